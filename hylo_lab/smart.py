"""SMART layer selection (Zebra-Llama): which layers to keep as MLA, scored by KL to the base.

From the all-linear student, put one layer at a time back to its all-MLA student's layer and measure how much
KL(base || student) on calibration ids drops; keep the k layers that help most.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base_checkpoint import UpcycleError, load_base_model
from .distill.losses import kl_div


def kl_to_teacher(student_logits, teacher_logprobs, mask=None) -> float:
    """Mean over tokens (where mask [B, T] is nonzero) of KL(teacher || student) from student logits and teacher
    log-probs [B, T, V]: losses.kl_div (log-probs are their own log_softmax)."""
    return kl_div(student_logits, teacher_logprobs, mask=mask).item()


@torch.no_grad()
def smart_select(base, k: int, calibration_ids, *, students, linear: str = "gdn", attention_mask=None):
    """SMART on `students` = (all-MLA, all-linear) hybrids of `base` (upcycle.convert_all, or trained stage-1
    students): score_i = KL(all-linear) - KL(all-linear with layer i from the all-MLA student); keep the k best.

    Returns (sorted indices, scores) with scores = {"kl_all_linear", "kl_all_mla", "kl_with_mla_at" [per
    layer], "score" [per layer], "selected", "linear", "calibration_tokens"}.
    """
    model = load_base_model(base)
    n = model.config.num_hidden_layers
    if not 0 < k < n:
        raise UpcycleError(f"k={k} must be in 1..{n - 1}")
    mla, probe = students
    ids = calibration_ids.to(next(model.parameters()).device)
    logits = model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits
    teacher = F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), -1)

    def kl(m):
        return kl_to_teacher(m(ids, attention_mask=attention_mask, use_cache=False).logits, teacher, attention_mask)

    kl_mla = kl(mla)
    kl_lin = kl(probe)
    # Swap layer objects into the linear student in place (with use_cache=False nothing else reads mixers).
    rotary = probe.model.rotary
    rotary["mla"] = mla.model.rotary["mla"]
    per_layer = []
    try:
        for i in range(n):
            own = probe.model.layers[i]
            probe.model.layers[i] = mla.model.layers[i]
            try:
                per_layer.append(kl(probe))
            finally:
                probe.model.layers[i] = own
    finally:
        del rotary["mla"]
    score = [kl_lin - x for x in per_layer]
    chosen = sorted(sorted(range(n), key=lambda i: (-score[i], i))[:k])
    return chosen, dict(kl_all_linear=kl_lin, kl_all_mla=kl_mla, kl_with_mla_at=per_layer, score=score,
                        selected=chosen, linear=linear, calibration_tokens=int(ids.numel()))
