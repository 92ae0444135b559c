import pytest

from hylo_lab import PRESETS, HyloConfig
from hylo_lab.config import evenly_spaced, format_layout, parse_layout


def test_layout_with_indices_builds_mixers():
    mixers = parse_layout("4MLA12GDN", 16, [1, 5, 10, 14])
    assert [i for i, m in enumerate(mixers) if m == "mla"] == [1, 5, 10, 14]
    assert mixers.count("gdn") == 12 and format_layout(mixers) == "4MLA12GDN"


def test_layout_without_indices_spreads_mla_evenly():
    assert evenly_spaced(4, 16) == [2, 6, 10, 14]
    config = HyloConfig(num_hidden_layers=8, layout="2MLA6M2")
    assert config.layer_indices("mla") == [2, 6] and config.mixers.count("mamba2") == 6
    assert config.layout == "2MLA6M2"


@pytest.mark.parametrize("kwargs, message", [
    (dict(layout="3MLA2GDN"), "describes 5 layers but the model has 4"),
    (dict(layout="2MLA2XYZ"), "unknown block name 'XYZ'"),
    (dict(layout="2MLA2GDN", mla_layers=[0, 9]), "out of range"),
    (dict(layout="2MLA2GDN", mla_layers=[0]), "has 2 MLA layers but 1 indices"),
    (dict(layout="2MLA2GDN", mla_layers=[1, 1]), "listed twice"),
    (dict(layout="2MLA1GDN1M2"), "give `mixers` per layer"),
    (dict(layout="four"), "cannot parse layout"),
    (dict(mixers=["mla", "gdn", "lstm", "mla"]), "unknown mixer"),
    (dict(mixers=["mla", "gdn"]), "mixers lists 2 layers"),
    (dict(layout="4MLA", kv_lora_rank=4096), "kv_lora_rank=4096 must be in"),
    (dict(layout="4MLA", q_lora_rank=10_000), "q_lora_rank=10000 must be in"),
    (dict(layout="4MLA", qk_rope_head_dim=7), "positive even number"),
    (dict(num_key_value_heads=3), "not a multiple"),
    (dict(kernel_backend="cuda"), "kernel_backend"),
])
def test_bad_configs_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        HyloConfig(**kwargs)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_instantiates(name):
    config = HyloConfig.from_preset(name)
    base, mla_layers, linear = PRESETS[name]
    assert config.layer_indices("mla") == mla_layers
    assert set(config.mixers) == {"mla", linear}


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="llama3.2-1b/4MLA12GDN"):
        HyloConfig.from_preset("llama3.2-1b/5MLA11GDN")


def test_config_round_trip(tmp_path):
    config = HyloConfig(layout="2MLA2GDN", mla_layers=[0, 3], mla_rope_parameters={"rope_type": "yarn", "rope_theta": 1e4,
                        "factor": 4.0, "original_max_position_embeddings": 256})
    config.save_pretrained(tmp_path)
    again = HyloConfig.from_pretrained(tmp_path)
    assert again.mixers == config.mixers and again.mla_rope_parameters["factor"] == 4.0
