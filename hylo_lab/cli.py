"""The `hylo-lab` command. Each subcommand parses its arguments here and calls one library function;
heavy modules are imported only when their subcommand runs, so `hylo-lab --help` is instant."""

from __future__ import annotations

import argparse
import os
import sys

TRACKING_HELP = "MLflow tracking URI (default $MLFLOW_TRACKING_URI, else mlflow.db at the root of this checkout)"


def cmd_smoke(args):
    """Build a tiny hybrid with all four block types, prefill, decode and check it against a full forward."""
    import torch

    from hylo_lab import HyloCache, HyloConfig, HyloForCausalLM, cache_footprint

    torch.manual_seed(0)
    config = HyloConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, mixers=["mla", "gdn", "mamba2", "attention"],
                        kv_lora_rank=32, q_lora_rank=48, gdn_num_heads=2, gdn_head_dim=16)
    model = HyloForCausalLM(config).eval()
    ids = torch.randint(0, 256, (1, 48))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = HyloCache(config)
        steps = [model(ids[:, :40], past_key_values=cache).logits]
        steps += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(40, 48)]
    err = (torch.cat(steps, 1) - full).abs().max().item()
    fp = cache_footprint(config, 48, dtype=torch.float32)
    print(f"layers: {config.mixers}  params: {sum(p.numel() for p in model.parameters()):,}")
    print(f"prefill+decode vs full forward: max |diff| = {err:.2e}")
    print(f"cache after 48 tokens: {cache.nbytes()['total']:,} bytes measured, {fp['total_bytes']:,} predicted")
    if err > 1e-4:
        sys.exit("smoke run failed: cached decode disagrees with the full forward")


def cmd_upcycle(args):
    """Base checkpoint -> hybrid directory (hylo_lab.upcycle_io.upcycle_to_dir); prints plan, params, cache."""
    from hylo_lab.outputs import check_writable
    from hylo_lab.upcycle_io import upcycle_to_dir

    check_writable(args.out, "--out")
    kwargs = dict(layout=args.layout, mla_layers=_numbers(args.mla_layers, int, "--mla-layers") if args.mla_layers else None,
                  select=args.select, preset=args.preset, linear=args.linear, q_lora_rank=args.q_lora_rank,
                  kv_lora_rank=args.kv_lora_rank, qk_rope_head_dim=args.qk_rope_head_dim,
                  rank_energy=args.rank_energy, rope_init=args.rope_init, qk_norm=args.qk_norm,
                  mixer_init=args.mixer_init, mamba2_D=args.mamba2_d, dtype=args.dtype, seed=args.seed)
    print(upcycle_to_dir(args.base, args.out, calib_file=args.calib_file, calib_tokens=args.calib_tokens,
                         calib_len=args.calib_len, seq_lens=_numbers(args.seq_lens, int, "--seq-lens"), **kwargs))


def cmd_info(args):
    """Layer plan, parameter count and cache footprint vs the base for a saved hybrid or a preset."""
    from hylo_lab.describe import info_text

    print(info_text(args.target, _numbers(args.seq_lens, int, "--seq-lens")))


def _numbers(text: str, kind, flag: str) -> list:
    """"256, 512" -> [256, 512]; a bad item is a UserError naming the flag."""
    from hylo_lab.config import parse_list
    from hylo_lab.errors import UserError

    try:
        return parse_list(text, kind)
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected a comma list of {kind.__name__}s, e.g. {flag} "
                        f"{'256,512' if kind is int else '0,0.5,1'}") from None


