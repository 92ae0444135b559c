"""Upcycling: a pretrained Llama / Mistral / Qwen2 / Qwen3 causal LM -> a HyLo hybrid (method.md sections 2-4).

Copied exactly (same dtype = bit-identical): embeddings, every input / post-attention RMSNorm, every MLP, the
final norm and the LM head (tied or untied, as in the base). Each attention block becomes, by the layout:
- "mla": truncated SVD (X-EcoMLA). Per query head the RoPE rows are rope/2 frequency pairs (j, j + hd/2) of
  the base head, taken every hd/rope pairs (rope_pairs, stored as config.mla_rope_pairs): MLA's Rotary
  computes the base head's frequencies and attention factor (transformers' own, for every rope type) and
  keeps those pairs, so the RoPE part of a score is the base's contribution of those pairs (a YaRN stage
  later extends the base head's RoPE at the same pairs). The NoPE rows are the first `nope` remaining dims,
  now unrotated (the one inherent approximation besides the rank). q_a_proj = S_r V_r^T,
  q_b_proj = U_r of the per-head [nope | rope] query matrix (scaled by sqrt((nope+rope)/hd) so the MLA's
  softmax scale equals the base's); kv_a_proj_with_mqa[:r] = S_r V_r^T, kv_b_proj = U_r of the stacked
  [K_nope; V] rows of every KV head (one shared latent); kv_a_proj_with_mqa[r:] (the shared RoPE key) is
  the mean over KV heads of the K RoPE rows; o_proj copied. rope_init="random" leaves both RoPE parts at
  their fresh init and spends the query rank on the NoPE rows only.
- "mamba2" (MambaInLlama): in_proj's x <- W_V, B <- W_K, C <- W_Q, out_proj <- W_O; z, dt, A_log, conv, norm
  at their default init. RoPE is simply dropped. D (the x skip) is set to `mamba2_D` = 0 by default, not
  mamba-ssm's 1: with x <- W_V and dt ~ 1e-3..1e-1 at init, D = 1 makes the block output mostly the current
  token's value (attention to itself), drowning the mapped context mixing; with D = 0 the block starts as the
  base attention with the softmax removed (up to decay, conv and gate). On the toy teacher of
  tests/test_upcycle.py, KL to the teacher right after conversion: 1MLA1M2 0.39 with D = 0 vs 2.02 with
  D = 1 (random mixers 1.27); 2M2 0.66 vs 2.06 (1.32). mamba2_D=1.0 gives MambaInLlama's start.
- "gdn": W_K, W_V repeated to the query heads (GQA order), then the overlapping rows of W_Q, W_K, W_V copied
  into q_proj, k_proj, v_proj and W_O into the overlapping columns of o_proj; the rest at default init.
- "attention": the base block verbatim (biases and q/k norms included).
What to expect right after conversion (toy teacher, tests/test_upcycle.py): MLA layers carry the base's
attention (all-MLA KL 0.03 vs 0.59 with fresh mixers); a pure-GDN model starts no closer than fresh blocks
(0.62 vs 0.59: the fresh output gate silu(g_proj x) ~ +-0.01 mutes the block, and without the gate the delta
rule over similar keys mostly returns the latest value): the linear maps are a starting point for stage 1,
not a working block.

Decisions the paper leaves open (each documented where it is applied):
- q/k/v biases (Qwen2). MLA: exact, on q_b_proj (q_proj) and kv_b_proj (config.mla_bias); the shared RoPE
  key has no bias slot, so the mean K bias of the RoPE rows is dropped. Mamba2: in_proj has no bias, so
  the x/B/C biases are moved through the conv: conv1d.bias += b * sum_w conv1d.weight (exact except for
  the first W-1 tokens, where the conv reads zero padding). GDN: no bias slot; dropped. o_proj bias
  (Llama/Qwen3 with attention_bias=True) has no slot in any block: refused.
- Qwen3's per-head q_norm / k_norm (q <- w * q / rms(q)). qk_norm="fold" (default): for MLA and Mamba2
  each query / key row is multiplied by its norm weight and by a per-head constant c = E[1/rms(q_h)] that
  stands in for the per-token normalisation (measured on `calibration_ids` when given, else the data-free
  estimate 1/sqrt(||W_h diag(g)||_F^2 / hd) for unit-RMS isotropic inputs scaled by the input norm's g);
  for GDN only the weight matters (q and k are L2-normalised per GDN head) but the same fold is applied.
  qk_norm="drop": the raw projections are used and the norm weights are discarded. Attention layers keep
  the norms either way. Fold keeps the base's score scale; drop shrinks scores by ~rms(q) rms(k) (about
  5x on a toy Qwen3), i.e. softer attention, which happened to suit the position-free toy task better
  (all-MLA KL 0.10 drop vs 0.19 fold vs 0.17 calibrated fold): a question for training, not settled here.
- Sliding windows (Mistral's sliding_window, Qwen2's use_sliding_window) cannot be honoured: refused.

Entry points: `upcycle` (one hybrid), `convert_all` + `assemble` (stage 1's all-MLA / all-linear students
and the hybrid built from them), `smart_select` (SMART layer choice), `hylo_config_from_base`, `describe`.
"""

from __future__ import annotations

from hylo_lab.errors import UserError
import copy
import math
import os

import torch
import torch.nn.functional as F

