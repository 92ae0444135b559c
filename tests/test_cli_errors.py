"""Every `hylo-lab` subcommand with bad inputs: one line on stderr, exit code 2 (1 for a failing environment), no
traceback, and nothing heavy run first. Plus MLflow stores that cannot be used: one warning within seconds, the
work still done; output folders that are replaced only on success, and refused while another run holds them."""

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from hylo_lab import HyloForCausalLM
from hylo_lab.cli import main
from hylo_lab.outputs import locked

from conftest import tiny_config
from test_eval_ruler import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY_NB = ROOT / "tests" / "data" / "tiny_sweep.ipynb"


def read_only_folder(tmp_path) -> Path:
    """A folder no file can be created in: chmod 555, or /proc (read-only even for root, who ignores modes)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        return Path("/proc/hylo_lab_ro")
    return folder


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny hybrid with its tokenizer, one without a tokenizer, a tiny Llama base, a sweep, odd files."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = tmp / "model"
    HyloForCausalLM(tiny_config(("mla", "gdn"), vocab_size=len(tok))).save_pretrained(model)
    tok.save_pretrained(model)
    bare = tmp / "bare"
    HyloForCausalLM(tiny_config(("mla", "gdn"), vocab_size=len(tok))).save_pretrained(bare)
    base = tmp / "base"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8)).save_pretrained(base)
    (tmp / "full").mkdir()
    (tmp / "full" / "x.txt").write_text("x")
    (tmp / "file.txt").write_text("a file, not a folder")
    (tmp / "bad.yaml").write_text("name: [unclosed\n  grid: {")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    (tmp / "unknown_key.yaml").write_text(yaml.safe_dump(dict(name="t", notebook=str(TINY_NB), experiment="e",
                                                              grid={"x": [1]}, grids={"x": [1]})))
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(dict(name="t", notebook=str(TINY_NB), experiment="e",
                                                        grid={"x": [1]})))
    (tmp / "docs.jsonl").write_text('{"txt": "no text field"}\n')
    (tmp / "qa.jsonl").write_text("not json\n")
    recipe = yaml.safe_load((ROOT / "recipes" / "toy.yaml").read_text())
    (tmp / "recipe_unknown_key.yaml").write_text(yaml.safe_dump({**recipe, "stagez": []}))
    return dict(tmp=tmp, model=str(model), bare=str(bare), base=str(base), full=str(tmp / "full"),
                file=str(tmp / "file.txt"), bad_yaml=str(tmp / "bad.yaml"), list_yaml=str(tmp / "list.yaml"),
                unknown_key=str(tmp / "unknown_key.yaml"), sweep=str(tmp / "sweep.yaml"),
                docs=str(tmp / "docs.jsonl"), qa=str(tmp / "qa.jsonl"), missing=str(tmp / "missing"),
                recipe_unknown_key=str(tmp / "recipe_unknown_key.yaml"))


def run_cli(argv, capsys):
    """(exit code, stderr) of `hylo-lab argv` in this process."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    code = exc.value.code
    err = capsys.readouterr().err
    if isinstance(code, str):  # sys.exit("message"): Python prints it and exits 1
        code, err = 1, err + code + "\n"
    return code, err


def assert_one_line(code, err, command, expected_code=2):
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"hylo-lab {command}:"), err
    assert code == expected_code, (code, err)


# "{name}" placeholders are filled from the `files` fixture, {ro} a read-only folder, {tmp} the test's folder
CASES = {
    "smoke": [["--bogus"]],
    "upcycle": [
        [],  # --base and --out missing
        ["--base", "{missing}", "--out", "{tmp}/u1", "--layout", "1MLA1GDN"],
        ["--base", "{file}", "--out", "{tmp}/u2", "--layout", "1MLA1GDN"],
        ["--base", "{base}", "--out", "{full}", "--layout", "1MLA1GDN"],
        ["--base", "{base}", "--out", "{ro}/u3", "--layout", "1MLA1GDN"],
        ["--base", "{base}", "--out", "{file}/u4", "--layout", "1MLA1GDN"],
        ["--base", "{base}", "--out", "{tmp}/u5", "--layout", "1MLA1GDN", "--kv-lora-rank", "many"],
        ["--base", "{base}", "--out", "{tmp}/u6", "--layout", "1MLA1GDN", "--select", "best"],
        ["--base", "{base}", "--out", "{tmp}/u7", "--mla-layers", "one,two"],
        ["--base", "{base}", "--out", "{tmp}/u8", "--layout", "1MLA1GDN", "--seq-lens", "8k"],
        ["--base", "{base}", "--out", "{tmp}/u9", "--layout", "9MLA9GDN"],
    ],
    "info": [
        ["{missing}"], ["{file}"], ["no-such-preset/4MLA12GDN"], ["{model}", "--seq-lens", "a,b"],
    ],
    "eval": [
        ["{missing}"], ["{file}"], ["{full}"],
        ["{bare}", "--suite", "ruler", "--no-track"],  # no tokenizer
        ["{model}", "--suite", "rulers"], ["{model}", "--tasks", "niah_single_9"],
        ["{model}", "--lengths", "1k"], ["{model}", "--lengths", "0"], ["{model}", "--lengths", ","],
        ["{model}", "--suite", "niah", "--niah-task", "vt"], ["{model}", "--suite", "niah", "--depths", "0,1.5"],
        ["{model}", "--suite", "niah", "--depths", "half"],
        ["{model}", "--suite", "ppl"], ["{model}", "--suite", "ppl", "--documents", "{missing}"],
        ["{model}", "--suite", "ppl", "--documents", "{docs}", "--no-track"],
        ["{model}", "--tasks", "qa_1", "--qa-file", "{missing}"], ["{model}", "--tasks", "qa_1", "--qa-file", "{qa}"],
        ["{model}", "--haystack", "{missing}"], ["{model}", "--num-samples", "0"], ["{model}", "--batch-size", "-1"],
        ["{model}", "--num-samples", "two"], ["{model}", "--device", "nonsense"], ["{model}", "--dtype", "float7"],
        ["{model}", "--include-path", "{missing}", "--suite", "harness"], ["{model}", "--limit", "0"],
        ["{model}", "--out-dir", "{ro}/out", "--no-track"], ["{model}", "--out-dir", "{file}", "--no-track"],
    ],
    "distill": [
        [], ["{missing}"], ["{bad_yaml}"], ["{list_yaml}"], ["{recipe_unknown_key}", "--check"],
        ["{recipe_unknown_key}", "--max-steps", "ten"], [str(ROOT / "recipes" / "toy.yaml"), "--bogus"],
    ],
    "sweep": [
        ["{missing}"], ["{bad_yaml}"], ["{list_yaml}"], ["{unknown_key}"], ["{file}"],
        ["{sweep}", "--jobs", "0"], ["{sweep}", "--jobs", "many"], ["{sweep}", "--only", "x"],
        ["{sweep}", "--only", "y=1"], ["{sweep}", "--out-dir", "{ro}/s"], ["{sweep}", "--out-dir", "{file}"],
    ],
    "compare": [
        ["{missing}.yaml"], ["{bad_yaml}"], ["{unknown_key}"], ["no_such_sweep"],
        ["{sweep}", "--out-dir", "{ro}/c"], ["{sweep}", "--out-dir", "{file}"],
    ],
    "demo": [
        ["--linear", "rwkv"], ["--out", "{file}"], ["--out", "{ro}/demo"], ["--tracking-uri"],
    ],
}
PARAMS = [(cmd, args) for cmd, cases in CASES.items() for args in cases]