def cmd_eval(args):
    """Evaluate a saved model on one or more suites (hylo_lab.eval.evaluate); print the tables, log to MLflow."""
    from hylo_lab.eval import check_request, evaluate, load_documents, summary_text
    from hylo_lab.tracking import Tracker

    def names(text):
        from hylo_lab.config import parse_list

        return parse_list(text) or None

    limit = int(args.limit) if args.limit and args.limit >= 1 else args.limit
    kwargs = dict(lengths=_numbers(args.lengths, int, "--lengths"), tasks=names(args.tasks),
                  depths=_numbers(args.depths, float, "--depths"), niah_task=args.niah_task,
                  num_samples=args.num_samples, haystack=args.haystack, qa_file=args.qa_file, documents=args.documents,
                  position_length=args.position_length, bucket_size=args.bucket_size,
                  harness_tasks=names(args.harness_tasks), include_path=args.include_path,
                  num_fewshot=args.num_fewshot, limit=limit, batch_size=args.batch_size,
                  prefill_chunk=args.prefill_chunk or None, decode_tokens=args.decode_tokens, device=args.device,
                  dtype=args.dtype)
    check_request(args.model, names(args.suite) or [], check_harness=False, **kwargs)
    if "ppl" in (names(args.suite) or []):
        kwargs["documents"] = load_documents(args.documents)
    if args.out_dir:
        from hylo_lab.outputs import check_writable

        check_writable(args.out_dir, "--out-dir")
    tracker = None
    if not args.no_track:
        tracker = Tracker(args.experiment, args.run_name, tracking_uri=args.tracking_uri,
                          tags={"model_path": args.model, "suite": args.suite, "command": "eval"})
        tracker = tracker if tracker.active else None
    try:
        results = evaluate(args.model, names(args.suite), seed=args.seed, tracker=tracker, out_dir=args.out_dir,
                           label=args.label, progress=True, **kwargs)
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    if tracker is not None:
        tracker.end()
    print(summary_text(results))
    if tracker is not None:
        _print_run_link(tracker.url())


def cmd_sweep(args):
    """Run every point of an ablation YAML with papermill: one MLflow parent run, one child run per point."""
    from hylo_lab.sweep import parse_only, parse_seeds, run_sweep

    executor = None
    if args.executor == "ray":
        from hylo_lab.executors import RayExecutor

        executor = RayExecutor(args.address, gpus_per_point=args.gpus_per_point, cpus_per_point=args.cpus_per_point)
    summary = run_sweep(args.sweep_file, jobs=args.jobs, dry_run=args.dry_run, only=parse_only(args.only),
                        out_dir=args.out_dir, tracking_uri=args.tracking_uri, executor=executor,
                        seeds=parse_seeds(args.seeds))
    if summary.attrs.get("parent_run_id"):
        from hylo_lab.tracking import run_url

        _print_run_link(run_url(summary.attrs["parent_run_id"], summary.attrs["tracking_uri"]), "the sweep's parent")
    failed = int((summary.status == "FAILED").sum())
    if failed:
        sys.exit(f"hylo-lab sweep: {failed} of {len(summary)} point(s) failed")


def cmd_compare(args):
    """A sweep's runs as a table and its plots as PNGs, logged to the sweep's parent run."""
    from hylo_lab.compare import compare

    from hylo_lab.compare import print_statistics

    frame, figures = compare(args.sweep, tracking_uri=args.tracking_uri, out_dir=args.out_dir,
                             paired_points=args.paired, from_points=args.from_points)
    print(frame.drop(columns=["run_id"]).to_string(index=False, float_format="{:.4g}".format))
    print_statistics(frame)
    print(f"{len(figures)} figure(s), runs.csv and aggregates.csv in {frame.attrs['out_dir']}"
          + (f", logged to parent run {frame.attrs['parent_run_id']}" if frame.attrs.get("parent_run_id") else ""))