from .cache import cache_footprint
from .config import BASE_SHAPES, LINEAR_MIXERS, PRESETS, HyloConfig, format_layout, parse_layout
from .model import HyloForCausalLM

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_TEXT = "llama, mistral (no sliding window), qwen2 (no sliding window in use), qwen3"
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
SHAPE_KEYS = ("base_model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim")
DIM_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
            "gdn_num_heads", "gdn_head_dim")
RMS_EPS = 1e-6


class UpcycleError(UserError):
    """A base, layout or option that cannot be upcycled; raised before any weight is loaded or computed."""


# ---------------------------------------------------------------------------------------------------------------
# The base: load, check, describe its shape


def _is_model(base) -> bool:
    return isinstance(base, torch.nn.Module)


def load_base_config(base):
    """The base's transformers config, from a model object, a local directory or a hub id (no weights)."""
    if _is_model(base):
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
    if _is_model(base):
        return base
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype or "auto").eval()


def _attention_biases(cfg) -> tuple[bool, bool]:
    """(q/k/v have biases, o_proj has a bias) as the transformers modeling file builds them."""
    if cfg.model_type == "qwen2":
        return True, False
    if cfg.model_type == "mistral":
        return False, False
    bias = bool(getattr(cfg, "attention_bias", False))
    return bias, bias


