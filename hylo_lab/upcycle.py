"""Upcycling: a pretrained Llama / Mistral / Qwen2 / Qwen3 causal LM -> a HyLo hybrid (method.md sections 2-4).

Copied exactly (same dtype = bit-identical): embeddings, every input / post-attention RMSNorm, every MLP, the
final norm and the LM head (tied or untied, as in the base). Each attention block becomes the layout's mixer,
initialised by that layer's `from_attention` (its docstring says what maps where): MLA by truncated SVD
(layers/mla.py), Mamba2 by MambaInLlama's map (layers/mamba2.py), GDN by copying the overlapping rows
(layers/gdn.py), attention verbatim (layers/attention.py). The base is read by base_checkpoint.py.

What to expect right after conversion (toy teacher, tests/test_upcycle.py): MLA layers carry the base's
attention (all-MLA KL 0.03 vs 0.59 with fresh mixers); a pure-GDN model starts no closer than fresh blocks
(0.62 vs 0.59: the fresh output gate silu(g_proj x) ~ +-0.01 mutes the block, and without the gate the delta
rule over similar keys mostly returns the latest value): the linear maps are a starting point for stage 1,
not a working block. Mamba2 with D = 0: 1MLA1M2 0.39 vs 2.02 with D = 1 (random mixers 1.27).

Decisions the paper leaves open: q/k/v biases (Qwen2) go where a block has a slot (MLA: q_b_proj, kv_b_proj;
Mamba2: through the conv bias; GDN: dropped; the shared RoPE key's mean K bias: dropped); Qwen3's q/k norms
are folded or dropped (qk_norm, base_checkpoint.py), for GDN only the weight matters (q and k are L2-normalised)
but the same fold is applied; o_proj biases and sliding windows are refused.

Entry points: `upcycle` (one hybrid), `convert_all` + `assemble` (stage 1's all-MLA / all-linear students and
the hybrid built from them), `check_upcycle` (every weightless check), `hylo_config_from_base`. SMART is in
smart.py, the text of `hylo-lab info` in describe.py, directory in / directory out in upcycle_io.py.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

from .base_checkpoint import (DIM_KEYS, SHAPE_KEYS, AttentionWeights, UpcycleError, base_shape, check_base_config,
                              default_dims, is_model, load_base_config, load_base_model, qk_norm_scales)
from .config import BASE_SHAPES, PRESETS, HyloConfig, format_layout, parse_layout
from .layers.mla import attention_targets, rope_pairs
from .mixers import MIXERS, linear_mixers
from .model import HyloForCausalLM
from .ops.low_rank import energy_rank
from .smart import smart_select

__all__ = ["upcycle", "convert_all", "assemble", "check_upcycle", "plan_mixers", "hylo_config_from_base",
           "UpcycleOptions", "UpcycleError"]


@dataclass(frozen=True)
class UpcycleOptions:
    """How the mixers are initialised (validated on construction; recorded in config.upcycle).

    rope_init: "filled" (MLA RoPE rows from the base) | "random". qk_norm: "fold" | "drop" (Qwen3's q/k norms,
    base_checkpoint.py). mixer_init: "attention" (from the base) | "random" (fresh: the control for "does
    upcycling help"). rank_energy (e.g. 0.95): each MLA rank not given explicitly becomes the smallest multiple
    of 8 keeping that singular-value energy in every MLA layer (one rank for all: the maximum). mamba2_D: the D
    skip of upcycled Mamba2 blocks (0; 1 = MambaInLlama, layers/mamba2.py says why 0).
    """

    rope_init: str = "filled"
    qk_norm: str = "fold"
    mixer_init: str = "attention"
    rank_energy: float | None = None
    mamba2_D: float = 0.0

    def __post_init__(self):
        if self.rope_init not in ("filled", "random"):
            raise UpcycleError(f"rope_init={self.rope_init!r}; choose 'filled' (from the base weights) or 'random'")
        if self.qk_norm not in ("fold", "drop"):
            raise UpcycleError(f"qk_norm={self.qk_norm!r}; choose 'fold' or 'drop'")
        if self.mixer_init not in ("attention", "random"):
            raise UpcycleError(f"mixer_init={self.mixer_init!r}; choose 'attention' (from the base) or 'random' (fresh)")
        if self.rank_energy is not None and not 0 < self.rank_energy <= 1:
            raise UpcycleError(f"rank_energy={self.rank_energy} must be in (0, 1]")

    @classmethod
    def split(cls, options, kwargs) -> tuple["UpcycleOptions", dict]:
        """(options with any of its fields given as keywords applied, the remaining keywords)."""
        names = {f.name for f in dataclasses.fields(cls)}
        mine = {k: v for k, v in kwargs.items() if k in names}
        return dataclasses.replace(options or cls(), **mine), {k: v for k, v in kwargs.items() if k not in names}


# ---------------------------------------------------------------------------------------------------------------
# Planning: config and layout from the base's config alone (cheap; runs before any weight is touched)


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


def plan_mixers(base_config, layout=None, *, mla_layers=None, select=None, preset=None, linear=None):
    """-> (mixers, dims from the preset, number of MLA layers SMART must choose or 0).

    For select="smart" the returned mixers are a placeholder (evenly spaced) used for validation only.
    """
    n = base_config.num_hidden_layers
    if select not in (None, "uniform", "smart"):
        raise UpcycleError(f"select={select!r}; choose 'uniform' or 'smart' (or give mla_layers)")
    if linear is not None and linear not in linear_mixers():
        raise UpcycleError(f"linear={linear!r}; choose one of {linear_mixers()}")
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
        if layout is not None and layout_mixers(layout, n, idx) != mixers:
            raise UpcycleError(f"layout {layout!r} disagrees with preset {preset!r} ({format_layout(mixers)})")
        if linear is not None and linear != lin:
            raise UpcycleError(f"linear={linear!r} disagrees with preset {preset!r} ({lin})")
        return mixers, {k: ref[k] for k in DIM_KEYS}, 0
    if layout is None:
        if mla_layers is None:
            raise UpcycleError("give a layout (e.g. '4MLA12GDN' or a list of mixers), mla_layers or a preset")
        k = len(mla_layers)
        layout = f"{k}MLA{n - k}{MIXERS[linear or 'gdn'].code}" if k < n else f"{n}MLA"
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
    lin_in_layout = [m for m in set(mixers) if MIXERS[m].linear]
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


def layout_mixers(layout, n, mla_layers):
    """A layout string placed on n layers (parse_layout), or a per-layer list as given."""
    if not isinstance(layout, str):
        return list(layout)
    try:
        return parse_layout(layout, n, mla_layers)
    except ValueError as exc:
        raise UpcycleError(str(exc)) from exc


def check_upcycle(base_config, layout=None, *, mla_layers=None, select=None, preset=None, linear=None,
                  options: UpcycleOptions | None = None, **overrides):
    """Every check of `upcycle` that needs no weights, on the base's config alone (UpcycleError on the first
    problem) -> (HyloConfig before SMART / rank_energy, mixers, dims, number of MLA layers SMART must choose).
    `overrides`: UpcycleOptions fields and HyloConfig fields (block dims such as kv_lora_rank, chunk_size, ...)."""
    _, dims = UpcycleOptions.split(options, overrides)
    check_base_config(base_config)
    mixers, preset_dims, k_smart = plan_mixers(base_config, layout, mla_layers=mla_layers, select=select,
                                               preset=preset, linear=linear)
    dims = {**preset_dims, **{k: v for k, v in dims.items() if v is not None}}
    if dims.get("qk_rope_head_dim") is not None and "qk_nope_head_dim" not in dims:
        dims["qk_nope_head_dim"] = base_shape(base_config)["head_dim"] - dims["qk_rope_head_dim"]
    config = hylo_config_from_base(base_config, mixers, **dims)  # validates dims and ranks
    return config, mixers, dims, k_smart


# ---------------------------------------------------------------------------------------------------------------
# Building


def upcycle(base, layout=None, *, mla_layers=None, select=None, preset=None, linear=None, calibration_ids=None,
            calibration_mask=None, dtype=None, seed=0, options: UpcycleOptions | None = None, **overrides):
    """Build a HyloForCausalLM from `base` (a transformers causal LM, a local directory or a hub id).

    Layer choice (one of): `preset` ("llama3.2-1b/4MLA12GDN", the paper's layers and dims; the base must have
    that shape); `layout` ("4MLA12GDN" or a list of mixers) with explicit `mla_layers`, or select="uniform"
    (evenly spaced, the default) or select="smart" (SMART on `calibration_ids`; scores land in
    config.upcycle["smart"]); or `mla_layers` alone with `linear` ("gdn" default | "mamba2").
    `options` (UpcycleOptions) says how mixers are initialised; its fields may also be given as keywords.
    Other keywords are HyloConfig fields: block dims (None = the preset's, else `default_dims`, the paper's for a
    paper-shaped base; q_lora_rank=0 = no query compression), chunk_size, kernel_backend, mla_rope_parameters, ...
    `calibration_ids` also calibrate the q/k-norm fold when given. dtype: output dtype (default: the base's).
    Everything that can be checked without weights is checked before the base's weights are loaded.
    """
    options, dims = UpcycleOptions.split(options, overrides)
    base_config = load_base_config(base)
    config, mixers, dims, k_smart = check_upcycle(base_config, layout, mla_layers=mla_layers, select=select,
                                                  preset=preset, linear=linear, **dims)
    if k_smart and calibration_ids is None:
        raise UpcycleError("select='smart' needs calibration_ids (a [B, T] LongTensor of token ids)")
    planned = (list(mixers), dict(dims))

    model = load_base_model(base)
    dtype = _resolve_dtype(dtype, model)
    shape = base_shape(base_config)
    compute = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32

    def reader(scales):
        return lambda i: AttentionWeights(model.model.layers[i], shape, compute).fold_qk_norm(
            options.qk_norm, None if scales is None else scales[i])

    smart = None
    if k_smart:
        lin = next(m for m in mixers if MIXERS[m].linear)
        n = len(mixers)
        # SMART's students: the data-free fold, the base's dtype, every mixer from the base
        students = [_student(model, hylo_config_from_base(base_config, [kind] * n, **dims), reader(None),
                             dataclasses.replace(options, mixer_init="attention"), next(model.parameters()).dtype,
                             seed)[0] for kind in ("mla", lin)]
        indices, smart = smart_select(model, k_smart, calibration_ids, students=students, linear=lin,
                                      attention_mask=calibration_mask)
        mixers = ["mla" if i in indices else lin for i in range(n)]
    scales = None
    if options.qk_norm == "fold" and shape["attention_qk_norm"] and calibration_ids is not None \
            and options.mixer_init == "attention":
        scales = qk_norm_scales(model, calibration_ids, calibration_mask)
    weights = reader(scales)
    if options.rank_energy is not None and "mla" in mixers and options.mixer_init == "attention":
        dims = _energy_ranks(config, mixers, dims, weights, options, overrides)
    if (mixers, dims) != planned:  # SMART's layers or rank_energy's ranks
        config = hylo_config_from_base(base_config, mixers, **dims)

    student, stats = _student(model, config, weights, options, dtype, seed)
    student.config.upcycle = _provenance(base, base_config, config, select, preset, options, scales is not None,
                                         stats, smart)
    if "mamba2" in config.mixers:
        student.config.upcycle["mamba2_D"] = options.mamba2_D
    return student


def _student(model, config, weights, options, dtype, seed):
    """(the hybrid of `config` built in `dtype` on the base's device, shared weights copied and every mixer set by
    its from_attention unless mixer_init="random"; attention layers are always copied), per-layer stats."""
    torch.manual_seed(seed)
    student = _build(config, dtype).to(next(model.parameters()).device)  # a base on the GPU: convert there
    copy_shared(student, model)
    stats = {}
    for i, m in enumerate(config.mixers):
        if m == "attention" or options.mixer_init == "attention":
            stats[i] = student.model.layers[i].mixer.from_attention(weights(i), rope_init=options.rope_init,
                                                                    mamba2_D=options.mamba2_D)
    return student, stats


def _build(config, dtype):
    """A fresh HyloForCausalLM created directly in `dtype` (no float32 copy of a 1B model on the way)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return HyloForCausalLM(config).to(dtype).eval()
    finally:
        torch.set_default_dtype(previous)


def _energy_ranks(config, mixers, dims, weights, options, explicit) -> dict:
    """dims with each MLA rank not given explicitly chosen by kept singular-value energy (UpcycleOptions)."""
    q_ranks, kv_ranks = [], []
    for i in [i for i, m in enumerate(mixers) if m == "mla"]:
        q, _, _, _, kv, _ = attention_targets(weights(i), config.qk_nope_head_dim, config.qk_rope_head_dim,
                                              options.rope_init)
        q_ranks.append(energy_rank(torch.linalg.svdvals(q), options.rank_energy))
        kv_ranks.append(energy_rank(torch.linalg.svdvals(kv), options.rank_energy))
    new = dict(dims)
    if explicit.get("q_lora_rank") is None and config.q_lora_rank is not None:
        new["q_lora_rank"] = max(q_ranks)
    if explicit.get("kv_lora_rank") is None:
        new["kv_lora_rank"] = max(kv_ranks)
    return new


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


def _provenance(base, base_config, config, select, preset, options, calibrated, stats, smart) -> dict:
    """JSON-able record of how the model was made (stored as config.upcycle; `hylo-lab info` prints it)."""
    name = getattr(base_config, "_name_or_path", "") if is_model(base) else str(base)
    energies = {k: [round(stats[i][k], 6) for i in config.layer_indices("mla") if k in stats.get(i, {})]
                for k in ("q_energy", "kv_energy")}
    return dict(base=name, base_model_type=base_config.model_type, layout=config.layout,
                mla_layers=config.layer_indices("mla"), select=select or ("preset" if preset else "explicit"),
                preset=preset, rope_init=options.rope_init, qk_norm=options.qk_norm, qk_norm_calibrated=calibrated,
                mixer_init=options.mixer_init, rank_energy=options.rank_energy, kept_energy=energies, smart=smart)


def convert_all(base, kind: str, **kwargs):
    """Every layer one block type (a key of mixers.MIXERS): stage 1's full-width students."""
    if kind not in MIXERS:
        raise UpcycleError(f"kind={kind!r}; choose one of {', '.join(MIXERS)}")
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
    if len(lin) != 1 or not lin <= set(linear_mixers()):
        raise UpcycleError(f"linear_student must be all-GDN or all-Mamba2 (one linear block type of "
                           f"{', '.join(linear_mixers())}), got layout {b.layout}")
    (lin,) = lin
    ignore = {"mixers", "upcycle", "_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"}
    da, db = a.to_dict(), b.to_dict()
    diff = sorted(k for k in set(da) | set(db) if k not in ignore and da.get(k) != db.get(k))
    if diff:
        raise UpcycleError(f"the two students differ in {diff}: they must come from the same base and dims")
    n = a.num_hidden_layers
    mixers = layout_mixers(mixers, n, mla_layers)
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
