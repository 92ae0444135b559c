"""Perplexity by context length and by position in long documents.

By length: ppl(L) = exp(mean NLL of tokens 2..L of every document with >= L tokens, truncated to L).
By position: the NLL of the target token at positions [start, end) of documents truncated to one length,
averaged per bucket: does the model keep using context far past its training length, or drift?

A causal model's prediction at position t does not depend on what follows, so one pass per document over
its first max(lengths) tokens gives every truncation at once. Long documents run in fixed-size chunks that
carry the cache (`prefill_chunk`), so only one chunk's logits are ever held.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from .generation import model_device, positions
from .ruler import active


def as_documents(documents, tokenizer=None, *, window: int | None = None) -> list[list[int]]:
    """Texts (a str or a list of str; needs `tokenizer`), token lists, or one token stream (a flat list or 1-D
    tensor of ids, cut into consecutive documents of `window` tokens) -> a list of token lists."""
    if isinstance(documents, str):
        documents = [documents]
    if isinstance(documents, torch.Tensor):
        documents = documents.tolist()  # [T]: one stream; [B, T]: B documents
    documents = list(documents)
    if documents and isinstance(documents[0], int):
        stream = documents
        step = window or len(stream)
        return [stream[i:i + step] for i in range(0, len(stream), step)]
    out = []
    for doc in documents:
        if isinstance(doc, str):
            if tokenizer is None:
                raise ValueError("text documents need a tokenizer")
            out.append(list(tokenizer(doc)["input_ids"]))
        else:
            out.append(doc.tolist() if isinstance(doc, torch.Tensor) else list(doc))
    return out


@torch.no_grad()
def token_nll(model, input_ids: torch.Tensor, *, prefill_chunk: int | None = None) -> torch.Tensor:
    """-log p(x_{t+1} | x_{<=t}) for t = 0 .. T-2 -> [B, T-1] float32. With `prefill_chunk`, the sequence runs
    in chunks carrying the cache; a chunk's last logit scores the first token of the next chunk."""
    ids = input_ids.to(model_device(model))
    B, T = ids.shape
    step = prefill_chunk or T
    pos = positions(torch.ones_like(ids))
    past, out = None, []
    for s in range(0, T - 1, step):
        e = min(T, s + step)
        res = model(input_ids=ids[:, s:e], position_ids=pos[:, s:e], past_key_values=past, use_cache=step < T)
        past = res.past_key_values
        logits = res.logits[:, : T - 1 - s].float()  # the last token of the sequence predicts nothing
        target = ids[:, s + 1: s + 1 + logits.shape[1]]
        out.append(F.cross_entropy(logits.transpose(1, 2), target, reduction="none"))
    return torch.cat(out, dim=1)


def document_nll(model, docs: list[list[int]], max_len: int, *, batch_size: int = 1,
                 prefill_chunk: int | None = None) -> list[torch.Tensor]:
    """Per-token NLL [min(len, max_len) - 1] of every document (documents of equal truncated length batched)."""
    cut = [d[:max_len] for d in docs]
    out: list[torch.Tensor | None] = [None] * len(docs)
    order = sorted(range(len(docs)), key=lambda i: len(cut[i]))
    groups: dict[int, list[int]] = {}
    for i in order:
        if len(cut[i]) >= 2:
            groups.setdefault(len(cut[i]), []).append(i)
    for idx in groups.values():
        for b in range(0, len(idx), batch_size):
            part = idx[b:b + batch_size]
            nll = token_nll(model, torch.tensor([cut[i] for i in part]), prefill_chunk=prefill_chunk).cpu()
            for i, row in zip(part, nll):
                out[i] = row
    return [x if x is not None else torch.zeros(0) for x in out]


def _row(nll_sum: float, n: int, **extra) -> dict:
    nll = nll_sum / n if n else float("nan")
    return dict(**extra, nll=nll, ppl=math.exp(nll) if n else float("nan"), n_tokens=n)


