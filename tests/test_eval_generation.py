import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hylo_lab import HyloForCausalLM
from hylo_lab.eval.generation import greedy_generate, positions

from conftest import tiny_config


def perturbed(model, seed=0):
    """float64 with every parameter nudged, so greedy argmax ties are practically impossible."""
    torch.manual_seed(seed)
    model = model.to(torch.float64).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hylo():
    torch.manual_seed(0)
    return perturbed(HyloForCausalLM(tiny_config(("mla", "gdn", "mamba2", "attention"))))


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    return perturbed(LlamaForCausalLM(cfg))


def naive_generate(model, rows, n):
    """No cache at all: every step re-runs the whole (left-padded) sequence and takes the last argmax."""
    out = []
    for r in rows:
        seq = torch.tensor([r])
        for _ in range(n):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        out.append(seq[0, len(r):].tolist())
    return out


# rows of 19, 11 and 4 tokens: the shorter two are left-padded by 8 and 15 inside one batch; the 7-token
# prefill chunk leaves the last row's first two chunks entirely padding
@pytest.mark.parametrize("which", ["hylo", "llama"])
@pytest.mark.parametrize("chunk", [None, 7], ids=["one_shot", "chunk7"])
def test_cached_greedy_equals_full_forward_loop(which, chunk, request):
    model = request.getfixturevalue(which)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (19, 11, 4)]
    got = greedy_generate(model, rows, 6, prefill_chunk=chunk)
    assert got == naive_generate(model, rows, 6)


@pytest.mark.parametrize("which", ["hylo", "llama"])
def test_chunked_prefill_equals_one_shot(which, request):
    model = request.getfixturevalue(which)
    ids = torch.randint(1, 97, (2, 40), generator=torch.Generator().manual_seed(2))
    one = greedy_generate(model, ids, 5)
    for chunk in (1, 16, 39):
        assert greedy_generate(model, ids, 5, prefill_chunk=chunk) == one


def test_eos_ends_a_row_and_is_not_returned(hylo):
    ids = torch.randint(1, 97, (1, 12), generator=torch.Generator().manual_seed(3))
    free = greedy_generate(hylo, ids, 6)[0]
    stopped = greedy_generate(hylo, ids, 6, eos_token_id=free[2])[0]
    assert stopped == free[: free.index(free[2])]
    assert greedy_generate(hylo, ids, 6, stop=lambda toks: len(toks) == 3)[0] == free[:3]


def test_positions_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
