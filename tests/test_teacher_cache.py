"""kl="topk": the teacher's top-k targets on disk (teacher_cache.py) and the loss on them (losses.topk_kd_loss).

The loss with k = V is kl_div (+ CE) in value and gradient, with k < V a dense formula (float64, 1e-10); the cache
reads back what it wrote, writes atomically, rewrites a corrupt file and misses on another teacher, k or
temperature; a KD stage run twice over the same batches runs no teacher forward the second time and gives the
same losses as the run without a cache; bad teacher_topk values are one clear recipe error."""
import os

import pytest
import torch
from test_distill_trainer import world  # noqa: F401 - a fixture

from hylo_lab.distill import teacher_cache as tc
from hylo_lab.distill.losses import kd_loss, next_token_labels, topk_kd_loss
from hylo_lab.distill.stages import RecipeError, recipe_from_dict
from hylo_lab.distill.trainer import Distiller


def tiny_teacher(seed=0, vocab=40):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def loss_and_grads(fn, h, w):
    h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss, parts = fn(h, w)
    loss.backward()
    return loss.detach(), parts, h.grad, w.grad


def test_topk_loss_with_k_equal_to_the_vocabulary_is_kl_div_plus_ce():
    g = torch.Generator().manual_seed(0)
    B, T, D, V, temp = 2, 7, 6, 11, 2.0
    h, w, zt = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((B, T, D), (V, D), (B, T, V)))
    ids = torch.randint(0, V, (B, T), generator=g)
    labels, mask = next_token_labels(ids), torch.rand(B, T, generator=g) > 0.3
    logp = torch.log_softmax(zt / temp, -1)
    top_logp, top_ids = logp.sort(-1, descending=True)
    kw = dict(kl_weight=0.7, ce_weight=0.5, temperature=temp, mask=mask)
    ref = loss_and_grads(lambda h, w: kd_loss(h @ w.T, zt, labels, **kw), h, w)
    got = loss_and_grads(lambda h, w: topk_kd_loss(h, w, top_ids.int(), top_logp, labels, chunk_size=3, **kw), h, w)
    assert got[0].dtype == torch.float64
    assert abs(got[0] - ref[0]) < 1e-10 and abs(got[1]["kl"] - ref[1]["kl"]) < 1e-10
    assert abs(got[1]["ce"] - ref[1]["ce"]) < 1e-10
    assert torch.allclose(got[2], ref[2], rtol=0, atol=1e-10) and torch.allclose(got[3], ref[3], rtol=0, atol=1e-10)


def test_topk_loss_below_the_vocabulary_equals_the_dense_formula():
    """KL over the teacher's top-k support with its probabilities renormalised there; the student's full softmax."""
    g = torch.Generator().manual_seed(1)
    B, T, D, V, k, temp = 2, 5, 6, 13, 4, 1.5
    h, w, zt = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((B, T, D), (V, D), (B, T, V)))
    top_logp, top_ids = torch.log_softmax(zt / temp, -1).topk(k, -1)

    def dense(h, w):
        q = torch.zeros(B, T, V, dtype=torch.float64).scatter(-1, top_ids, torch.softmax(top_logp, -1))
        ls = torch.log_softmax(h @ w.T / temp, -1)
        kl = torch.where(q > 0, q * (q.clamp_min(1e-300).log() - ls), 0.0).sum(-1).mean() * temp**2
        return kl, {}

    ref = loss_and_grads(dense, h, w)
    got = loss_and_grads(lambda h, w: topk_kd_loss(h, w, top_ids, top_logp, temperature=temp, chunk_size=4), h, w)
    assert abs(got[0] - ref[0]) < 1e-10 and got[0] > 0.1
    assert torch.allclose(got[2], ref[2], rtol=0, atol=1e-10) and torch.allclose(got[3], ref[3], rtol=0, atol=1e-10)
    full = loss_and_grads(lambda h, w: kd_loss(h @ w.T, zt, temperature=temp), h, w)
    assert abs(got[0] - full[0]) > 1e-3  # the renormalised top-k KL is not the full one


