"""The teacher's top-k next-token targets (kl="topk"), computed once per batch and kept on disk for later passes.

    <root>/<key[:2]>/<key>.safetensors    ids int32 [B, T, k], logprobs float16 [B, T, k]
key = sha256(VERSION, teacher fingerprint, k, temperature, the batch's token ids: dtype, shape and bytes)
teacher fingerprint = sha256(its config without transformers_version, its parameters' dtype and device type (a GPU
rounds differently from the CPU), its weights: the files of its directory as names, sizes and mtimes
(demo.stage_cache._local_stat) when it has one, else the bytes of its state dict). ids are the teacher's k most
likely next tokens, descending; logprobs its log softmax(z / T) over the whole vocabulary at those ids, rounded to
float16 whether read or computed, so a hit and a miss give the same loss.

A file is written beside its final name and renamed over it, so it is whole or absent; one that does not load, or
whose key, shapes or dtypes are not this batch's, is a miss and is rewritten. A hit skips the teacher forward.
When it wins: a batch costs B * T * k * (4 + 2) bytes on disk (64 MiB at B = 8, T = 8192, k = 128) and saves one
teacher forward per step on every pass over the same batches after the first (same seed, data, seq_len and
micro-batch rows: a rerun or a sweep over student settings); the first pass pays the write.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..outputs import atomic_file

VERSION = 1
SUFFIX = ".safetensors"


def teacher_fingerprint(teacher, path: str | None = None) -> str:
    """What makes a teacher's targets: config, dtype, device type, weights (path + mtimes when it has a directory,
    else bytes)."""
    from ..demo.stage_cache import _local_stat
    from .stages import expand

    config = teacher.config.to_dict()
    config.pop("transformers_version", None)
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    first = next(teacher.parameters())
    h.update(f"{first.dtype} {first.device.type}".encode())
    if path is not None and Path(expand(path)).exists():
        h.update(_local_stat(path).encode())
    else:
        for name, t in sorted(teacher.state_dict().items()):
            h.update(name.encode() + b"\0")
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


@torch.no_grad()
def teacher_topk_targets(teacher, input_ids: torch.Tensor, k: int, temperature: float = 1.0,
                         chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int32 [B, T, k], logprobs float16 [B, T, k]): the top k of log softmax(h W^T / T) over the vocabulary,
    from the teacher's final hidden states h and LM-head weight W in blocks of chunk_size tokens."""
    from .losses import _mm

    hidden = teacher.model(input_ids=input_ids, use_cache=False).last_hidden_state
    head = teacher.get_output_embeddings().weight
    if not 1 <= k <= head.shape[0]:
        raise ValueError(f"k={k} must be in [1, vocabulary size {head.shape[0]}]")
    h = hidden.reshape(-1, hidden.shape[-1])
    ids = torch.empty(h.shape[0], k, dtype=torch.int32, device=h.device)
    logp = torch.empty(h.shape[0], k, dtype=torch.float16, device=h.device)
    dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    with torch.autocast(input_ids.device.type, enabled=False):
        for i0 in range(0, h.shape[0], chunk_size):
            z = torch.log_softmax(_mm(h[i0:i0 + chunk_size], head.T, dtype) / temperature, dim=-1)
            values, index = z.topk(k, dim=-1)
            ids[i0:i0 + chunk_size], logp[i0:i0 + chunk_size] = index, values
    return ids.reshape(*input_ids.shape, k), logp.reshape(*input_ids.shape, k)


class TeacherTopKCache:
    """Top-k targets of one teacher at one (k, temperature), one file per batch under `root`; counts hits, misses."""

    def __init__(self, root, fingerprint: str, k: int, temperature: float):
        self.root, self.k, self.temperature = Path(root), int(k), float(temperature)
        self.fingerprint = fingerprint
        self.hits = self.misses = 0

    def key(self, input_ids: torch.Tensor) -> str:
        ids = input_ids.detach().cpu().contiguous()
        h = hashlib.sha256(f"{VERSION}\0{self.fingerprint}\0{self.k}\0{self.temperature!r}\0{ids.dtype}\0"
                           f"{tuple(ids.shape)}\0".encode())
        h.update(ids.reshape(-1).view(torch.uint8).numpy())
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{SUFFIX}"

    def load(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This batch's (ids, logprobs) on input_ids' device, or None when absent or unreadable."""
        from safetensors import safe_open

        key = self.key(input_ids)
        shape = (*input_ids.shape, self.k)
        try:
            with safe_open(str(self.path(key)), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    return None
                ids, logp = f.get_tensor("ids"), f.get_tensor("logprobs")
        except Exception:  # noqa: BLE001 - absent, partial or corrupt: a miss, rewritten
            return None
        if ids.shape != shape or logp.shape != shape or ids.dtype != torch.int32 or logp.dtype != torch.float16:
            return None
        return ids.to(input_ids.device), logp.to(input_ids.device)

    def store(self, input_ids: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor) -> Path:
        """Write this batch's targets beside their final name, then rename over it."""
        from safetensors.torch import save_file

        key = self.key(input_ids)
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(final) as tmp:
            save_file({"ids": ids.detach().to(torch.int32).cpu().contiguous(),
                       "logprobs": logprobs.detach().to(torch.float16).cpu().contiguous()}, str(tmp),
                      metadata={"key": key})
        return final

    def targets(self, input_ids: torch.Tensor, compute) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached targets of this batch, or compute() -> (ids, logprobs), stored for the next epoch."""
        found = self.load(input_ids)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        ids, logp = compute()
        self.store(input_ids, ids, logp)
        return ids, logp


def check_topk(stages, vocab_size: int) -> None:
    """RecipeError for a kl=topk stage whose teacher_topk exceeds the vocabulary (known once configs are read)."""
    from .stages import RecipeError

    for st in stages:
        if st.kind == "kd" and st.kl == "topk" and st.teacher_topk > vocab_size:
            raise RecipeError(f"stage {st.name}: teacher_topk={st.teacher_topk} is larger than the vocabulary "
                              f"({vocab_size} tokens); choose 1 .. {vocab_size}")
