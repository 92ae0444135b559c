"""Evaluation: one call per model and suite list, for notebooks, the CLI and the demo.

    evaluate(model, ["ruler", "niah", "ppl", "efficiency"], tokenizer=tok, lengths=[256, 512, ..., 8192],
             documents=texts, tracker=tracker, label="teacher")

Suites: ruler (ruler.py), niah (niah.py), ppl (perplexity.py), harness (harness.py), efficiency
(efficiency.py). lm-eval, seaborn and matplotlib are imported only when a suite needs them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..errors import UserError
from .niah import DEFAULT_DEPTHS

SUITES = ("ruler", "niah", "ppl", "harness", "efficiency")


def load_model(path, *, device=None, dtype=None, tokenizer: bool = True):
    """(model, tokenizer) from a saved folder (a HyLo checkpoint or any transformers causal LM), in eval mode
    on `device` (default: cuda when available) with `dtype` ("bfloat16", "float32", a torch dtype, None=as saved);
    tokenizer=False skips loading the tokenizer (None is returned in its place)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hylo_lab  # noqa: F401  registers model_type "hylo" with the Auto classes

    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), AutoTokenizer.from_pretrained(str(path)) if tokenizer else None


def load_documents(source) -> list:
    """Documents for perplexity: a list (texts or token lists) as is; a .jsonl path (field "text" of each line),
    a .txt file (one document), or a folder of .txt files (one document each, sorted). A path that is missing,
    unreadable, malformed or holds no document raises UserError."""
    import json

    if not isinstance(source, (str, Path)):
        return source
    p = Path(source)
    try:
        if p.is_dir():
            docs = [f.read_text(encoding="utf-8") for f in sorted(p.rglob("*.txt"))]
        elif p.suffix == ".jsonl":
            docs = []
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise UserError(f"documents {p}:{n}: each line must be a JSON object with a string 'text'")
                    docs.append(record["text"])
        else:
            docs = [p.read_text(encoding="utf-8")]
    except FileNotFoundError:
        raise UserError(f"documents {p}: no such file or folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"documents {p}: cannot be read ({exc})") from None
    if not any(d.strip() for d in docs):
        raise UserError(f"documents {p}: holds no text (a .jsonl with 'text' fields, a .txt file or a folder of .txt)")
    return docs


def _load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # transformers raises OSError, ValueError or TypeError for a missing tokenizer
        raise UserError(f"{path} has no usable tokenizer ({type(exc).__name__}); save it beside the weights with "
                        "tokenizer.save_pretrained(folder)") from None


def check_request(model, suites, *, lengths, tasks, depths, niah_task, num_samples, haystack, qa_file, documents,
                  position_length, bucket_size, harness_tasks, include_path, num_fewshot, limit, batch_size,
                  prefill_chunk, decode_tokens, device, dtype, check_harness: bool = True) -> None:
    """Every check `evaluate` can make without weights (lm-eval's tasks and their data too, unless
    check_harness=False); raises UserError naming each bad value."""
    import torch

    from ..data import tasks as T

    problems = []

    def positive(name, value, minimum=1, optional=False):
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            problems.append(f"{name} must be an integer >= {minimum}, got {value!r}")

    unknown = [s for s in suites if s not in SUITES]
    if unknown or not suites:
        problems.append(f"unknown suite(s) {', '.join(map(repr, unknown)) or '(none given)'}; choose from "
                        f"{', '.join(SUITES)}")
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.exists():
            problems.append(f"model {path}: no such folder")
        elif not path.is_dir() or not (path / "config.json").is_file():
            problems.append(f"model {path}: not a saved model folder (no config.json)")
    if not lengths:
        problems.append("give at least one length")
    for n in lengths:
        positive("every length", n)
    if tasks is not None:
        bad = [t for t in tasks if t not in T.RULER_TASKS]
        if bad or not tasks:
            problems.append(f"unknown RULER task(s) {', '.join(map(repr, bad))}; choose from {', '.join(T.RULER_TASKS)}")
    if "niah" in suites:
        if niah_task not in T.NIAH_TASKS:
            problems.append(f"the NIAH grid needs a niah_* task, got {niah_task!r}; choose from "
                            f"{', '.join(T.NIAH_TASKS)}")
        if not depths or any(not 0 <= d <= 1 for d in depths):
            problems.append(f"depths must lie in [0, 1], got {list(depths)}")
    positive("num_samples", num_samples)
    positive("batch_size", batch_size)
    positive("prefill_chunk", prefill_chunk, 0, optional=True)
    positive("decode_tokens", decode_tokens)
    positive("position_length", position_length, optional=True)
    positive("bucket_size", bucket_size, optional=True)
    positive("num_fewshot", num_fewshot, 0, optional=True)
    if limit is not None and not limit > 0:
        problems.append(f"limit must be > 0 (docs per task, or a fraction below 1), got {limit!r}")
    if haystack not in (None, "noise", "essay") and not Path(haystack).exists():
        problems.append(f"haystack {haystack!r}: choose noise, essay, or an existing .txt file or folder")
    if qa_file is not None and (tasks is None or any(t.startswith("qa_") for t in tasks)) and "ruler" in suites:
        try:
            T.load_qa_records(qa_file)
        except (ValueError, OSError) as exc:
            problems.append(f"qa_file {qa_file}: {exc}")
    if "ppl" in suites and documents is None:
        problems.append("the ppl suite needs documents (a .jsonl with 'text' fields, a .txt file or a folder of .txt)")
    if include_path is not None and not Path(include_path).exists():
        problems.append(f"include_path {include_path}: no such file or folder")
    if device is not None:
        try:
            dev = torch.device(device)
            if dev.type == "cuda" and not torch.cuda.is_available():
                problems.append(f"device {device!r}: no CUDA device here; leave --device out or use cpu")
        except (RuntimeError, ValueError):
            problems.append(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)")
    if isinstance(dtype, str) and dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
        problems.append(f"dtype {dtype!r} is not a torch dtype (float32, bfloat16, float16, ...)")
    if problems:
        raise UserError("; ".join(problems))
    if "harness" in suites and check_harness:
        from .harness import PAPER_HARNESS_TASKS, check_tasks, task_manager

        names = harness_tasks or PAPER_HARNESS_TASKS
        check_tasks(names, task_manager(names, include_path))


def evaluate(model, suite="ruler", *, tokenizer=None, lengths=(1024,), tasks=None, depths=DEFAULT_DEPTHS,
             niah_task: str = "niah_single_1", num_samples: int = 4, seed: int = 0, haystack: str | None = None,
             qa_file=None, documents=None, position_length: int | None = None, bucket_size: int | None = None,
             harness_tasks=None, include_path=None, num_fewshot: int = 0, limit=None, batch_size: int = 1,
             prefill_chunk: int | None = 2048, decode_tokens: int = 16, device=None, dtype=None, tracker=None,
             out_dir=None, label: str = "", progress: bool = False) -> dict:
    """Run one suite or several on a model object (with `tokenizer`) or a saved folder. Returns {suite: result}:

    ruler -> run_ruler's dict; niah -> run_niah_grid's DataFrame; ppl -> run_perplexity's dict (needs
    `documents`: texts, token lists or a path, see load_documents); harness -> run_harness's dict (tasks:
    `harness_tasks`, default the paper's eight); efficiency -> measure_efficiency's rows.

    Results go to `out_dir/<suite>[_<label>]` and to `tracker` under metric names carrying `label`, so several
    models (teacher, upcycled students) can be logged side by side in one MLflow run.
    Every input that needs no weights is checked first (check_request: UserError), and `out_dir` must be
    writable; its suite folders are written beside it and moved into place only when every suite has run.
    progress=True prints the overall line (progress.Overall) on stderr as each suite starts (`part_costs`).
    """
    suites = [s.strip() for s in suite.split(",")] if isinstance(suite, str) else list(suite)
    lengths = [lengths] if isinstance(lengths, int) else list(lengths)
    check_request(model, suites, lengths=lengths, tasks=tasks, depths=depths, niah_task=niah_task,
                  num_samples=num_samples, haystack=haystack, qa_file=qa_file, documents=documents,
                  position_length=position_length, bucket_size=bucket_size, harness_tasks=harness_tasks,
                  include_path=include_path, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                  prefill_chunk=prefill_chunk, decode_tokens=decode_tokens, device=device, dtype=dtype)
    if "ppl" in suites:
        documents = load_documents(documents)
    if out_dir is not None:
        from ..outputs import check_writable

        out_dir = check_writable(out_dir, "out_dir")
    if isinstance(model, (str, Path)):
        if tokenizer is None and any(s != "efficiency" for s in suites):
            tokenizer = _load_tokenizer(model)
        model, _ = load_model(model, device=device, dtype=dtype, tokenizer=False)
    elif device is not None or dtype is not None:
        import torch

        model = model.to(device=device, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    model.eval()
    if tokenizer is None and any(s != "efficiency" for s in suites):
        raise UserError("pass tokenizer= (only the efficiency suite runs without one)")
    with contextlib.ExitStack() as stack:
        stage = None
        if out_dir is not None:
            from ..outputs import staged

            stage = stack.enter_context(staged(out_dir))
        results = _run_suites(model, suites, stage, locals())
    for res in results.values():
        if isinstance(res, dict) and res.get("out_dir") is not None:
            res["out_dir"] = out_dir / Path(res["out_dir"]).name
    return results


def _run_suites(model, suites, stage, args: dict) -> dict:
    """evaluate's loop over suites (`args`: evaluate's arguments), writing under the folder `stage` when given."""
    import sys
    from types import SimpleNamespace

    from ..progress import Overall

    a = SimpleNamespace(**args)
    costs = part_costs(suites, a.lengths, tasks=a.tasks, depths=a.depths, num_samples=a.num_samples,
                       documents=a.documents, batch_size=a.batch_size, decode_tokens=a.decode_tokens,
                       harness_tasks=a.harness_tasks, limit=a.limit)
    overall = Overall("eval", costs, relative=True, echo=(lambda line: print(line, file=sys.stderr, flush=True))
                      if a.progress else (lambda line: None))

    def where(name):
        return None if stage is None else Path(stage) / f"{name}{'_' + a.label if a.label else ''}"

    common = dict(batch_size=a.batch_size, prefill_chunk=a.prefill_chunk, tracker=a.tracker, label=a.label)
    results = {}
    part = {name.split()[0]: name for name in costs}
    for s in suites:
        overall.step(part[s])
        if s == "ruler":
            from ..data.tasks import RULER_TASKS
            from .ruler import run_ruler

            results[s] = run_ruler(model, a.tokenizer, a.lengths, tasks=a.tasks or RULER_TASKS,
                                   num_samples=a.num_samples, seed=a.seed, haystack=a.haystack, qa_file=a.qa_file,
                                   out_dir=where(s), **common)
        elif s == "niah":
            from .niah import run_niah_grid

            results[s] = run_niah_grid(model, a.tokenizer, a.lengths, a.depths, task=a.niah_task,
                                       num_samples=a.num_samples, seed=a.seed, haystack=a.haystack, out_dir=where(s),
                                       **common)
        elif s == "ppl":
            from .perplexity import run_perplexity

            results[s] = run_perplexity(model, a.documents, a.lengths, tokenizer=a.tokenizer,
                                        position_length=a.position_length, bucket_size=a.bucket_size,
                                        out_dir=where(s), **common)
        elif s == "harness":
            from .harness import PAPER_HARNESS_TASKS, run_harness

            results[s] = run_harness(model, a.tokenizer, a.harness_tasks or PAPER_HARNESS_TASKS,
                                     include_path=a.include_path, num_fewshot=a.num_fewshot, batch_size=a.batch_size,
                                     limit=a.limit, seed=a.seed, tracker=a.tracker, out_dir=where(s), label=a.label)
        else:
            from .efficiency import measure_efficiency

            rows = measure_efficiency(model, a.lengths, batch_size=a.batch_size, prefill_chunk=a.prefill_chunk,
                                      decode_tokens=a.decode_tokens, seed=a.seed, tracker=a.tracker, label=a.label)
            if stage is not None:
                import pandas as pd

                from ..plots import efficiency_figure

                where(s).mkdir(parents=True, exist_ok=True)
                pd.DataFrame(rows).to_csv(where(s) / "efficiency.csv", index=False)
                efficiency_figure(rows, title=f"efficiency {a.label}".strip()).savefig(
                    where(s) / f"{where(s).name}.png", dpi=120, bbox_inches="tight")
            results[s] = rows
    overall.done()
    return results


HARNESS_DOC_TOKENS = 4 * 256  # a guess per lm-eval doc (a few choices of a few hundred tokens): its cost is unknown


def part_costs(suites, lengths, *, tasks=None, depths=DEFAULT_DEPTHS, num_samples=4, documents=None, batch_size=1,
               decode_tokens=16, harness_tasks=None, limit=None) -> dict:
    """{part name: relative cost} for the overall progress line, one part per suite ("niah 256..8192"), the cost
    being the tokens the model reads:
        ruler: tasks x samples x sum(lengths)      niah: depths x samples x sum(lengths)
        ppl: documents x max(lengths)              efficiency: batch x sum(length + decode_tokens)
        harness: tasks x docs x HARNESS_DOC_TOKENS (docs: `limit`, else 1000)"""
    from ..data.tasks import RULER_TASKS
    from .harness import PAPER_HARNESS_TASKS

    span = f"{min(lengths)}..{max(lengths)}" if len(set(lengths)) > 1 else str(lengths[0])
    n_docs = len(documents) if isinstance(documents, (list, tuple)) else 1
    harness_docs = limit if limit is not None and limit >= 1 else 1000
    cost = dict(ruler=len(tasks or RULER_TASKS) * num_samples * sum(lengths),
                niah=len(depths) * num_samples * sum(lengths),
                ppl=n_docs * max(lengths),
                efficiency=batch_size * sum(n + decode_tokens for n in lengths),
                harness=len(harness_tasks or PAPER_HARNESS_TASKS) * harness_docs * HARNESS_DOC_TOKENS)
    return {(s if s == "harness" else f"{s} {span}"): float(cost[s]) for s in suites}


def summary_text(results: dict) -> str:
    """The tables of `evaluate`'s results as plain text (what the CLI prints)."""
    import pandas as pd

    parts = []
    for suite, res in results.items():
        if suite == "ruler":
            grid = res["table"].pivot_table(index="task", columns="length", values="score", sort=False, dropna=False)
            avg = res["average"].set_index("length")[["average", "tasks_run", "tasks_requested"]].T
            text = f"{grid.round(3).to_string()}\n\n{avg.to_string()}"
            if res["not_run"]:
                text += "\n\nnot run:\n" + "\n".join(f"  {k}: {v}" for k, v in res["not_run"].items())
        elif suite == "niah":
            text = res.pivot_table(index="depth", columns="length", values="score", dropna=False).round(3).to_string()
        elif suite == "ppl":
            text = "\n\n".join(res[k].round(4).to_string(index=False) for k in ("by_length", "by_position"))
        elif suite == "harness":
            rows = [dict(task=t, metric=m, value=v) for t, (m, v) in res["primary"].items()]
            text = pd.DataFrame(rows).to_string(index=False)
            text += f"\n\naverage (paper commonsense tasks): {res['average']}"
        else:
            cols = ["length", "status", "ttft_s", "tpot_s", "cache_bytes_measured", "cache_bytes_predicted",
                    "peak_memory_bytes"]
            text = pd.DataFrame(res).reindex(columns=cols).to_string(index=False)
        parts.append(f"== {suite} ==\n{text}")
    return "\n\n".join(parts)


__all__ = ["evaluate", "check_request", "load_model", "load_documents", "part_costs", "summary_text", "SUITES"]
