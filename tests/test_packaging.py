"""The set-up promises: pyproject and environment.yml agree, the README's two commands exist and are
what CI runs, and `import hylo_lab` stays cheap and CPU-safe."""
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README_COMMANDS = ["make demo", "make test"]
FORBIDDEN_AT_IMPORT = ("triton", "fla", "mamba_ssm", "mlflow")


def normalise(requirement):
    """'Flash_Linear.Attention[x]>=0.6; python_version>"3"' -> 'flash-linear-attention'."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"not a requirement: {requirement!r}"
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def pyproject_names():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {normalise(r) for r in project["dependencies"]}
    for group in project["optional-dependencies"].values():
        names |= {normalise(r) for r in group}
    return names


def environment_pip_list():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "environment.yml needs exactly one pip section"
    return pip_sections[0]


def first_code_block(markdown):
    match = re.search(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.M | re.S)
    assert match, "README has no fenced code block"
    return [line.strip() for line in match.group(1).splitlines() if line.strip()]


def test_normalise_strips_specifiers_extras_and_spelling():
    assert normalise("Flash_Linear.Attention[x]>=0.6; python_version>'3'") == "flash-linear-attention"
    assert normalise("torch==2.13.0") == "torch"


def test_environment_yml_lists_exactly_the_pyproject_dependencies():
    expected = pyproject_names()
    assert "torch" in expected, "torch belongs in pyproject's core dependencies"
    assert {"flash-linear-attention", "fla-core", "tilelang", "liger-kernel", "mamba-ssm"} <= expected  # gpu
    pip_list = environment_pip_list()
    editable = [r for r in pip_list if r.startswith("-e")]
    assert [r.split(maxsplit=1)[1] for r in editable] == ["."], "environment.yml must install `-e .`"
    listed = [normalise(r) for r in pip_list if not r.startswith("-")]
    assert len(listed) == len(set(listed)), "environment.yml lists a package twice"
    assert set(listed) == expected, (
        f"only in environment.yml: {sorted(set(listed) - expected)}; "
        f"only in pyproject.toml: {sorted(expected - set(listed))}"
    )


def test_readme_first_code_block_is_the_two_setup_commands():
    readme = (ROOT / "README.md").read_text()
    assert readme.startswith("# "), "README starts with its title line"
    assert first_code_block(readme) == README_COMMANDS


def test_makefile_defines_the_readme_targets():
    makefile = (ROOT / "Makefile").read_text()
    for command in README_COMMANDS:
        target = command.split()[1]
        assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), f"no `{target}` target"


def test_ci_runs_the_readme_test_command():
    script = ROOT / ".ci" / "run"
    assert os.access(script, os.X_OK), ".ci/run must be executable"
    lines = [line.strip() for line in script.read_text().splitlines()]
    assert "set -euo pipefail" in lines
    commands = [line.removeprefix("exec ").strip() for line in lines if not line.startswith("#")]
    assert "make test" in commands


def loaded_forbidden_modules(module, extra_path=None):
    """Import `module` in a fresh interpreter; return the forbidden top-level packages it loaded."""
    probe = (
        f"import json, sys; import {module}; "
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(FORBIDDEN_AT_IMPORT)!r})))"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_hylo_lab_loads_no_gpu_or_tracking_modules():
    assert loaded_forbidden_modules("hylo_lab") == []


@pytest.mark.parametrize("leak", ["import mlflow", "import fla.ops"])
def test_import_probe_catches_a_module_level_import(tmp_path, leak):
    # stand-in `fla` package so the probe is checked even where the GPU packages are not installed
    (tmp_path / "fla" / "ops").mkdir(parents=True)
    (tmp_path / "fla" / "__init__.py").write_text("")
    (tmp_path / "fla" / "ops" / "__init__.py").write_text("")
    (tmp_path / "leaky.py").write_text(leak + "\n")
    assert loaded_forbidden_modules("leaky", extra_path=tmp_path) == [leak.split()[1].split(".")[0]]