def cmd_distill(args):
    """Run a distillation recipe: stage 1 Enhanced-ILD, assembly, stage-2 KD stages (hylo_lab.distill)."""
    import json
    import shlex
    from pathlib import Path

    from hylo_lab.distill.stages import load_recipe
    from hylo_lab.distill.trainer import Distiller, NonFiniteLoss, run_recipe
    from hylo_lab.errors import UserError

    if args.output_dir is not None and not args.output_dir.strip():
        raise UserError("--output-dir is empty; give a folder, or leave it out to use the recipe's output_dir")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps {args.max_steps}: give a number of optimizer steps >= 1")
    if args.allow_recipe_change and not args.resume:
        raise UserError("--allow-recipe-change applies to --resume only")
    try:
        recipe = load_recipe(args.recipe)
        if args.output_dir:
            recipe.output_dir = args.output_dir
        if args.no_mlflow:
            recipe.tracking.enabled = False
        if args.check:
            Distiller(recipe, resume=args.resume, allow_recipe_change=args.allow_recipe_change).setup()
            print(f"recipe {args.recipe} is valid: " + ", ".join(
                f"{st.name} ({st.kind}, {st.seq_len} tokens, {st.num_steps(recipe.stage_batch(st)[0])} steps)"
                for st in recipe.stages))
            return
        summary = run_recipe(recipe, resume=args.resume, max_steps=args.max_steps,
                             allow_recipe_change=args.allow_recipe_change, overall=True)
    except (NonFiniteLoss, OSError) as exc:
        sys.exit(f"hylo-lab distill: {exc}")
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch / torchrun only rank 0 reports
        return
    for run, info in summary["runs"].items():
        if info.get("diverged"):
            d = info["diverged"]
            print(f"warning: {run} diverged (held-out KL {d['best_kl']:.4g} at step {d['best_step']} -> "
                  f"{d['final_kl']:.4g} at the end); its best weights are in {d['best_dir']}", file=sys.stderr)
    if summary["stopped_early"]:
        again = ["hylo-lab", "distill", args.recipe, "--resume"]
        again += ["--output-dir", args.output_dir] if args.output_dir else []
        again += ["--no-mlflow"] if args.no_mlflow else []
        print(f"stopped after --max-steps {args.max_steps}; continue with: {shlex.join(again)}")
    else:
        print(f"final model: {summary['final_model']}")
    record = Path(summary["output_dir"]) / "mlflow_run.json"  # preflight.make_tracker's record of the run it logs to
    if recipe.tracking.enabled and record.is_file():
        from hylo_lab.tracking import run_url

        logged = json.loads(record.read_text())
        _print_run_link(run_url(logged.get("run_id", ""), logged.get("tracking_uri")))


def _print_run_link(url: str, what: str = "") -> None:
    """The last line of a command that logged to MLflow: where its run opens ("" prints nothing)."""
    if url:
        print(f"MLflow run{f' ({what})' if what else ''}: {url}")