@pytest.mark.parametrize("command, args", PARAMS, ids=[f"{c}:{' '.join(a)[:60]}" for c, a in PARAMS])
def test_bad_input_gives_one_line_and_exit_code_2(files, tmp_path, monkeypatch, capsys, command, args):
    monkeypatch.chdir(tmp_path)  # a default ./mlflow.db, runs/ or ablations/results/ lands here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    values = dict(files, ro=str(read_only_folder(tmp_path)), tmp=str(tmp_path))
    argv = [command] + [a.format(**values) for a in args]
    t0 = time.perf_counter()
    code, err = run_cli(argv, capsys)
    assert_one_line(code, err, command)
    assert time.perf_counter() - t0 < 60, "a bad input must be refused before any heavy work"


def test_compare_with_an_unreachable_store_fails_in_seconds_with_code_1(files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    code, err = run_cli(["compare", files["sweep"], "--tracking-uri", f"http://127.0.0.1:{closed_port()}"], capsys)
    assert_one_line(code, err, "compare", expected_code=1)
    assert "does not answer" in err and time.perf_counter() - t0 < 15


@pytest.mark.parametrize("store", ["http", "read_only"])
def test_eval_with_an_unusable_store_warns_once_and_finishes(files, tmp_path, monkeypatch, capsys, store):
    monkeypatch.chdir(tmp_path)
    uri = (f"http://127.0.0.1:{closed_port()}" if store == "http"
           else f"sqlite:///{read_only_folder(tmp_path) / 'mlflow.db'}")
    t0 = time.perf_counter()
    main(["eval", files["model"], "--suite", "efficiency", "--lengths", "32", "--decode-tokens", "1",
          "--tracking-uri", uri, "--out-dir", str(tmp_path / "out")])
    assert time.perf_counter() - t0 < 30
    out, err = capsys.readouterr()
    assert "== efficiency ==" in out and (tmp_path / "out" / "efficiency" / "efficiency.csv").exists()
    assert err.count("MLflow unavailable") == 1 and "Traceback" not in err and "UserWarning" not in err, err


def test_sweep_with_an_unreachable_store_runs_every_point_untracked(files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{closed_port()}"
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump(dict(name="t", notebook=str(TINY_NB), experiment="e", grid={"x": [1]})))
    main(["sweep", str(sweep), "--tracking-uri", uri, "--out-dir", str(tmp_path / "runs")])
    out, err = capsys.readouterr()
    assert err.count("MLflow unavailable") == 1 and "Traceback" not in err, err
    assert "FINISHED" in out and [p.name for p in (tmp_path / "runs").glob("*.ipynb")] == ["x=1.ipynb"]


@pytest.mark.parametrize("command", ["sweep", "demo"])
def test_a_folder_in_use_is_refused(files, tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    busy = tmp_path / "busy"
    argv = ["sweep", files["sweep"], "--out-dir", str(busy)] if command == "sweep" else ["demo", "--out", str(busy)]
    with locked(busy, "another hylo-lab run"):
        code, err = run_cli(argv, capsys)
    assert_one_line(code, err, command)
    assert "in use by another hylo-lab run" in err and not busy.exists()


def test_eval_keeps_the_previous_results_until_it_succeeds(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    common = ["eval", files["model"], "--suite", "efficiency", "--lengths", "32", "--decode-tokens", "1",
              "--no-track", "--out-dir", str(out)]
    main(common)
    first = (out / "efficiency" / "efficiency.csv").read_text()
    (out / "keep.txt").write_text("mine")

    def boom(*a, **k):
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr("hylo_lab.eval.efficiency.measure_efficiency", boom)
    with pytest.raises(RuntimeError, match="killed mid-run"):
        main(common)
    assert (out / "efficiency" / "efficiency.csv").read_text() == first and (out / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
    assert json.dumps(sorted(p.name for p in out.iterdir())) == json.dumps(["efficiency", "keep.txt"])
