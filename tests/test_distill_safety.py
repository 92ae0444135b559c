"""`hylo-lab distill` loses nothing and explains every mistake: the "continue with" command is exactly the one
to run; a resume refuses a changed recipe and never rewrites the recorded one; a run folder is locked while a
process trains there; --check runs upcycling's weightless checks; an unreadable newest checkpoint falls back
to the one before; a diverging run warns and keeps its best weights; wrong types in a recipe are refused.
Same tiny teacher and recipe as test_distill_trainer.py (1-4 steps per run, each test a few seconds)."""
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
import yaml

from hylo_lab.cli import main
from hylo_lab.distill.checkpoints import LOCK, latest_checkpoint, list_checkpoints
from hylo_lab.distill.stages import RecipeError, recipe_from_dict
from hylo_lab.distill.trainer import Distiller, run_recipe
from hylo_lab.errors import UserError
from test_distill_trainer import recipe, weights, world  # noqa: F401 - world is a fixture


def write(tmp_path, raw, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def cli_error(capsys, argv) -> str:
    """Run the CLI expecting a user error: exit code 2, no traceback -> the message (from `hylo-lab ` on; the
    [distill] progress lines before it are not part of it)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err and "hylo-lab distill: " in err, err
    return err[err.index("hylo-lab distill: "):]


def test_continue_command_is_exactly_the_one_to_run(world, tmp_path, capsys):
    raw = recipe(world, tmp_path / "recipe-out", ild_steps=1, kd_steps=1)
    path = write(tmp_path, raw)
    out = tmp_path / "my runs" / "x"  # a space: the printed command must quote it
    main(["distill", path, "--max-steps", "1", "--output-dir", str(out), "--no-mlflow"])
    printed = capsys.readouterr().out
    argv = shlex.split(printed.split("continue with: ", 1)[1])
    assert argv[:2] == ["hylo-lab", "distill"] and "--output-dir" in argv and "--resume" in argv
    assert argv[argv.index("--output-dir") + 1] == str(out)
    main(argv[1:])
    assert f"final model: {out / 'kd' / 'final'}" in capsys.readouterr().out
    assert not (tmp_path / "recipe-out").exists()


def test_resume_refuses_a_changed_recipe_and_never_rewrites_the_recorded_one(world, tmp_path, capsys):
    out = tmp_path / "out"
    raw = recipe(world, out, ild_steps=1, kd_steps=2)
    run_recipe(raw, max_steps=3)
    recorded = (out / "recipe.yaml").read_text()
    changed = json.loads(json.dumps(raw))
    changed["stages"][1]["lr"] = 2e-3
    changed["train"]["eval_every"] = 1  # bookkeeping: allowed without a word
    with pytest.raises(RecipeError) as info:
        run_recipe(changed, resume=True)
    msg = str(info.value)
    assert "stages.1.lr: 0.001 -> 0.002" in msg and "--allow-recipe-change" in msg and "eval_every" not in msg
    assert (out / "recipe.yaml").read_text() == recorded
    err = cli_error(capsys, ["distill", write(tmp_path, changed), "--resume", "--no-mlflow"])
    assert err.startswith("hylo-lab distill: --resume: the recipe differs") and "stages.1.lr" in err

    summary = run_recipe(changed, resume=True, allow_recipe_change=True)
    assert summary["final_model"] is not None
    assert (out / "recipe.yaml").read_text() == recorded  # what the weights of ild/ and kd's first step came from
    (entry,) = yaml.safe_load((out / "recipe_changes.yaml").read_text())
    assert entry["changes"]["stages.1.lr"] == dict(old=1e-3, new=2e-3)
    assert entry["finished_runs"] == ["assembled", "ild/gdn", "ild/mla"] and entry["recipe"]["stages"][1]["lr"] == 2e-3
    assert entry["resumed_from"] == ["kd/checkpoints/step-00000001"]
    # a later resume compares with the last allowed change, not with the first recipe
    assert run_recipe(changed, resume=True)["final_model"] is not None


def test_resume_takes_a_field_the_old_record_lacks_at_its_default_as_no_change(world, tmp_path):
    out = tmp_path / "out"
    raw = recipe(world, out, ild_steps=1, kd_steps=2)
    run_recipe(raw, max_steps=3)
    old = yaml.safe_load((out / "recipe.yaml").read_text())
    del old["toy_world"]["digit_group"], old["toy_world"]["training"]  # a run recorded before these fields existed
    (out / "recipe.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    changed = json.loads(json.dumps(raw))
    changed.setdefault("toy_world", {})["digit_group"] = 2
    with pytest.raises(RecipeError) as info:
        run_recipe(changed, resume=True)  # missing in the record and not the default: a change
    assert "toy_world.digit_group: '<absent>' -> 2" in str(info.value) and "toy_world.training" not in str(info.value)
    assert run_recipe(raw, resume=True)["final_model"] is not None


def test_a_run_folder_is_locked_while_a_process_trains_in_it(world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    raw = recipe(world, out, ild_steps=1, kd_steps=1)
    seen = []
    monkeypatch.setattr(Distiller, "loss_hook",
                        lambda self, loss, run, step: seen.append(json.loads((out / LOCK).read_text())) or loss)
    run_recipe(raw, max_steps=1)
    assert seen and seen[0]["pid"] == os.getpid()
    assert not (out / LOCK).exists()  # released when the process stops

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(json.dumps(dict(pid=other.pid, host=os.uname().nodename, since="today")))
        with pytest.raises(UserError, match=f"is in use: process {other.pid} has been training there since today"):
            run_recipe(raw, resume=True)
        err = cli_error(capsys, ["distill", write(tmp_path, raw), "--resume", "--no-mlflow"])
        assert len(err.strip().splitlines()) == 1 and "is in use" in err
    finally:
        other.kill()
        other.wait()
    capsys.readouterr()
    assert run_recipe(raw, resume=True)["final_model"] is not None  # the lock's process is gone: taken over
    assert f"taking over the stale lock of process {other.pid}" in capsys.readouterr().err
    assert not (out / LOCK).exists()


@pytest.mark.parametrize("change, message", [
    (dict(student=dict(layout="1MLA1GDN", mla_layers=[1], upcycle=dict(kv_lora_rank=0))), "kv_lora_rank=0 must be"),
    (dict(student=dict(layout="1MLA1GDN", mla_layers=[1], upcycle=dict(qk_rope_head_dim=6))),
     "qk_rope_head_dim=6 must be a positive even divisor"),
    ("hidden_act", "hidden_act 'gelu_new' is not supported"),
], ids=["zero-rank", "bad-rope-dim", "unsupported-base"])
def test_check_runs_every_upcycle_check_that_needs_no_weights(world, tmp_path, capsys, change, message):
    raw = recipe(world, tmp_path / "out")
    if change == "hidden_act":
        import shutil

        base = tmp_path / "base"
        shutil.copytree(world["base"], base)
        cfg = json.loads((base / "config.json").read_text())
        (base / "config.json").write_text(json.dumps(dict(cfg, hidden_act="gelu_new")))
        raw["base"] = str(base)
    else:
        raw.update(change)
    err = cli_error(capsys, ["distill", write(tmp_path, raw), "--check"])
    assert message in err
    loaded = []
    import transformers

    real = transformers.AutoModelForCausalLM.from_pretrained
    transformers.AutoModelForCausalLM.from_pretrained = lambda *a, **k: loaded.append(a) or real(*a, **k)
    try:
        with pytest.raises(RecipeError, match=message):
            run_recipe(raw)  # the real run refuses it too, before loading any weight or writing anything
    finally:
        transformers.AutoModelForCausalLM.from_pretrained = real
    assert not loaded and not (tmp_path / "out").exists()


def test_check_refuses_an_output_dir_that_cannot_be_created(world, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    raw = recipe(world, tmp_path / "a-file" / "out")
    err = cli_error(capsys, ["distill", write(tmp_path, raw), "--check"])
    assert "cannot be created" in err and "is not a folder" in err


def test_unreadable_newest_checkpoint_falls_back_to_the_previous_one(world, tmp_path, capsys):
    raw = recipe(world, tmp_path / "parts", ild_steps=1, kd_steps=4, checkpoint_every=1, keep_checkpoints=2)
    run_recipe(raw, max_steps=5)  # ild/mla, ild/gdn, then kd stops at step 3 with checkpoints 2 and 3
    kd = tmp_path / "parts" / "kd"
    assert [p.name for p in list_checkpoints(kd)] == ["step-00000002", "step-00000003"]
    newest = latest_checkpoint(kd)
    (model_file,) = [p for p in newest.iterdir() if p.name.startswith(("pytorch_model", "model"))]
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])  # truncated
    capsys.readouterr()
    done = run_recipe(raw, resume=True)
    err = capsys.readouterr().err
    assert "checkpoint step-00000003 cannot be read" in err and "falling back to step-00000002" in err
    assert "kd: resumed from" in err and "step-00000002 at step 2/4" in err
    whole = run_recipe(recipe(world, tmp_path / "whole", ild_steps=1, kd_steps=4, checkpoint_every=1,
                              keep_checkpoints=2))
    a, b = weights(tmp_path / "whole" / "kd" / "final"), weights(tmp_path / "parts" / "kd" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert done["runs"]["kd"]["eval_kl"] == whole["runs"]["kd"]["eval_kl"]


def test_diverging_run_warns_and_keeps_the_best_weights(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Distiller, "loss_hook", lambda self, loss, run, step: -loss if run == "kd" else loss)
    raw = recipe(world, tmp_path / "out", ild_steps=1, kd_steps=4, clip=0)
    raw["stages"][1].update(lr=0.05, warmup=0.0)
    main(["distill", write(tmp_path, raw), "--no-mlflow"])
    captured = capsys.readouterr()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    d = summary["runs"]["kd"]["diverged"]
    best = tmp_path / "out" / "kd" / "best"
    assert d["best_step"] == 0 and d["final_kl"] > 10 * d["best_kl"] and d["best_dir"] == str(best)
    assert "warning: kd diverged" in captured.err and str(best) in captured.err
    a, b = weights(best), weights(tmp_path / "out" / "assembled" / "final")  # step 0: the assembled hybrid
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "out" / "kd" / "final" / "done.json").is_file()
    assert not (tmp_path / "out" / "ild" / "mla" / "best").exists()  # a run that did not diverge keeps no copy


@pytest.mark.parametrize("where, value, message", [
    (("train", "progress"), "false", "train.progress: expected true or false, got the string 'false'"),
    (("train", "activation_checkpointing"), "no", "train.activation_checkpointing: expected true or false"),
    (("stages", 0, "squared"), 1, "squared: expected true or false, got int 1"),
    (("train", "batch_size"), "four", "train.batch_size: expected an integer, got the string 'four'"),
    (("tracking", "experiment"), 3, "tracking.experiment: expected a string, got int 3"),
    (("student", "upcycle", "dtype"), "bfloat16", "'dtype' is set by the trainer"),
    (("student", "upcycle", "hidden_size"), 64, "'hidden_size' comes from the base's config.json"),
], ids=["string-false", "string-no", "int-for-bool", "string-for-int", "int-for-string", "upcycle-dtype",
        "upcycle-base-shape"])
def test_recipe_checker_refuses_wrong_types(world, tmp_path, where, value, message):
    raw = recipe(world, tmp_path / "out")
    node = raw
    for key in where[:-1]:
        node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
    node[where[-1]] = value
    with pytest.raises(RecipeError, match="recipe is invalid") as info:
        recipe_from_dict(raw)
    assert message in str(info.value)


def test_bad_command_line_values_are_one_line_errors(world, tmp_path, capsys):
    path = write(tmp_path, recipe(world, tmp_path / "out"))
    assert "--max-steps 0" in cli_error(capsys, ["distill", path, "--max-steps", "0"])
    assert "--output-dir is empty" in cli_error(capsys, ["distill", path, "--output-dir", ""])
    assert "--allow-recipe-change applies to --resume only" in cli_error(
        capsys, ["distill", path, "--allow-recipe-change"])
    assert not (tmp_path / "out").exists()