def perplexity_by_length(model, documents, lengths, *, tokenizer=None, batch_size: int = 1,
                         prefill_chunk: int | None = None, nll=None):
    """DataFrame(length, n_docs, nll, ppl, n_tokens): documents with at least L tokens, truncated to L, scored
    on their L-1 predicted tokens (token-weighted mean). `nll`: precomputed `document_nll` to reuse."""
    import pandas as pd

    lengths = [lengths] if isinstance(lengths, int) else sorted(lengths)
    docs = as_documents(documents, tokenizer, window=max(lengths))
    nll = nll if nll is not None else document_nll(model, docs, max(lengths), batch_size=batch_size,
                                                   prefill_chunk=prefill_chunk)
    rows = []
    for L in lengths:
        use = [x[: L - 1] for d, x in zip(docs, nll) if len(d) >= L]
        rows.append(_row(sum(float(x.double().sum()) for x in use), sum(len(x) for x in use), length=L,
                         n_docs=len(use)))
    return pd.DataFrame(rows, columns=["length", "n_docs", "nll", "ppl", "n_tokens"])


def perplexity_by_position(model, documents, length: int, *, bucket_size: int | None = None, tokenizer=None,
                           batch_size: int = 1, prefill_chunk: int | None = None, nll=None):
    """DataFrame(start, end, nll, ppl, n_tokens, n_docs): documents with at least `length` tokens, truncated to
    it; target positions [start, end) (position p = the p-th token, 1 .. length-1) in buckets of `bucket_size`
    (default length // 8)."""
    import pandas as pd

    docs = as_documents(documents, tokenizer, window=length)
    keep = [i for i, d in enumerate(docs) if len(d) >= length]
    if nll is None:
        part = document_nll(model, [docs[i] for i in keep], length, batch_size=batch_size, prefill_chunk=prefill_chunk)
    else:
        part = [nll[i] for i in keep]
    stacked = torch.stack([x[: length - 1] for x in part]).double() if part else torch.zeros(0, length - 1)
    size = bucket_size or max(1, length // 8)
    rows = []
    for start in range(1, length, size):
        end = min(length, start + size)
        block = stacked[:, start - 1: end - 1]
        rows.append(_row(float(block.sum()), block.numel(), start=start, end=end, n_docs=len(part)))
    return pd.DataFrame(rows, columns=["start", "end", "nll", "ppl", "n_tokens", "n_docs"])


def run_perplexity(model, documents, lengths, *, tokenizer=None, position_length: int | None = None,
                   bucket_size: int | None = None, batch_size: int = 1, prefill_chunk: int | None = None,
                   tracker=None, out_dir=None, label: str = "") -> dict:
    """Both views from one pass per document: {"by_length": DataFrame, "by_position": DataFrame (over
    `position_length`, default max(lengths)), "out_dir"}. Logs `eval/ppl/[label/]<length>` and
    `eval/ppl_position/[label/]<start>`, the tables and the figure `ppl[_label]`."""
    from ..plots import perplexity_figure

    tracker = active(tracker)
    lengths = [lengths] if isinstance(lengths, int) else sorted(lengths)
    position_length = position_length or max(lengths)
    window = max(max(lengths), position_length)
    docs = as_documents(documents, tokenizer, window=window)
    nll = document_nll(model, docs, window, batch_size=batch_size, prefill_chunk=prefill_chunk)
    by_length = perplexity_by_length(model, docs, lengths, nll=nll)
    by_position = perplexity_by_position(model, docs, position_length, bucket_size=bucket_size, nll=nll)
    result = dict(by_length=by_length, by_position=by_position, out_dir=None)
    if out_dir is None and tracker is None:
        return result
    sub = label + "/" if label else ""
    metrics = {f"eval/ppl/{sub}{r.length}": r.ppl for r in by_length.itertuples()}
    metrics.update({f"eval/ppl_position/{sub}{r.start}": r.ppl for r in by_position.itertuples()})
    name = f"ppl{'_' + label if label else ''}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(out_dir) if out_dir is not None else Path(tmp)
        path.mkdir(parents=True, exist_ok=True)
        by_length.to_csv(path / "ppl_by_length.csv", index=False)
        by_position.to_csv(path / "ppl_by_position.csv", index=False)
        fig = perplexity_figure(by_length, by_position, title=f"perplexity {label}".strip())
        if tracker is not None:
            tracker.log_metrics(metrics)
            tracker.log_figure(fig, name)
            tracker.log_artifact(path, name)
        if out_dir is not None:
            fig.savefig(path / f"{name}.png", dpi=120, bbox_inches="tight")
            result["out_dir"] = path
    return result
