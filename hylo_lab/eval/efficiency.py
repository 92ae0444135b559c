"""Inference efficiency over context lengths: cache bytes (predicted and measured), peak memory, time to first
token and time per output token, for a HyLo model or any transformers causal LM.

Per length: random prompt -> prefill in fixed-size chunks carrying the cache (activation memory is bounded by
the chunk, not the context) -> first token -> `decode_tokens` greedy steps, each timed alone (TPOT = median).
An out-of-memory error at some length is recorded as that model's limit (status "oom") and longer lengths
are not tried; the caller gets a table, never a crash.

Peak memory is `torch.cuda.max_memory_allocated` (reset before each length) on CUDA. On CPU it is None: the
process's max RSS is a lifetime high-water mark that cannot be reset per length, and tracemalloc does not see
torch's allocator, so no honest per-length number exists there.
"""

from __future__ import annotations

import gc
import statistics
import time

import torch

from ..cache import cache_footprint
from .generation import forward_step, model_device
from .ruler import active

STATUS_OK, STATUS_OOM = "ok", "oom"


def is_oom(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or a CPU allocator failure (a RuntimeError)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def cache_nbytes(cache) -> int:
    """Bytes of every distinct tensor a cache object holds (HyloCache.nbytes(), DynamicCache layers, tuples)."""
    if cache is None:
        return 0
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes()["total"])
    seen_tensors, seen_objects, total = set(), set(), 0

    def walk(obj, depth):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), obj.numel()) if obj.numel() else id(obj)
            if key not in seen_tensors:
                seen_tensors.add(key)
                total += obj.numel() * obj.element_size()
        elif depth > 4 or id(obj) in seen_objects or isinstance(obj, (str, bytes, int, float, type, torch.nn.Module)):
            return  # a module or class reached from a cache is not the cache
        else:
            seen_objects.add(id(obj))
            if isinstance(obj, dict):
                items = obj.values()
            elif isinstance(obj, (list, tuple, set)):
                items = obj
            elif hasattr(obj, "__dict__"):
                items = vars(obj).values()
            else:
                return
            for x in items:
                walk(x, depth + 1)

    walk(cache, 0)
    return total


def predict_cache_bytes(config, seq_len: int, batch_size: int = 1, dtype=torch.bfloat16) -> dict:
    """{"predicted": bytes, "base": bytes of the base Transformer}: cache_footprint for a HyLo config; for a
    plain transformers config, K and V of every layer: 2 * layers * kv_heads * head_dim * bytes * tokens."""
    if getattr(config, "model_type", None) == "hylo":
        fp = cache_footprint(config, seq_len, batch_size, dtype)
        return dict(predicted=fp["total_bytes"], base=fp["base_total_bytes"])
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    e = torch.empty((), dtype=dtype).element_size()
    total = 2 * config.num_hidden_layers * kv * hd * e * seq_len * batch_size
    return dict(predicted=total, base=total)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def _one_length(model, length, batch_size, prefill_chunk, decode_tokens, vocab, device, gen) -> dict:
    ids = torch.randint(0, vocab, (batch_size, length), generator=gen).to(device)
    pos = torch.arange(length, device=device).expand(batch_size, length)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_mem = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    _sync(device)
    t0 = time.perf_counter()
    past, step = None, prefill_chunk or length
    for s in range(0, length, step):
        out = forward_step(model, ids[:, s:s + step], None, pos[:, s:s + step], past)
        past = out.past_key_values
    token = out.logits[:, -1].argmax(-1)
    _sync(device)
    ttft = time.perf_counter() - t0
    measured = cache_nbytes(past)
    peak_prefill = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    times = []
    nxt = torch.full((batch_size, 1), length, device=device)
    for _ in range(decode_tokens):
        t = time.perf_counter()
        out = forward_step(model, token[:, None], None, nxt, past)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1)
        _sync(device)
        times.append(time.perf_counter() - t)
        nxt = nxt + 1
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del past, out
    return dict(ttft_s=ttft, tpot_s=statistics.median(times) if times else None,
                prefill_tokens_per_s=batch_size * length / ttft, cache_bytes_measured=measured,
                peak_memory_bytes=peak, peak_prefill_bytes=peak_prefill, memory_before_bytes=base_mem)


def measure_efficiency(model, lengths, *, batch_size: int = 1, prefill_chunk: int | None = 2048,
                       decode_tokens: int = 16, device=None, dtype=None, warmup: bool = True, seed: int = 0,
                       tracker=None, label: str = "") -> list[dict]:
    """One row per context length (ascending): {length, batch_size, status "ok" | "oom", ttft_s, tpot_s,
    prefill_tokens_per_s, cache_bytes_measured (held after the prefill of `length` tokens),
    cache_bytes_predicted, base_cache_bytes (the base Transformer's), peak_memory_bytes, peak_prefill_bytes,
    memory_before_bytes (CUDA only, None on CPU), device, dtype, prefill_chunk}. The first "oom" row ends the
    list. `device`/`dtype` move the model first. Logs `eval/efficiency/[label/]<length>/<field>` and the
    figure `efficiency[_label]`."""
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    model.eval()
    device = model_device(model)
    try:
        dtype = next(model.parameters()).dtype
    except StopIteration:
        dtype = torch.float32
    config = model.config
    vocab = config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    lengths = sorted([lengths] if isinstance(lengths, int) else lengths)
    if warmup:  # first calls compile, autotune and allocate: keep them out of the first length's timings
        try:
            _one_length(model, min(lengths[0], prefill_chunk or lengths[0]), batch_size, prefill_chunk, 2, vocab,
                        device, gen)
        except Exception as exc:
            if not is_oom(exc):
                raise
        _free(device)
    rows = []
    for length in lengths:
        pred = predict_cache_bytes(config, length, batch_size, dtype)
        row = dict(length=length, batch_size=batch_size, status=STATUS_OK, device=str(device),
                   dtype=str(dtype).replace("torch.", ""), prefill_chunk=prefill_chunk,
                   cache_bytes_predicted=pred["predicted"], base_cache_bytes=pred["base"])
        oom = None
        try:
            row.update(_one_length(model, length, batch_size, prefill_chunk, decode_tokens, vocab, device, gen))
        except Exception as exc:
            if not is_oom(exc):
                raise
            oom = f"{type(exc).__name__}: {str(exc)[:200]}"
        _free(device)  # outside the except block: the traceback no longer pins the failed step's tensors
        if oom is not None:
            row.update(status=STATUS_OOM, error=oom)
            if device.type == "cuda":
                row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
            rows.append(row)
            break
        rows.append(row)
    if active(tracker) is not None:
        _log(tracker, rows, label)
    return rows


def _log(tracker, rows, label):
    from ..plots import efficiency_figure

    sub = label + "/" if label else ""
    metrics = {}
    for r in rows:
        for k in ("ttft_s", "tpot_s", "prefill_tokens_per_s", "cache_bytes_measured", "cache_bytes_predicted",
                  "peak_memory_bytes"):
            if r.get(k) is not None:
                metrics[f"eval/efficiency/{sub}{r['length']}/{k}"] = r[k]
    ok = [r["length"] for r in rows if r["status"] == STATUS_OK]
    if ok:
        metrics[f"eval/efficiency/{sub}max_length"] = max(ok)
    tracker.log_metrics(metrics)
    name = f"efficiency{'_' + label if label else ''}"
    tracker.log_dict(rows, f"{name}.json")
    tracker.log_figure(efficiency_figure(rows, title=f"efficiency {label}".strip()), name)
