"""The token mixers, one row each: a new block type is a layer file plus one row here.

    code     its name in layout strings ("4MLA12GDN"); aliases are also accepted when parsing
    cls      the layer: cls(config, layer_idx); cls.cache_shapes(config) (states.py says the format);
             cls.describe(config) (one line of dims); layer.from_attention(w, **options) fills a freshly
             built layer from one base attention block in place (upcycle.py) and returns its stats
    state    the cache state class (states.py)
    linear   a fixed-size state; a layout holds at most one linear block type

Read by config (validation, layout strings), model (the layer), cache (states, shapes), upcycle (init,
layout planning), describe, the CLI and the demo. Iteration order is the order layout strings are written in.
"""

from __future__ import annotations

from dataclasses import dataclass

from .layers.attention import Attention
from .layers.gdn import GatedDeltaNet
from .layers.mamba2 import Mamba2
from .layers.mla import MLA
from .states import KVState, LinearState, MLAState


@dataclass(frozen=True)
class Mixer:
    code: str
    cls: type
    state: type
    linear: bool
    aliases: tuple[str, ...] = ()


MIXERS = {
    "mla": Mixer("MLA", MLA, MLAState, linear=False),
    "attention": Mixer("ATTN", Attention, KVState, linear=False, aliases=("ATTENTION",)),
    "gdn": Mixer("GDN", GatedDeltaNet, LinearState, linear=True),
    "mamba2": Mixer("M2", Mamba2, LinearState, linear=True, aliases=("MAMBA2",)),
}


def linear_mixers() -> tuple[str, ...]:
    return tuple(name for name, row in MIXERS.items() if row.linear)


def layout_names() -> dict[str, str]:
    """Every accepted layout block name (upper case) -> mixer name."""
    return {code: name for name, row in MIXERS.items() for code in (row.code, *row.aliases)}
