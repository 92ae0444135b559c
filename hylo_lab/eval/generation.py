"""Greedy decoding for evaluation: prefill once (optionally in fixed-size chunks), then one token per step.

Works for `HyloForCausalLM` (HyloCache) and any transformers causal LM (DynamicCache): the first forward call
gets `past_key_values=None` and builds its own cache, every later call gets back what the previous one
returned. Positions are always passed explicitly and count real tokens only, so a left-padded row starts
at position 0 exactly like the same prompt alone.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import torch


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _accepts(model, name: str) -> bool:
    """Does model.forward take `name` (explicitly or through **kwargs)? Cached per model class."""
    return _class_accepts(type(model), name)


@functools.lru_cache(maxsize=None)
def _class_accepts(cls, name: str) -> bool:
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists of any lengths -> (input_ids [B, T], attention_mask [B, T]) padded on the left."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, T - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, T - len(r):] = 1
    return ids, mask


def as_batch(input_ids, attention_mask=None, pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A token list, a list of token lists (left-padded here) or a [T] / [B, T] tensor -> (ids, mask) [B, T]."""
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).reshape(ids.shape)
        return ids.long(), mask.long()
    rows = list(input_ids)
    if rows and not isinstance(rows[0], (Sequence, torch.Tensor)):
        rows = [rows]
    rows = [r.tolist() if isinstance(r, torch.Tensor) else list(r) for r in rows]
    if attention_mask is not None:
        return torch.tensor(rows, dtype=torch.long), torch.as_tensor(attention_mask).long()
    return left_pad(rows, pad_token_id)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position of every token counting real tokens only: [0 0 0 1 2] for mask [0 0 1 1 1]."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def forward_step(model, ids, mask, pos, past, *, last_only: bool = True):
    """One forward call with the cache; `mask` is None when nothing is padded (lets SDPA use its causal kernel)."""
    kwargs = dict(input_ids=ids, position_ids=pos, past_key_values=past, use_cache=True)
    if mask is not None:
        kwargs["attention_mask"] = mask
    if last_only and _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    return model(**kwargs)


@torch.no_grad()
def prefill(model, ids: torch.Tensor, mask: torch.Tensor | None, *, prefill_chunk: int | None = None, past=None):
    """Run the prompt through the model in chunks of `prefill_chunk` tokens (one pass when None), carrying the
    cache. Returns (logits of the last position [B, V], cache). Activation memory is bounded by the chunk size."""
    T = ids.shape[1]
    pos = positions(mask) if mask is not None else torch.arange(T, device=ids.device).expand(ids.shape[0], T)
    step = prefill_chunk or T
    out = None
    for s in range(0, T, step):
        e = min(T, s + step)
        out = forward_step(model, ids[:, s:e], None if mask is None else mask[:, :e], pos[:, s:e], past)
        past = out.past_key_values
    return out.logits[:, -1], past


@torch.no_grad()
def greedy_generate(model, input_ids, max_new_tokens: int, *, attention_mask=None, eos_token_id=None,
                    pad_token_id: int = 0, prefill_chunk: int | None = None,
                    stop: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """Greedy continuation of each row of `input_ids` (token lists of any lengths, left-padded here, or a [B, T]
    tensor with an optional left-padding `attention_mask`).

    Prefill once (in `prefill_chunk`-token chunks when given), then decode one token per step with the cache
    and explicit positions. A row stops at `eos_token_id` (an int or a collection; not included in the output)
    or when `stop(tokens_so_far)` is true; decoding ends when every row has stopped. Returns the new tokens.
    """
    device = model_device(model)
    ids, mask = as_batch(input_ids, attention_mask, pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    B = ids.shape[0]
    padded = bool((mask == 0).any())
    eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    out: list[list[int]] = [[] for _ in range(B)]
    if max_new_tokens <= 0:
        return out
    logits, past = prefill(model, ids, mask if padded else None, prefill_chunk=prefill_chunk)
    pos = positions(mask)[:, -1:] + 1
    done = [False] * B
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        for i, t in enumerate(token.tolist()):
            if done[i]:
                continue
            if t in eos:
                done[i] = True
                continue
            out[i].append(t)
            done[i] = stop is not None and stop(out[i])
        if all(done) or step == max_new_tokens - 1:
            break
        if padded:
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        res = forward_step(model, token[:, None], mask if padded else None, pos, past)
        logits, past = res.logits[:, -1], res.past_key_values
        pos = pos + 1
    return out


@torch.no_grad()
def generate_answers(model, tokenizer, samples, *, batch_size: int = 1, prefill_chunk: int | None = None,
                     max_new_tokens: int | None = None) -> list[str]:
    """Decode the answer of every task sample (`Sample.input_ids`, `.max_new_tokens`) greedily, `batch_size`
    samples per call, samples of equal length batched together (others left-padded). Predictions in order."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
    preds = [""] * len(samples)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        n = max_new_tokens or max(samples[i].max_new_tokens for i in idx)
        rows = greedy_generate(model, [list(samples[i].input_ids) for i in idx], n, eos_token_id=eos,
                               pad_token_id=pad, prefill_chunk=prefill_chunk)
        for i, r in zip(idx, rows):
            preds[i] = tokenizer.decode(r, skip_special_tokens=True)
    return preds