def cmd_demo(args):
    """The toy HyLo recipe end to end: execute notebooks/00_quickstart.ipynb, write it, its HTML and figures."""
    from hylo_lab.demo import report_text, run_demo

    summary = run_demo(quick=args.quick, linear=args.linear, out_dir=args.out, tracking_uri=args.tracking_uri or "",
                       experiment=args.experiment)
    print(report_text(summary))


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: `hylo-lab eval: argument --lengths: ... (see hylo-lab eval --help)`, code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hylo-lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("smoke", help="build a tiny hybrid and check cached decode against a full forward")
    p.set_defaults(func=cmd_smoke)

    p = sub.add_parser("upcycle", help="convert a Llama / Mistral / Qwen2 / Qwen3 checkpoint into a hybrid directory")
    p.add_argument("--base", required=True, help="local directory or hub id of the base causal LM")
    p.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--layout", help="e.g. 4MLA12GDN or 8MLA8M2 (MLA layers evenly spaced unless placed otherwise)")
    p.add_argument("--mla-layers", help="explicit 0-based MLA layer indices, e.g. 1,5,10,14")
    p.add_argument("--select", choices=("uniform", "smart"), help="place the layout's MLA layers evenly or by SMART")
    p.add_argument("--preset", help="a paper preset, e.g. llama3.2-1b/4MLA12GDN (layers and dims)")
    p.add_argument("--linear", help="linear block for --mla-layers without --layout: gdn | mamba2 (a linear row of "
                                    "hylo_lab.mixers.MIXERS)")
    p.add_argument("--q-lora-rank", type=int,
                   help="query latent rank (0 = no query compression; omitted: the default size)")
    p.add_argument("--kv-lora-rank", type=int, help="KV latent rank")
    p.add_argument("--qk-rope-head-dim", type=int, help="MLA RoPE width per head (a divisor of head_dim)")
    p.add_argument("--rank-energy", type=float, help="choose unset ranks by kept singular-value energy, e.g. 0.95")
    p.add_argument("--rope-init", choices=("filled", "random"), default="filled", help="MLA RoPE rows (default filled)")
    p.add_argument("--qk-norm", choices=("fold", "drop"), default="fold", help="Qwen3 q/k norms in MLA/linear blocks")
    p.add_argument("--mixer-init", choices=("attention", "random"), default="attention",
                   help="initialise mixers from the base attention (default) or leave them fresh")
    p.add_argument("--mamba2-d", type=float, default=0.0, help="D skip of upcycled Mamba2 blocks (default 0; 1 = MambaInLlama)")
    p.add_argument("--dtype", help="output dtype, e.g. bfloat16 (default: the base's)")
    p.add_argument("--seed", type=int, default=0, help="seed of every freshly initialised weight")
    p.add_argument("--calib-file", help="text file for SMART / the q/k-norm fold (default: random token ids)")
    p.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens (default 2048)")
    p.add_argument("--calib-len", type=int, default=256, help="calibration row length (default 256)")
    p.add_argument("--seq-lens", default="8192,65536", help="sequence lengths for the cache comparison")
    p.set_defaults(func=cmd_upcycle)

    p = sub.add_parser("info", help="layer plan, parameters and cache footprint of a hybrid directory or preset")
    p.add_argument("target", help="a saved hybrid directory or a preset name such as llama3.2-1b/4MLA12GDN")
    p.add_argument("--seq-lens", default="8192,65536", help="sequence lengths for the cache comparison")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval", help="evaluate a saved model: RULER, NIAH grid, perplexity, lm-eval tasks, efficiency")
    p.add_argument("model", help="a saved model folder (HyLo or any transformers causal LM) with its tokenizer")
    p.add_argument("--suite", default="ruler", help="comma list of ruler, niah, ppl, harness, efficiency")
    p.add_argument("--lengths", default="1024", help="context lengths in tokens, e.g. 256,512,1024")
    p.add_argument("--tasks", help="RULER tasks (default all 13), e.g. niah_single_1,vt")
    p.add_argument("--depths", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", help="NIAH needle depths")
    p.add_argument("--niah-task", default="niah_single_1", help="the task of the NIAH grid")
    p.add_argument("--num-samples", type=int, default=4, help="samples per task, length (and depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--haystack", help="noise, essay, or a .txt file / folder of .txt files")
    p.add_argument("--qa-file", help="jsonl of question/answers/context records for qa_1 and qa_2")
    p.add_argument("--documents", help="ppl: a .jsonl (field text), a .txt file or a folder of .txt files")
    p.add_argument("--position-length", type=int, help="ppl by position: document length (default max length)")
    p.add_argument("--bucket-size", type=int, help="ppl by position: bucket width (default length / 8)")
    p.add_argument("--harness-tasks", help="lm-eval tasks (default the paper's eight)")
    p.add_argument("--include-path", help="folder of local lm-eval YAML tasks")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--limit", type=float, help="lm-eval docs per task (>= 1) or fraction (< 1)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prefill-chunk", type=int, default=2048, help="prefill chunk in tokens (0 = one pass)")
    p.add_argument("--decode-tokens", type=int, default=16, help="efficiency: timed decode steps per length")
    p.add_argument("--device", help="default: cuda when available")
    p.add_argument("--dtype", help="e.g. bfloat16 (default: as saved)")
    p.add_argument("--out-dir", help="save samples, predictions and tables under this folder")
    p.add_argument("--label", default="", help="name of this model in metric names, e.g. teacher")
    p.add_argument("--experiment", default="eval", help="MLflow experiment")
    p.add_argument("--run-name", help="MLflow run name")
    p.add_argument("--tracking-uri", help=TRACKING_HELP)
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("distill", help="run a distillation recipe (stage 1 ILD, assembly, stage-2 KD / YaRN stages)")
    p.add_argument("recipe", help="a recipe YAML (recipes/toy.yaml, recipes/llama3.2-1b-4mla12gdn-8k.yaml, ...)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in output_dir: finished stages are skipped, an interrupted one continues "
                        "from its newest checkpoint (model, optimizer, data position, RNG)")
    p.add_argument("--max-steps", type=int, metavar="N",
                   help="stop after N optimizer steps in this invocation (all stages together), with a checkpoint")
    p.add_argument("--allow-recipe-change", action="store_true",
                   help="with --resume: continue although the recipe differs from the run's recorded one (the "
                        "change is appended to recipe_changes.yaml)")
    p.add_argument("--output-dir", help="override the recipe's output_dir")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--check", action="store_true",
                   help="validate the recipe, tokenizer, teacher and data (no weights loaded), then exit")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("sweep", help="run an ablation YAML: one papermill execution and MLflow child run per point")
    p.add_argument("sweep_file", help="ablations/NAME.yaml")
    p.add_argument("--jobs", type=int, default=1, help="points run in parallel processes (default 1)")
    p.add_argument("--dry-run", action="store_true", help="print the points and what they would run, run nothing")
    p.add_argument("--only", action="append", metavar="KEY=VALUE",
                   help="run only points with this parameter value (repeat: same key = any of, keys = all of)")
    p.add_argument("--out-dir", help="executed notebooks go here (default runs/sweeps/NAME/)")
    p.add_argument("--seeds", metavar="0,1,2", help="these seeds instead of the YAML's `seeds`")
    p.add_argument("--tracking-uri", help=TRACKING_HELP)
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: papermill processes here (default); ray: one Ray task per point (pip install "
                        "'hylo_lab[ray]')")
    p.add_argument("--address", help="Ray cluster address HOST:PORT (default $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--gpus-per-point", type=float, default=0.0, help="GPUs a point reserves on Ray; 0.25 packs 4 "
                   "points per GPU (default 0)")
    p.add_argument("--cpus-per-point", type=float, default=1.0, help="CPUs a point reserves on Ray (default 1)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("compare", help="a sweep's runs as a table and its plots, saved and logged to MLflow")
    p.add_argument("sweep", help="ablations/NAME.yaml or a sweep name already in MLflow")
    p.add_argument("--out-dir", help="figures and runs.csv go here (default ablations/results/NAME/)")
    p.add_argument("--tracking-uri", help=TRACKING_HELP)
    p.add_argument("--paired", nargs=2, action="append", metavar=("A", "B"),
                   help='point A vs point B, seeds paired: mean difference A - B and its 95%% CI per metric, e.g. '
                        '--paired "layout=2MLA2GDN;linear=gdn" "layout=3MLA1GDN;linear=gdn" (repeatable)')
    p.add_argument("--from-points", action="store_true",
                   help="read the YAML's exported points (results/NAME/points/*.json) instead of MLflow")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="the whole toy HyLo recipe end to end (teachers, upcycle, ILD, KD + YaRN, "
                                    "evaluation at 1x-32x, report)")
    p.add_argument("--quick", action="store_true", help="tiny models and few steps: every step in about a minute (CI)")
    p.add_argument("--linear", default="gdn", help="linear block of the hybrid: gdn (default) | mamba2 (a linear row "
                                                   "of hylo_lab.mixers.MIXERS)")
    p.add_argument("--out", help="output folder (default runs/demo, runs/demo-quick with --quick)")
    p.add_argument("--experiment", default="quickstart", help="MLflow experiment (default quickstart)")
    p.add_argument("--tracking-uri", help=TRACKING_HELP)
    p.set_defaults(func=cmd_demo)

    return parser


def _one_line(message: str) -> str:
    """"file: 2 problems:\n  - a\n  - b" -> "file: 2 problems: a; b" (a terminal line per error, not a list)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) < 2:
        return message.strip()
    rest = "; ".join(line.removeprefix("- ") for line in lines[1:])
    return f"{lines[0]} {rest}" if lines[0].endswith(":") else f"{lines[0]}; {rest}"


def main(argv=None):
    import warnings

    from hylo_lab.errors import UserError
    from hylo_lab.tracking import TrackingUnavailable

    args, extra = build_parser().parse_known_args(argv)
    if extra:
        print(f"hylo-lab {args.command}: unrecognized arguments: {' '.join(extra)} (see hylo-lab {args.command} "
              "--help)", file=sys.stderr)
        sys.exit(2)
    warnings.filterwarnings("ignore", message="MLflow logging disabled")  # Tracker prints its own one line
    try:
        args.func(args)
    except UserError as exc:
        print(f"hylo-lab {args.command}: {_one_line(str(exc))}", file=sys.stderr)
        sys.exit(2)
    except TrackingUnavailable as exc:
        print(f"hylo-lab {args.command}: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit("interrupted")


if __name__ == "__main__":
    main()
