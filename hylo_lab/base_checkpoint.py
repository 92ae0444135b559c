"""The base checkpoint of an upcycling: load it, check it, describe its shape, read its attention blocks.

Supported: Llama, Mistral (no sliding window), Qwen2 (no sliding window in use), Qwen3. Decisions the hybrid
blocks impose on a base, each refused here with what is supported: o_proj biases (no block has a slot), sliding
windows, partial RoPE, rope types outside ROPE_TYPES.

Qwen3's per-head q_norm / k_norm (q <- w * q / rms(q)), AttentionWeights.fold_qk_norm: "fold" multiplies each
query / key row by its norm weight and by a per-head constant c = E[1/rms(q_h)] that stands in for the per-token
normalisation (measured on calibration ids by qk_norm_scales, else the data-free estimate
1/sqrt(||W_h diag(g)||_F^2 / hd) for unit-RMS isotropic inputs scaled by the input norm's g); "drop" uses the raw
projections. Fold keeps the base's score scale; drop shrinks scores by ~rms(q) rms(k) (about 5x on a toy Qwen3).
"""

from __future__ import annotations

import copy
import os

import torch

from .config import BASE_SHAPES
from .errors import UserError
from .ops.low_rank import round_up

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_TEXT = "llama, mistral (no sliding window), qwen2 (no sliding window in use), qwen3"
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
SHAPE_KEYS = ("base_model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim")
DIM_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
            "gdn_num_heads", "gdn_head_dim")


class UpcycleError(UserError):
    """A base, layout or option that cannot be upcycled; raised before any weight is loaded or computed."""


def is_model(base) -> bool:
    return isinstance(base, torch.nn.Module)


def load_base_config(base):
    """The base's transformers config, from a model object, a local directory or a hub id (no weights)."""
    if is_model(base):
        return base.config
    if not isinstance(base, (str, os.PathLike)):
        raise UpcycleError(f"base must be a transformers causal LM, a local directory or a hub id, not {type(base).__name__}")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(base))
    except Exception as exc:  # noqa: BLE001 - surfaces as one clear message
        where = "local directory" if os.path.isdir(base) else "hub id (offline mode or no network makes hub ids fail)"
        raise UpcycleError(f"cannot read the config of base {str(base)!r} as a {where}: {exc}") from exc


def load_base_model(base, dtype=None):
    """A model object as is; else AutoModelForCausalLM.from_pretrained in the checkpoint's dtype (or `dtype`)."""
    if is_model(base):
        return base
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype or "auto").eval()


def attention_biases(cfg) -> tuple[bool, bool]:
    """(q/k/v have biases, o_proj has a bias) as the transformers modeling file builds them."""
    if cfg.model_type == "qwen2":
        return True, False
    if cfg.model_type == "mistral":
        return False, False
    bias = bool(getattr(cfg, "attention_bias", False))
    return bias, bias


