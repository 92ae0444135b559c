"""Search the toy world's knobs on a GPU: train teacher variants and run the demo's pipeline on each, in parallel.

    python benchmarks/toy_search.py VARIANTS.json --out DIR [--workers 6] [--deadline 540]
    python benchmarks/toy_search.py --report DIR/search.json [...] > table.md

VARIANTS.json is a list of {"name": ..., "teacher": {...}, "demo": {...}, "recipe": {...}}: "teacher" overrides
the teachers' training settings (the recipe field toy_world.training: any `train_teacher` keyword, e.g. steps,
lr, copy_len), "demo" sets `DemoSettings` (e.g. eval_samples) and "recipe" fields of recipes/demo.yaml as dotted
keys ({"data.synthetic.fraction": 0.6}); optional: "base" (the teacher to train, default the demo's llama-s),
"world" (toy_world recipe fields, e.g. {"digit_group": 2}; the old constant names such as DIGIT_GROUP are read
too) and "teacher_only" ({"samples": N, "lengths": [...]}: train and evaluate the teacher alone, no hybrid; `teacher_only`
below). Each variant runs in its own process:
teacher (cached under DIR/world by its settings, so variants that share a teacher train it once per process
that gets there first) -> the demo's functions (distill, evaluate, summarize; no notebook) -> DIR/<name>/.
Everything runs in float32 (teacher training, distillation and the teacher in it) so the numbers carry over to
the CPU demo. DIR/search.json collects every variant's summary, per-task NIAH table and seconds (written after
each variant finishes, so a killed search keeps what finished); a failed variant records its error.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import sys
import time
import traceback
from pathlib import Path


WORLD_KEYS = ("digit_group",)


def world_fields(variant: dict) -> dict:
    """The variant's "world" as toy_world recipe fields ({"DIGIT_GROUP": 2} -> {"digit_group": 2})."""
    out = {str(k).lower(): v for k, v in variant.get("world", {}).items()}
    unknown = sorted(set(out) - set(WORLD_KEYS))
    if unknown:
        raise ValueError(f"variant {variant.get('name')!r}: unknown world keys {unknown}; known: {WORLD_KEYS}")
    return out


def recipe_overrides(variant: dict) -> dict:
    """The variant as dotted recipe keys: base, teacher training (float32), world fields, its "recipe" keys."""
    base = variant.get("base", "llama-s")
    recipe = {"base": f"toy:{base}", "toy_world.training": dict(bf16=False, **variant.get("teacher", {})),
              **{f"toy_world.{k}": v for k, v in world_fields(variant).items()}, **variant.get("recipe", {})}
    if "teacher_only" in variant:  # no stage-2 teacher to train
        recipe["teacher"] = f"toy:{base}"
    return recipe


def run_variant(variant: dict, out: str) -> dict:
    import torch

    torch.set_num_threads(2)
    from hylo_lab import demo
    from hylo_lab.distill.stages import format_overrides

    name = variant["name"]
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["HYLO_LAB_HOME"] = str(Path(out) / "world")
    sys.stderr = open(folder / "log.txt", "w", buffering=1)
    t0 = time.perf_counter()
    settings = demo.DemoSettings(**dict(variant.get("demo", {}), out_dir=str(folder), experiment=name,
                                        overrides=format_overrides(recipe_overrides(variant)),
                                        tracking_uri=f"sqlite:///{folder.resolve()}/mlflow.db"))
    tracker = demo.start(settings)
    world = demo.prepare_world(settings, tracker)
    t_teacher = time.perf_counter() - t0
    report = demo.teacher_check(settings, world, tracker)
    if "teacher_only" in variant:
        return dict(variant=variant, seconds=dict(teacher=t_teacher), teacher_check=report,
                    teacher_only=teacher_only(settings, world, folder, report, **variant["teacher_only"]))
    recipe = demo.build_recipe(settings, world)
    recipe["train"].update(precision="fp32", teacher_dtype="float32")
    hybrid_dir = demo.distill(settings, recipe, tracker)
    t_distill = time.perf_counter() - t0 - t_teacher
    models = demo.load_models(settings, world, hybrid_dir)
    results = demo.evaluate_models(settings, models, world, tracker)
    summary = demo.summarize(settings, results, report, tracker)
    tasks = [c for c in results.columns if c.startswith("niah_")]
    return dict(variant=variant, summary=summary, teacher_check=report, seconds=dict(
        teacher=t_teacher, distill=t_distill, total=time.perf_counter() - t0),
        niah=results[["model", "length", "niah"] + tasks].round(3).to_dict("records"))


def teacher_only(settings, world, folder: Path, check: dict, samples: int = 128, lengths=(256, 512)) -> dict:
    """The base teacher alone on the demo's evaluation path (run_ruler, seeds 1000+) with `samples` samples per
    task and length, its failures at the shortest length, and the held-out perplexity vs unigram of `check`
    (demo.teacher_check)."""
    import torch

    from hylo_lab import demo
    from hylo_lab.eval.ruler import run_ruler

    tok, model = world.tokenizer(), world.teacher(settings.base).to("cuda" if torch.cuda.is_available() else "cpu")
    res = run_ruler(model, tok, list(lengths), tasks=demo.NIAH_TASKS, num_samples=samples, seed=1000,
                    batch_size=64, out_dir=folder / "niah")
    niah = {f"{r.length}/{r.task}": r.score for r in res["table"].itertuples()}
    fails = [r for r in res["records"] if r["score"] < 1 and r["length"] == min(lengths)]
    return dict(niah=niah, failures=[(r["answers"][0], r["prediction"]) for r in fails][:24],
                failures_with_a_doubled_digit=sum(any(a == b for a, b in zip(r["answers"][0], r["answers"][0][1:]))
                                                  for r in fails),
                heldout_ppl=check["heldout_ppl"], unigram_ppl=check["unigram_ppl"])


