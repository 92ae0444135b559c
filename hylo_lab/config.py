"""HyloConfig: one flat, validated config for a hybrid decoder (MLA | Mamba2 | GDN | attention per layer).

The base model's shape (hidden size, heads, MLP, norms, RoPE of kept attention layers) is stored next to
the per-layer mixer choice and the block dimensions, so a config alone says what the hybrid is and what
the Transformer it came from would cost (see `cache.cache_footprint`).
"""

from __future__ import annotations

import copy
import re

from transformers import PretrainedConfig

from .mixers import MIXERS, layout_names

KERNEL_BACKENDS = ("auto", "torch", "fla", "mamba_ssm")

# Base shapes of the paper's models (public config.json values) and the MLA / GDN dimensions the paper uses
# for each (method.md sections 2-3). Numbers only: no weights are involved.
BASE_SHAPES = {
    "llama3.2-1b": dict(
        base_model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=131072,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
        q_lora_rank=1344, kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64,
        gdn_num_heads=6, gdn_head_dim=256,
    ),
    "llama3.2-3b": dict(
        base_model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=131072,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
        q_lora_rank=1536, kv_lora_rank=128, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=128,
        gdn_num_heads=9, gdn_head_dim=256,
    ),
    "qwen3-1.7b": dict(
        base_model_type="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, tie_word_embeddings=True,
        max_position_embeddings=40960, attention_qk_norm=True,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        q_lora_rank=1344, kv_lora_rank=256, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=128,
        gdn_num_heads=6, gdn_head_dim=256,
    ),
}

# The paper's layouts: MLA layer indices (0-based), all other layers linear (method.md section 2).
PAPER_MLA_LAYERS = {
    ("llama3.2-1b", 4): [1, 5, 10, 14],
    ("llama3.2-1b", 8): list(range(0, 16, 2)),
    ("llama3.2-3b", 6): [0, 5, 10, 16, 21, 26],
    ("llama3.2-3b", 14): list(range(0, 28, 2)),
    ("qwen3-1.7b", 7): [1, 5, 9, 13, 17, 21, 25],
    ("qwen3-1.7b", 14): list(range(0, 28, 2)),
}
PAPER_LINEAR = ("gdn", "mamba2")
PRESETS = {
    f"{base}/{n}MLA{BASE_SHAPES[base]['num_hidden_layers'] - n}{MIXERS[lin].code}": (base, idx, lin)
    for (base, n), idx in PAPER_MLA_LAYERS.items()
    for lin in PAPER_LINEAR
}


def layout_parts(layout: str) -> list[tuple[int, str]]:
    """'4MLA12GDN' -> [(4, 'mla'), (12, 'gdn')] (names from mixers.MIXERS, any case, spaces ignored)."""
    text = layout.replace(" ", "")
    names = layout_names()
    alternatives = "|".join(sorted(names, key=len, reverse=True))
    parts = re.findall(rf"(\d+)({alternatives}|[A-Za-z]+\d*)", text, flags=re.IGNORECASE)
    if not parts or "".join(n + name for n, name in parts) != text:
        raise ValueError(f"cannot parse layout {layout!r}: expected counts and block names like '4MLA12GDN' "
                         f"(block names: {', '.join(names)})")
    out = []
    for n, name in parts:
        mixer = names.get(name.upper())
        if mixer is None:
            raise ValueError(f"unknown block name {name!r} in layout {layout!r}; known: {', '.join(names)}")
        out.append((int(n), mixer))
    return out


def parse_list(text, kind=str) -> list:
    """"256, 512" -> [256, 512] (kind=int); "" and None -> []. The one comma-list parser of settings and flags."""
    return [kind(x.strip()) for x in str(text or "").split(",") if x.strip()]


