"""FSDP2 distillation on two CPU processes (gloo), launched as a user would (`accelerate launch --use_fsdp
--fsdp_version 2`): the held-out KL and final weights match the one-process run; a sharded checkpoint written by
two processes resumes in one and ends where an uninterrupted run ends. Tolerance: 1e-4 (float32; each process
sums the gradients of its half of the batch and the halves are then summed across processes, a different
addition order from one process summing all rows; the DDP test uses the same bound). Each launch is bounded in
time and the launcher and its ranks are killed on a hang, so a collective that waits forever fails the test."""
import json
import os
import subprocess
import sys

import psutil
import pytest
import yaml

from hylo_lab.distill.trainer import latest_checkpoint, run_recipe
from test_distill_trainer import recipe, weights, world  # noqa: F401 - world is a fixture

pytestmark = pytest.mark.slow

LAUNCH_TIMEOUT = 240  # one launch takes ~20 s on an idle 2-core machine


def launch_fsdp(path, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "0", "-m", "hylo_lab.cli", "distill", str(path), "--no-mlflow", *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        # torchrun starts each rank in its own session: kill the tree, or the ranks outlive the launcher and
        # keep its pipes open
        tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
        for p in tree:
            p.kill()
        out, err = proc.communicate()
        pytest.fail(f"2-process FSDP run hung for {LAUNCH_TIMEOUT} s; stderr tail:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    assert "2 process(es) on cpu (DistributedType.FSDP)" in err
    assert out.count("final model:") <= 1  # only rank 0 reports
    return err


def close(a_dir, b_dir, tol=1e-4):
    a, b = weights(a_dir), weights(b_dir)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"{b_dir}: max |one - two| = {worst:.2e}")
    assert worst < tol, (str(b_dir), worst)


def test_two_process_fsdp_matches_one_process_and_its_checkpoint_resumes_in_one(world, tmp_path, capfd):
    single = run_recipe(recipe(world, tmp_path / "one", ild_steps=2, kd_steps=2, checkpoint_every=1))
    # activation checkpointing under FSDP recomputes each layer in backward: same numbers as the plain one process
    spec = recipe(world, tmp_path / "two", ild_steps=2, kd_steps=2, checkpoint_every=1, activation_checkpointing=True)
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(spec))
    launch_fsdp(path)
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    for run in ("ild/mla", "ild/gdn", "kd"):
        close(tmp_path / "one" / run / "final", tmp_path / "two" / run / "final")
        kl_one = [v for _, v in single["runs"][run]["eval_kl"]]
        kl_two = [v for _, v in two["runs"][run]["eval_kl"]]
        assert kl_two == pytest.approx(kl_one, rel=1e-4), run

    # 2 processes stop after 5 steps (ild/mla, ild/gdn done; kd stopped after 1 with a sharded checkpoint)
    spec = recipe(world, tmp_path / "moved", ild_steps=2, kd_steps=2, checkpoint_every=1)
    path = tmp_path / "moved.yaml"
    path.write_text(yaml.safe_dump(spec))
    launch_fsdp(path, "--max-steps", "5")
    ckpt = latest_checkpoint(tmp_path / "moved" / "kd")
    assert ckpt is not None and (ckpt / "dcp").is_dir() and not (tmp_path / "moved" / "kd" / "final").exists()
    assert len(list((ckpt / "dcp").glob("*.distcp"))) == 2  # one shard file per process
    capfd.readouterr()
    resumed = run_recipe(spec, resume=True)  # one plain process: DCP assembles the full tensors
    assert not resumed["stopped_early"]
    err = capfd.readouterr().err
    assert f"kd: resumed from {ckpt} at step 1/2" in err and "cannot be read" not in err
    close(tmp_path / "one" / "kd" / "final", tmp_path / "moved" / "kd" / "final")
    kl_one = [v for _, v in single["runs"]["kd"]["eval_kl"]]
    assert [v for _, v in resumed["runs"]["kd"]["eval_kl"]] == pytest.approx(kl_one, rel=1e-4)


def test_a_checkpoint_written_without_fsdp_is_refused_under_fsdp_and_kept(tmp_path):
    """Resuming it under --use_fsdp is a usage error, not an unreadable checkpoint to move aside."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from hylo_lab.distill.trainer import Distiller
    from hylo_lab.errors import UserError

    ckpt = tmp_path / "kd" / "checkpoints" / "step-00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps(dict(step=2)))
    (ckpt / "model.bin").write_bytes(b"")  # accelerate's layout: no dcp/
    distiller = object.__new__(Distiller)
    distiller.accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, is_main_process=True,
                                            wait_for_everyone=lambda: None)
    with pytest.raises(UserError, match="written without FSDP .* resume it without --use_fsdp"):
        distiller.restore("kd", tmp_path / "kd")
    assert (ckpt / "model.bin").is_file() and not list(ckpt.parent.glob("*.unreadable"))
