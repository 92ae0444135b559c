"""Sharded distillation: FSDP2 through accelerate, and checkpoints that resume on any number of processes.

Turned on by accelerate's own flags, so a recipe runs unchanged on 1 process, N GPUs or N nodes:

    accelerate launch --use_fsdp --fsdp_version 2 --num_processes N -m hylo_lab.cli distill RECIPE.yaml

`make_accelerator` builds the Accelerator the trainer uses. Under ACCELERATE_USE_FSDP it passes a
FullyShardedDataParallelPlugin(fsdp_version=FSDP_VERSION, default 2) that shards each HyloDecoderLayer (and the
root: embeddings, final norm, head) and reshards after forward. Mixed precision is
the recipe's: train.precision bf16 (auto on GPU) -> parameters all-gathered in bfloat16, gradients reduced in
float32 (MixedPrecisionPolicy), under the trainer's bf16 autocast. Activation checkpointing is the recipe's
train.activation_checkpointing (transformers' non-reentrant checkpointing of each decoder layer, which FSDP2
composes with). accelerate only selects FSDP for accelerator devices; on CPU (gloo) the same plugin is installed
into the state by hand, which FSDP2 supports, so the CPU tests exercise the same sharding (not accelerate's own
selection of it, nor the bf16 gather).

Final and best weights: a consolidated Hugging Face folder, as one process writes it. `full_state_dict` gathers
the full tensors collectively (every process calls it; only the main one receives them, on CPU) and
`save_pretrained` writes them from a plain, unsharded copy of the model on the main process.

The teacher is replicated, not sharded: it is frozen (no gradients, no optimizer state), so per process it costs
its bf16 weights only, against 16 bytes per student parameter for float32 weights + AdamW moments that FSDP
does shard; sharding it would add one all-gather per teacher layer per micro-batch for that small saving.

Checkpoints: under FSDP, `save_state` writes the model and optimizer with torch.distributed.checkpoint (DCP)
into <ckpt>/dcp/ (each process its own shards; keys are the unsharded parameter names) plus each process's RNG
state; `load_state` reads a dcp/ checkpoint into whatever is running now: N' FSDP processes (DCP reshards) or one
plain process (no process group: DCP reads every shard and assembles full tensors). Checkpoints without dcp/
(written without FSDP) go through accelerate's save_state/load_state as before.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

DCP_DIR = "dcp"
WRAP = ["HyloDecoderLayer"]


def fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def make_accelerator(*, cpu: bool, bf16: bool):
    """The trainer's Accelerator: plain (DDP when launched on several processes) or FSDP2 (see the module doc)."""
    from accelerate import Accelerator

    if not fsdp_requested():
        return Accelerator(cpu=cpu)
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    version = int(os.environ.get("FSDP_VERSION", "2"))
    kwargs = dict(fsdp_version=version, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=WRAP,
                  state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False, activation_checkpointing=False)
    if version == 2:
        kwargs["reshard_after_forward"] = True
        if bf16:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            kwargs["mixed_precision_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                    reduce_dtype=torch.float32)
    plugin = FullyShardedDataParallelPlugin(**kwargs)
    acc = Accelerator(cpu=cpu, fsdp_plugin=plugin)
    if acc.distributed_type != DistributedType.FSDP and acc.num_processes > 1:  # CPU / gloo: accelerate skips FSDP
        from accelerate.state import PartialState

        # both shared states, as accelerate does on GPU: every later AcceleratorState() copies PartialState's
        # distributed_type over its own
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
    return acc


def is_fsdp(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def _model_and_optimizer(acc):
    if len(acc._models) != 1 or len(acc._optimizers) != 1:
        raise RuntimeError(f"expected one prepared model and optimizer, found {len(acc._models)} and "
                           f"{len(acc._optimizers)}")
    return acc._models[0], acc._optimizers[0].optimizer


def save_state(acc, path: str):
    """One checkpoint of the prepared model + optimizer (+ RNG): DCP under FSDP, else accelerate's save_state."""
    if not is_fsdp(acc):
        acc.save_state(path, safe_serialization=False)  # torch.save keeps tied weights without warnings
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer = _model_and_optimizer(acc)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(Path(path) / DCP_DIR))
    rng = dict(python=random.getstate(), torch=torch.get_rng_state(),
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    Path(path).mkdir(parents=True, exist_ok=True)  # DCP creates it on the coordinator only
    torch.save(rng, Path(path) / f"rng_{acc.process_index}.pt")


def load_state(acc, path: str):
    """Restore a checkpoint into the prepared model + optimizer, whatever number of processes wrote it."""
    if not (Path(path) / DCP_DIR).is_dir():
        if is_fsdp(acc):
            from ..errors import UserError

            raise UserError(f"{path} was written without FSDP (no {DCP_DIR}/ inside): resume it without "
                            f"--use_fsdp, or delete the checkpoints folder to restart that run under FSDP")
        acc.load_state(path)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, optimizer = _model_and_optimizer(acc)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(Path(path) / DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    rng_file = Path(path) / f"rng_{acc.process_index}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def save_pretrained(acc, model, folder, state_dict: dict):
    """model.save_pretrained(folder) with the full `state_dict` (main process only, after `full_state_dict`).

    Under FSDP the prepared model's parameters are sharded DTensors, and transformers' save_pretrained reads the
    model's own parameters (tied-weight checks), which would wait for the other processes. So a plain copy is
    built on the meta device, takes the gathered tensors (assign: no copy), re-ties lm_head to the embeddings and
    saves its own state dict: tied weights share storage as in a one-process save, so the same keys are written."""
    if not is_fsdp(acc):
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        return
    with torch.device("meta"):
        plain = type(model)(model.config)
    unexpected = plain.load_state_dict(state_dict, strict=False, assign=True).unexpected_keys
    plain.tie_weights()
    left = [k for k, v in plain.state_dict().items() if v.is_meta]
    if unexpected or left:
        raise RuntimeError(f"gathered state dict does not fit {type(model).__name__}: missing {left}, "
                           f"unexpected {unexpected}")
    plain.save_pretrained(folder, safe_serialization=True)


def full_state_dict(acc, model) -> dict:
    """The prepared model's full (unsharded) state dict; every process must call it, under FSDP only the main
    one gets the tensors (gathered to CPU)."""
    if not is_fsdp(acc):
        return acc.get_state_dict(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
