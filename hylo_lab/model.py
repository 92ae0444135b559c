"""The hybrid decoder: Llama/Qwen layer structure (RMSNorm, SwiGLU, residuals) with one token mixer per layer.

    h = x + mixer(input_layernorm(x));  out = h + mlp(post_attention_layernorm(h))

mixer is MLA, Mamba2, GatedDeltaNet or the base's own attention (a row of mixers.MIXERS), chosen by
`config.mixers[i]`.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .cache import HyloCache
from .config import HyloConfig
from .layers.common import MLP, RMSNorm, Rotary, mla_rotary
from .mixers import MIXERS

# Newer transformers (5.25 here) pass and return the cache as `cache` and warn on `past_key_values`; older ones
# (5.17) know only `past_key_values`. forward() takes either; outputs and generation inputs use the installed name.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def pick_cache(past_key_values, cache):
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("pass the cache once, as `cache` or `past_key_values`, not two different ones")
    return past_key_values if cache is None else cache


class HyloDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HyloConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.mixer_type = config.mixers[layer_idx]
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = MIXERS[self.mixer_type].cls(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias)

    def forward(self, hidden_states, rope=None, state=None, attention_mask=None, return_mixer_output=False):
        """rope: {"mla": (cos, sin), "attention": (cos, sin)}. Returns the layer output, and the mixer output
        too when `return_mixer_output` (Enhanced-ILD compares both)."""
        x = self.input_layernorm(hidden_states)
        if rope and self.mixer_type in rope:  # the mixers with a Rotary in HyloModel.rotary
            a = self.mixer(x, rope=rope[self.mixer_type], state=state, attention_mask=attention_mask)
        else:
            a = self.mixer(x, state=state, attention_mask=attention_mask)
        h = hidden_states + a
        out = h + self.mlp(self.post_attention_layernorm(h))
        return (out, a) if return_mixer_output else out


class HyloPreTrainedModel(PreTrainedModel):
    config_class = HyloConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HyloDecoderLayer"]
    _supports_sdpa = True
    # Linear layers carry recurrent state: transformers must not build its own DynamicCache for generate().
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def save_pretrained(self, save_directory, *args, **kwargs):
        """save_pretrained, plus flat copies of the modeling code and an `auto_map` (hylo_lab/hub.py), so that
        `trust_remote_code=True` loads the folder where hylo_lab is not installed. A remote-code copy of this class
        (`_auto_class` set by transformers) is saved by transformers itself."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if self._auto_class is None and kwargs.get("is_main_process", True):
            # by name: an import statement here would make the remote-code copy require hylo_lab
            importlib.import_module("hylo_lab.hub").write_remote_code(save_directory)

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)


class HyloModel(HyloPreTrainedModel):
    def __init__(self, config: HyloConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(HyloDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = nn.ModuleDict()
        if "mla" in config.mixers:
            self.rotary["mla"] = mla_rotary(config)
        if "attention" in config.mixers:
            self.rotary["attention"] = Rotary(config.head_dim, config.rope_parameters, config.max_position_embeddings)
        self.gradient_checkpointing = False
        self.post_init()

    def rope_tables(self, position_ids, dtype):
        """{"attention": (cos, sin), "mla": (cos, sin, logit temperature)} (Rotary.forward says why MLA's differ)."""
        tables = {name: rot(position_ids, dtype) for name, rot in self.rotary.items() if name != "mla"}
        if "mla" in self.rotary:
            rot = self.rotary["mla"]
            tables["mla"] = (*rot(position_ids, dtype, scaled=False), rot.scaling**2)
        return tables

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=False, cache=None, **kwargs):
        past_key_values = pick_cache(past_key_values, cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = h.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None and not self.training:
            past_key_values = HyloCache(self.config)
        past = past_key_values.seq_length if past_key_values is not None else 0
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past, T, h.device, B)
        rope = self.rope_tables(position_ids, h.dtype)
        hidden_states = [h] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            state = past_key_values[i] if past_key_values is not None else None
            h = layer(h, rope, state, attention_mask)
            if output_hidden_states:
                hidden_states.append(h)
        h = self.norm(h)
        if past_key_values is not None:
            if past_key_values.static and T == 1:  # MLA wrote at `position` (no Python length changed)
                past_key_values.position.add_(1)
                past_key_values.advance(1)
            else:
                past_key_values.seq_length += T
                past_key_values.sync_position()
        if output_hidden_states:
            hidden_states[-1] = h
        return BaseModelOutputWithPast(last_hidden_state=h, **{CACHE_NAME: past_key_values},
                                       hidden_states=tuple(hidden_states) if hidden_states else None)


def positions_from_mask(attention_mask, past, T, device, batch_size):
    """Positions count real tokens only, so left-padded rows start at 0 (attention_mask covers past + T)."""
    if attention_mask is None:
        return torch.arange(past, past + T, device=device)[None].expand(batch_size, T)
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, -T:]


class HyloForCausalLM(HyloPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HyloConfig):
        super().__init__(config)
        self.model = HyloModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=False,
                logits_to_keep: int = 0, cache=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=pick_cache(past_key_values, cache), inputs_embeds=inputs_embeds,
                         use_cache=use_cache, output_hidden_states=output_hidden_states)
        h = out.last_hidden_state
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                               ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_NAME: getattr(out, CACHE_NAME)},
                                      hidden_states=out.hidden_states)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=True, cache=None, **kwargs):
        """Feed only the tokens the cache has not seen; positions follow from the cache length and padding.
        GenerationMixin hands the cache back as `cache` or `past_key_values`, whichever its version uses."""
        past_key_values = pick_cache(past_key_values, cache)
        if past_key_values is None and use_cache:
            past_key_values = HyloCache(self.config)
        past = past_key_values.seq_length if past_key_values is not None else 0
        inputs = {CACHE_NAME: past_key_values, "use_cache": use_cache, "attention_mask": attention_mask}
        if inputs_embeds is not None and past == 0:
            inputs["inputs_embeds"] = inputs_embeds
            T = inputs_embeds.shape[1]
        else:
            inputs["input_ids"] = input_ids[:, past:]
            T = inputs["input_ids"].shape[1]
        B = input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0]
        device = input_ids.device if input_ids is not None else inputs_embeds.device
        inputs["position_ids"] = positions_from_mask(attention_mask, past, T, device, B)
        inputs["logits_to_keep"] = 1
        return inputs


if __name__ == "hylo_lab.model":  # a remote-code copy (hub.py) is registered by transformers, per folder
    AutoConfig.register("hylo", HyloConfig, exist_ok=True)
    AutoModelForCausalLM.register(HyloConfig, HyloForCausalLM, exist_ok=True)
