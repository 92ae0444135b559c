"""Stage 2, knowledge distillation (method.md section 5): what one KD step computes, and what a stage changes.

    teacher (no gradients): logits [B, T, V] (kl="full") or final hidden states [B, T, Dt] + LM-head weight
    student: same input ids -> logits, or final hidden states + its own LM-head weight
    loss = kl_weight * T^2 KL(p_teacher || p_student)   (direction "forward"; "reverse" swaps them)
         + ce_weight * CE(student, next tokens)           (the paper: ce_weight = 0)
with the KL "full" (losses.kd_loss on both T x V logit tensors), "chunked" (losses.fused_linear_kd: KL and CE
from hidden states in one pass over token blocks, gradients made in forward; the fastest, and ~10% of the
full logits' memory), "hidden" (losses.hidden_kd_loss: logit-free vocabulary tiles, the least memory) or "topk"
(losses.topk_kd_loss: the teacher as its top-k ids and log-probs per token, teacher_cache.py, optionally read
from disk so a later epoch runs no teacher forward; forward KL on the teacher's top-k support).
A stage may first put YaRN on the MLA layers (`apply_yarn`). The teacher may be larger than the base but
must predict over the same token ids (`check_shared_tokenizer`, run before any weight is loaded).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .ild import heldout_kl
from .losses import fused_linear_cross_entropy, fused_linear_kd, hidden_kd_loss, kd_loss, next_token_labels, \
    topk_kd_loss
from .stages import RecipeError, StageSpec


class KDStudent(nn.Module):
    """A HyloForCausalLM wrapped for stage 2: forward(input_ids, teacher output, teacher head) -> (loss, parts).

    The loss is computed inside forward so DDP / FSDP see one module call (the LM head weight is only
    whole inside it under FSDP). teacher_out is the teacher's logits [B, T, V] for kl="full", its top-k
    (ids, logprobs), each [B, T, k], for kl="topk", else its final hidden states [B, T, Dt] with its
    LM-head weight. `heldout=(ids, teacher_hidden, head)` returns
    ild.heldout_kl instead (evaluation).
    """

    _no_split_modules = ["HyloDecoderLayer"]

    def __init__(self, student, stage: StageSpec):
        super().__init__()
        self.student = student
        self.stage = stage

    def forward(self, input_ids=None, teacher_out=None, teacher_head_weight=None, *, heldout=None):
        if heldout is not None:
            return heldout_kl(self.student, *heldout)
        st = self.stage
        labels = next_token_labels(input_ids)
        if not st.kl_weight:  # cross-entropy only: no teacher output is needed (the trainer skips its forward)
            hidden = self.student.model(input_ids=input_ids, use_cache=False).last_hidden_state
            with torch.autocast(input_ids.device.type, enabled=False):
                ce = fused_linear_cross_entropy(hidden, self.student.lm_head.weight, labels,
                                                chunk_size=st.kl_chunk_size)
            return st.ce_weight * ce, {"ce": ce.detach()}
        terms = dict(kl_weight=st.kl_weight, ce_weight=st.ce_weight, direction=st.direction,
                     temperature=st.temperature)
        if st.kl == "full":
            logits = self.student(input_ids=input_ids, use_cache=False).logits
            with torch.autocast(input_ids.device.type, enabled=False):
                return kd_loss(logits, teacher_out, labels, **terms)
        hidden = self.student.model(input_ids=input_ids, use_cache=False).last_hidden_state
        head = self.student.lm_head.weight
        with torch.autocast(input_ids.device.type, enabled=False):
            if st.kl == "topk":
                return topk_kd_loss(hidden, head, *teacher_out, labels, kl_weight=st.kl_weight,
                                    ce_weight=st.ce_weight, temperature=st.temperature, chunk_size=st.kl_chunk_size)
            if st.kl == "chunked":  # KL and CE in one pass: the student's logits are made once
                return fused_linear_kd(hidden, head, teacher_out, teacher_head_weight, labels,
                                       chunk_size=st.kl_chunk_size, **terms)
            return hidden_kd_loss(hidden, head, teacher_out, teacher_head_weight, labels, token_chunk=st.kl_chunk_size,
                                  vocab_chunk=st.vocab_chunk_size, backend=st.kl_backend, **terms)


@torch.no_grad()
def teacher_kd_targets(teacher, input_ids, kl: str):
    """(teacher output, teacher head weight): logits for kl="full", else final hidden states + head."""
    if kl == "full":
        return teacher(input_ids=input_ids, use_cache=False).logits, None
    hidden = teacher.model(input_ids=input_ids, use_cache=False).last_hidden_state
    return hidden, teacher.get_output_embeddings().weight


def apply_yarn(model, yarn, seq_len: int) -> dict:
    """Set YaRN on the MLA layers' RoPE (config.mla_rope_parameters) and rebuild their Rotary tables.

    rope_theta is kept from the current MLA RoPE; max_position_embeddings grows to cover seq_len and
    factor x original length. An upcycled MLA gets the base head's frequencies under YaRN at its kept pairs
    (layers.common.mla_rotary). Returns the new rope parameters. Attention layers keep the base's RoPE.
    """
    from ..layers.common import mla_rotary

    config = model.config
    if "mla" not in config.mixers:
        raise RecipeError(f"yarn applies to MLA layers, but this student ({config.layout}) has none")
    params = yarn.rope_parameters(config.mla_rope_parameters.get("rope_theta", 10000.0))
    config.mla_rope_parameters = params
    config.max_position_embeddings = int(max(config.max_position_embeddings, seq_len,
                                             yarn.factor * yarn.original_max_position_embeddings))
    model.model.rotary["mla"] = mla_rotary(config)
    return params


# ---------------------------------------------------------------------------------------------------------------
# The teacher must share the student's tokenizer


def check_shared_tokenizer(base_path: str, teacher_path: str, tokenizer) -> None:
    """The stage-2 teacher must predict over the same token ids as the student: compare the configs'
    vocabulary sizes and, when the teacher has a tokenizer, every token and the special tokens."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        vocab = AutoConfig.from_pretrained(base_path).vocab_size
    except Exception as exc:  # noqa: BLE001
        raise RecipeError(f"cannot read the config of base {base_path!r}: {exc}") from exc
    if len(tokenizer) > vocab:
        raise RecipeError(f"the tokenizer has {len(tokenizer)} tokens but the base {base_path!r} has a vocabulary of "
                          f"{vocab}: they do not belong together")
    if teacher_path == base_path:
        return
    try:
        base_cfg, teacher_cfg = AutoConfig.from_pretrained(base_path), AutoConfig.from_pretrained(teacher_path)
    except Exception as exc:  # noqa: BLE001
        raise RecipeError(f"cannot read the config of base {base_path!r} or teacher {teacher_path!r}: {exc}") from exc
    if base_cfg.vocab_size != teacher_cfg.vocab_size:
        raise RecipeError(f"teacher {teacher_path!r} does not share the student's tokenizer: vocabulary sizes "
                          f"{teacher_cfg.vocab_size} (teacher) vs {base_cfg.vocab_size} (base / student). The KL "
                          f"compares next-token distributions id by id, so both must use the same tokenizer")
    try:
        teacher_tok = AutoTokenizer.from_pretrained(teacher_path)
    except Exception:  # noqa: BLE001 - a teacher directory without tokenizer files
        print(f"[distill] warning: teacher {teacher_path} has no tokenizer to compare; only the vocabulary size "
              f"({teacher_cfg.vocab_size}) was checked", file=sys.stderr)
        return
    a, b = tokenizer.get_vocab(), teacher_tok.get_vocab()
    if a != b:
        inv_a, inv_b = {v: k for k, v in a.items()}, {v: k for k, v in b.items()}
        ids = sorted(set(inv_a) | set(inv_b))
        first = next(i for i in ids if inv_a.get(i) != inv_b.get(i))
        raise RecipeError(f"teacher {teacher_path!r} does not share the student's tokenizer: {len(b)} vs {len(a)} "
                          f"tokens; first difference at id {first}: {inv_b.get(first)!r} (teacher) vs "
                          f"{inv_a.get(first)!r} (student)")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, name) != getattr(teacher_tok, name):
            raise RecipeError(f"teacher {teacher_path!r} tokenizer has {name}={getattr(teacher_tok, name)}, the "
                              f"student's has {getattr(tokenizer, name)}")
