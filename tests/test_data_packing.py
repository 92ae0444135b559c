"""Packing: fixed-length rows, deterministic in the seed, resumable from state_dict (a JSON value) at any row,
mixing weights respected, synthetic task rows at the asked fraction, held-out / row-length checks."""
import json

import pytest
import torch

from hylo_lab.data.packing import PackedStream, SyntheticSpec, check_fills_row, heldout_rows
from hylo_lab.data.sources import SourceSpec
from hylo_lab.data.toy_corpus import toy_corpus


@pytest.fixture(scope="module")
def tokenizer():
    from hylo_lab.data.toy import train_tokenizer

    return train_tokenizer(toy_corpus(60, seed=5), vocab_size=400)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text("\n\n".join(toy_corpus(40, seed=1)))
    (root / "b.txt").write_text("\n\n".join(f"Zed zed zed {i}." for i in range(200)))
    return root


def specs(corpus, wb=1.0):
    return [SourceSpec(type="text", path=str(corpus / "a.txt"), separator="\n\n"),
            SourceSpec(type="text", path=str(corpus / "b.txt"), separator="\n\n", weight=wb)]


def test_rows_are_fixed_length_and_the_stream_is_the_concatenated_documents(corpus, tokenizer):
    one = [SourceSpec(type="text", path=str(corpus / "a.txt"), separator="\n\n", shuffle=False)]
    stream = PackedStream(one, tokenizer, 37, seed=0)
    rows = stream.next_batch(5)
    assert rows.shape == (5, 37) and rows.dtype == torch.long
    docs = toy_corpus(40, seed=1)
    expected = [t for d in docs[:20] for t in tokenizer.encode(d.strip("\n")) + [tokenizer.eos_token_id]]
    assert rows.flatten().tolist() == expected[:5 * 37]


def test_same_seed_same_rows_other_seed_other_rows(corpus, tokenizer):
    a = PackedStream(specs(corpus), tokenizer, 64, seed=7).next_batch(6)
    b = PackedStream(specs(corpus), tokenizer, 64, seed=7).next_batch(6)
    c = PackedStream(specs(corpus), tokenizer, 64, seed=8).next_batch(6)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_rows_do_not_depend_on_the_process_or_where_the_data_lies(corpus, tokenizer, tmp_path):
    """A fresh Python process reading a copy of the corpus in another folder packs the very same rows (task
    rows with cwe / fwe included, whose words come from a module-level cache)."""
    import shutil
    import subprocess
    import sys

    syn = SyntheticSpec(fraction=0.5, tasks=["niah_single_1", "cwe", "fwe", "vt"], answer_room=32)
    here = PackedStream(specs(corpus), tokenizer, 192, seed=5, synthetic=syn).next_batch(24)
    assert 6 <= int(sum("Answer:" in tokenizer.decode(r) for r in here.tolist())) <= 18
    copy = tmp_path / "elsewhere" / "deeper"
    shutil.copytree(corpus, copy)
    tokenizer.save_pretrained(tmp_path / "tok")
    script = f"""
import json, sys
from transformers import AutoTokenizer
from hylo_lab.data.packing import PackedStream, SyntheticSpec
from hylo_lab.data.sources import SourceSpec
from hylo_lab.data.tasks import tokenizer_corpus
tokenizer_corpus(5)  # touches the synthetic-word cache first, unlike the test process
tok = AutoTokenizer.from_pretrained({str(tmp_path / "tok")!r})
specs = [SourceSpec(type="text", path={str(copy / "a.txt")!r}, separator="\\n\\n"),
         SourceSpec(type="text", path={str(copy / "b.txt")!r}, separator="\\n\\n")]
syn = SyntheticSpec(fraction=0.5, tasks=["niah_single_1", "cwe", "fwe", "vt"], answer_room=32)
print(json.dumps(PackedStream(specs, tok, 192, seed=5, synthetic=syn).next_batch(24).tolist()))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here.tolist()


@pytest.mark.parametrize("k", [0, 3, 11], ids=lambda k: f"after{k}rows")
def test_resume_from_state_dict_continues_with_the_next_row(corpus, tokenizer, k):
    syn = SyntheticSpec(fraction=0.3, tasks=["niah_single_1", "vt"])
    full = PackedStream(specs(corpus), tokenizer, 160, seed=1, synthetic=syn).next_batch(k + 6)
    first = PackedStream(specs(corpus), tokenizer, 160, seed=1, synthetic=syn)
    first.next_batch(k) if k else None
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = PackedStream(specs(corpus), tokenizer, 160, seed=1, synthetic=syn)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch(6), full[k:])
    with pytest.raises(ValueError, match="data state is for seq_len=160"):
        PackedStream(specs(corpus), tokenizer, 128, seed=1).load_state_dict(state)


def test_mixing_weights_choose_documents(corpus, tokenizer):
    stream = PackedStream(specs(corpus, wb=3.0), tokenizer, 32, seed=0)
    stream.next_batch(150)
    a, b = stream.cursors
    assert 2.2 < b / a < 4.0  # 3:1 by documents


def test_synthetic_rows_hold_a_task_prompt_and_its_answer(corpus, tokenizer):
    syn = SyntheticSpec(fraction=0.5, tasks=["niah_single_1"], answer_room=32)
    stream = PackedStream(specs(corpus), tokenizer, 192, seed=3, synthetic=syn)
    rows = stream.next_batch(16)
    assert rows.shape == (16, 192)
    assert 4 <= stream.task_samples <= 12
    texts = [tokenizer.decode(r) for r in rows.tolist()]
    with_task = [t for t in texts if "magic number" in t]
    assert len(with_task) == stream.task_samples
    assert all("Answer:" in t for t in with_task)
    short = PackedStream(specs(corpus), tokenizer, 64, seed=3, synthetic=syn)  # below min_seq_len: text only
    short.next_batch(8)
    assert short.task_samples == 0


# 400 rows: the binomial standard deviation of the share is <= 0.025, so 0.05 is two of them (fixed seeds)
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.6])
def test_synthetic_share_of_rows_follows_the_mixing_ratio(corpus, tokenizer, fraction):
    syn = SyntheticSpec(fraction=fraction, tasks=["niah_single_1", "vt"], answer_room=32)
    stream = PackedStream(specs(corpus), tokenizer, 192, seed=11, synthetic=syn)
    rows = stream.next_batch(400)
    with_task = sum("Answer:" in tokenizer.decode(r) for r in rows.tolist())
    assert with_task == stream.task_samples
    assert abs(with_task / 400 - fraction) < 0.05, with_task


def test_synthetic_spec_checks_tasks():
    assert SyntheticSpec(tasks="niah").tasks[0] == "niah_single_1"
    with pytest.raises(ValueError, match="unknown synthetic task 'needle'"):
        SyntheticSpec(tasks=["needle"])
    with pytest.raises(ValueError, match="needs a QA file"):
        SyntheticSpec(tasks=["qa_1"])
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\]"):
        SyntheticSpec(fraction=1.5)


def test_heldout_and_row_length_checks(corpus, tokenizer):
    small = [SourceSpec(type="text", path=str(corpus / "b.txt"), separator="\n\n")]  # ~200 x 8 tokens
    assert heldout_rows(small, tokenizer, 64, 4).shape == (4, 64)
    with pytest.raises(ValueError, match="held-out data is too small for 100 rows of 64 tokens"):
        heldout_rows(small, tokenizer, 64, 100)
    check_fills_row(small, tokenizer, 512)
    with pytest.raises(ValueError, match="seq_len=8192 is longer than the data can provide"):
        check_fills_row(small, tokenizer, 8192)
