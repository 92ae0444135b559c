"""The toy teachers' copy rows (hylo_lab.data.toy.TeacherBatches.copy_batch): what they score and that they are
reproducible. The teachers themselves are measured by the demo (README, "Toy demo results")."""

import pytest
import torch

from hylo_lab.data.toy import TeacherBatches, train_tokenizer
from hylo_lab.data.toy_corpus import toy_corpus


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(toy_corpus(60, seed=5), vocab_size=400)


def batches(tokenizer, seed=0):
    ids = torch.tensor(tokenizer.encode(" ".join(toy_corpus(40, seed=1))))
    return TeacherBatches(tokenizer, ids, seq_len=160, niah_fraction=0.5, answer_weight=3.0, seed=seed,
                          niah_tasks=("niah_single_1",))


def test_copy_rows_score_only_the_repeated_segment(tokenizer):
    inputs, targets, weights = batches(tokenizer).copy_batch(8, 40)
    assert inputs.shape == targets.shape == weights.shape == (8, 40)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    digits = set(batches(tokenizer).digit_ids.tolist())
    for row, target, w in zip(inputs, targets, weights):
        scored = w.nonzero().flatten()
        assert 5 <= len(scored) <= 13  # a 6-14 token segment, its first token unpredictable
        for t in scored.tolist():
            # the target was seen before, right after the token the model sees now
            earlier = [j for j in range(t) if row[j] == row[t] and j + 1 < t and row[j + 1] == target[t]]
            assert earlier, (t, row.tolist())
        assert row.min() >= 3  # never a special token
    all_tokens = inputs.flatten().tolist()
    assert sum(t in digits for t in all_tokens) > len(all_tokens) * 0.05  # needle values are digit strings


def test_copy_rows_are_reproducible_from_the_seed(tokenizer):
    a, b, c = (batches(tokenizer, seed=s).copy_batch(4, 40)[0] for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_digit_groups_split_numbers_from_the_left_and_copy_rows_use_every_digit_token():
    tok = train_tokenizer(toy_corpus(60, seed=5), vocab_size=1024, digit_group=2)
    assert tok.tokenize(" 5999014.") == ["Ġ", "59", "99", "01", "4", "."]
    assert tok.decode(tok.encode(" 5999014.")) == " 5999014."
    ids = torch.tensor(tok.encode(" ".join(toy_corpus(40, seed=1))))
    b = TeacherBatches(tok, ids, seq_len=160, niah_fraction=0.5, answer_weight=3.0, seed=0,
                       niah_tasks=("niah_single_1",))
    assert sorted(tok.convert_ids_to_tokens(b.digit_ids.tolist())) == sorted(
        [str(d) for d in range(10)] + [f"{d:02d}" for d in range(100)])


def test_digit_group_must_be_1_or_2():
    with pytest.raises(ValueError, match="digit_group"):
        train_tokenizer(toy_corpus(5, seed=5), vocab_size=300, digit_group=3)


def test_copy_digits_sets_the_share_of_digits_in_the_repeated_segment(tokenizer):
    ids = torch.tensor(tokenizer.encode(" ".join(toy_corpus(40, seed=1))))
    b = TeacherBatches(tokenizer, ids, seq_len=160, niah_fraction=0.5, answer_weight=3.0, seed=0,
                       niah_tasks=("niah_single_1",), copy_digits=1.0)
    inputs, targets, weights = b.copy_batch(4, 40)
    digits = set(b.digit_ids.tolist())
    assert all(t in digits for t in targets[weights > 0].tolist())


def test_toy_world_settings_are_arguments_not_module_globals(tmp_path, monkeypatch):
    """Teacher training and digit_group key their own cache folders; the defaults keep today's keys."""
    from hylo_lab.data import toy

    monkeypatch.setattr(toy, "_build", lambda final, build_fn, progress: None)
    world = lambda **kw: toy.get_toy_world(tmp_path, teachers=("llama-s",), progress=False, **kw)  # noqa: E731
    plain, same, steps = world(), world(training={"steps": 1500}), world(training={"steps": 3})
    pairs = world(digit_group=2)
    assert plain.teacher_dirs == same.teacher_dirs
    assert steps.root == plain.root and steps.teacher_dirs["llama-s"] != plain.teacher_dirs["llama-s"]
    assert pairs.root != plain.root
    assert toy.TEACHER_TRAINING["llama-s"]["steps"] == 1500 and toy.DIGIT_GROUP == 1
