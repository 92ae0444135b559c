"""The demo's models (teacher, teacher with YaRN, hybrid) and their evaluation: NIAH per length, short-context
perplexity, cache bytes; the hybrid's MLA YaRN factor raised per length under yarn_eval="cover"."""

from __future__ import annotations

import contextlib
import json
import math
import time

from ..data.toy import TOY_TRAIN_LEN
from .settings import MEASURE_CACHE_UP_TO, NIAH_TASKS, DemoSettings, log, step, warn_outside_yarn, yarn_factor_at


def load_models(settings: DemoSettings, world, hybrid_dir) -> dict:
    """{"teacher": the base teacher, "teacher_yarn": the same with YaRN on every layer, "hybrid": the result},
    in eval mode on the GPU when there is one."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..eval import load_model

    from ..distill.stages import YarnSpec

    step(settings, "load")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = world.teacher_dirs[settings.base]
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(device)
    factor = settings.teacher_yarn_factor
    config = AutoConfig.from_pretrained(path)
    yarn = YarnSpec(factor=factor, original_max_position_embeddings=TOY_TRAIN_LEN)
    config.rope_parameters = yarn.rope_parameters(config.rope_parameters.get("rope_theta", 1e4))
    config.max_position_embeddings = int(max(TOY_TRAIN_LEN * factor, max(settings.lengths)))
    teacher_yarn = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval().to(device)
    hybrid, _ = load_model(hybrid_dir, device=device, dtype=torch.float32)
    log(f"models on {device}: teacher {settings.base}, teacher + YaRN x{factor:g}, hybrid {settings.student_layout}")
    return dict(teacher=teacher, teacher_yarn=teacher_yarn, hybrid=hybrid)


@contextlib.contextmanager
def mla_yarn(model, factor: float, length: int):
    """YaRN x`factor` over the original 256 tokens on the hybrid's MLA layers inside the block (nothing for
    factor 0); the RoPE it had is back afterwards."""
    if not factor:
        yield model
        return
    from ..distill.kd import apply_yarn
    from ..distill.stages import YarnSpec
    from ..layers.common import mla_rotary

    config = model.config
    saved = dict(config.mla_rope_parameters), config.max_position_embeddings
    apply_yarn(model, YarnSpec(factor=float(factor), original_max_position_embeddings=TOY_TRAIN_LEN), length)
    device = next(model.parameters()).device
    model.model.rotary["mla"].to(device)
    try:
        yield model
    finally:
        config.mla_rope_parameters, config.max_position_embeddings = saved
        model.model.rotary["mla"] = mla_rotary(config).to(device)


def _heldout_stream(world, tokens: int) -> list[int]:
    from ..data.toy import read_corpus

    tok = world.tokenizer()
    ids: list[int] = []
    for doc in read_corpus(world.corpus_heldout):
        ids += tok.encode(doc) + [tok.eos_token_id]
        if len(ids) >= tokens:
            break
    return ids[:tokens]


def evaluate_models(settings: DemoSettings, models: dict, world, tracker=None):
    """NIAH accuracy (NIAH_TASKS, settings.niah_samples(model, length) samples each at random needle depths from
    settings.eval_seed: the same samples for every model; with yarn_eval="cover" the hybrid's MLA factor is
    raised per length, yarn_factor_at), perplexity at the teachers' length on
    held-out text, and cache bytes of every model at every length (predicted by `predict_cache_bytes` in the
    model's dtype; measured after a prefill of random tokens up to `measure_cache_up_to`). Returns a
    DataFrame(model, length, niah, niah_low, niah_high, n, ppl, cache_bytes, cache_bytes_measured, ttft_s, and one
    column per NIAH task; niah_low/high: the Wilson 95% interval over the n samples evaluated, all tasks pooled)
    and logs the metric names listed in the module docstring."""
    import pandas as pd

    from ..eval.efficiency import measure_efficiency, predict_cache_bytes
    from ..eval.perplexity import run_perplexity
    from ..eval.ruler import run_ruler
    from ..stats import accuracy_ci

    step(settings, "evaluate")
    tok = world.tokenizer()
    lengths = settings.lengths
    short = TOY_TRAIN_LEN if TOY_TRAIN_LEN in lengths else min(lengths)
    stream = _heldout_stream(world, settings.ppl_tokens)
    active = tracker if tracker is not None and tracker.active else None
    rows, metrics = [], {}
    for label, model in models.items():
        t0 = time.perf_counter()
        niah, per_task, ci = {}, {}, {}
        for length in lengths:  # one call per length: batch as many samples as ~16K tokens allow
            n = settings.niah_samples(label, length)
            batch = max(1, min(n * len(NIAH_TASKS), 16384 // length))
            factor = yarn_factor_at(settings, label, length)
            if factor and length > TOY_TRAIN_LEN * factor:
                warn_outside_yarn(f"evaluates {label} at", length, factor)
            cover = label == "hybrid" and settings.yarn_eval == "cover"
            with mla_yarn(model, factor, length) if cover else contextlib.nullcontext():
                res = run_ruler(model, tok, [length], tasks=NIAH_TASKS, num_samples=n, seed=settings.eval_seed,
                                batch_size=batch, prefill_chunk=2048,
                                out_dir=settings.folder / "eval" / f"niah_{label}" / str(length))
            niah[length] = float(res["average"].average.iloc[0])
            ok = res["table"][res["table"].status == "ok"]
            per_task[length] = dict(zip(ok.task, ok.score))
            ci[length] = accuracy_ci(int(round(float((ok.score * ok.n).sum()))), int(ok.n.sum()))
            metrics.update({f"eval/{label}/niah/{length}/{task}": v for task, v in per_task[length].items()})
        t_niah = time.perf_counter() - t0
        ppl = run_perplexity(model, stream, [short], batch_size=8)["by_length"].set_index("length")["ppl"]
        measured = [n for n in lengths if n <= MEASURE_CACHE_UP_TO] or lengths[:1]
        eff = {r["length"]: r for r in measure_efficiency(model, measured, prefill_chunk=2048, decode_tokens=1,
                                                           warmup=False)}
        dtype = next(model.parameters()).dtype
        for length in lengths:
            e = eff.get(length, {})
            predicted = predict_cache_bytes(model.config, length, dtype=dtype)["predicted"]
            rows.append(dict(model=label, length=length, niah=niah[length], niah_low=ci[length]["low"],
                             niah_high=ci[length]["high"], n=ci[length]["n"], ppl=float(ppl.get(length, math.nan)),
                             cache_bytes=predicted, cache_bytes_measured=e.get("cache_bytes_measured"),
                             ttft_s=e.get("ttft_s"), **per_task[length]))
            metrics[f"eval/{label}/niah/{length}"] = niah[length]
            metrics[f"eval/{label}/cache_bytes/{length}"] = predicted
            if e.get("cache_bytes_measured") is not None:
                metrics[f"eval/{label}/cache_bytes_measured/{length}"] = e["cache_bytes_measured"]
        metrics[f"eval/{label}/ppl/{short}"] = float(ppl[short])
        settings._seconds = dict(getattr(settings, "_seconds", {}), **{f"eval_{label}": time.perf_counter() - t0})
        log(f"{label}: NIAH " + ", ".join(f"{k}: {v:.2f}" for k, v in niah.items())
            + f" | ppl@{short} {float(ppl[short]):.3f} | {time.perf_counter() - t0:.0f} s (NIAH {t_niah:.0f} s)")
    frame = pd.DataFrame(rows)
    frame.to_csv(settings.folder / "results.csv", index=False)
    (settings.folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if active is not None:
        active.log_metrics(metrics)
        active.log_artifact(settings.folder / "results.csv", "tables")
    return frame
