"""Stage 1, Enhanced-ILD with teacher forcing (method.md section 5).

The teacher (the base transformers Llama / Qwen model, or any model whose decoder layers sit in
`model.model.layers` with a `self_attn` or `mixer` submodule) runs once without gradients; forward hooks
record, for every layer l,
    x_l  the hidden state entering layer l,
    h_l  the layer's output,
    a_l  the attention block's output (before the residual add).
Every student layer l then runs on the teacher's x_l (not on its own previous layer's output), so all
layers train in parallel and an error in layer 3 never reaches layer 4's input:
    h'_l, a'_l = student_layer_l(x_l)
    loss = sum_l mean_t ||h'_l - h_l||_2 + mixer_weight * mean_t ||a'_l - a_l||_2   (losses.ild_loss)
Embeddings, final norm and LM head take no part (they are copies of the base's and get no gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .losses import chunked_kl_div, ild_loss


@dataclass
class TeacherStates:
    """Per-layer teacher tensors [B, T, D] (see the module docstring) and the positions used."""

    inputs: list[Tensor]
    outputs: list[Tensor]
    mixer_outputs: list[Tensor]
    position_ids: Tensor


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of a causal LM (transformers Llama/Qwen/Mistral or HyloForCausalLM)."""
    body = getattr(model, "model", model)
    layers = getattr(body, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no `model.layers`: teacher-forced ILD needs a decoder-only "
                         f"model laid out like transformers' Llama")
    return layers


def mixer_of(layer) -> nn.Module:
    for name in ("self_attn", "mixer"):
        if hasattr(layer, name):
            return getattr(layer, name)
    raise ValueError(f"{type(layer).__name__} has neither `self_attn` nor `mixer`")


def _first(output) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def teacher_states(teacher, input_ids: Tensor, attention_mask: Tensor | None = None) -> TeacherStates:
    """Run the teacher's decoder body once (no LM head) and record x_l, h_l, a_l for every layer."""
    layers = decoder_layers(teacher)
    n = len(layers)
    inputs, outputs, mixers = [None] * n, [None] * n, [None] * n
    hooks = []

    def pre_hook(i):
        def fn(module, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]
        return fn

    def out_hook(store, i):
        def fn(module, args, output):
            store[i] = _first(output)
        return fn

    try:
        for i, layer in enumerate(layers):
            hooks.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
            hooks.append(layer.register_forward_hook(out_hook(outputs, i)))
            hooks.append(mixer_of(layer).register_forward_hook(out_hook(mixers, i)))
        B, T = input_ids.shape
        position_ids = torch.arange(T, device=input_ids.device)[None].expand(B, T)
        body = getattr(teacher, "model", teacher)
        body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    missing = [i for i in range(n) if inputs[i] is None or outputs[i] is None or mixers[i] is None]
    if missing:
        raise RuntimeError(f"teacher layers {missing} were not run (a model that skips layers cannot teach ILD)")
    return TeacherStates(inputs, outputs, mixers, position_ids)


class TeacherForcedStudent(nn.Module):
    """A HyloForCausalLM wrapped for stage 1: forward(teacher states) -> (loss, parts).

    The wrapper is what `accelerator.prepare` sees, so DDP / FSDP hooks run around the teacher-forced pass
    (calling the student's layers directly would bypass them). With `heldout=(input_ids, teacher_hidden,
    teacher_head_weight)` it instead runs the whole student normally and returns `heldout_kl` (evaluation).
    """

    _no_split_modules = ["HyloDecoderLayer"]

    def __init__(self, student, *, mixer_weight: float = 1.0, squared: bool = False):
        super().__init__()
        self.student = student
        self.mixer_weight, self.squared = mixer_weight, squared
        if len(self.student.model.layers) == 0:
            raise ValueError("student has no layers")

    def layer_outputs(self, states: TeacherStates, attention_mask=None):
        """Each student layer on the teacher's input to that layer: lists of outputs h'_l and mixer outputs a'_l."""
        layers = self.student.model.layers
        if len(layers) != len(states.inputs):
            raise ValueError(f"student has {len(layers)} layers, teacher {len(states.inputs)}: ILD pairs them one to one")
        rope = self.student.model.rope_tables(states.position_ids, states.inputs[0].dtype)
        outs, mixes = [], []
        for layer, x in zip(layers, states.inputs):
            h, a = layer(x, rope, None, attention_mask, return_mixer_output=True)
            outs.append(h)
            mixes.append(a)
        return outs, mixes

    def forward(self, states: TeacherStates | None = None, attention_mask=None, loss_mask=None, *, heldout=None):
        if heldout is not None:
            return heldout_kl(self.student, *heldout)
        outs, mixes = self.layer_outputs(states, attention_mask)
        return ild_loss(outs, states.outputs, mixes, states.mixer_outputs, mixer_weight=self.mixer_weight,
                        squared=self.squared, mask=loss_mask)


def heldout_kl(student, input_ids: Tensor, teacher_hidden: Tensor, teacher_head_weight: Tensor,
               chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Free-running forward KL(teacher || student) of a whole student on `input_ids` [B, T].

    teacher_hidden [B, T, Dt]: the teacher's final (normed) hidden states; the LM heads turn both into
    logits chunk by chunk (losses.chunked_kl_div), never T x V at once. Returns (sum of per-token KL,
    number of tokens) so callers can average over batches and processes. Call under no_grad.
    """
    hidden = student.model(input_ids=input_ids, use_cache=False).last_hidden_state
    with torch.autocast(input_ids.device.type, enabled=False):
        kl = chunked_kl_div(hidden, teacher_hidden, student.lm_head.weight, teacher_head_weight,
                            chunk_size=chunk_size)
    n = torch.tensor(float(input_ids.numel()), device=kl.device)
    return kl * n, n
