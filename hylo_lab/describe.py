"""Describing a hybrid next to its base: layer plan, block dims, parameters and cache footprint (the text
`hylo-lab upcycle` and `hylo-lab info` print)."""

from __future__ import annotations

import os

import torch

from .base_checkpoint import UpcycleError
from .cache import cache_footprint
from .config import PRESETS, HyloConfig
from .mixers import MIXERS
from .model import HyloForCausalLM


def base_param_count(config) -> int:
    """Parameters of the base Transformer the config describes (attention everywhere)."""
    D, I, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    H, Hkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    attn = D * H * hd * 2 + 2 * D * Hkv * hd + (H * hd + 2 * Hkv * hd if config.attention_bias else 0)
    attn += 2 * hd if config.attention_qk_norm else 0
    mlp = 3 * D * I + ((2 * I + D) if config.mlp_bias else 0)
    return V * D * (1 if config.tie_word_embeddings else 2) + L * (attn + mlp + 2 * D) + D


def param_counts(config) -> tuple[int, list[int]]:
    """(total, per-layer mixer parameters) from a weightless (meta-device) model."""
    with torch.device("meta"):
        model = HyloForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    return total, [sum(p.numel() for p in layer.mixer.parameters()) for layer in model.model.layers]


def describe(config, seq_lens=(8192, 65536), dtype=torch.bfloat16) -> str:
    """Layer plan, block dims, parameter count and cache footprint vs the base, as printable text."""
    total, per_layer = param_counts(config)
    base_total = base_param_count(config)
    lines = [f"layout {config.layout}  ({config.num_hidden_layers} layers, base {config.base_model_type or '?'}, "
             f"hidden {config.hidden_size}, {config.num_attention_heads} q / {config.num_key_value_heads} kv heads x {config.head_dim})"]
    lines.append("layer plan: " + " ".join(f"{i}:{MIXERS[m].code}" for i, m in enumerate(config.mixers)))
    for m in MIXERS:
        idx = config.layer_indices(m)
        if not idx:
            continue
        d = MIXERS[m].cls.describe(config)
        lines.append(f"  {MIXERS[m].code:>4} x{len(idx):<3} {d}; {per_layer[idx[0]]:,} params each; layers {idx}")
    lines.append(f"parameters: {total:,} (base Transformer {base_total:,}; {100 * (total / base_total - 1):+.1f}%)")
    lines.append(f"cache ({str(dtype).replace('torch.', '')}, batch 1):")
    for T in seq_lens:
        fp = cache_footprint(config, T, dtype=dtype)
        lines.append(f"  {T:>8} tokens: {fp['total_bytes'] / 2**20:10.1f} MiB vs base {fp['base_total_bytes'] / 2**20:10.1f} MiB "
                     f"({100 * fp['total_ratio']:.1f}%; per-token KV {100 * fp['kv_fraction']:.1f}% of base)")
    return "\n".join(lines)


def info_text(target, seq_lens=(8192, 65536)) -> str:
    """`describe` for a preset name or a saved hybrid directory, plus how it was upcycled when recorded."""
    if target in PRESETS:
        config = HyloConfig.from_preset(target)
        head = f"preset {target}"
    elif os.path.isdir(target):
        config = HyloConfig.from_pretrained(target)
        head = f"model {target}"
    else:
        raise UpcycleError(f"{target!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a directory")
    text = head + "\n" + describe(config, seq_lens)
    up = getattr(config, "upcycle", None)
    if up:
        keep = ("base", "select", "preset", "rope_init", "qk_norm", "qk_norm_calibrated", "mixer_init", "mamba2_D", "rank_energy")
        text += "\nupcycled: " + ", ".join(f"{k}={up.get(k)}" for k in keep if up.get(k) is not None)
        energy = up.get("kept_energy") or {}
        for k, v in energy.items():
            if v:
                text += f"\n  {k} per MLA layer: {', '.join(f'{x:.3f}' for x in v)}"
    return text
