import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hylo_lab import HyloCache, HyloConfig, HyloForCausalLM, cache_footprint
from hylo_lab.layers.common import Rotary

from conftest import tiny_config

ALL_FOUR = ("mla", "gdn", "mamba2", "attention")


def randomised(config, dtype=torch.float64, seed=0):
    """A model whose norms, biases and gates are perturbed too, so no parameter is a silent identity."""
    torch.manual_seed(seed)
    model = HyloForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hybrid():
    return randomised(tiny_config(ALL_FOUR, mla_bias=True, mla_latent_norm=True))


def test_layer_types_follow_mixers(hybrid):
    got = [type(layer.mixer).__name__ for layer in hybrid.model.layers]
    assert got == ["MLA", "GatedDeltaNet", "Mamba2", "Attention"]


# 37 tokens cross two 16-token chunks of the linear ops; decode steps cover the absorbed MLA path
def test_prefill_then_decode_equals_full_forward(hybrid):
    ids = torch.randint(0, 97, (2, 37))
    full = hybrid(ids, use_cache=False).logits
    cache = HyloCache(hybrid.config)
    out = [hybrid(ids[:, :30], past_key_values=cache).logits]
    for t in range(30, 37):
        out.append(hybrid(ids[:, t : t + 1], past_key_values=cache).logits)
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=1e-9, atol=1e-9)
    assert cache.seq_length == 37


@pytest.mark.parametrize("pieces", [(5, 20, 12), (17, 17, 3), (1, 35, 1)], ids=lambda p: "-".join(map(str, p)))
def test_chunked_prompt_equals_one_pass(hybrid, pieces):
    ids = torch.randint(0, 97, (1, sum(pieces)))
    full = hybrid(ids, use_cache=False).logits
    cache, out, start = HyloCache(hybrid.config), [], 0
    for n in pieces:
        out.append(hybrid(ids[:, start : start + n], past_key_values=cache).logits)
        start += n
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=1e-9, atol=1e-9)


