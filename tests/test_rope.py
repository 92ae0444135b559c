"""RoPE (layers/common.py Rotary): the hybrid's frequencies are transformers' own, bit for bit, for every rope type.

Bases are tiny Llamas / Qwen3s (hidden 64, 4 query heads of 16 dims = 8 frequency pairs). An MLA with
qk_rope_head_dim=8 keeps base pairs 0, 2, 4, 6 (layers.mla.rope_pairs); their frequencies and attention factor must
be the base's, which a Rotary over the MLA's own 8 dims does not give for yarn (its ramp is placed per dim index)
nor for longrope (its factors are per base pair). longrope switches to its long factors once a forward sees a
position >= original_max_position_embeddings (32 here): T=24 stays short, T=48 goes long.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from hylo_lab import HyloForCausalLM
from hylo_lab.upcycle import convert_all, upcycle

ROPES = {
    "default": dict(rope_type="default", rope_theta=10000.0),
    "linear": dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    "llama3": dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64),
    "yarn": dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=64),
    "longrope": dict(rope_type="longrope", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=32,
                     short_factor=[1.0 + 0.1 * i for i in range(8)], long_factor=[1.0 + 0.5 * i for i in range(8)]),
}
SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
KEPT_PAIRS = [0, 2, 4, 6]  # every hd/rope = 2nd pair of the 8
KEPT_DIMS = KEPT_PAIRS + [j + 8 for j in KEPT_PAIRS]  # half-split layout: pair j rotates dims j and j + hd/2


@torch.no_grad()
def tiny_base(rope="default", cls=LlamaConfig, dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    config = cls(**{**SHAPE, "rope_parameters": dict(ROPES[rope]), **overrides})
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def ids(T, batch=2):
    return torch.randint(0, 97, (batch, T), generator=torch.Generator().manual_seed(T))


def base_tables(rotary_emb, T):
    """transformers' (cos, sin) [1, T, hd] for positions 0..T-1 (longrope picks its factors from T)."""
    return rotary_emb(torch.zeros(1), torch.arange(T)[None])


@pytest.mark.parametrize("rope", list(ROPES))
@torch.no_grad()
def test_kept_pairs_carry_exactly_the_base_frequencies(rope, tmp_path):
    base = tiny_base(rope)
    theirs = base.model.rotary_emb
    hybrid = upcycle(base, ["mla", "attention"], qk_rope_head_dim=8)
    ours = hybrid.model.rotary["mla"]
    assert torch.equal(ours.inv_freq, theirs.inv_freq[KEPT_PAIRS])
    assert ours.scaling == theirs.attention_scaling
    hybrid.save_pretrained(tmp_path)
    again = HyloForCausalLM.from_pretrained(tmp_path).model.rotary["mla"]
    for T in (24, 48):
        cos, sin = base_tables(theirs, T)
        for rot in (ours, again):
            c, s = rot(torch.arange(T)[None], torch.float32)
            assert torch.equal(c, cos[..., KEPT_DIMS]) and torch.equal(s, sin[..., KEPT_DIMS]), (T, rot)


# One KV head so that MLA's shared RoPE key (the KV-head mean) is exact; full ranks, nope = 0: the MLA model is the
# base up to rounding: 1e-12 in float64, or 1e-6 where an attention factor != 1 applies (yarn, longrope: the base
# multiplies its float32 cos and sin by it, rounding them to float32; MLA puts its square on the float64 logit).
@pytest.mark.parametrize("rope", list(ROPES))
@torch.no_grad()
def test_full_rope_mla_and_attention_reproduce_the_base(rope):
    base = tiny_base(rope, dtype=torch.float64, num_key_value_heads=1)
    mla = convert_all(base, "mla", qk_rope_head_dim=16, qk_nope_head_dim=0, q_lora_rank=0, kv_lora_rank=16)
    attention = convert_all(base, "attention")
    tol = 1e-12 if base.model.rotary_emb.attention_scaling == 1.0 else 1e-6
    for T in (24, 48):
        x = ids(T)
        want = base(x).logits
        assert (mla(x, use_cache=False).logits - want).abs().max().item() < tol, T
        assert torch.equal(attention(x, use_cache=False).logits, want), T


# float32 as loaded; Llama under every rope type, Qwen3 (q/k norms) under its default RoPE
@pytest.mark.parametrize("cls,rope", [(LlamaConfig, r) for r in ROPES] + [(Qwen3Config, "default")],
                         ids=[f"llama-{r}" for r in ROPES] + ["qwen3-default"])
@torch.no_grad()
def test_all_attention_upcycle_is_bit_exact(cls, rope):
    base = tiny_base(rope, cls)
    student = convert_all(base, "attention")
    for T in (24, 48):
        x = ids(T)
        assert torch.equal(student(x, use_cache=False).logits, base(x).logits), T


@torch.no_grad()
def test_yarn_on_an_upcycled_mla_is_the_bases_head_under_yarn_at_the_kept_pairs(tmp_path):
    """apply_yarn (distillation stages, the demo) extends the base head's RoPE, then keeps the same pairs."""
    from hylo_lab.distill.kd import apply_yarn
    from hylo_lab.distill.stages import YarnSpec

    hybrid = upcycle(tiny_base("llama3"), ["mla", "gdn"], qk_rope_head_dim=8)
    # 8192: YaRN's ramp over the base head ends between pairs 4 and 5, over 8 dims between MLA pairs 2 and 3
    params = apply_yarn(hybrid, YarnSpec(factor=4, original_max_position_embeddings=8192), seq_len=512)
    assert params["rope_theta"] == ROPES["llama3"]["rope_theta"]
    yarned = LlamaRotaryEmbedding(LlamaConfig(**{**SHAPE, "rope_parameters": dict(params),
                                                 "max_position_embeddings": hybrid.config.max_position_embeddings}))
    hybrid.save_pretrained(tmp_path)
    again = HyloForCausalLM.from_pretrained(tmp_path)
    for model in (hybrid, again):
        rot = model.model.rotary["mla"]
        assert torch.equal(rot.inv_freq, yarned.inv_freq[KEPT_PAIRS]) and rot.scaling == yarned.attention_scaling


def test_rope_pairs_are_validated():
    from hylo_lab import HyloConfig

    kw = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=1,
              mixers=["mla"], qk_rope_head_dim=8, qk_nope_head_dim=8, kv_lora_rank=16)
    assert HyloConfig(**kw, mla_rope_pairs=KEPT_PAIRS).mla_rope_pairs == KEPT_PAIRS
    for bad in ([0, 2, 4], [0, 2, 4, 8], [0, 2, 2, 4]):
        with pytest.raises(ValueError, match="mla_rope_pairs"):
            HyloConfig(**kw, mla_rope_pairs=bad)