def parse_layout(layout: str, num_layers: int, mla_layers=None, attention_layers=None) -> list[str]:
    """'4MLA12GDN' (+ optional explicit MLA / attention indices) -> one mixer name per layer.

    Placement: MLA and attention layers at the given indices, or evenly spaced when none are given; every
    other layer takes the layout's single linear block type.
    """
    counts: dict[str, int] = {}
    for n, mixer in layout_parts(layout):
        counts[mixer] = counts.get(mixer, 0) + n
    total = sum(counts.values())
    if total != num_layers:
        raise ValueError(f"layout {layout!r} describes {total} layers but the model has {num_layers}")
    linear = [m for m in counts if MIXERS[m].linear]
    if len(linear) > 1:
        raise ValueError(f"layout {layout!r} mixes {linear}: give `mixers` per layer explicitly for that")
    mixers = [linear[0] if linear else None] * num_layers
    for mixer, indices in (("mla", mla_layers), ("attention", attention_layers)):
        n = counts.get(mixer, 0)
        if indices is None:
            indices = evenly_spaced(n, num_layers) if n else []
        indices = [int(i) for i in indices]
        if len(indices) != n:
            raise ValueError(f"layout {layout!r} has {n} {mixer.upper()} layers but {len(indices)} indices were given: {indices}")
        bad = [i for i in indices if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"{mixer} layer indices {bad} out of range for {num_layers} layers (0-based)")
        for i in indices:
            if mixers[i] in ("mla", "attention"):
                raise ValueError(f"layer {i} is listed twice in the layout's indices")
            mixers[i] = mixer
    if None in mixers:
        raise ValueError(f"layout {layout!r} leaves layers {[i for i, m in enumerate(mixers) if m is None]} without a block")
    return mixers


def evenly_spaced(k: int, n: int) -> list[int]:
    """k indices spread over n layers, centred in their strides (k=4, n=16 -> 2, 6, 10, 14)."""
    return sorted({int((i + 0.5) * n / k) for i in range(k)})


def format_layout(mixers: list[str]) -> str:
    """['gdn', 'mla', ...] -> '4MLA12GDN' (in mixers.MIXERS order: MLA, attention, then linear blocks, as the
    paper writes them)."""
    return "".join(f"{mixers.count(m)}{row.code}" for m, row in MIXERS.items() if m in mixers)