def test_left_padded_batch_equals_single_sequences(hybrid):
    a, b = torch.randint(1, 97, (1, 20)), torch.randint(1, 97, (1, 13))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 7, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    logits = hybrid(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(logits[0], hybrid(a, use_cache=False).logits[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logits[1, 7:], hybrid(b, use_cache=False).logits[0], rtol=1e-9, atol=1e-9)


def test_generate_greedy_matches_manual_loop_and_sampling_runs(hybrid):
    ids = torch.randint(0, 97, (1, 12))
    gen = hybrid.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    seq = ids
    for _ in range(6):
        nxt = hybrid(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(gen, seq)
    torch.manual_seed(1)
    sampled = hybrid.generate(ids, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)
    assert sampled.shape == (1, 18) and torch.equal(sampled[:, :12], ids)


def test_batched_generate_with_left_padding(hybrid):
    a, b = torch.randint(1, 97, (1, 9)), torch.randint(1, 97, (1, 5))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    gen = hybrid.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    single = hybrid.generate(b, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(gen[1, 4:], single[0])


def test_save_load_round_trip(tmp_path, hybrid):
    hybrid.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "hylo"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert isinstance(loaded, HyloForCausalLM)
    ids = torch.randint(0, 97, (1, 21))
    assert torch.equal(loaded(ids, use_cache=False).logits, hybrid(ids, use_cache=False).logits)


def test_tied_embeddings_share_storage():
    model = HyloForCausalLM(tiny_config(ALL_FOUR, tie_word_embeddings=True))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_gradients_reach_every_parameter():
    model = randomised(tiny_config(ALL_FOUR, mla_latent_norm=True), dtype=torch.float32).train()
    ids = torch.randint(0, 97, (2, 24))
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_gradient_checkpointing_gives_same_gradients():
    model = randomised(tiny_config(ALL_FOUR), dtype=torch.float64).train()
    ids = torch.randint(0, 97, (1, 20))
    model(ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-9, atol=1e-12, msg=n)


def test_bf16_forward_close_to_fp32():
    model = randomised(tiny_config(ALL_FOUR), dtype=torch.float32)
    ids = torch.randint(0, 97, (1, 33))
    ref = model(ids, use_cache=False).logits
    low = model.to(torch.bfloat16)(ids, use_cache=False).logits.float()
    assert ((low - ref).norm() / ref.norm()).item() < 3e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cache_footprint_equals_measured_bytes(dtype):
    config = tiny_config(("mla", "gdn", "mamba2", "attention", "mla"))
    model = HyloForCausalLM(config).to(dtype).eval()
    cache = HyloCache(config)
    with torch.no_grad():
        model(torch.randint(0, 97, (3, 45)), past_key_values=cache)
    measured = cache.nbytes()
    predicted = cache_footprint(config, 45, batch_size=3, dtype=dtype)
    assert measured["growing"] == predicted["growing_bytes"]
    assert measured["fixed"] == predicted["fixed_bytes"]
    assert measured["total"] == predicted["total_bytes"]


PAPER_FRACTIONS = {  # method.md section 3: per-token KV cache of the hybrid / the base Transformer, in %
    "llama3.2-1b/4MLA12GDN": 3.9, "llama3.2-1b/8MLA8M2": 7.8, "llama3.2-3b/6MLA22M2": 2.0,
    "llama3.2-3b/14MLA14GDN": 4.7, "qwen3-1.7b/7MLA21GDN": 3.9, "qwen3-1.7b/14MLA14M2": 7.8,
}


@pytest.mark.parametrize("preset", PAPER_FRACTIONS)
def test_paper_kv_fractions(preset):
    fp = cache_footprint(HyloConfig.from_preset(preset), 65536)
    assert round(100 * fp["kv_fraction"], 1) == PAPER_FRACTIONS[preset]
    assert fp["fixed_bytes"] > 0  # reported beside the fraction, not hidden
    assert fp["total_ratio"] > fp["kv_fraction"]


@torch.no_grad()
def test_yarn_attention_factor_scales_the_whole_mla_logit():
    """YaRN's attention factor is a temperature on the whole logit: transformers rotates all of q and k with
    tables scaled by it; DeepSeek-V2 multiplies MLA's softmax scale by its square. MLA rotates only
    qk_rope_head_dim of each head, so the nope part must be scaled too: with q's RoPE rows zeroed, the YaRN model
    equals the plain-RoPE model whose q nope rows are scaled by the factor squared (prefill and decode)."""
    yarn = dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=64)
    a = HyloForCausalLM(tiny_config(("mla", "mla"), mla_rope_parameters=yarn)).double().eval()
    b = HyloForCausalLM(tiny_config(("mla", "mla"))).double().eval()
    b.load_state_dict(a.state_dict())
    factor = a.model.rotary["mla"].scaling
    assert factor > 1.1
    nope, rope = a.config.qk_nope_head_dim, a.config.qk_rope_head_dim
    for la, lb in zip(a.model.layers, b.model.layers):
        wa = la.mixer.q_b_proj.weight.view(a.config.num_attention_heads, nope + rope, -1)
        wa[:, nope:] = 0
        lb.mixer.q_b_proj.weight.copy_(wa.reshape_as(lb.mixer.q_b_proj.weight))
        lb.mixer.q_b_proj.weight.view_as(wa)[:, :nope] *= factor**2
    x = torch.randint(0, 97, (2, 30))
    torch.testing.assert_close(a(x).logits, b(x).logits)
    cache_a, cache_b = HyloCache(a.config), HyloCache(b.config)
    a(x[:, :20], past_key_values=cache_a), b(x[:, :20], past_key_values=cache_b)
    torch.testing.assert_close(a(x[:, 20:21], past_key_values=cache_a).logits,
                               b(x[:, 20:21], past_key_values=cache_b).logits)


def test_yarn_rope_changes_mla_tables_only():
    config = tiny_config(ALL_FOUR, mla_rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                            original_max_position_embeddings=128))
    model = HyloForCausalLM(config)
    plain = Rotary(8, {"rope_type": "default", "rope_theta": 10000.0}, 512)
    assert not torch.allclose(model.model.rotary["mla"].inv_freq, plain.inv_freq)
    assert model.model.rotary["mla"].scaling > 1.0
    assert model.model.rotary["attention"].scaling == 1.0