def _line(res: dict) -> str:
    """One line of progress for a finished variant."""
    if "error" in res:
        return res["error"].splitlines()[-1]
    if "teacher_only" in res:
        t = res["teacher_only"]
        return f"teacher only {t['niah']}, ppl {t['heldout_ppl']:.3f}, {res['seconds']['teacher']:.0f} s"
    s = res["summary"]
    return (f"teacher@1x {s['teacher_niah_1x']:.2f}, hybrid@{s['longest']} {s['hybrid_niah_longest']:.2f}, "
            f"teacher+yarn beyond 4x {s['teacher_yarn_niah_beyond_4x_max']:.2f}, ppl ratio {s['ppl_ratio']:.3f}, "
            f"{res['seconds']['total']:.0f} s")


def _guarded(variant: dict, out: str) -> dict:
    try:
        return run_variant(variant, out)
    except Exception:  # recorded, the search goes on
        return dict(variant=variant, error=traceback.format_exc())


def report(paths) -> str:
    """One markdown table row per variant of the given search.json files: its overrides, the teacher check, and
    NIAH per model and length as single_1/single_2 (the demo's tasks)."""
    lines = ["| search | variant | overrides | teacher check (1x) | model | " + " | ".join(
        str(n) for n in (256, 512, 1024, 2048, 4096, 8192)) + " | ppl ratio |", "|" + "---|" * 12]
    for path in paths:
        for name, res in json.loads(Path(path).read_text())["done"].items():
            v = res["variant"]
            over = "; ".join(f"{k}: {json.dumps(v[k])}" for k in ("teacher", "demo") if v.get(k))
            over += "; recipe: " + json.dumps({k: x for k, x in v.get("recipe", {}).items() if "eval" not in k})
            over += "".join(f"; {k}: {json.dumps(v[k])}" for k in ("base", "world") if v.get(k))
            if "error" in res:
                lines.append(f"| {Path(path).parent.name} | {name} | {over} | error: "
                             f"{res['error'].strip().splitlines()[-1]} |" + " |" * 8)
                continue
            if "teacher_only" in res:
                t = res["teacher_only"]
                cells = ["/".join(f"{x:.2f}" for k, x in t["niah"].items() if k.startswith(f"{n}/"))
                         for n in (256, 512, 1024, 2048, 4096, 8192)]
                lines.append(f"| {Path(path).parent.name} | {name} | {over} | | teacher only | " + " | ".join(cells)
                             + f" | ppl {t['heldout_ppl']:.3f} |")
                continue
            check = "/".join(f"{x:.2f}" for x in res["teacher_check"]["niah_tasks"].values())
            tasks = [k for k in res["niah"][0] if k.startswith("niah_")]
            for model in ("teacher", "teacher_yarn", "hybrid"):
                cells = ["/".join(f"{r[t]:.2f}" for t in tasks) for r in res["niah"] if r["model"] == model]
                first = model == "teacher"
                head = f"| {Path(path).parent.name} | {name} | {over} | {check} |" if first else "| | | | |"
                ppl = f" {res['summary']['ppl_ratio']:.3f} |" if model == "hybrid" else " |"
                lines.append(f"{head} {model} | " + " | ".join(cells) + " |" + ppl)
    return "\n".join(lines)


def main(argv=None) -> None:
    if argv is None and sys.argv[1:2] == ["--report"]:
        print(report(sys.argv[2:]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", help="JSON file: a list of variants")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--deadline", type=float, default=540.0, help="seconds; unfinished variants are reported")
    args = p.parse_args(argv)
    variants = json.loads(Path(args.variants).read_text())
    names = [v["name"] for v in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"variant names must be unique: {names}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Build the corpus and tokenizer once before the workers start (they would race to build it).
    os.environ["HYLO_LAB_HOME"] = str(out / "world")
    from hylo_lab.data import toy

    for world in {json.dumps(world_fields(v), sort_keys=True) for v in variants}:
        toy.get_toy_world(teachers=(), progress=False, **json.loads(world))
    done: dict[str, dict] = {}

    def save():  # after every finished variant, so a killed search keeps what finished
        pending = [n for n in names if n not in done]
        (out / "search.json").write_text(json.dumps(dict(done=done, pending=pending), indent=1, default=str))

    t0 = time.perf_counter()
    pool = cf.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                                  max_tasks_per_child=1)
    futures = {pool.submit(_guarded, v, str(out)): v["name"] for v in variants}
    try:
        for fut in cf.as_completed(futures, timeout=args.deadline):
            res = fut.result()
            done[futures[fut]] = res
            print(f"[{time.perf_counter() - t0:5.0f} s] {futures[fut]}: {_line(res)}", flush=True)
            save()
    except cf.TimeoutError:
        print(f"deadline: unfinished {[n for n in names if n not in done]}", flush=True)
    save()
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in multiprocessing.active_children():  # idle or late workers: stop them (they hold stdout open)
        proc.terminate()
    os._exit(0)  # do not wait for workers past the deadline


if __name__ == "__main__":
    main()