class HyloConfig(PretrainedConfig):
    model_type = "hylo"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 256,
        intermediate_size: int = 688,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        attention_bias: bool = False,
        attention_qk_norm: bool = False,
        mlp_bias: bool = False,
        rope_parameters: dict | None = None,
        base_model_type: str | None = None,
        mixers: list[str] | None = None,
        layout: str | None = None,
        mla_layers: list[int] | None = None,
        q_lora_rank: int | None = None,  # None: no query compression (upcycle's 0; its None is the default size)
        kv_lora_rank: int = 64,
        qk_rope_head_dim: int | None = None,
        qk_nope_head_dim: int | None = None,
        v_head_dim: int | None = None,
        mla_num_kv_heads: int | None = None,
        mla_latent_norm: bool = False,
        mla_bias: bool = False,
        mla_rope_parameters: dict | None = None,
        mla_rope_pairs: list[int] | None = None,
        mamba2_state_size: int | None = None,
        mamba2_conv_kernel: int = 4,
        gdn_num_heads: int = 2,
        gdn_head_dim: int | None = None,
        gdn_expand_v: float = 2.0,
        gdn_conv_size: int = 4,
        gdn_use_short_conv: bool = True,
        gdn_use_gate: bool = True,
        gdn_norm_eps: float = 1e-5,
        chunk_size: int = 64,
        kernel_backend: str = "auto",
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.attention_bias = attention_bias
        self.attention_qk_norm = attention_qk_norm
        self.mlp_bias = mlp_bias
        self.rope_parameters = dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
        self.base_model_type = base_model_type
        if mixers is None:
            layout = layout or f"{num_hidden_layers}ATTN"
            mixers = parse_layout(layout, num_hidden_layers, mla_layers)
        self.mixers = list(mixers)
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = kv_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim if qk_rope_head_dim is not None else self.head_dim // 2
        self.qk_nope_head_dim = qk_nope_head_dim if qk_nope_head_dim is not None else self.head_dim - self.qk_rope_head_dim
        self.v_head_dim = v_head_dim or self.head_dim
        self.mla_num_kv_heads = mla_num_kv_heads or num_key_value_heads
        self.mla_latent_norm = mla_latent_norm
        self.mla_bias = mla_bias
        self.mla_rope_parameters = dict(mla_rope_parameters or self.rope_parameters)
        # Upcycled: which of the base head's head_dim/2 RoPE frequencies the MLA rotates (layers.mla.rope_pairs);
        # None: the MLA's own qk_rope_head_dim frequencies (layers.common.mla_rotary).
        self.mla_rope_pairs = None if mla_rope_pairs is None else [int(j) for j in mla_rope_pairs]
        self.mamba2_state_size = mamba2_state_size or self.head_dim
        self.mamba2_conv_kernel = mamba2_conv_kernel
        self.gdn_num_heads = gdn_num_heads
        self.gdn_head_dim = gdn_head_dim or self.head_dim
        self.gdn_expand_v = gdn_expand_v
        self.gdn_conv_size = gdn_conv_size
        self.gdn_use_short_conv = gdn_use_short_conv
        self.gdn_use_gate = gdn_use_gate
        self.gdn_norm_eps = gdn_norm_eps
        self.chunk_size = chunk_size
        self.kernel_backend = kernel_backend
        self.use_cache = use_cache
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_hylo()

    # transformers may standardise `rope_parameters`; the MLA copy is ours alone.
    def validate_hylo(self):
        n = self.num_hidden_layers
        if len(self.mixers) != n:
            raise ValueError(f"mixers lists {len(self.mixers)} layers but num_hidden_layers is {n}")
        unknown = sorted({m for m in self.mixers if m not in MIXERS})
        if unknown:
            raise ValueError(f"unknown mixer(s) {unknown}; each layer must be one of {tuple(MIXERS)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend={self.kernel_backend!r}; choose one of {KERNEL_BACKENDS}")
        if "mla" in self.mixers:
            H, Hkv = self.num_attention_heads, self.mla_num_kv_heads
            if H % Hkv:
                raise ValueError(f"mla_num_kv_heads={Hkv} must divide num_attention_heads={H}")
            if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim <= 0:
                raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be a positive even number")
            pairs = self.mla_rope_pairs
            if pairs is not None and (len(pairs) != self.qk_rope_head_dim // 2 or len(set(pairs)) != len(pairs)
                                      or not all(0 <= j < self.head_dim // 2 for j in pairs)):
                raise ValueError(f"mla_rope_pairs={pairs} must be qk_rope_head_dim/2 = {self.qk_rope_head_dim // 2} "
                                 f"distinct frequency pairs in 0..{self.head_dim // 2 - 1} of the base head")
            q_full = min(self.hidden_size, H * (self.qk_nope_head_dim + self.qk_rope_head_dim))
            if self.q_lora_rank is not None and not 0 < self.q_lora_rank <= q_full:
                raise ValueError(f"q_lora_rank={self.q_lora_rank} must be in 1..{q_full} "
                                 f"(min of hidden_size and the query width it compresses)")
            kv_full = min(self.hidden_size, Hkv * (self.qk_nope_head_dim + self.v_head_dim))
            if not 0 < self.kv_lora_rank <= kv_full:
                raise ValueError(f"kv_lora_rank={self.kv_lora_rank} must be in 1..{kv_full} "
                                 f"(min of hidden_size and mla_num_kv_heads*(qk_nope_head_dim+v_head_dim))")
        if "mamba2" in self.mixers and self.mamba2_conv_kernel < 1:
            raise ValueError("mamba2_conv_kernel must be >= 1")
        if "gdn" in self.mixers:
            if self.gdn_num_heads <= 0 or self.gdn_head_dim <= 0:
                raise ValueError("gdn_num_heads and gdn_head_dim must be positive")
            if self.gdn_head_dim * self.gdn_expand_v != int(self.gdn_head_dim * self.gdn_expand_v):
                raise ValueError(f"gdn_head_dim*gdn_expand_v={self.gdn_head_dim * self.gdn_expand_v} must be an integer")

    @property
    def layout(self) -> str:
        return format_layout(self.mixers)

    @property
    def gdn_head_v_dim(self) -> int:
        return int(self.gdn_head_dim * self.gdn_expand_v)

    def layer_indices(self, mixer: str) -> list[int]:
        return [i for i, m in enumerate(self.mixers) if m == mixer]

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "HyloConfig":
        """A paper preset such as 'llama3.2-1b/4MLA12GDN': the base's shape with the paper's MLA layers and dims."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        base, mla_layers, linear = PRESETS[name]
        kw = copy.deepcopy(BASE_SHAPES[base])
        n = kw["num_hidden_layers"]
        kw["mixers"] = ["mla" if i in mla_layers else linear for i in range(n)]
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_base_shape(cls, base: str, layout: str, mla_layers=None, **overrides) -> "HyloConfig":
        """A base shape from BASE_SHAPES with any layout, e.g. ('llama3.2-1b', '8MLA8M2')."""
        if base not in BASE_SHAPES:
            raise ValueError(f"unknown base shape {base!r}; known: {', '.join(BASE_SHAPES)}")
        kw = copy.deepcopy(BASE_SHAPES[base])
        kw.update(layout=layout, mla_layers=mla_layers)
        kw.update(overrides)
        return cls(**kw)
