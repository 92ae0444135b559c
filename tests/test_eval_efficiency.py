import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from hylo_lab import HyloForCausalLM, cache_footprint
from hylo_lab.eval.efficiency import cache_nbytes, measure_efficiency
from hylo_lab.plots import efficiency_figure

from conftest import tiny_config


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


# 40 tokens in 16-token prefill chunks: three chunks, the last one partial
def test_hylo_cache_measured_equals_cache_footprint():
    torch.manual_seed(0)
    model = HyloForCausalLM(tiny_config(("mla", "gdn", "mamba2", "attention"))).eval()
    rows = measure_efficiency(model, [40, 8], batch_size=2, prefill_chunk=16, decode_tokens=2, warmup=False)
    assert [r["length"] for r in rows] == [8, 40] and all(r["status"] == "ok" for r in rows)
    for r in rows:
        fp = cache_footprint(model.config, r["length"], batch_size=2, dtype=torch.float32)
        assert r["cache_bytes_measured"] == r["cache_bytes_predicted"] == fp["total_bytes"]
        assert r["base_cache_bytes"] == fp["base_total_bytes"]
        assert r["ttft_s"] > 0 and r["tpot_s"] > 0
        assert r["peak_memory_bytes"] is None and r["device"] == "cpu" and r["dtype"] == "float32"
    # the linear layers' states do not grow: only MLA and attention bytes scale with the length
    grow = rows[1]["cache_bytes_measured"] - rows[0]["cache_bytes_measured"]
    assert grow == 32 * 2 * cache_footprint(model.config, 1, dtype=torch.float32)["per_token_bytes"]


def test_transformers_kv_cache_measured_equals_2LHdT():
    rows = measure_efficiency(tiny_llama(), [24], prefill_chunk=10, decode_tokens=1, warmup=False)
    assert rows[0]["cache_bytes_measured"] == rows[0]["cache_bytes_predicted"] == 2 * 2 * 2 * 8 * 4 * 24


class OOMAt(nn.Module):
    """Wraps a model and fails like the GPU would once a position reaches `limit`."""

    def __init__(self, inner, limit, error=torch.OutOfMemoryError):
        super().__init__()
        self.inner, self.limit, self.error = inner, limit, error
        self.config = inner.config

    def forward(self, input_ids, position_ids=None, **kwargs):
        if int(position_ids.max()) >= self.limit:
            raise self.error("CUDA out of memory. Tried to allocate 1.00 GiB (simulated)")
        return self.inner(input_ids=input_ids, position_ids=position_ids, **kwargs)


def test_oom_is_recorded_as_the_limit_and_stops():
    model = OOMAt(tiny_llama(), limit=50)
    rows = measure_efficiency(model, [16, 32, 64, 128], prefill_chunk=16, decode_tokens=2)
    assert [(r["length"], r["status"]) for r in rows] == [(16, "ok"), (32, "ok"), (64, "oom")]
    assert "OutOfMemoryError" in rows[-1]["error"] and rows[-1]["cache_bytes_predicted"] > 0
    fig = efficiency_figure(rows)
    assert len(fig.axes) == 3


def test_other_errors_are_not_swallowed():
    with pytest.raises(ValueError, match="simulated"):
        measure_efficiency(OOMAt(tiny_llama(), limit=20, error=ValueError), [16, 32], decode_tokens=1)


def test_cache_nbytes_walks_plain_tuples_once():
    k = torch.zeros(1, 2, 5, 8)
    assert cache_nbytes(((k, k), (torch.zeros(3), None))) == k.numel() * 4 + 3 * 4
