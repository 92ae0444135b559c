"""hylo_lab: upcycle pretrained Transformers into HyLo hybrids (MLA + Mamba2 / Gated DeltaNet), distil, evaluate.

Importing registers `model_type="hylo"` with transformers' AutoConfig and AutoModelForCausalLM.
"""

from .cache import HyloCache, cache_footprint
from .config import PRESETS, HyloConfig
from .model import HyloForCausalLM, HyloModel

__all__ = ["HyloConfig", "HyloForCausalLM", "HyloModel", "HyloCache", "cache_footprint", "PRESETS"]
__version__ = "0.1.0"
