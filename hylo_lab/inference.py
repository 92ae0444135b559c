"""Long-context inference for HyLo models: chunked prefill into a preallocated cache, then a static decode step
that a CUDA graph can capture.

    cache = allocate_cache(model, batch_size=1, max_length=prompt_len + new_tokens)
    logits = chunked_prefill(model, ids, cache, chunk_size=16384)   # memory: weights + latents + one chunk
    token = logits.argmax(-1, keepdim=True)
    decoder = GraphDecoder(model, cache)                            # CUDA only; eager `decode_step` elsewhere
                                                                    # compile=True: torch.compile'd step (fewer kernels)
    pack_decode_projections(model)    # optional: GDN's input projections and convs as one kernel each per step
    tokens = decoder.generate(token, 64)

Prefill runs the model's ordinary forward one fixed-size chunk at a time: linear layers carry their conv and
recurrent states, MLA layers write their latents into the preallocated buffer (no torch.cat growth: at 2M
tokens that would copy the cache ~N/chunk times) and attend over it with the flash kernel, the causal
diagonal at the bottom right. Decode feeds one token whose position is the cache's device tensor
`position`: MLA writes its latent at that row and attends to rows <= position over the whole fixed-size
buffer (a mask, not a slice, so shapes never change), linear layers update their states in place, and the
step ends by advancing `position` on the device. Nothing in a step reads a Python length, so the step can
be captured once and replayed per token.
"""

from __future__ import annotations

import torch

from .cache import HyloCache


def _device_dtype(model):
    p = next(model.parameters())
    return p.device, p.dtype


def allocate_cache(model, batch_size: int, max_length: int, *, static: bool = True, dtype=None) -> HyloCache:
    """A preallocated HyloCache for `model` (its device; MLA latents and conv tails in `dtype` or the model's)."""
    device, mdtype = _device_dtype(model)
    return HyloCache(model.config, batch_size=batch_size, max_length=max_length, device=device,
                     dtype=dtype or mdtype, static=static)


@torch.no_grad()
def chunked_prefill(model, input_ids, cache: HyloCache, chunk_size: int = 16384):
    """Feed `input_ids` [B, T] in chunks of `chunk_size` tokens (the last may be shorter) after whatever the
    cache already holds; returns the last position's logits [B, vocab] (float32)."""
    B, T = input_ids.shape
    if cache.max_length is not None and cache.seq_length + T > cache.max_length:
        raise ValueError(f"cache holds {cache.max_length} tokens; {cache.seq_length} + {T} needed")
    h = None
    for s in range(0, T, chunk_size):
        ids = input_ids[:, s:s + chunk_size]
        start = cache.seq_length
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)[None].expand(B, -1)
        h = model.model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True).last_hidden_state
    return model.lm_head(h[:, -1]).float()


def pack_decode_projections(model, enable: bool = True) -> int:
    """Decode steps into a static cache read each Gated DeltaNet layer's six input projections as one stacked
    matrix and run its three short convs as one (fewer kernels per step; a step is launch-bound). Costs a copy
    of those weights, built here and rebuilt when a weight changes; returns its size in bytes (0 when off or
    when the model has no such layer). Same arithmetic per output row as the unpacked step."""
    return sum(m.set_packed_decode(enable) for m in model.modules() if hasattr(m, "set_packed_decode"))


@torch.no_grad()
def decode_step(model, token_ids, cache: HyloCache):
    """One static decode step: token_ids [B, 1] at position `cache.position` -> logits [B, vocab] (float32).
    Advances the cache (device position and the host-side lengths)."""
    if not cache.static:
        raise ValueError("decode_step needs a static cache (allocate_cache(..., static=True))")
    B = token_ids.shape[0]
    pos = cache.position.view(1, 1).expand(B, 1)
    out = model(input_ids=token_ids, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float()


class GraphDecoder:
    """Greedy decoding with the static step captured in one CUDA graph (argmax included), replayed per token.

    The first step runs eagerly on a side stream (kernels compile and autotune there; it is a real step);
    capture records without executing, so the cache is untouched by it. Replays advance the device position
    themselves; `cache.advance(1)` keeps the host-side lengths in step. compile=True: the step is
    torch.compile'd first (static shapes), so the graph replays inductor's fused kernels instead of one
    launch per small op; the first step then also compiles (tens of seconds for a 1B model).
    """

    def __init__(self, model, cache: HyloCache, *, compile: bool = False):
        if not cache.static:
            raise ValueError("GraphDecoder needs a static cache")
        self.model, self.cache = model, cache
        self.graph = None
        self.ids = None
        self._step = decode_step
        if compile:
            import torch._dynamo

            # every layer is its own module: room for one compiled frame per layer after graph breaks
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit,
                                                        4 * model.config.num_hidden_layers)
            self._step = torch.compile(decode_step, dynamic=False)

    def _eager(self, token_ids):
        logits = self._step(self.model, token_ids, self.cache)
        return logits.argmax(-1, keepdim=True)

    def capture(self, token_ids):
        """Run one real step eagerly from `token_ids` [B, 1], then capture; returns that step's next token."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            nxt = self._eager(token_ids)
        torch.cuda.current_stream().wait_stream(side)
        self.ids = nxt.clone()
        seq, lengths = self.cache.seq_length, [getattr(st, "length", None) for st in self.cache.layers]
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            logits = self._step(self.model, self.ids, self.cache)
            self.ids.copy_(logits.argmax(-1, keepdim=True))
        self.cache.seq_length = seq  # capture ran the host-side bookkeeping once without executing the step
        for st, n in zip(self.cache.layers, lengths):
            if n is not None:
                st.length = n
        return nxt

    def step(self):
        """One replay: consumes self.ids, leaves the next token in self.ids."""
        self.graph.replay()
        self.cache.advance(1)
        return self.ids

    @torch.no_grad()
    def generate(self, first_token, n: int):
        """n greedy tokens after `first_token` [B, 1] (the prefill's argmax): returns [B, n]."""
        out = [self.capture(first_token)]
        for _ in range(n - 1):
            out.append(self.step().clone())
        return torch.cat(out, dim=1)


@torch.no_grad()
def greedy_decode(model, first_token, cache: HyloCache, n: int):
    """Eager reference of GraphDecoder.generate: n greedy tokens through decode_step."""
    out, tok = [], first_token
    for _ in range(n):
        tok = decode_step(model, tok, cache).argmax(-1, keepdim=True)
        out.append(tok)
    return torch.cat(out, dim=1)
