"""Data sources: local text (per file or split at a separator), jsonl (text field or chat messages through the
chat template), parquet, `datasets` directories; documents end with eos; epochs reshuffle deterministically."""
import json

import pytest

from hylo_lab.data.sources import Documents, SourceSpec, open_source, tokenize_document
from hylo_lab.data.toy_corpus import toy_corpus

CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer():
    from hylo_lab.data.toy import train_tokenizer

    tok = train_tokenizer(toy_corpus(60, seed=5), vocab_size=400)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def chats():
    return [[{"role": "user", "content": f"how many apples, {i}?"}, {"role": "assistant", "content": f"{i} apples."}]
            for i in range(4)]


def test_text_files_one_document_each_or_split_at_separator(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("third doc")
    whole = open_source(SourceSpec(type="text", path=str(tmp_path), shuffle=False))
    assert [whole.get(k) for k in range(2)] == ["first doc\n\nsecond doc\n", "third doc"]
    split = open_source(SourceSpec(type="text", path=str(tmp_path), separator="\n\n", shuffle=False))
    assert [split.get(k) for k in range(3)] == ["first doc", "second doc\n", "third doc"]
    globbed = open_source(SourceSpec(type="text", path=str(tmp_path / "*.txt")))
    assert len(globbed) == 1


def test_jsonl_text_field_and_clear_errors(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"Mara has {i} apples.", "id": i}) for i in range(3)) + "\n\n")
    docs = open_source(SourceSpec(type="jsonl", path=str(path), field="body", shuffle=False))
    assert docs.get(1) == "Mara has 1 apples."
    ids = tokenize_document(docs.get(1), tokenizer)
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.decode(ids[:-1]) == "Mara has 1 apples."
    with pytest.raises(ValueError, match=r"d.jsonl:1: record has no field 'text'.*\['body', 'id'\]"):
        open_source(SourceSpec(type="jsonl", path=str(path)))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        open_source(SourceSpec(type="jsonl", path=str(tmp_path / "bad.jsonl")))
    with pytest.raises(FileNotFoundError, match="no jsonl file matches"):
        open_source(SourceSpec(type="jsonl", path=str(tmp_path / "missing.jsonl")))


def test_jsonl_chat_goes_through_the_chat_template(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m}) for m in chats()))
    spec = SourceSpec(type="jsonl", path=str(path), format="chat", shuffle=False)
    assert spec.field == "messages"
    doc = open_source(spec).get(2)
    ids = tokenize_document(doc, tokenizer, "chat")
    assert ids == tokenizer.encode("<s>user: how many apples, 2?\n<s>assistant: 2 apples.\n",
                                   add_special_tokens=False) + [tokenizer.eos_token_id]
    assert ids[0] == tokenizer.bos_token_id  # the template's <s> is the special token, not its characters
    saved, tokenizer.chat_template = tokenizer.chat_template, None  # no template: chat data is refused
    try:
        with pytest.raises(ValueError, match="chat template"):
            tokenize_document(doc, tokenizer, "chat")
    finally:
        tokenizer.chat_template = saved
    with pytest.raises(ValueError, match="use format 'chat'"):
        tokenize_document(doc, tokenizer, "text")


def test_parquet_text_and_chat_columns(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", "two", "three"], "messages": chats()[:3]}), tmp_path / "p.parquet")
    docs = open_source(SourceSpec(type="parquet", path=str(tmp_path), shuffle=False))
    assert [docs.get(k) for k in range(3)] == ["one", "two", "three"]
    chat = open_source(SourceSpec(type="parquet", path=str(tmp_path / "p.parquet"), format="chat", shuffle=False))
    assert tokenizer.decode(tokenize_document(chat.get(0), tokenizer, "chat")).startswith("<s>user: how many apples, 0?")
    with pytest.raises(ValueError, match="no column 'body'"):
        open_source(SourceSpec(type="parquet", path=str(tmp_path), field="body"))


def test_datasets_directory_from_save_to_disk(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a b", "c d", "e f"]})}).save_to_disk(
        str(tmp_path / "ds"))
    docs = open_source(SourceSpec(type="datasets", path=str(tmp_path / "ds"), shuffle=False))
    assert len(docs) == 3 and docs.get(4) == "c d"  # epoch 1, second document
    with pytest.raises(ValueError, match="splits"):
        open_source(SourceSpec(type="datasets", path=str(tmp_path / "ds"), split="validation"))


def test_streaming_datasets_source_reads_in_order_resumes_and_wraps(tmp_path):
    """`streaming: true` (the hub path, here a local folder of jsonl files so it runs offline): documents in file
    order, any position k reached again by skipping (what a resumed run does), epochs restart the stream."""
    (tmp_path / "stream").mkdir()
    (tmp_path / "stream" / "part.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
    spec = SourceSpec(type="datasets", path=str(tmp_path / "stream"), streaming=True)
    docs = open_source(spec)
    assert [docs.get(k) for k in range(7)] == [f"doc {i}" for i in (0, 1, 2, 3, 4, 0, 1)]
    assert docs.length == 5 and docs.epoch_of(7) == 1
    fresh = open_source(spec)
    assert fresh.get(3) == "doc 3" and fresh.get(4) == "doc 4"  # a resumed reader jumps straight to k


def test_epochs_reshuffle_deterministically():
    a = Documents(list(range(10)), "x", seed=3)
    b = Documents(list(range(10)), "x", seed=3)
    first = [a.get(k) for k in range(30)]
    assert first == [b.get(k) for k in range(30)]
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert first[:10] != first[10:20]  # epoch 1 is another order
    assert first != [Documents(list(range(10)), "x", seed=4).get(k) for k in range(30)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(type="csv", path="x"), "source type 'csv' is unknown"),
    (dict(type="text"), "needs `path`"),
    (dict(type="text", path="x", format="chat"), "needs structured records"),
    (dict(type="datasets"), "exactly one of `path`"),
    (dict(type="toy", split="validation"), "toy source split"),
    (dict(type="jsonl", path="x", weight=0), "weight must be > 0"),
    (dict(type="text", path="x", streaming=True), "streaming applies to datasets"),
])
def test_source_spec_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SourceSpec(**kwargs)
