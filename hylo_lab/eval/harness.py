"""LM-Eval-Harness on an in-memory model (HyLo or any transformers causal LM), offline.

`run_harness(model, tokenizer, tasks)` wraps the model in lm-eval's HFLM (scoring calls the model without a
cache; generation goes through `greedy_generate`, i.e. the model's own cache with explicit positions) and runs
named tasks: the paper's (`PAPER_HARNESS_TASKS`, when their data sets are in the local HF cache) or local YAML
tasks over local jsonl (`include_path`). A task whose data cannot be loaded offline fails up front with
`MissingTaskData`, naming every such task and why, before any model call.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from ..errors import UserError

# method.md section 6: the 0-shot commonsense average, and GSM8K 0-shot reported apart.
PAPER_COMMONSENSE_TASKS = ("arc_challenge", "arc_easy", "hellaswag", "openbookqa", "piqa", "race", "winogrande")
PAPER_GENERATIVE_TASKS = ("gsm8k",)
PAPER_HARNESS_TASKS = PAPER_COMMONSENSE_TASKS + PAPER_GENERATIVE_TASKS
# The number reported per task (every metric is kept too): length-normalised accuracy where the choices differ
# in length and the hybrid-distillation literature reports it (Mamba-in-the-Llama, Zebra-Llama tables).
PRIMARY_METRIC = {
    "arc_challenge": "acc_norm", "arc_easy": "acc", "hellaswag": "acc_norm", "openbookqa": "acc_norm",
    "piqa": "acc", "race": "acc", "winogrande": "acc", "gsm8k": "exact_match/strict-match",
}
_FALLBACK_METRICS = ("acc_norm", "acc", "exact_match", "word_perplexity")


class MissingTaskData(UserError):
    """An lm-eval task is unknown or its data set cannot be loaded offline."""


def _lm_class():
    """HFLM with cache-free scoring and greedy generation through `greedy_generate` (built lazily: lm-eval is
    an optional dependency and slow to import)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from .generation import greedy_generate

    class HyloLM(HFLM):
        def _model_call(self, inps, attn_mask=None, labels=None):
            if attn_mask is not None or labels is not None:
                return super()._model_call(inps, attn_mask, labels)
            with torch.no_grad():
                return self.model(input_ids=inps, use_cache=False).logits

        def _model_generate(self, context, max_length, stop, **kwargs):
            mask = kwargs.pop("attention_mask", None)
            if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0.0:
                return super()._model_generate(context, max_length, stop, attention_mask=mask, **kwargs)
            tok = self.tokenizer
            window = 4 + max((len(s) for s in stop), default=0)

            def stopped(tokens):
                return any(s in tok.decode(tokens[-window:], skip_special_tokens=False) for s in stop)

            rows = greedy_generate(self.model, context, max_length - context.shape[1], attention_mask=mask,
                                   eos_token_id=self.eot_token_id, pad_token_id=tok.pad_token_id or 0,
                                   stop=stopped if stop else None)
            n = max((len(r) for r in rows), default=0)
            pad = tok.pad_token_id if tok.pad_token_id is not None else self.eot_token_id
            new = torch.full((len(rows), n), pad, dtype=context.dtype, device=context.device)
            for i, r in enumerate(rows):
                new[i, : len(r)] = torch.tensor(r, dtype=context.dtype)
            return torch.cat([context, new], dim=1)

    return HyloLM


def _defined_tasks(include_path) -> set:
    """Task names declared (`task: name`) by the YAML files under include_path."""
    names = set()
    for path in [include_path] if isinstance(include_path, (str, Path)) else include_path or []:
        p = Path(path)
        for f in [p] if p.is_file() else [*p.rglob("*.yaml"), *p.rglob("*.yml")]:
            names.update(m.group(1) for m in re.finditer(r"^task:\s*['\"]?([\w\-.]+)", f.read_text(), re.M))
    return names


def task_manager(tasks, include_path=None, include_defaults: bool | None = None):
    """lm-eval's TaskManager; lm-eval's own task index (slow: ~10 s) is only built when a task needs it."""
    from lm_eval.tasks import TaskManager

    if include_defaults is None:
        include_defaults = not include_path or not set(tasks) <= _defined_tasks(include_path)
    paths = [str(p) for p in ([include_path] if isinstance(include_path, (str, Path)) else include_path or [])]
    return TaskManager(include_path=paths or None, include_defaults=include_defaults)


