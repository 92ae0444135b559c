"""benchmarks/gpu_session.sh, the one device call of a GPU session, checked here without a GPU: `python3` and
`nvidia-smi` are stand-ins that record their arguments, so what is checked is the script's own logic (steps in the
order asked, each benchmark with the flags of its variant, results and triton's autotune results packed into
$OUT) before a call spends device time on it."""
import os
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_session_runs_each_step_and_packs_its_results(tmp_path):
    shims, work, out = tmp_path / "bin", tmp_path / "work", tmp_path / "out"
    shims.mkdir()
    calls = tmp_path / "calls.txt"
    for name in ("python3", "nvidia-smi"):
        (shims / name).write_text(f'#!/bin/bash\necho "{name} $*" >> {calls}\n')
        (shims / name).chmod(0o755)
    (work / "tcache" / "ab").mkdir(parents=True)
    (work / "tcache" / "ab" / "k.autotune.json").write_text("{}")  # as triton leaves its autotune results
    env = dict(os.environ, PATH=f"{shims}:{os.environ['PATH']}", OUT=str(out), GPU_WORK=str(work),
               WHEEL_DIR=str(tmp_path / "no_wheels"), STEPS="long kernels distill", TOTAL_S="400",
               LC_VARIANTS="plain pack+compile", KERNEL_CHECKS="gdn_chunk", DISTILL_ONLY="step", DISTILL_S="100")
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    bench = [line.split()[1:] for line in calls.read_text().splitlines() if line.startswith("python3 benchmarks/")]
    assert [b[0] for b in bench] == ["benchmarks/long_context.py"] * 2 + ["benchmarks/kernel_check.py",
                                                                            "benchmarks/distill_gpu.py"]
    plain, both = bench[0], bench[1]
    assert "--pack-decode" not in plain and "--compile-decode" not in plain
    assert {"--pack-decode", "--compile-decode"} <= set(both) and plain[plain.index("--out") + 1].endswith("lc_plain")
    assert bench[2][bench[2].index("--checks") + 1] == "gdn_chunk"
    assert bench[3][bench[3].index("--only") + 1] == "step" and int(bench[3][bench[3].index("--budget-s") + 1]) <= 75
    with tarfile.open(out / "results.tar.gz") as tar:
        assert "results/log.txt" in tar.getnames()
    with tarfile.open(out / "tcache.tar.gz") as tar:
        assert tar.getnames() == ["tcache/ab/k.autotune.json"]
    log = (out / "log.txt").read_text()
    assert log.index("decode step: plain") < log.index("decode step: pack+compile") < log.index("kernel_check") \
        < log.index("distill_gpu") < log.index("] done")
