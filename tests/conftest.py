import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def tiny_config(mixers=("mla", "gdn", "mamba2", "attention"), **overrides):
    """A 4-layer hybrid small enough for float64 equivalence checks on one core."""
    from hylo_lab import HyloConfig

    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=len(mixers),
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, mixers=list(mixers),
              kv_lora_rank=24, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
              gdn_num_heads=2, gdn_head_dim=16, chunk_size=16, max_position_embeddings=512,
              kernel_backend="torch")
    kw.update(overrides)
    return HyloConfig(**kw)


@pytest.fixture
def make_config():
    return tiny_config