def check_tasks(tasks, manager) -> None:
    """Load every task's data now; raise MissingTaskData naming each one that cannot be had offline."""
    from lm_eval.tasks import get_task_dict

    problems = {}
    for name in tasks:
        try:
            manager.load([name]) if hasattr(manager, "load") else get_task_dict([name], manager)
        except KeyError as exc:
            problems[name] = f"unknown task ({exc.args[0] if exc.args else exc})"
        except Exception as exc:  # datasets' ConnectionError / FileNotFoundError / DatasetNotFoundError ...
            problems[name] = f"data set not available offline: {type(exc).__name__}: {str(exc)[:300]}"
    if problems:
        lines = "\n".join(f"  {k}: {v}" for k, v in problems.items())
        raise MissingTaskData(
            f"lm-eval cannot run {len(problems)} task(s):\n{lines}\n"
            "Cache the data sets (HF_DATASETS_CACHE, downloaded on a machine with network) or describe the task as "
            "a local YAML over a local jsonl (dataset_path: json, dataset_kwargs.data_files) and pass include_path.")


def flatten_results(raw: dict) -> dict:
    """lm-eval's {"results": {task: {"acc,none": x, "acc_stderr,none": s, "alias": ...}}} ->
    {task: {"acc": x, "acc_stderr": s}}; a filter other than "none" is kept as "metric/filter"."""
    out = {}
    for task, metrics in raw.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            row[metric if filt == "none" else f"{metric}/{filt}"] = float(value)
        out[task] = row
    return out


def primary_metric(task: str, metrics: dict):
    name = PRIMARY_METRIC.get(task)
    if name in metrics:
        return name, metrics[name]
    for name in _FALLBACK_METRICS:
        hits = [k for k in metrics if k == name or k.startswith(name + "/")]
        if hits:
            return hits[0], metrics[hits[0]]
    return None, None


def run_harness(model, tokenizer, tasks=PAPER_HARNESS_TASKS, *, include_path=None, include_defaults=None,
                num_fewshot: int | None = 0, batch_size: int = 1, limit=None, max_length: int | None = None,
                bootstrap_iters: int = 1000, log_samples: bool = False, seed: int = 0, tracker=None, out_dir=None,
                label: str = "") -> dict:
    """Run lm-eval `tasks` on the in-memory `model` (eval mode, its device and dtype).

    include_path: a folder (or YAML file, or list) of local task definitions. include_defaults: also index
    lm-eval's built-in tasks (default: only when some task is not defined under include_path). limit: docs per
    task (int) or fraction. Returns {"results": {task: {metric: value}}, "primary": {task: (metric, value)},
    "average": mean primary value over the paper's commonsense tasks that ran (None if none did),
    "samples": per-doc records when log_samples, "out_dir"}. Logs `eval/harness/[label/]<task>/<metric>` and
    `eval/harness/[label/]average`.
    """
    import lm_eval

    from .ruler import active

    tracker = active(tracker)
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    manager = task_manager(tasks, include_path, include_defaults)
    check_tasks(tasks, manager)
    model.eval()
    lm = _lm_class()(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                     max_length=max_length)
    raw = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                                  bootstrap_iters=bootstrap_iters, log_samples=log_samples, random_seed=seed,
                                  numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    results = flatten_results(raw)
    primary = {t: primary_metric(t, m) for t, m in results.items()}
    common = [v for t, (_, v) in primary.items() if t in PAPER_COMMONSENSE_TASKS and v is not None]
    out = dict(results=results, primary=primary, average=sum(common) / len(common) if common else None,
               samples=raw.get("samples") if log_samples else None, out_dir=None)
    if out_dir is None and tracker is None:
        return out
    sub = label + "/" if label else ""
    metrics = {f"eval/harness/{sub}{t}/{k}": v for t, m in results.items() for k, v in m.items()}
    if out["average"] is not None:
        metrics[f"eval/harness/{sub}average"] = out["average"]
    summary = dict(suite="harness", label=label, tasks=tasks, num_fewshot=num_fewshot, limit=limit, results=results,
                   primary=primary, average=out["average"], versions=raw.get("versions"),
                   n_samples=raw.get("n-samples"))
    name = f"harness{'_' + label if label else ''}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(out_dir) if out_dir is not None else Path(tmp)
        path.mkdir(parents=True, exist_ok=True)
        (path / "harness_results.json").write_text(json.dumps(summary, indent=2, default=str))
        if log_samples:
            (path / "harness_samples.json").write_text(json.dumps(raw.get("samples"), default=str))
        if tracker is not None:
            tracker.log_metrics(metrics)
            tracker.log_artifact(path, name)
        out["out_dir"] = path if out_dir is not None else None
    return out
