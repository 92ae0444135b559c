"""Upcycling from directory to directory (the CLI's `hylo-lab upcycle`): calibration ids, the base tokenizer
copied beside the hybrid, SMART scores written next to it."""

from __future__ import annotations

import json
import os
import shutil
import time

import torch

from .base_checkpoint import UpcycleError, is_model, load_base_config
from .describe import describe
from .upcycle import upcycle

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def calibration_batch(base, *, text_file=None, tokens: int = 2048, seq_len: int = 256, seed: int = 0):
    """[rows, seq_len] token ids: the base tokenizer over `text_file`, or (no file) seeded random ids."""
    rows = max(1, tokens // seq_len)
    if text_file is None:
        vocab = load_base_config(base).vocab_size
        return torch.randint(0, vocab, (rows, seq_len), generator=torch.Generator().manual_seed(seed))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base.config._name_or_path if is_model(base) else str(base))
    with open(text_file, encoding="utf-8") as f:
        ids = tok(f.read(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < seq_len:
        raise UpcycleError(f"{text_file} gives {ids.numel()} tokens, fewer than one row of {seq_len}")
    rows = min(rows, ids.numel() // seq_len)
    return ids[: rows * seq_len].view(rows, seq_len)


def copy_tokenizer(base, out) -> bool:
    """Put the base tokenizer beside the output: its files from a local directory, else AutoTokenizer (hub)."""
    if isinstance(base, (str, os.PathLike)) and os.path.isdir(base):
        found = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(base, f))]
        for f in found:
            shutil.copy2(os.path.join(base, f), os.path.join(out, f))
        return bool(found)
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(base)).save_pretrained(out)
        return True
    except Exception:  # noqa: BLE001 - a base without a tokenizer is allowed
        return False


def upcycle_to_dir(base, out, *, calib_file=None, calib_tokens: int = 2048, calib_len: int = 256,
                   seq_lens=(8192, 65536), **upcycle_kwargs) -> str:
    """`upcycle` + save_pretrained(out) + the base tokenizer + smart_scores.json (when SMART ran).
    Returns the printable summary (layer plan, parameters, cache vs base, files written)."""
    if os.path.exists(out) and os.listdir(out):
        raise UpcycleError(f"output directory {out!r} exists and is not empty")
    t0 = time.time()
    needs_calib = upcycle_kwargs.get("select") == "smart" or (calib_file is not None)
    if needs_calib:
        upcycle_kwargs["calibration_ids"] = calibration_batch(base, text_file=calib_file, tokens=calib_tokens,
                                                              seq_len=calib_len, seed=upcycle_kwargs.get("seed", 0))
    model = upcycle(base, **upcycle_kwargs)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    notes = [f"wrote {out} in {time.time() - t0:.1f} s"]
    notes.append("tokenizer copied" if copy_tokenizer(base, out) else "no tokenizer found beside the base")
    smart = model.config.upcycle.get("smart")
    if smart:
        smart = dict(smart, calibration="random token ids" if calib_file is None else str(calib_file))
        with open(os.path.join(out, "smart_scores.json"), "w") as f:
            json.dump(smart, f, indent=2)
        notes.append(f"SMART scores -> {os.path.join(out, 'smart_scores.json')} (selected {smart['selected']})")
    return describe(model.config, seq_lens) + "\n" + "\n".join(notes)
