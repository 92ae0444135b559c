import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hylo_lab import HyloForCausalLM
from hylo_lab.eval.perplexity import (as_documents, perplexity_by_length, perplexity_by_position, run_perplexity,
                                      token_nll)

from conftest import tiny_config


class Bigram(nn.Module):
    """p(next | current) from a fixed table: P[a, a+1 mod 4] = 1/2, every other next token 1/6."""

    def __init__(self):
        super().__init__()
        P = torch.full((4, 4), 1 / 6, dtype=torch.float64)
        P[torch.arange(4), (torch.arange(4) + 1) % 4] = 0.5
        self.logp = nn.Parameter(P.log(), requires_grad=False)

    def forward(self, input_ids, position_ids=None, past_key_values=None, use_cache=False, **kw):
        return SimpleNamespace(logits=self.logp[input_ids], past_key_values=None)


# doc A follows the cycle 0->1->2->3->0 everywhere (every token costs log 2); doc B breaks it at two of its
# three steps (log 2 + 2 log 6); doc C is too short for length 4
DOCS = [[0, 1, 2, 3, 0, 1], [0, 1, 3, 3], [2, 3]]


def test_by_length_hand_computed():
    df = perplexity_by_length(Bigram(), DOCS, [2, 4, 6]).set_index("length")
    l2, l6 = math.log(2), math.log(6)
    assert df.loc[2, "n_docs"] == 3 and df.loc[4, "n_docs"] == 2 and df.loc[6, "n_docs"] == 1
    # L=2: one target per doc: 0->1, 0->1, 2->3 all follow the cycle
    assert df.loc[2, "ppl"] == pytest.approx(2.0)
    # L=4: A contributes 3 x log 2, B log 2 + 2 log 6
    assert df.loc[4, "nll"] == pytest.approx((4 * l2 + 2 * l6) / 6)
    assert df.loc[4, "n_tokens"] == 6
    assert df.loc[6, "ppl"] == pytest.approx(2.0)


def test_by_position_hand_computed():
    df = perplexity_by_position(Bigram(), DOCS, 4, bucket_size=2)
    # targets at positions 1-2 and 3 of A and B: B's breaks sit at positions 2 and 3
    assert df[["start", "end", "n_tokens", "n_docs"]].values.tolist() == [[1, 3, 4, 2], [3, 4, 2, 2]]
    assert df.nll.tolist() == pytest.approx([(3 * math.log(2) + math.log(6)) / 4, (math.log(2) + math.log(6)) / 2])


def test_token_stream_is_cut_into_windows():
    assert as_documents(torch.arange(10), window=4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.fixture(scope="module")
def hylo():
    torch.manual_seed(0)
    return HyloForCausalLM(tiny_config(("mla", "gdn", "mamba2", "attention"))).to(torch.float64).eval()


def test_chunked_nll_equals_the_models_own_loss(hylo):
    """Chunks carrying the cache (5 tokens, crossing the ops' 16-token chunks) give the full-forward loss."""
    ids = torch.randint(0, 97, (2, 37), generator=torch.Generator().manual_seed(0))
    for L in (9, 37):
        want = hylo(ids[:, :L], labels=ids[:, :L], use_cache=False).loss
        got = token_nll(hylo, ids[:, :L], prefill_chunk=5)
        torch.testing.assert_close(got.mean().double(), want.double(), rtol=1e-6, atol=1e-6)
    df = perplexity_by_length(hylo, ids, [9, 37], prefill_chunk=5, batch_size=2)
    assert df.ppl.iloc[1] == pytest.approx(math.exp(hylo(ids, labels=ids, use_cache=False).loss.item()), rel=1e-6)


def test_run_perplexity_logs_both_views(tmp_path):
    class Rec:
        metrics, figures = {}, []

        def log_metrics(self, m, step=None):
            self.metrics.update(m)

        def log_figure(self, fig, name):
            self.figures.append(name)

        def log_artifact(self, path, artifact_path=None):
            pass

    tracker = Rec()
    res = run_perplexity(Bigram(), DOCS, [2, 4], position_length=4, bucket_size=2, tracker=tracker, out_dir=tmp_path)
    assert tracker.metrics["eval/ppl/2"] == pytest.approx(2.0) and "eval/ppl_position/3" in tracker.metrics
    assert tracker.figures == ["ppl"] and (tmp_path / "ppl_by_position.csv").exists()
    assert len(res["by_position"]) == 2
