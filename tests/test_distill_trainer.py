"""The distillation loop on a tiny trained Llama teacher (hidden 32, 2 layers, BPE vocabulary of 384 over the
toy corpus, 80 training steps: ~1 s): a run stopped after N steps and resumed ends bitwise equal to an
uninterrupted one; a NaN stops the run with a clear message and keeps the last good checkpoint; held-out KL
falls in stage 1 and stage 2 and every metric lands in a temporary MLflow; the teacher must share the
tokenizer; full, chunked and hidden-state KL give the same stage-2 loss."""
import json

import pytest
import torch
import torch.nn.functional as F

from hylo_lab.distill.kd import KDStudent, teacher_kd_targets
from hylo_lab.distill.losses import fused_linear_cross_entropy
from hylo_lab.distill.stages import RecipeError, StageSpec
from hylo_lab.distill.trainer import (
    Distiller,
    NonFiniteLoss,
    latest_checkpoint,
    run_recipe,
    set_activation_checkpointing,
)
from hylo_lab.model import HyloForCausalLM


def train_llama(tok, docs, path, *, hidden=32, layers=2, steps=80, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    ids = torch.tensor([t for d in docs for t in tok.encode(d) + [tok.eos_token_id]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.stack([ids[s:s + 65] for s in torch.randint(0, len(ids) - 65, (8,), generator=g)])
        loss = F.cross_entropy(model(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from hylo_lab.data.toy import train_tokenizer
    from hylo_lab.data.toy_corpus import heldout_seed, toy_corpus

    root = tmp_path_factory.mktemp("distill_world")
    docs = toy_corpus(300, seed=0)
    tok = train_tokenizer(docs, vocab_size=384)
    (root / "train.txt").write_text("\n\n".join(docs))
    (root / "heldout.txt").write_text("\n\n".join(toy_corpus(40, seed=heldout_seed(0))))
    return dict(root=root, base=train_llama(tok, docs, root / "teacher"),
                big=train_llama(tok, docs, root / "teacher-big", hidden=48, layers=3, seed=1), tok=tok, docs=docs)


def recipe(world, out, *, ild_steps=4, kd_steps=4, **train):
    root = world["root"]
    return dict(
        name="tiny", output_dir=str(out), base=str(world["base"]),
        student=dict(layout="1MLA1GDN", mla_layers=[1]),
        data=dict(train=[dict(type="text", path=str(root / "train.txt"), separator="\n\n")],
                  heldout=[dict(type="text", path=str(root / "heldout.txt"), separator="\n\n")]),
        train=dict(dict(batch_size=4, micro_batch_size=2, eval_rows=4, progress=False, checkpoint_every=2), **train),
        tracking=dict(enabled=False),
        stages=[dict(name="ild", kind="ild", seq_len=48, steps=ild_steps, lr=3e-3),
                dict(name="kd", kind="kd", seq_len=48, steps=kd_steps, lr=1e-3, warmup=0.25)],
    )


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_stopped_and_resumed_run_equals_an_uninterrupted_run(world, tmp_path):
    whole = run_recipe(recipe(world, tmp_path / "whole"))
    assert not whole["stopped_early"]
    parts = recipe(world, tmp_path / "parts")
    # 5 steps: ild/mla done (4), ild/gdn stopped after 1 (checkpoint), then ild/gdn done, kd stopped after 1.
    first = run_recipe(parts, max_steps=5)
    assert first["stopped_early"] and first["final_model"] is None
    assert latest_checkpoint(tmp_path / "parts" / "ild" / "gdn").name == "step-00000001"
    second = run_recipe(parts, resume=True, max_steps=4)
    assert second["stopped_early"]
    assert json.loads((latest_checkpoint(tmp_path / "parts" / "kd") / "trainer_state.json").read_text())["step"] == 1
    third = run_recipe(parts, resume=True)
    assert not third["stopped_early"]
    for run in ("ild/mla", "ild/gdn", "kd"):
        a, b = weights(tmp_path / "whole" / run / "final"), weights(tmp_path / "parts" / run / "final")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), run
    assert third["runs"]["kd"]["eval_kl"] == whole["runs"]["kd"]["eval_kl"]
    assert not (tmp_path / "parts" / "kd" / "checkpoints").exists()  # removed once the run finished
    with pytest.raises(RecipeError, match="already holds a run: pass --resume"):
        run_recipe(parts)


class RecordingTracker:
    active = True

    def __init__(self):
        self.metrics = {}

    def log_metrics(self, metrics, step=None):
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append(v)

    def log_artifact(self, *args, **kwargs):
        pass

    set_tags = log_dict = end = log_artifact


# Measured on the code before the trainer was split into checkpoints / evaluation / preflight (same seeds):
# 4 steps per run, losses after each step; the schedule's lr is exact (warmup 0 in ild, 1 step in kd).
GOLDEN = {"train/ild/mla/loss": [0.9789749383926392, 1.4269027709960938, 1.2418469190597534, 1.2234623432159424],
          "train/ild/gdn/loss": [3.684878349304199, 2.9111971855163574, 2.6799895763397217, 2.995542526245117],
          "train/kd/loss": [1.1447367668151855, 1.2816568613052368, 1.2392053604125977, 1.1125121116638184],
          "eval/kd/kl": [0.06830277293920517, 0.06603366136550903, 0.06627243012189865]}
GOLDEN_LR = {"train/ild/gdn/lr": [0.003, 0.002560660171779821, 0.0015, 0.0004393398282201788],
             "train/kd/lr": [0.001, 0.001, 0.00075, 0.0002500000000000001]}


def test_golden_losses_of_a_tiny_recipe(world, tmp_path):
    """Stage 1 (MLA and GDN students) and stage 2 (KL + 0.3 CE), 4 steps each, log and evaluate often: every
    training loss and held-out KL equals the recorded one, every learning rate exactly."""
    raw = recipe(world, tmp_path / "out", log_every=1, eval_every=2)
    raw["stages"][1]["ce_weight"] = 0.3
    tracker = RecordingTracker()
    run_recipe(raw, tracker=tracker)
    for name, values in GOLDEN.items():
        assert tracker.metrics[name] == pytest.approx(values, rel=1e-5, abs=1e-7), name
    for name, values in GOLDEN_LR.items():
        assert tracker.metrics[name] == values, name


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(world, tmp_path, monkeypatch):
    def poison(self, loss, run, step):
        return loss * float("nan") if run == "kd" and step == 2 else loss

    monkeypatch.setattr(Distiller, "loss_hook", poison)
    with pytest.raises(NonFiniteLoss) as info:
        run_recipe(recipe(world, tmp_path / "out", ild_steps=2))
    msg = str(info.value)
    ckpt = tmp_path / "out" / "kd" / "checkpoints" / "step-00000002"
    assert "kd: loss is nan at step 3" in msg and "stopped before the optimizer step" in msg
    assert f"the last good checkpoint is {ckpt} (kept)" in msg
    assert latest_checkpoint(tmp_path / "out" / "kd") == ckpt
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2
    assert not (tmp_path / "out" / "kd" / "final").exists()
    # The kept checkpoint is good: without the poison the run resumes from it and finishes, with the weights of
    # a run that never failed (a crash mid-run, resumed from a periodic checkpoint, not from a --max-steps stop).
    monkeypatch.setattr(Distiller, "loss_hook", lambda self, loss, run, step: loss)
    done = run_recipe(recipe(world, tmp_path / "out", ild_steps=2), resume=True)
    assert done["final_model"].endswith("kd/final")
    clean = run_recipe(recipe(world, tmp_path / "clean", ild_steps=2))
    a, b = weights(tmp_path / "clean" / "kd" / "final"), weights(tmp_path / "out" / "kd" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert done["runs"]["kd"]["eval_kl"] == clean["runs"]["kd"]["eval_kl"]


def test_heldout_kl_falls_in_both_stages_and_is_logged_to_mlflow(world, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = recipe(world, tmp_path / "out", ild_steps=12, kd_steps=12, eval_every=6, checkpoint_every=0)
    raw["teacher"] = str(world["big"])  # a larger stage-2 teacher with the same tokenizer
    raw["stages"][0].update(lr=2e-3, warmup=0.25)  # no early spike, so the 3-point histories fall on any CPU
    raw["tracking"] = dict(enabled=True, tracking_uri=uri, experiment="distill-test")
    raw["stages"].append(dict(name="kd-96", kind="kd", seq_len=96, steps=2, lr=1e-4, kl="hidden",
                              kl_chunk_size=64, vocab_chunk_size=100,
                              yarn=dict(factor=2, original_max_position_embeddings=48)))
    summary = run_recipe(raw)
    for run in ("ild/mla", "ild/gdn", "kd"):
        history = summary["runs"][run]["eval_kl"]
        assert [s for s, _ in history] == [0, 6, 12]
        assert history[-1][1] < 0.9 * history[0][1], (run, history)

    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("distill-test").experiment_id])
    assert run.info.status == "FINISHED"
    for name in ("eval/ild/mla/kl", "eval/ild/gdn/kl", "eval/kd/kl", "eval/ild/mla/ild"):
        values = [m.value for m in sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)]
        assert len(values) == 3 and values[-1] < values[0], name
    assert len(client.get_metric_history(run.info.run_id, "train/kd/loss")) == 12
    assert len(client.get_metric_history(run.info.run_id, "train/ild/gdn/layer/1")) == 12
    assert {"train/kd/kl", "train/kd/tokens_per_s", "train/kd-96/lr", "eval/kd-96/kl"} <= set(run.data.metrics)
    params = run.data.params
    assert params["teacher"] == str(world["big"]) and params["stages.2.yarn.factor"] == "2"
    assert params["stages.0.kind"] == "ild" and params["data.train.0.type"] == "text" and params["train.batch_size"] == "4"
    assert run.data.tags["final_model"] == summary["final_model"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe", "model", "tables"} <= artifacts
    assert "recipe/recipe.yaml" in {a.path for a in client.list_artifacts(run.info.run_id, "recipe")}
    final = HyloForCausalLM.from_pretrained(summary["final_model"])
    assert final.config.mla_rope_parameters["rope_type"] == "yarn"
    assert final.config.mla_rope_parameters["factor"] == 2.0
    assert final.config.layout == "1MLA1GDN" and final.config.mixers == ["gdn", "mla"]


def test_unreachable_mlflow_is_reported_not_fatal(world, tmp_path, capsys):
    raw = recipe(world, tmp_path / "out", ild_steps=1, kd_steps=1)
    raw["tracking"] = dict(enabled=True, tracking_uri="http://127.0.0.1:9/")  # nothing listens on port 9
    import os

    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "2"
    with pytest.warns(UserWarning, match="MLflow logging disabled"):
        summary = run_recipe(raw)
    assert summary["final_model"] is not None
    assert "MLflow unavailable" in capsys.readouterr().err


def test_teacher_with_another_tokenizer_is_refused_up_front(world, tmp_path):
    from hylo_lab.data.toy import train_tokenizer

    other = train_tokenizer(world["docs"][:100], vocab_size=320)
    bad = train_llama(other, world["docs"][:5], tmp_path / "other", steps=1)
    raw = recipe(world, tmp_path / "out")
    raw["teacher"] = str(bad)
    with pytest.raises(RecipeError, match=r"does not share the student's tokenizer: vocabulary sizes 320 \(teacher\) vs 384"):
        run_recipe(raw)
    same_size = train_tokenizer(list(reversed(world["docs"]))[:100], vocab_size=384)
    bad2 = train_llama(same_size, world["docs"][:5], tmp_path / "other2", steps=1)
    raw["teacher"] = str(bad2)
    with pytest.raises(RecipeError, match="first difference at id"):
        run_recipe(raw)
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("kl", ["chunked", "hidden"])
def test_kd_losses_agree_whatever_the_kl_implementation(world, kl):
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(world["base"]).eval()
    torch.manual_seed(0)
    student = HyloForCausalLM(tiny_config(["mla", "gdn"], vocab_size=384))
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    losses, grads = {}, {}
    for impl in ("full", kl):
        st = StageSpec(name="kd", kind="kd", seq_len=24, steps=1, kl=impl, ce_weight=0.5, temperature=2.0,
                       kl_chunk_size=7, vocab_chunk_size=50)
        t_out, t_head = teacher_kd_targets(teacher, ids, impl)
        student.zero_grad()
        loss, parts = KDStudent(student, st)(ids, t_out, t_head)
        loss.backward()
        losses[impl] = (loss.item(), parts["kl"].item(), parts["ce"].item())
        grads[impl] = torch.cat([p.grad.flatten() for p in student.parameters()])
    assert losses[kl] == pytest.approx(losses["full"], rel=1e-5)
    assert torch.allclose(grads[kl], grads["full"], rtol=1e-4, atol=1e-6)
    ce = student(ids, labels=ids).loss  # transformers-style shifted CE
    assert losses["full"][2] == pytest.approx(ce.item(), rel=1e-5)


@pytest.mark.parametrize("kl", ["full", "chunked"])
def test_a_cross_entropy_only_stage_runs_no_teacher_forward(world, kl, monkeypatch):
    """kl_weight 0: the trainer asks the teacher for nothing and the loss is ce_weight x the shifted CE."""
    from conftest import tiny_config

    from hylo_lab.distill import trainer

    torch.manual_seed(0)
    student = HyloForCausalLM(tiny_config(["mla", "gdn"], vocab_size=384))
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    st = StageSpec(name="kd", kind="kd", seq_len=24, steps=1, kl=kl, kl_weight=0.0, ce_weight=0.5, kl_chunk_size=7)
    monkeypatch.setattr(trainer, "teacher_kd_targets", lambda *a: pytest.fail("teacher forward at kl_weight 0"))
    targets = trainer.Distiller.kd_targets(None, st, teacher=None, ids=ids)
    assert targets == (None, None)
    loss, parts = KDStudent(student, st)(ids, *targets)
    assert set(parts) == {"ce"}
    ce = student(ids, labels=ids).loss  # transformers-style shifted CE
    assert loss.item() == pytest.approx(0.5 * ce.item(), rel=1e-5)


def test_chunked_cross_entropy_equals_plain():
    h = torch.randn(3, 10, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    y = torch.randint(0, 30, (3, 10))
    y[0, -1] = -100
    a = fused_linear_cross_entropy(h, w, y, chunk_size=4)
    b = F.cross_entropy((h @ w.T).flatten(0, 1), y.flatten(), ignore_index=-100)
    assert torch.allclose(a, b, atol=1e-6)
    ga = torch.autograd.grad(a, (h, w))
    gb = torch.autograd.grad(b, (h, w))
    assert all(torch.allclose(x, z, atol=1e-6) for x, z in zip(ga, gb))


def test_activation_checkpointing_gives_the_same_gradients(world):
    """Stage 1 calls the decoder layers directly and stage 2 the whole model: both go through transformers'
    GradientCheckpointingLayer, so enabling checkpointing must recompute, not change, anything."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    from hylo_lab.distill.ild import TeacherForcedStudent, teacher_states

    teacher = AutoModelForCausalLM.from_pretrained(world["base"]).eval()
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    student = HyloForCausalLM(tiny_config(["mla", "gdn"], vocab_size=384, hidden_size=32, num_attention_heads=2,
                                          num_key_value_heads=1)).train()
    st = StageSpec(name="kd", kind="kd", seq_len=24, steps=1, kl="chunked", kl_chunk_size=10)
    grads = []
    for ckpt in (False, True):
        if ckpt:
            set_activation_checkpointing(student, True)
        assert all(layer.gradient_checkpointing == ckpt for layer in student.model.layers)
        student.zero_grad()
        ild, _ = TeacherForcedStudent(student)(teacher_states(teacher, ids))
        t_out, t_head = teacher_kd_targets(teacher, ids, "chunked")
        kd, _ = KDStudent(student, st)(ids, t_out, t_head)
        (ild + kd).backward()
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_run_on_cpu(world, tmp_path):
    """The GPU precision path (bf16 autocast, logit-free KL outside autocast) runs end to end."""
    raw = recipe(world, tmp_path / "out", ild_steps=1, kd_steps=2, precision="bf16", activation_checkpointing=True)
    raw["stages"][1].update(kl="hidden", kl_chunk_size=32, vocab_chunk_size=128)
    summary = run_recipe(raw)
    assert all(v == v and v < 10 for _, v in summary["runs"]["kd"]["eval_kl"])


def test_yarn_rebuilds_the_mla_rope_and_survives_save_and_load(tmp_path):
    from conftest import tiny_config

    from hylo_lab.distill.stages import YarnSpec
    from hylo_lab.distill.kd import apply_yarn

    model = HyloForCausalLM(tiny_config(["mla", "attention"]))
    ids = torch.randint(0, 97, (1, 40))
    before = model(ids).logits
    attention_rope = model.model.rotary["attention"]
    params = apply_yarn(model, YarnSpec(factor=4, original_max_position_embeddings=16), seq_len=64)
    assert params == dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16)
    assert model.model.rotary["mla"].rope_type == "yarn" and model.model.rotary["attention"] is attention_rope
    assert model.config.max_position_embeddings == 512  # already above 64 and 4 x 16
    after = model(ids).logits
    assert not torch.allclose(before, after)
    model.save_pretrained(tmp_path)
    again = HyloForCausalLM.from_pretrained(tmp_path)
    assert again.config.mla_rope_parameters == params
    assert torch.allclose(again(ids).logits, after, atol=1e-6)
    with pytest.raises(RecipeError, match="has none"):
        apply_yarn(HyloForCausalLM(tiny_config(["gdn"])), YarnSpec(2, 16), 32)


def test_cli_check_then_a_stopped_run(world, tmp_path, capsys):
    import yaml

    from hylo_lab.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(world, tmp_path / "out", ild_steps=1, kd_steps=1)))
    main(["distill", str(path), "--check"])
    assert "is valid: ild (ild, 48 tokens, 1 steps), kd (kd, 48 tokens, 1 steps)" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    main(["distill", str(path), "--max-steps", "1", "--no-mlflow"])
    assert "continue with: hylo-lab distill" in capsys.readouterr().out
    main(["distill", str(path), "--resume"])
    assert "final model:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["distill", str(path)])
    assert info.value.code == 2 and "already holds a run" in capsys.readouterr().err


def test_cli_prints_an_overall_progress_line_per_run(world, tmp_path, capsys):
    """`hylo-lab distill`: one line as each training run starts (3 here: ild/mla, ild/gdn, kd) with elapsed time,
    an estimate once a run has finished, and the total at the end; a resume counts only the runs left."""
    import re

    import yaml

    from hylo_lab.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(world, tmp_path / "out", ild_steps=1, kd_steps=1)))
    main(["distill", str(path), "--max-steps", "2"])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("[distill ")]
    assert [x.split(" |")[0] for x in lines] == ["[distill 1/3 ild/mla", "[distill 2/3 ild/gdn"]
    assert lines[0].endswith("elapsed, estimate after the first step]")
    assert re.search(r"\| \d+:\d\d elapsed, about \d+:\d\d left\]$", lines[1])
    main(["distill", str(path), "--resume"])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("[distill ")]
    assert lines[0].startswith("[distill 1/1 kd | ") and re.fullmatch(r"\[distill done in \d+:\d\d\]", lines[1])


def test_gpu_benchmark_script_runs_in_smoke_mode(tmp_path):
    """benchmarks/distill_gpu.py with tiny shapes on CPU: every configuration runs, the fused losses agree with
    the plain ones, and both files are written."""
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "distill_gpu.py"
    assert runpy.run_path(str(script))["main"](["--out", str(tmp_path), "--smoke"]) == 0
    results = json.loads((tmp_path / "distill_gpu.json").read_text())
    rows = results["losses"] + results["student"] + results["step"]
    assert rows and all(r["status"] == "ok" for r in rows)
    kl = {r["impl"]: r for r in results["losses"][:3]}
    assert set(kl) == {"plain", "chunked", "hidden"}
    # bf16 logits in the plain form vs float32 tiles in the fused ones
    assert kl["chunked"]["loss"] == pytest.approx(kl["plain"]["loss"], rel=2e-2)
    assert kl["hidden"]["loss"] == pytest.approx(kl["chunked"]["loss"], rel=1e-4)
    assert {r["student"] for r in results["step"]} >= {"gdn", "m2", "llama"}
    assert "| llama |" in (tmp_path / "distill_gpu.md").read_text()


def test_two_process_ddp_through_accelerate_launch_matches_one_process(world, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU-only host starts two processes (torchrun) that
    train with DDP over gloo (`--cpu --num_processes 2` would start only one). Each process takes half of every
    global batch, so the result equals the one-process run up to the order of the gradient sums."""
    import os
    import subprocess
    import sys

    import yaml

    single = run_recipe(recipe(world, tmp_path / "one", ild_steps=2, kd_steps=2, micro_batch_size=2))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(world, tmp_path / "two", ild_steps=2, kd_steps=2, micro_batch_size=2)))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "hylo_lab.cli", "distill", str(path), "--no-mlflow"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) on cpu (DistributedType.MULTI_CPU)" in proc.stderr
    assert proc.stdout.count("final model:") == 1  # only rank 0 reports
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    for run in ("ild/mla", "ild/gdn", "kd"):
        a, b = weights(tmp_path / "one" / run / "final"), weights(tmp_path / "two" / run / "final")
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        print(f"{run}: max |one - two| = {worst:.2e}")
        assert worst < 1e-4, (run, worst)
        kl_one = [v for _, v in single["runs"][run]["eval_kl"]]
        kl_two = [v for _, v in two["runs"][run]["eval_kl"]]
        assert kl_two == pytest.approx(kl_one, rel=1e-4), run
    start, end = weights(tmp_path / "two" / "assembled" / "final"), weights(tmp_path / "two" / "kd" / "final")
    assert any(not torch.equal(start[k], end[k]) for k in start)  # the two processes did train