def rope_parameters(cfg) -> dict:
    params = getattr(cfg, "rope_parameters", None)
    if params is None:  # pre-5.x style configs
        params = dict(getattr(cfg, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    params = dict(params)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    original = params.get("original_max_position_embeddings")
    if params["rope_type"] == "longrope" and params.get("factor") is None and original:
        # transformers derives it from max_position_embeddings, which a YaRN stage on the MLA layers raises
        params["factor"] = cfg.max_position_embeddings / original
    return params


def check_base_config(cfg) -> None:
    """Refuse, with what is supported, every base the blocks cannot reproduce."""
    mt = getattr(cfg, "model_type", None)
    if getattr(cfg, "is_encoder_decoder", False) or mt in ("bert", "roberta", "t5", "bart", "deberta", "electra"):
        raise UpcycleError(f"model_type {mt!r} is an encoder or encoder-decoder model; only decoder-only causal "
                           f"LMs can be upcycled. Supported model types: {SUPPORTED_TEXT}")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UpcycleError(f"model_type {mt!r} is not supported. Supported model types: {SUPPORTED_TEXT}")
    if mt == "mistral" and getattr(cfg, "sliding_window", None) is not None:
        raise UpcycleError(f"this mistral config uses sliding_window={cfg.sliding_window}, which the hybrid blocks "
                           f"cannot honour; set sliding_window=None (e.g. Mistral-7B-v0.3) to upcycle it")
    layer_types = getattr(cfg, "layer_types", None) or []
    if "sliding_attention" in layer_types or (mt in ("qwen2", "qwen3") and getattr(cfg, "use_sliding_window", False)):
        raise UpcycleError(f"this {mt} config has sliding-window layers in use (use_sliding_window / layer_types), "
                           f"which the hybrid blocks cannot honour; supported: {SUPPORTED_TEXT}")
    if attention_biases(cfg)[1]:
        raise UpcycleError("attention_bias=True gives o_proj a bias, which no hybrid block has a slot for; "
                           "only q/k/v biases (qwen2) are supported")
    rope = rope_parameters(cfg)
    if rope["rope_type"] not in ROPE_TYPES:
        raise UpcycleError(f"rope_type {rope['rope_type']!r} is not supported; use one of {ROPE_TYPES}")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UpcycleError("partial_rotary_factor != 1 is not supported (RoPE must cover the whole head)")
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu"):
        raise UpcycleError(f"hidden_act {act!r} is not supported by the hybrid's MLP")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise UpcycleError("num_attention_heads must be a multiple of num_key_value_heads")


def base_shape(cfg) -> dict:
    """HyloConfig fields describing the base Transformer (everything but the mixers and their dims)."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    qkv_bias, _ = attention_biases(cfg)
    return dict(
        base_model_type=cfg.model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads, head_dim=head_dim,
        hidden_act=getattr(cfg, "hidden_act", "silu"), max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, initializer_range=getattr(cfg, "initializer_range", 0.02),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)), attention_bias=qkv_bias,
        attention_qk_norm=cfg.model_type == "qwen3", mlp_bias=bool(getattr(cfg, "mlp_bias", False) or False),
        rope_parameters=rope_parameters(cfg), pad_token_id=getattr(cfg, "pad_token_id", None),
        bos_token_id=getattr(cfg, "bos_token_id", None), eos_token_id=getattr(cfg, "eos_token_id", None),
    )


def matching_base_shape(cfg) -> str | None:
    """The BASE_SHAPES name whose shape equals this base's, if any."""
    shape = base_shape(cfg)
    for name, ref in BASE_SHAPES.items():
        if all(shape[k] == ref[k] for k in SHAPE_KEYS):
            return name
    return None


def default_dims(cfg) -> dict:
    """Block dims: the paper's for a base of a paper shape (method.md section 3), else the same rules
    (rope = nope = v/2 = hd/2; kv_lora_rank = H_kv*hd/4; q_lora_rank ~ 21/32 of hidden; GDN key width
    ~ 3/4 of H*hd in heads of min(256, 4*hd)), which reproduce the paper's numbers for its bases."""
    name = matching_base_shape(cfg)
    if name is not None:
        return {k: BASE_SHAPES[name][k] for k in DIM_KEYS}
    s = base_shape(cfg)
    H, Hkv, hd, D = s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"], s["hidden_size"]
    rope = max(2, hd // 2 - (hd // 2) % 2)
    q_full = min(D, H * hd)
    gdn_head = min(256, 4 * hd)
    return dict(q_lora_rank=min(q_full, round_up(21 * D // 32, 8)), kv_lora_rank=min(D, Hkv * hd, round_up(Hkv * hd // 4, 8)),
                qk_rope_head_dim=rope, qk_nope_head_dim=hd - rope, v_head_dim=hd,
                gdn_num_heads=max(1, round(0.75 * H * hd / gdn_head)), gdn_head_dim=gdn_head)


class AttentionWeights:
    """One base attention block in the compute dtype: q [H*hd, D], k / v [Hkv*hd, D], o [D, H*hd], biases or
    None, q/k norm weights [hd] or None, the layer's input-norm weight [D] (for the q/k-norm estimate), and the
    block itself as `module`. What every mixer's from_attention() reads."""

    def __init__(self, layer, shape: dict, dtype):
        attn = self.module = layer.self_attn
        get = lambda mod, name: None if mod is None or getattr(mod, name, None) is None else getattr(mod, name).detach().to(dtype)  # noqa: E731
        self.q, self.k, self.v, self.o = (get(getattr(attn, n), "weight") for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        self.q_bias, self.k_bias, self.v_bias = (get(getattr(attn, n), "bias") for n in ("q_proj", "k_proj", "v_proj"))
        if get(attn.o_proj, "bias") is not None:
            raise UpcycleError("o_proj has a bias, which no hybrid block has a slot for")
        self.q_norm = get(getattr(attn, "q_norm", None), "weight")
        self.k_norm = get(getattr(attn, "k_norm", None), "weight")
        self.input_norm = get(layer.input_layernorm, "weight")
        self.H, self.Hkv, self.hd = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
        self.eps = shape["rms_norm_eps"]

    def fold_qk_norm(self, mode: str, scales: tuple | None = None) -> "AttentionWeights":
        """A copy with q/k norms folded into the rows (see the module docstring), or unchanged for "drop"."""
        out = copy.copy(self)
        if self.q_norm is None or mode == "drop":
            return out
        for name, n_heads in (("q", self.H), ("k", self.Hkv)):
            W, b, w = getattr(self, name), getattr(self, f"{name}_bias"), getattr(self, f"{name}_norm")
            if scales is not None:
                c = scales[0 if name == "q" else 1].to(W)
            else:  # unit-RMS isotropic input times the input norm's gain
                ms = (W * self.input_norm[None]).view(n_heads, self.hd, -1).pow(2).sum((1, 2)) / self.hd
                if b is not None:
                    ms = ms + b.view(n_heads, self.hd).pow(2).sum(1) / self.hd
                c = (ms + self.eps).rsqrt()
            g = (c[:, None] * w[None]).reshape(-1)  # [n_heads * hd]
            setattr(out, name, W * g[:, None])
            setattr(out, f"{name}_bias", None if b is None else b * g)
        return out


@torch.no_grad()
def qk_norm_scales(model, calibration_ids, attention_mask=None) -> dict[int, tuple]:
    """Per layer (c_q [H], c_k [Hkv]) = mean over tokens of 1/rms of each head's raw projection, for
    qk_norm="fold": the constant that replaces q_norm / k_norm's per-token division."""
    cfg = model.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    found, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        for name, n_heads in (("q_proj", H), ("k_proj", Hkv)):
            def hook(mod, inp, out, i=i, name=name, n_heads=n_heads):
                x = out.float().reshape(-1, n_heads, hd)
                inv = (x.pow(2).mean(-1) + cfg.rms_norm_eps).rsqrt()  # [tokens, heads]
                if attention_mask is not None:
                    m = attention_mask.reshape(-1).bool().to(inv.device)
                    inv = inv[m]
                found[(i, name)] = inv.mean(0)
            hooks.append(getattr(layer.self_attn, name).register_forward_hook(hook))
    try:
        model(input_ids=calibration_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {i: (found[(i, "q_proj")], found[(i, "k_proj")]) for i in range(len(model.model.layers))}
