"""Evaluation: one call per model and suite list, for notebooks, the CLI and the demo.

    evaluate(model, ["ruler", "niah", "ppl", "efficiency"], tokenizer=tok, lengths=[256, 512, ..., 8192],
             documents=texts, tracker=tracker, label="teacher")

Suites: ruler (ruler.py), niah (niah.py), ppl (perplexity.py), harness (harness.py), efficiency
(efficiency.py). lm-eval, seaborn and matplotlib are imported only when a suite needs them.
"""

from __future__ import annotations

from pathlib import Path

from .niah import DEFAULT_DEPTHS

SUITES = ("ruler", "niah", "ppl", "harness", "efficiency")


def load_model(path, *, device=None, dtype=None):
    """(model, tokenizer) from a saved folder (a HyLo checkpoint or any transformers causal LM), in eval mode
    on `device` (default: cuda when available) with `dtype` ("bfloat16", "float32", a torch dtype, None=as saved)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hylo_lab  # noqa: F401  registers model_type "hylo" with the Auto classes

    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), AutoTokenizer.from_pretrained(str(path))


def load_documents(source) -> list:
    """Documents for perplexity: a list (texts or token lists) as is; a .jsonl path (field "text" of each line),
    a .txt file (one document), or a folder of .txt files (one document each, sorted)."""
    import json

    if not isinstance(source, (str, Path)):
        return source
    p = Path(source)
    if p.is_dir():
        return [f.read_text(encoding="utf-8") for f in sorted(p.rglob("*.txt"))]
    if p.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [p.read_text(encoding="utf-8")]


def evaluate(model, suite="ruler", *, tokenizer=None, lengths=(1024,), tasks=None, depths=DEFAULT_DEPTHS,
             niah_task: str = "niah_single_1", num_samples: int = 4, seed: int = 0, haystack: str | None = None,
             qa_file=None, documents=None, position_length: int | None = None, bucket_size: int | None = None,
             harness_tasks=None, include_path=None, num_fewshot: int = 0, limit=None, batch_size: int = 1,
             prefill_chunk: int | None = 2048, decode_tokens: int = 16, device=None, dtype=None, tracker=None,
             out_dir=None, label: str = "") -> dict:
    """Run one suite or several on a model object (with `tokenizer`) or a saved folder. Returns {suite: result}:

    ruler -> run_ruler's dict; niah -> run_niah_grid's DataFrame; ppl -> run_perplexity's dict (needs
    `documents`: texts, token lists or a path, see load_documents); harness -> run_harness's dict (tasks:
    `harness_tasks`, default the paper's eight); efficiency -> measure_efficiency's rows.

    Results go to `out_dir/<suite>[_<label>]` and to `tracker` under metric names carrying `label`, so several
    models (teacher, upcycled students) can be logged side by side in one MLflow run.
    """
    suites = [s.strip() for s in suite.split(",")] if isinstance(suite, str) else list(suite)
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; choose from {SUITES}")
    if isinstance(model, (str, Path)):
        model, loaded_tok = load_model(model, device=device, dtype=dtype)
        tokenizer = tokenizer or loaded_tok
    elif device is not None or dtype is not None:
        import torch

        model = model.to(device=device, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    model.eval()
    if tokenizer is None and any(s != "efficiency" for s in suites):
        raise ValueError("pass tokenizer= (only the efficiency suite runs without one)")
    lengths = [lengths] if isinstance(lengths, int) else list(lengths)

    def where(name):
        return None if out_dir is None else Path(out_dir) / f"{name}{'_' + label if label else ''}"

    common = dict(batch_size=batch_size, prefill_chunk=prefill_chunk, tracker=tracker, label=label)
    results = {}
    for s in suites:
        if s == "ruler":
            from ..data.tasks import RULER_TASKS
            from .ruler import run_ruler

            results[s] = run_ruler(model, tokenizer, lengths, tasks=tasks or RULER_TASKS, num_samples=num_samples,
                                   seed=seed, haystack=haystack, qa_file=qa_file, out_dir=where(s), **common)
        elif s == "niah":
            from .niah import run_niah_grid

            results[s] = run_niah_grid(model, tokenizer, lengths, depths, task=niah_task, num_samples=num_samples,
                                       seed=seed, haystack=haystack, out_dir=where(s), **common)
        elif s == "ppl":
            from .perplexity import run_perplexity

            if documents is None:
                raise ValueError("the ppl suite needs documents= (texts, token lists, a .jsonl/.txt path or a folder)")
            results[s] = run_perplexity(model, load_documents(documents), lengths, tokenizer=tokenizer,
                                        position_length=position_length, bucket_size=bucket_size, out_dir=where(s),
                                        **common)
        elif s == "harness":
            from .harness import PAPER_HARNESS_TASKS, run_harness

            results[s] = run_harness(model, tokenizer, harness_tasks or PAPER_HARNESS_TASKS,
                                     include_path=include_path, num_fewshot=num_fewshot, batch_size=batch_size,
                                     limit=limit, seed=seed, tracker=tracker, out_dir=where(s), label=label)
        else:
            from .efficiency import measure_efficiency

            rows = measure_efficiency(model, lengths, batch_size=batch_size, prefill_chunk=prefill_chunk,
                                      decode_tokens=decode_tokens, seed=seed, tracker=tracker, label=label)
            if out_dir is not None:
                import pandas as pd

                from ..plots import efficiency_figure

                where(s).mkdir(parents=True, exist_ok=True)
                pd.DataFrame(rows).to_csv(where(s) / "efficiency.csv", index=False)
                efficiency_figure(rows, title=f"efficiency {label}".strip()).savefig(
                    where(s) / f"{where(s).name}.png", dpi=120, bbox_inches="tight")
            results[s] = rows
    return results


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


__all__ = ["evaluate", "load_model", "load_documents", "summary_text", "SUITES"]
