"""The demo's stage-1 cache (hylo_lab/demo/stage_cache.py): sweep points that share the first stage train it once.

Quick demo recipes on CPU through demo.distill (about 5 s a run): a point that differs in a later stage reuses
stage 1 and ends with the same weights as a run without the cache; a change stage 1 depends on misses; an entry
that store() did not finish is never read.
"""

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from hylo_lab import demo
from hylo_lab.demo import stage_cache
from hylo_lab.distill.stages import recipe_from_dict


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYLO_LAB_HOME", str(root / "home"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.delenv(stage_cache.ENV, raising=False)
        yield root


def settings(root: Path, name: str, overrides: str = "") -> demo.DemoSettings:
    return demo.DemoSettings(quick=True, out_dir=str(root / name), overrides=overrides)


def distill(root: Path, name: str, overrides: str = "") -> tuple[Path, str]:
    s = settings(root, name, overrides)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        final = demo.distill(s, s.recipe)
    return final, buf.getvalue()


def key(root: Path, overrides: str = "") -> str:
    return stage_cache.stage1_key(recipe_from_dict(settings(root, "k", overrides).recipe))[0]


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, folder
    return {k: v for f in files for k, v in load_file(f).items()}


def assert_equal_weights(a: Path, b: Path):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def stage1_line(log: str) -> str:
    lines = [line for line in log.splitlines() if "stage 1 (" in line]
    assert len(lines) == 1, log[-3000:]
    return lines[0]


def test_a_later_stage_change_reuses_stage_1_with_the_weights_of_a_run_without_cache(home, monkeypatch):
    _, log = distill(home, "first", "stages.kd-long.steps=3")
    assert "trained and stored for reuse in" in stage1_line(log) and "ild/mla: done" in log
    final, log = distill(home, "later", "stages.kd-short.lr=5e-4")
    entry = home / "home" / "stage1" / key(home, "stages.kd-short.lr=5e-4")
    assert f"reused from {entry}" in stage1_line(log)
    assert "ild/mla: done" not in log and "ild/gdn: done" not in log and "kd-short: done" in log
    assert json.loads((final.parent.parent / "summary.json").read_text())["runs"]["ild/mla"]["steps"] == 4
    monkeypatch.setenv(stage_cache.ENV, "0")
    plain, log = distill(home, "plain", "stages.kd-short.lr=5e-4")
    assert "cache off" in stage1_line(log) and "ild/mla: done" in log
    assert_equal_weights(final, plain)
    assert_equal_weights(final.parent.parent / "assembled" / "final", plain.parent.parent / "assembled" / "final")


@pytest.mark.parametrize("change", ["seed=1", "student.layout=1MLA3GDN", "stages.ild.steps=5", "stages.ild.lr=1e-3",
                                    "train.batch_size=2", "student.upcycle.rope_init=random"])
def test_what_stage_1_depends_on_changes_the_key(home, change):
    assert key(home, change) != key(home)


@pytest.mark.parametrize("same", ["stages.kd-long.steps=7", "stages.kd-short.lr=5e-4", "stages.kd-long.yarn=null",
                                  "teacher=toy:llama-xs", "train.log_every=3"])
def test_what_stage_1_does_not_read_keeps_the_key(home, same):
    assert key(home, same) == key(home)


def test_a_kd_first_stage_keys_its_teacher(home):
    assert key(home, "stages.ild=null") != key(home)
    assert key(home, "stages.ild=null; teacher=toy:llama-xs") != key(home, "stages.ild=null")
    assert key(home, "stages.ild=null; stages.kd-long.steps=7") == key(home, "stages.ild=null")


def test_a_changed_stage_1_setting_trains_again(home):
    distill(home, "base")
    _, log = distill(home, "steps5", "stages.ild.steps=5")
    line = stage1_line(log)
    assert "trained and stored" in line and key(home, "stages.ild.steps=5") in line and "ild/mla: done" in log
    assert key(home, "stages.ild.steps=5") != key(home)


def test_a_recipe_whose_first_stage_is_kd_is_cached_too(home, monkeypatch):
    _, log = distill(home, "kd1", "stages.ild=null")
    assert "stage 1 (kd-short): trained and stored" in stage1_line(log)
    final, log = distill(home, "kd2", "stages.ild=null; stages.kd-long.steps=3")
    assert "stage 1 (kd-short): reused from" in stage1_line(log) and "kd-short: done" not in log
    monkeypatch.setenv(stage_cache.ENV, "off")
    plain, _ = distill(home, "kd3", "stages.ild=null; stages.kd-long.steps=3")
    assert_equal_weights(final, plain)


def test_a_half_written_entry_is_never_used(home):
    change = "stages.ild.lr=1.5e-3"
    k = key(home, change)
    root = home / "home" / "stage1"
    distill(home, "source", "stages.ild.lr=1.7e-3")  # a real entry's folders, to copy half of
    (src,) = [p for p in root.iterdir() if p.name == key(home, "stages.ild.lr=1.7e-3")]
    for half in (root / f".{k}.tmp-12345", root / k):  # a killed store(), a copy cut short (no entry.json)
        shutil.copytree(src, half)
        (half / stage_cache.ENTRY).unlink()
        (half / "assembled" / "final" / "model.safetensors").write_bytes(b"not weights")
    assert stage_cache.lookup(root, k) is None
    _, log = distill(home, "fresh", change)
    assert f"trained and stored for reuse in {root / k}" in stage1_line(log) and "ild/mla: done" in log
    assert stage_cache.lookup(root, k) == root / k
    assert (root / f".{k}.tmp-12345").is_dir()  # left alone, never read
    weights(root / k / "assembled" / "final")
