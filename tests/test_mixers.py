"""A block type added through the table alone (hylo_lab/mixers.py): one row registered by a fixture, no other
file touched, then a forward, a cached decode (growing and preallocated) equal to the full forward, the cache
footprint, describe, and an upcycle from a tiny Llama.

The dummy mixer ("SMR", Smear) is a decaying running sum: s_t = s_{t-1} / 2 + v_proj(x_t), o_t = o_proj(s_t),
with one fixed state [B, 1, 1, C] (C = num_key_value_heads * head_dim = 32 here).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from conftest import tiny_config
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from hylo_lab import HyloCache, HyloForCausalLM, cache_footprint
from hylo_lab.describe import describe
from hylo_lab.mixers import MIXERS, Mixer
from hylo_lab.states import LinearState
from hylo_lab.upcycle import upcycle


class Smear(nn.Module):
    def __init__(self, config, layer_idx=None):
        super().__init__()
        self.width = config.num_key_value_heads * config.head_dim
        self.v_proj = nn.Linear(config.hidden_size, self.width, bias=False)
        self.o_proj = nn.Linear(self.width, config.hidden_size, bias=False)

    @classmethod
    def cache_shapes(cls, config):
        return {"recurrent": (1, 1, config.num_key_value_heads * config.head_dim)}

    @classmethod
    def describe(cls, config):
        return "decaying running sum"

    @torch.no_grad()
    def from_attention(self, w, **_):
        self.v_proj.weight.copy_(w.v)
        self.o_proj.weight.copy_(w.o[:, : self.width])
        return {}

    def forward(self, x, *, state=None, attention_mask=None):
        v = self.v_proj(x)
        s = v.new_zeros(v.shape[0], self.width) if state is None or state.recurrent is None \
            else state.recurrent.view(v.shape[0], -1).to(v.dtype)
        out = []
        for t in range(v.shape[1]):
            s = s / 2 + v[:, t]
            out.append(s)
        if state is not None:
            state.set_recurrent(s.view(v.shape[0], 1, 1, -1).float() if v.dtype != torch.float64 else
                                s.view(v.shape[0], 1, 1, -1))
        return self.o_proj(torch.stack(out, 1))


@pytest.fixture
def smear():
    MIXERS["smear"] = Mixer("SMR", Smear, LinearState, linear=True)
    yield
    del MIXERS["smear"]


def hybrid():
    torch.manual_seed(0)
    return HyloForCausalLM(tiny_config(("mla", "smear", "mla", "smear"))).double().eval()


# 20 prompt tokens, then 5 one-token decode steps (MLA's absorbed path)
@pytest.mark.parametrize("prealloc", [False, True], ids=["growing", "preallocated"])
def test_a_table_row_makes_a_working_layer(smear, prealloc):
    model = hybrid()
    assert model.config.layout == "2MLA2SMR" and isinstance(model.model.layers[1].mixer, Smear)
    ids = torch.randint(0, 97, (2, 25), generator=torch.Generator().manual_seed(1))
    full = model(ids, use_cache=False).logits
    cache = HyloCache(model.config, batch_size=2, max_length=32, dtype=torch.float64) if prealloc \
        else HyloCache(model.config)
    out = [model(ids[:, :20], past_key_values=cache).logits]
    for t in range(20, 25):
        out.append(model(ids[:, t: t + 1], past_key_values=cache).logits)
    tol = 1e-6 if prealloc else 1e-9  # a preallocated recurrent state is float32, the model float64
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=tol, atol=tol)
    assert cache[1].recurrent.shape == (2, 1, 1, 32)
    if not prealloc:
        fp = cache_footprint(model.config, 25, batch_size=2, dtype=torch.float64)
        assert cache.nbytes()["fixed"] == 2 * 2 * 32 * 8  # float64 here; the footprint counts float32 states
        assert fp["fixed_bytes"] == 2 * 2 * 32 * 4 and fp["growing_bytes"] == cache.nbytes()["growing"]
    text = describe(model.config, seq_lens=(64,))
    assert "layer plan: 0:MLA 1:SMR 2:MLA 3:SMR" in text and "decaying running sum" in text


def test_upcycle_initialises_the_new_row_from_attention(smear):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256)).double().eval()
    student = upcycle(base, "2MLA2SMR")
    assert student.config.mixers == ["smear", "mla", "smear", "mla"]
    for i in (0, 2):
        attn, mixer = base.model.layers[i].self_attn, student.model.layers[i].mixer
        assert torch.equal(mixer.v_proj.weight, attn.v_proj.weight)
        assert torch.equal(mixer.o_proj.weight, attn.o_proj.weight[:, :32])
    assert upcycle(base, mla_layers=[0], linear="smear").config.layout == "1MLA3SMR"
    ids = torch.randint(0, 97, (1, 12))
    assert torch.isfinite(student(ids, use_cache=False).logits).all()