def test_cache_round_trip_counts_hits_and_matches_the_teacher(tmp_path):
    teacher, k, temp = tiny_teacher(), 5, 2.0
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    cache = tc.TeacherTopKCache(tmp_path, tc.teacher_fingerprint(teacher), k, temp)
    first = cache.targets(ids, lambda: tc.teacher_topk_targets(teacher, ids, k, temp, chunk_size=4))
    assert (cache.hits, cache.misses) == (0, 1) and cache.path(cache.key(ids)).is_file()
    second = cache.targets(ids, lambda: pytest.fail("a hit must not compute"))
    assert (cache.hits, cache.misses) == (1, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert first[0].dtype == torch.int32 and first[1].dtype == torch.float16 and first[0].shape == (2, 9, k)
    logp = torch.log_softmax(teacher(input_ids=ids).logits.double() / temp, -1)
    want_logp, want_ids = logp.topk(k, -1)
    assert torch.equal(first[0].long(), want_ids)
    assert torch.allclose(first[1].double(), want_logp, rtol=1e-3, atol=1e-3)  # float16 storage


def test_writes_are_atomic_and_a_corrupt_file_is_rewritten(tmp_path, monkeypatch):
    from safetensors import torch as st_torch

    teacher, k = tiny_teacher(), 3
    ids = torch.randint(0, 40, (1, 6), generator=torch.Generator().manual_seed(1))
    compute = lambda: tc.teacher_topk_targets(teacher, ids, k)  # noqa: E731
    cache = tc.TeacherTopKCache(tmp_path, tc.teacher_fingerprint(teacher), k, 1.0)
    final = cache.path(cache.key(ids))

    def half_then_die(tensors, path, metadata=None):
        open(path, "wb").write(b"\x00" * 10)
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(st_torch, "save_file", half_then_die)
        with pytest.raises(OSError, match="disk full"):
            cache.targets(ids, compute)
    assert not final.exists() and os.listdir(final.parent) == []  # neither the final name nor a temporary
    good = cache.targets(ids, compute)
    final.write_bytes(final.read_bytes()[:40])  # a partial file, as if copied half
    assert cache.load(ids) is None
    again = cache.targets(ids, compute)
    assert cache.misses == 3 and cache.hits == 0
    assert cache.targets(ids, compute) and cache.hits == 1
    assert all(torch.equal(a, b) for a, b in zip(good, again))


def test_another_teacher_k_or_temperature_misses(tmp_path):
    teacher = tiny_teacher()
    ids = torch.randint(0, 40, (1, 6), generator=torch.Generator().manual_seed(2))
    fp = tc.teacher_fingerprint(teacher)
    key = tc.TeacherTopKCache(tmp_path, fp, 4, 1.0).key(ids)
    assert tc.TeacherTopKCache(tmp_path, fp, 4, 1.0).key(ids.clone()) == key
    assert tc.TeacherTopKCache(tmp_path, fp, 5, 1.0).key(ids) != key
    assert tc.TeacherTopKCache(tmp_path, fp, 4, 2.0).key(ids) != key
    assert tc.TeacherTopKCache(tmp_path, fp, 4, 1.0).key(ids.flip(-1)) != key
    with torch.no_grad():
        teacher.model.norm.weight[0] += 1e-3
    assert tc.teacher_fingerprint(teacher) != fp  # weights hashed when there is no directory
    teacher.save_pretrained(tmp_path / "t")
    on_disk = tc.teacher_fingerprint(teacher, str(tmp_path / "t"))
    weights = tmp_path / "t" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    rewritten = tc.teacher_fingerprint(teacher, str(tmp_path / "t"))
    assert rewritten != on_disk  # a rewritten checkpoint
    assert tc.teacher_fingerprint(teacher.to("meta"), str(tmp_path / "t")) != rewritten  # another device


def kd_recipe(world, out, **stage):  # noqa: F811
    root = world["root"]
    return dict(
        name="topk", output_dir=str(out), base=str(world["base"]), student=dict(layout="1MLA1GDN", mla_layers=[1]),
        data=dict(train=[dict(type="text", path=str(root / "train.txt"), separator="\n\n")]),
        train=dict(batch_size=4, micro_batch_size=2, progress=False), tracking=dict(enabled=False),
        stages=[dict(dict(name="kd", kind="kd", seq_len=32, steps=3, lr=1e-3, kl="topk", teacher_topk=16,
                          temperature=2.0, ce_weight=0.25, kl_chunk_size=20), **stage)])


class Counting(Distiller):
    """Records each step's loss and counts the teacher's forwards."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.losses, self.forwards = [], 0

    def teacher(self, path):
        model = super().teacher(path)
        if not getattr(model, "_counted", False):
            model.model.register_forward_pre_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))
            model._counted = True
        return model

    def loss_hook(self, loss, run, step):
        self.losses.append(loss.item())
        return loss


def test_a_second_epoch_reads_every_target_from_disk_and_trains_the_same(world, tmp_path):  # noqa: F811
    def run(name, cache):
        d = Counting(recipe_from_dict(kd_recipe(world, tmp_path / name, teacher_cache=cache)))
        d.run()
        return d

    plain = run("plain", None)
    first = run("epoch1", str(tmp_path / "cache"))
    second = run("epoch2", str(tmp_path / "cache"))
    assert plain.forwards == first.forwards == 6  # 3 steps x 2 micro-batches
    assert second.forwards == 0
    assert (first.topk_caches["kd"].misses, second.topk_caches["kd"].hits) == (6, 6)
    assert second.topk_caches["kd"].misses == 0
    assert len(plain.losses) == 6 and first.losses == plain.losses and second.losses == plain.losses
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 6


@pytest.mark.parametrize("stage, message", [
    (dict(teacher_topk=0), "teacher_topk=0 must be >= 1"),
    (dict(teacher_topk=2.5), "teacher_topk: expected an integer"),
    (dict(direction="reverse"), "direction must be 'forward'"),
    (dict(kl="chunked", teacher_cache="/tmp/x"), "apply to kl=topk only"),
])
def test_bad_topk_settings_are_recipe_errors(world, tmp_path, stage, message):  # noqa: F811
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(kd_recipe(world, tmp_path / "out", **stage))


def test_a_k_larger_than_the_vocabulary_is_refused_before_any_weight_loads(world, tmp_path):  # noqa: F811
    d = Distiller(recipe_from_dict(kd_recipe(world, tmp_path / "out", teacher_topk=10**6)))
    with pytest.raises(RecipeError, match=r"teacher_topk=1000000 is larger than the vocabulary \(384 tokens\)"):
        d.setup()
    assert not d.teachers