def _rope_parameters(cfg) -> dict:
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
    if _attention_biases(cfg)[1]:
        raise UpcycleError("attention_bias=True gives o_proj a bias, which no hybrid block has a slot for; "
                           "only q/k/v biases (qwen2) are supported")
    rope = _rope_parameters(cfg)
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
    qkv_bias, _ = _attention_biases(cfg)
    return dict(
        base_model_type=cfg.model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads, head_dim=head_dim,
        hidden_act=getattr(cfg, "hidden_act", "silu"), max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, initializer_range=getattr(cfg, "initializer_range", 0.02),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)), attention_bias=qkv_bias,
        attention_qk_norm=cfg.model_type == "qwen3", mlp_bias=bool(getattr(cfg, "mlp_bias", False) or False),
        rope_parameters=_rope_parameters(cfg), pad_token_id=getattr(cfg, "pad_token_id", None),
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
    return dict(q_lora_rank=min(q_full, _round_up(21 * D // 32, 8)), kv_lora_rank=min(D, Hkv * hd, _round_up(Hkv * hd // 4, 8)),
                qk_rope_head_dim=rope, qk_nope_head_dim=hd - rope, v_head_dim=hd,
                gdn_num_heads=max(1, round(0.75 * H * hd / gdn_head)), gdn_head_dim=gdn_head)


def _round_up(x: float, m: int) -> int:
    return max(m, int(math.ceil(x / m)) * m)


def hylo_config_from_base(base_config, mixers, **dims) -> HyloConfig:
    """A validated HyloConfig: the base's shape, one mixer per layer, block dims (default_dims unless given;
    None = default, q_lora_rank=0 = no query compression). Other HyloConfig fields pass through."""
    check_base_config(base_config)
    kw = base_shape(base_config)
    kw.update(default_dims(base_config))
    kw.update({k: v for k, v in dims.items() if v is not None})
    if kw.get("q_lora_rank") == 0:
        kw["q_lora_rank"] = None
    kw["mixers"] = list(mixers)
    kw.setdefault("mla_bias", kw["attention_bias"])
    _check_upcycle_dims(kw)
    hd, rope = kw["head_dim"], kw["qk_rope_head_dim"]
    if kw.get("mla_rope_pairs") is None and 0 < rope <= hd and hd % rope == 0 and rope % 2 == 0:
        kw["mla_rope_pairs"] = rope_pairs(hd, rope)
    try:
        return HyloConfig(**kw)
    except ValueError as exc:
        raise UpcycleError(str(exc)) from exc


def _check_upcycle_dims(kw) -> None:
    """What the weight mapping needs beyond HyloConfig's own validation."""
    hd, mixers = kw["head_dim"], kw["mixers"]
    if "mla" in mixers:
        rope, nope = kw["qk_rope_head_dim"], kw["qk_nope_head_dim"]
        if rope <= 0 or rope % 2 or rope > hd or hd % rope:
            raise UpcycleError(f"qk_rope_head_dim={rope} must be a positive even divisor of head_dim={hd} "
                               f"(the RoPE rows are every hd/rope-th frequency pair of the base head)")
        if nope < 0 or nope + rope > hd:
            raise UpcycleError(f"qk_nope_head_dim + qk_rope_head_dim = {nope + rope} must be <= head_dim={hd}")
        if kw.get("v_head_dim") not in (None, hd):
            raise UpcycleError(f"v_head_dim={kw['v_head_dim']} must equal head_dim={hd}: o_proj is copied from the base")
        if kw.get("mla_num_kv_heads") not in (None, kw["num_key_value_heads"]):
            raise UpcycleError("mla_num_kv_heads must equal the base's num_key_value_heads (kv_b_proj expands to them)")
    if "mamba2" in mixers and kw.get("mamba2_state_size") not in (None, hd):
        raise UpcycleError(f"mamba2_state_size must equal head_dim={hd} (B is copied from a KV head of W_K)")


# ---------------------------------------------------------------------------------------------------------------
# Layout resolution (cheap; runs before any weight is touched)


def plan_mixers(base_config, layout=None, *, mla_layers=None, select=None, preset=None, linear=None):
    """-> (mixers, dims from the preset, number of MLA layers SMART must choose or 0).

    For select="smart" the returned mixers are a placeholder (evenly spaced) used for validation only.
    """
    n = base_config.num_hidden_layers
    if select not in (None, "uniform", "smart"):
        raise UpcycleError(f"select={select!r}; choose 'uniform' or 'smart' (or give mla_layers)")
    if linear is not None and linear not in LINEAR_MIXERS:
        raise UpcycleError(f"linear={linear!r}; choose one of {LINEAR_MIXERS}")
    if mla_layers is not None and select is not None:
        raise UpcycleError("give either explicit mla_layers or select='uniform'|'smart', not both")
    if preset is not None:
        if preset not in PRESETS:
            raise UpcycleError(f"unknown preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
        if mla_layers is not None or select is not None:
            raise UpcycleError("a preset fixes the MLA layers: do not combine it with mla_layers or select")
        shape_name, idx, lin = PRESETS[preset]
        ref, got = BASE_SHAPES[shape_name], base_shape(base_config)
        diff = {k: (got[k], ref[k]) for k in SHAPE_KEYS if got[k] != ref[k]}
        if diff:
            raise UpcycleError(f"preset {preset!r} is for a {shape_name} base, but this base differs in "
                               + ", ".join(f"{k}={a} (preset expects {b})" for k, (a, b) in diff.items()))
        mixers = ["mla" if i in idx else lin for i in range(n)]
        if layout is not None and _layout_mixers_str(layout, n, idx) != mixers:
            raise UpcycleError(f"layout {layout!r} disagrees with preset {preset!r} ({format_layout(mixers)})")
        if linear is not None and linear != lin:
            raise UpcycleError(f"linear={linear!r} disagrees with preset {preset!r} ({lin})")
        return mixers, {k: ref[k] for k in DIM_KEYS}, 0
    if layout is None:
        if mla_layers is None:
            raise UpcycleError("give a layout (e.g. '4MLA12GDN' or a list of mixers), mla_layers or a preset")
        k = len(mla_layers)
        layout = f"{k}MLA{n - k}{'M2' if linear == 'mamba2' else 'GDN'}" if k < n else f"{n}MLA"
    if not isinstance(layout, str):
        mixers = list(layout)
        if len(mixers) != n:
            raise UpcycleError(f"layout lists {len(mixers)} mixers but the base has {n} layers")
        if mla_layers is not None or select is not None:
            raise UpcycleError("a per-layer mixer list already places every layer: drop mla_layers / select")
        return mixers, {}, 0
    try:
        mixers = parse_layout(layout, n, mla_layers)
    except ValueError as exc:
        raise UpcycleError(str(exc)) from exc
    lin_in_layout = [m for m in set(mixers) if m in LINEAR_MIXERS]
    if linear is not None and lin_in_layout and lin_in_layout != [linear]:
        raise UpcycleError(f"linear={linear!r} disagrees with layout {layout!r}")
    k_smart = 0
    if select == "smart":
        if "attention" in mixers:
            raise UpcycleError("SMART selection chooses MLA layers among linear ones; the layout must hold only MLA and one linear type")
        k_smart = mixers.count("mla")
        if not 0 < k_smart < n:
            raise UpcycleError(f"SMART needs 0 < number of MLA layers < {n}, layout {layout!r} has {k_smart}")
    return mixers, {}, k_smart


def _layout_mixers_str(layout, n, mla_layers):
    if not isinstance(layout, str):
        return list(layout)
    try:
        return parse_layout(layout, n, mla_layers)
    except ValueError as exc:
        raise UpcycleError(str(exc)) from exc


# ---------------------------------------------------------------------------------------------------------------
# Linear algebra of the MLA initialisation


def low_rank(W: torch.Tensor, rank: int):
    """Best rank-`rank` factorisation W ~ B @ A (Eckart-Young): A = S_r V_r^T [rank, in], B = U_r [out, rank],
    and all singular values S. Ranks above min(W.shape) are zero-padded (rows of A zero)."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    r = min(rank, S.numel())
    A = W.new_zeros(rank, W.shape[1])
    B = W.new_zeros(W.shape[0], rank)
    A[:r] = S[:r, None] * Vh[:r]
    B[:, :r] = U[:, :r]
    return A, B, S


def energy_rank(S: torch.Tensor, energy: float, multiple: int = 8) -> int:
    """Smallest rank keeping `energy` of sum(S^2), rounded up to a multiple of `multiple`, capped at full rank."""
    e = S.double().pow(2)
    cum = e.cumsum(0) / e.sum().clamp_min(1e-300)
    r = int((cum < energy - 1e-12).sum().item()) + 1
    return min(S.numel(), _round_up(r, multiple))


def kept_energy(S: torch.Tensor, rank: int) -> float:
    e = S.double().pow(2)
    return float(e[:rank].sum() / e.sum().clamp_min(1e-300))


def rope_pairs(head_dim: int, rope: int) -> list[int]:
    """The base head's frequency pairs an MLA of qk_rope_head_dim `rope` keeps: 0, s, 2s, ... (s = hd/rope), so
    the kept frequencies span the base's range from the fastest down. Stored as config.mla_rope_pairs: the MLA's
    Rotary then rotates pair i at exactly the base's inv_freq[pairs[i]] (whatever the rope type)."""
    return list(range(0, head_dim // 2, head_dim // rope))[: rope // 2]


def rope_dim_split(head_dim: int, rope: int, nope: int) -> tuple[list[int], list[int]]:
    """Base head dims feeding MLA's (NoPE, RoPE) parts. Half-split RoPE rotates dims j and j + hd/2 at the
    base's inv_freq[j]; the RoPE rows are the kept pairs (rope_pairs) laid out [firsts | seconds], as MLA's
    Rotary lays out its pairs; NoPE = the first `nope` other dims."""
    half = head_dim // 2
    pairs = rope_pairs(head_dim, rope)
    rope_src = pairs + [j + half for j in pairs]
    taken = set(rope_src)
    return [d for d in range(head_dim) if d not in taken][:nope], rope_src


# ---------------------------------------------------------------------------------------------------------------
# Reading one base attention block


class AttentionWeights:
    """One base attention block in the compute dtype: q [H*hd, D], k / v [Hkv*hd, D], o [D, H*hd], biases or
    None, q/k norm weights [hd] or None, and the layer's input-norm weight [D] (for the q/k-norm estimate)."""

    def __init__(self, layer, shape: dict, dtype):
        attn = layer.self_attn
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


# ---------------------------------------------------------------------------------------------------------------
# Per-block initialisation from a base attention block


def _mla_targets(w: AttentionWeights, nope: int, rope: int, rope_init: str):
    """(query matrix to factorise, its bias, its row positions in q_b_proj's [H, nope+rope] rows, RoPE key rows
    or None, stacked [K_nope; V] per KV head, its bias)."""
    H, Hkv, hd, D = w.H, w.Hkv, w.hd, w.q.shape[1]
    nope_src, rope_src = rope_dim_split(hd, rope, nope)
    src = nope_src + (rope_src if rope_init == "filled" else [])
    qk = nope + rope
    scale = math.sqrt(qk / hd)  # MLA divides scores by sqrt(nope + rope), the base by sqrt(hd)
    rows = torch.tensor([h * qk + j for h in range(H) for j in range(len(src))])
    q = w.q.view(H, hd, D)[:, src].reshape(-1, D) * scale
    q_bias = None if w.q_bias is None else w.q_bias.view(H, hd)[:, src].reshape(-1) * scale
    k = w.k.view(Hkv, hd, D)
    k_rope = k[:, rope_src].mean(0) if rope_init == "filled" else None
    kv = torch.cat([k[:, nope_src], w.v.view(Hkv, hd, D)], dim=1).reshape(-1, D)
    kv_bias = None
    if w.k_bias is not None:
        kv_bias = torch.cat([w.k_bias.view(Hkv, hd)[:, nope_src], w.v_bias.view(Hkv, hd)], dim=1).reshape(-1)
    return q, q_bias, rows, k_rope, kv, kv_bias


def _put(param, value, idx=slice(None)):
    param.data[idx] = value.to(param.dtype)


@torch.no_grad()
def init_mla(mla, w: AttentionWeights, *, rope_init: str = "filled") -> dict:
    """Truncated-SVD initialisation (module docstring); returns the kept singular-value energies."""
    q, q_bias, rows, k_rope, kv, kv_bias = _mla_targets(w, mla.nope, mla.rope, rope_init)
    stats = {}
    if mla.q_lora_rank is None:
        _put(mla.q_proj.weight, q, rows)
        q_b = mla.q_proj
    else:
        A, B, S = low_rank(q, mla.q_lora_rank)
        _put(mla.q_a_proj.weight, A)
        _put(mla.q_b_proj.weight, B, rows)
        stats["q_energy"] = kept_energy(S, mla.q_lora_rank)
        q_b = mla.q_b_proj
    if q_bias is not None and q_b.bias is not None:
        _put(q_b.bias, q_bias, rows)
    r = mla.kv_lora_rank
    A, B, S = low_rank(kv, r)
    _put(mla.kv_a_proj_with_mqa.weight, A, slice(0, r))
    _put(mla.kv_b_proj.weight, B)
    stats["kv_energy"] = kept_energy(S, r)
    if kv_bias is not None and mla.kv_b_proj.bias is not None:
        _put(mla.kv_b_proj.bias, kv_bias)
    if k_rope is not None:
        _put(mla.kv_a_proj_with_mqa.weight, k_rope, slice(r, r + mla.rope))
    _put(mla.o_proj.weight, w.o)
    return stats


@torch.no_grad()
def init_mamba2(m, w: AttentionWeights, *, D: float = 0.0) -> dict:
    """in_proj rows [z | x <- W_V | B <- W_K | C <- W_Q | dt], out_proj <- W_O, D = `D` (module docstring);
    q/k/v biases moved into the conv bias (b * sum of the channel's taps); the rest keeps its default init."""
    d_inner, d_xb = m.d_inner, m.d_xb
    W = m.in_proj.weight
    for off, src in ((d_inner, w.v), (d_inner + d_xb, w.k), (d_inner + 2 * d_xb, w.q)):
        W[off : off + src.shape[0]] = src.to(W.dtype)
    m.out_proj.weight.copy_(w.o.to(m.out_proj.weight.dtype))
    m.D.fill_(D)
    if w.q_bias is not None:
        b = torch.cat([w.v_bias, w.k_bias, w.q_bias])  # conv channels [x | B | C]
        taps = m.conv1d.weight.detach().to(b.dtype).reshape(m.conv_dim, -1).sum(-1)
        m.conv1d.bias.add_((b * taps).to(m.conv1d.bias.dtype))
    return {}


@torch.no_grad()
def init_gdn(g, w: AttentionWeights) -> dict:
    """W_K, W_V repeated to the H query heads; overlapping rows copied into q/k/v_proj, W_O into the overlapping
    columns of o_proj. Biases have no slot (dropped). Returns how many rows were copied."""
    rep = w.H // w.Hkv
    D = w.q.shape[1]
    k = w.k.view(w.Hkv, w.hd, D).repeat_interleave(rep, dim=0).reshape(-1, D)
    v = w.v.view(w.Hkv, w.hd, D).repeat_interleave(rep, dim=0).reshape(-1, D)
    nk, nv = min(g.key_dim, w.q.shape[0]), min(g.value_dim, v.shape[0])
    g.q_proj.weight[:nk] = w.q[:nk].to(g.q_proj.weight.dtype)
    g.k_proj.weight[:nk] = k[:nk].to(g.k_proj.weight.dtype)
    g.v_proj.weight[:nv] = v[:nv].to(g.v_proj.weight.dtype)
    g.o_proj.weight[:, :nv] = w.o[:, :nv].to(g.o_proj.weight.dtype)
    return {"qk_rows": nk, "v_rows": nv}


@torch.no_grad()
def init_attention(attn, layer) -> dict:
    """The base block verbatim (weights, q/k/v biases, q/k norms)."""
    src = layer.self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        for p in ("weight", "bias"):
            dst = getattr(getattr(attn, name), p)
            if dst is not None:
                dst.copy_(getattr(getattr(src, name), p))
    if attn.q_norm is not None:
        attn.q_norm.weight.copy_(src.q_norm.weight)
        attn.k_norm.weight.copy_(src.k_norm.weight)
    return {}


# ---------------------------------------------------------------------------------------------------------------
# Building the student


def _shared_keys(student_sd: dict) -> list[str]:
    """Student parameters that are copied from the base under the same name (all but the mixers)."""
    return [k for k in student_sd if ".mixer." not in k and not k.startswith("model.rotary")]


@torch.no_grad()
def copy_shared(student, base) -> None:
    """Embeddings, norms, MLPs, final norm and (untied) LM head, bit for bit (names match transformers')."""
    base_sd = base.state_dict()
    student_sd = student.state_dict()
    missing = [k for k in _shared_keys(student_sd) if k not in base_sd]
    if missing:
        raise UpcycleError(f"the base has no weights for {missing[:5]}{'...' if len(missing) > 5 else ''}")
    for k in _shared_keys(student_sd):
        student_sd[k].copy_(base_sd[k])


def _resolve_dtype(dtype, base):
    if dtype is None:
        return next(base.parameters()).dtype
    if isinstance(dtype, str):
        try:
            return getattr(torch, dtype.replace("torch.", ""))
        except AttributeError as exc:
            raise UpcycleError(f"unknown dtype {dtype!r}") from exc
    return dtype


def _check_options(rope_init, qk_norm, mixer_init, rank_energy):
    if rope_init not in ("filled", "random"):
        raise UpcycleError(f"rope_init={rope_init!r}; choose 'filled' (from the base weights) or 'random'")
    if qk_norm not in ("fold", "drop"):
        raise UpcycleError(f"qk_norm={qk_norm!r}; choose 'fold' or 'drop'")
    if mixer_init not in ("attention", "random"):
        raise UpcycleError(f"mixer_init={mixer_init!r}; choose 'attention' (from the base) or 'random' (fresh)")
    if rank_energy is not None and not 0 < rank_energy <= 1:
        raise UpcycleError(f"rank_energy={rank_energy} must be in (0, 1]")


def check_upcycle(base_config, layout=None, *, mla_layers=None, select=None, preset=None, linear=None,
                  q_lora_rank=None, kv_lora_rank=None, qk_rope_head_dim=None, qk_nope_head_dim=None,
                  gdn_num_heads=None, gdn_head_dim=None, rank_energy=None, rope_init="filled", qk_norm="fold",
                  mixer_init="attention", **config_overrides):
    """Every check of `upcycle` that needs no weights, on the base's config alone (UpcycleError on the first
    problem) -> (HyloConfig before SMART / rank_energy, mixers, dims, number of MLA layers SMART must choose)."""
    _check_options(rope_init, qk_norm, mixer_init, rank_energy)
    check_base_config(base_config)
    mixers, preset_dims, k_smart = plan_mixers(base_config, layout, mla_layers=mla_layers, select=select,
                                               preset=preset, linear=linear)
    explicit = dict(q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim,
                    qk_nope_head_dim=qk_nope_head_dim, gdn_num_heads=gdn_num_heads, gdn_head_dim=gdn_head_dim)
    dims = {**preset_dims, **{k: v for k, v in explicit.items() if v is not None}, **config_overrides}
    if qk_rope_head_dim is not None and qk_nope_head_dim is None and "qk_nope_head_dim" not in preset_dims:
        dims["qk_nope_head_dim"] = base_shape(base_config)["head_dim"] - qk_rope_head_dim
    config = hylo_config_from_base(base_config, mixers, **dims)  # validates dims and ranks
    return config, mixers, dims, k_smart


def upcycle(base, layout=None, *, mla_layers=None, select=None, preset=None, linear=None,
            q_lora_rank=None, kv_lora_rank=None, qk_rope_head_dim=None, qk_nope_head_dim=None,
            gdn_num_heads=None, gdn_head_dim=None, rank_energy=None, rope_init="filled", qk_norm="fold",
            mixer_init="attention", mamba2_D=0.0, calibration_ids=None, calibration_mask=None, dtype=None,
            seed=0, **config_overrides):
    """Build a HyloForCausalLM from `base` (a transformers causal LM, a local directory or a hub id).

    Layer choice (one of): `preset` ("llama3.2-1b/4MLA12GDN", the paper's layers and dims; the base must have
    that shape); `layout` ("4MLA12GDN" or a list of mixers) with explicit `mla_layers`, or select="uniform"
    (evenly spaced, the default) or select="smart" (SMART on `calibration_ids`; scores land in
    config.upcycle["smart"]); or `mla_layers` alone with `linear` ("gdn" default | "mamba2").
    Dims: None = the preset's, else `default_dims` (the paper's for a paper-shaped base); q_lora_rank=0 = no
    query compression; rank_energy (e.g. 0.95) picks each rank not given explicitly as the smallest multiple
    of 8 keeping that singular-value energy in every MLA layer (one rank for all layers: the maximum).
    rope_init: "filled" | "random" MLA RoPE rows. qk_norm: "fold" (default) | "drop" (module docstring).
    mixer_init="random" keeps every mixer at fresh init (the control for "does upcycling help").
    mamba2_D: the D skip of upcycled Mamba2 blocks (0 by default; 1 = MambaInLlama, see the module docstring).
    `calibration_ids` also calibrate the q/k-norm fold when given. dtype: output dtype (default: the base's).
    Remaining keyword arguments go to HyloConfig (e.g. chunk_size, kernel_backend, mla_rope_parameters).
    Everything that can be checked without weights is checked before the base's weights are loaded.
    """
    base_config = load_base_config(base)
    config, mixers, dims, k_smart = check_upcycle(
        base_config, layout, mla_layers=mla_layers, select=select, preset=preset, linear=linear,
        q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim,
        qk_nope_head_dim=qk_nope_head_dim, gdn_num_heads=gdn_num_heads, gdn_head_dim=gdn_head_dim,
        rank_energy=rank_energy, rope_init=rope_init, qk_norm=qk_norm, mixer_init=mixer_init, **config_overrides)
    explicit = dict(q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank)
    if k_smart and calibration_ids is None:
        raise UpcycleError("select='smart' needs calibration_ids (a [B, T] LongTensor of token ids)")

    model = load_base_model(base)
    dtype = _resolve_dtype(dtype, model)
    smart = None
    if k_smart:
        lin = next(m for m in mixers if m in LINEAR_MIXERS)
        indices, smart = smart_select(model, k_smart, calibration_ids, linear=lin, attention_mask=calibration_mask,
                                      rope_init=rope_init, qk_norm=qk_norm, mamba2_D=mamba2_D, seed=seed, **dims)
        mixers = ["mla" if i in indices else lin for i in range(len(mixers))]
        config = hylo_config_from_base(base_config, mixers, **dims)
    compute = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    shape = base_shape(base_config)
    scales = None
    if qk_norm == "fold" and shape["attention_qk_norm"] and calibration_ids is not None and mixer_init == "attention":
        scales = qk_norm_scales(model, calibration_ids, calibration_mask)
    weights = lambda i: AttentionWeights(model.model.layers[i], shape, compute).fold_qk_norm(  # noqa: E731
        qk_norm, None if scales is None else scales[i])

    if rank_energy is not None and "mla" in mixers and mixer_init == "attention":
        config = _energy_ranks(config, base_config, dims, weights, rank_energy, rope_init, explicit)

    torch.manual_seed(seed)
    student = _build(config, dtype).to(next(model.parameters()).device)  # a base on the GPU: convert there
    copy_shared(student, model)
    stats = {}
    for i, m in enumerate(config.mixers):
        layer = model.model.layers[i]
        mixer = student.model.layers[i].mixer
        if m == "attention":
            stats[i] = init_attention(mixer, layer)
        elif mixer_init == "random":
            continue
        elif m == "mla":
            stats[i] = init_mla(mixer, weights(i), rope_init=rope_init)
        elif m == "mamba2":
            stats[i] = init_mamba2(mixer, weights(i), D=mamba2_D)
        else:
            stats[i] = init_gdn(mixer, weights(i))
    student.config.upcycle = _provenance(base, base_config, config, select, preset, rope_init, qk_norm, mixer_init,
                                         rank_energy, scales is not None, stats, smart)
    if "mamba2" in config.mixers:
        student.config.upcycle["mamba2_D"] = mamba2_D
    return student


def _build(config, dtype):
    """A fresh HyloForCausalLM created directly in `dtype` (no float32 copy of a 1B model on the way)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return HyloForCausalLM(config).to(dtype).eval()
    finally:
        torch.set_default_dtype(previous)


def _energy_ranks(config, base_config, dims, weights, energy, rope_init, explicit):
    """Re-make the config with each MLA rank not given explicitly chosen by kept singular-value energy."""
    q_ranks, kv_ranks = [], []
    for i in config.layer_indices("mla"):
        q, _, _, _, kv, _ = _mla_targets(weights(i), config.qk_nope_head_dim, config.qk_rope_head_dim, rope_init)
        q_ranks.append(energy_rank(torch.linalg.svdvals(q), energy))
        kv_ranks.append(energy_rank(torch.linalg.svdvals(kv), energy))
    new = dict(dims)
    if explicit["q_lora_rank"] is None and config.q_lora_rank is not None:
        new["q_lora_rank"] = max(q_ranks)
    if explicit["kv_lora_rank"] is None:
        new["kv_lora_rank"] = max(kv_ranks)
    return hylo_config_from_base(base_config, config.mixers, **new)


def _provenance(base, base_config, config, select, preset, rope_init, qk_norm, mixer_init, rank_energy,
                calibrated, stats, smart) -> dict:
    """JSON-able record of how the model was made (stored as config.upcycle; `hylo-lab info` prints it)."""
    name = getattr(base_config, "_name_or_path", "") if _is_model(base) else str(base)
    energies = {k: [round(stats[i][k], 6) for i in config.layer_indices("mla") if k in stats.get(i, {})]
                for k in ("q_energy", "kv_energy")}
    return dict(base=name, base_model_type=base_config.model_type, layout=config.layout,
                mla_layers=config.layer_indices("mla"), select=select or ("preset" if preset else "explicit"),
                preset=preset, rope_init=rope_init, qk_norm=qk_norm, qk_norm_calibrated=calibrated,
                mixer_init=mixer_init, rank_energy=rank_energy, kept_energy=energies, smart=smart)


def convert_all(base, kind: str, **kwargs):
    """Every layer one block type ("mla", "gdn", "mamba2" or "attention"): stage 1's full-width students."""
    if kind not in ("mla", "gdn", "mamba2", "attention"):
        raise UpcycleError(f"kind={kind!r}; choose mla, gdn, mamba2 or attention")
    n = load_base_config(base).num_hidden_layers
    return upcycle(base, [kind] * n, **kwargs)


def assemble(mla_student, linear_student, mixers, *, mla_layers=None, shared_from: str = "mla"):
    """The hybrid whose layer i is the whole decoder layer i (mixer, norms, MLP) of the all-MLA or the
    all-linear student, by `mixers` (a list, or a layout string placed by `mla_layers` / evenly spaced).
    Embeddings, final norm and LM head come from the `shared_from` student ("mla" | "linear")."""
    a, b = mla_student.config, linear_student.config
    if set(a.mixers) != {"mla"}:
        raise UpcycleError(f"mla_student must be all-MLA, got layout {a.layout}")
    lin = set(b.mixers)
    if len(lin) != 1 or not lin <= set(LINEAR_MIXERS):
        raise UpcycleError(f"linear_student must be all-GDN or all-Mamba2, got layout {b.layout}")
    (lin,) = lin
    ignore = {"mixers", "upcycle", "_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"}
    da, db = a.to_dict(), b.to_dict()
    diff = sorted(k for k in set(da) | set(db) if k not in ignore and da.get(k) != db.get(k))
    if diff:
        raise UpcycleError(f"the two students differ in {diff}: they must come from the same base and dims")
    n = a.num_hidden_layers
    mixers = _layout_mixers_str(mixers, n, mla_layers)
    bad = sorted(set(mixers) - {"mla", lin})
    if bad:
        raise UpcycleError(f"mixers may only be 'mla' or {lin!r} for these students, got {bad}")
    if shared_from not in ("mla", "linear"):
        raise UpcycleError("shared_from must be 'mla' or 'linear'")
    config = copy.deepcopy(a)
    config.mixers = list(mixers)
    config.validate_hylo()
    if getattr(a, "upcycle", None):
        config.upcycle = dict(a.upcycle, layout=config.layout, mla_layers=config.layer_indices("mla"),
                              assembled=True, kept_energy=None, smart=None)
    hybrid = _build(config, next(mla_student.parameters()).dtype)
    src = {"mla": mla_student.state_dict(), lin: linear_student.state_dict()}
    shared = src["mla" if shared_from == "mla" else lin]
    sd = {}
    for k in hybrid.state_dict():
        if k.startswith("model.layers."):
            i = int(k.split(".")[2])
            sd[k] = src[mixers[i]][k]
        else:
            sd[k] = shared[k]
    hybrid.load_state_dict(sd, strict=True)
    return hybrid


# ---------------------------------------------------------------------------------------------------------------
# SMART layer selection


def kl_to_teacher(student_logits, teacher_logprobs, mask=None) -> float:
    """Mean over tokens of KL(teacher || student) from student logits and teacher log-probs [B, T, V]."""
    dtype = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logprobs.dtype) else torch.float32
    s = F.log_softmax(student_logits.to(dtype), -1)
    t = teacher_logprobs.to(dtype)
    kl = (t.exp() * (t - s)).sum(-1)
    if mask is None:
        return kl.mean().item()
    m = mask.to(kl.dtype)
    return (kl * m).sum().item() / m.sum().clamp_min(1).item()


@torch.no_grad()
def smart_select(base, k: int, calibration_ids, *, linear: str = "gdn", attention_mask=None, students=None,
                 **upcycle_kwargs):
    """SMART (Zebra-Llama): from the all-linear student, put one layer at a time back to MLA and score it by
    how much the KL to the base (the teacher) on `calibration_ids` drops; keep the k best.

    Returns (sorted indices, scores) with scores = {"kl_all_linear", "kl_all_mla", "kl_with_mla_at" [per
    layer], "score" [per layer, = kl_all_linear - kl_with_mla_at], "selected", "calibration_tokens"}.
    `students` = (all-MLA, all-linear) to reuse; else both are built with `upcycle_kwargs`.
    """
    model = load_base_model(base)
    n = model.config.num_hidden_layers
    if not 0 < k < n:
        raise UpcycleError(f"k={k} must be in 1..{n - 1}")
    if students is None:
        students = (convert_all(model, "mla", **upcycle_kwargs), convert_all(model, linear, **upcycle_kwargs))
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


# ---------------------------------------------------------------------------------------------------------------
# Describing a hybrid next to its base (the CLI's `upcycle` and `info` output)


def base_param_count(config) -> int:
    """Parameters of the base Transformer the config describes (attention everywhere)."""
    D, I, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    H, Hkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    attn = D * H * hd * 2 + 2 * D * Hkv * hd + (H * hd + 2 * Hkv * hd if config.attention_bias else 0)
    attn += 2 * hd if config.attention_qk_norm else 0
    mlp = 3 * D * I + ((2 * I + D) if config.mlp_bias else 0)
    return V * D * (1 if config.tie_word_embeddings else 2) + L * (attn + mlp + 2 * D) + D


def param_counts(config) -> tuple[int, list[int]]:
    """(total, per-layer mixer parameters) from a weightless (meta-device) model."""
    with torch.device("meta"):
        model = HyloForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    return total, [sum(p.numel() for p in layer.mixer.parameters()) for layer in model.model.layers]


def describe(config, seq_lens=(8192, 65536), dtype=torch.bfloat16) -> str:
    """Layer plan, block dims, parameter count and cache footprint vs the base, as printable text."""
    total, per_layer = param_counts(config)
    base_total = base_param_count(config)
    short = {"mla": "MLA", "gdn": "GDN", "mamba2": "M2", "attention": "ATTN"}
    lines = [f"layout {config.layout}  ({config.num_hidden_layers} layers, base {config.base_model_type or '?'}, "
             f"hidden {config.hidden_size}, {config.num_attention_heads} q / {config.num_key_value_heads} kv heads x {config.head_dim})"]
    lines.append("layer plan: " + " ".join(f"{i}:{short[m]}" for i, m in enumerate(config.mixers)))
    for m in ("mla", "gdn", "mamba2", "attention"):
        idx = config.layer_indices(m)
        if not idx:
            continue
        if m == "mla":
            d = (f"q_lora_rank {config.q_lora_rank}, kv_lora_rank {config.kv_lora_rank}, rope {config.qk_rope_head_dim}, "
                 f"nope {config.qk_nope_head_dim}, v {config.v_head_dim}, rope {config.mla_rope_parameters.get('rope_type')}")
        elif m == "gdn":
            d = f"{config.gdn_num_heads} heads x {config.gdn_head_dim} (v {config.gdn_head_v_dim}), conv {config.gdn_conv_size}"
        elif m == "mamba2":
            d = f"{config.num_attention_heads} heads x {config.head_dim}, state {config.mamba2_state_size}, conv {config.mamba2_conv_kernel}"
        else:
            d = f"{config.num_key_value_heads} kv heads x {config.head_dim}"
        lines.append(f"  {short[m]:>4} x{len(idx):<3} {d}; {per_layer[idx[0]]:,} params each; layers {idx}")
    lines.append(f"parameters: {total:,} (base Transformer {base_total:,}; {100 * (total / base_total - 1):+.1f}%)")
    lines.append(f"cache ({str(dtype).replace('torch.', '')}, batch 1):")
    for T in seq_lens:
        fp = cache_footprint(config, T, dtype=dtype)
        lines.append(f"  {T:>8} tokens: {fp['total_bytes'] / 2**20:10.1f} MiB vs base {fp['base_total_bytes'] / 2**20:10.1f} MiB "
                     f"({100 * fp['total_ratio']:.1f}%; per-token KV {100 * fp['kv_fraction']:.1f}% of base)")
    return "\n".join(lines)


__all__ = ["upcycle", "convert_all", "assemble", "smart_select", "hylo_config_from_base", "describe",
           "UpcycleError", "check_base_config", "default_dims", "low_rank", "energy_rank", "rope_dim_split",
           "rope_pairs"]


# ---------------------------------------------------------------------------------------------------------------
# Directory in, directory out (the CLI)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def calibration_batch(base, *, text_file=None, tokens: int = 2048, seq_len: int = 256, seed: int = 0):
    """[rows, seq_len] token ids: the base tokenizer over `text_file`, or (no file) seeded random ids."""
    rows = max(1, tokens // seq_len)
    if text_file is None:
        vocab = load_base_config(base).vocab_size
        return torch.randint(0, vocab, (rows, seq_len), generator=torch.Generator().manual_seed(seed))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base.config._name_or_path if _is_model(base) else str(base))
    with open(text_file, encoding="utf-8") as f:
        ids = tok(f.read(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < seq_len:
        raise UpcycleError(f"{text_file} gives {ids.numel()} tokens, fewer than one row of {seq_len}")
    rows = min(rows, ids.numel() // seq_len)
    return ids[: rows * seq_len].view(rows, seq_len)


def copy_tokenizer(base, out) -> bool:
    """Put the base tokenizer beside the output: its files from a local directory, else AutoTokenizer (hub)."""
    import shutil

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
    import json
    import time

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


def info_text(target, seq_lens=(8192, 65536)) -> str:
    """`describe` for a preset name or a saved hybrid directory, plus how it was upcycled when recorded."""
    if target in PRESETS:
        config = HyloConfig.from_preset(target)
        head = f"preset {target}"
    elif os.path.isdir(target):
        config = HyloConfig.from_pretrained(target)
        head = f"model {target}"
    else:
        raise UpcycleError(f"{target!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a directory")
    text = head + "\n" + describe(config, seq_lens)
    up = getattr(config, "upcycle", None)
    if up:
        keep = ("base", "select", "preset", "rope_init", "qk_norm", "qk_norm_calibrated", "mixer_init", "mamba2_D", "rank_energy")
        text += "\nupcycled: " + ", ".join(f"{k}={up.get(k)}" for k in keep if up.get(k) is not None)
        energy = up.get("kept_energy") or {}
        for k, v in energy.items():
            if v:
                text += f"\n  {k} per MLA layer: {', '.join(f'{x:.3f}' for x in v)}"
    return text
