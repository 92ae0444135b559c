"""Conversion time and peak memory of `hylo_lab.upcycle` on the CPU machine, paper-sized random-weight bases.

Each case runs in its own process (clean peak-RSS accounting): build the base from BASE_SHAPES with transformers'
LlamaConfig / Qwen3Config (random weights, `--dtype`), save it to a temporary directory, then time
`upcycle_to_dir` (the CLI path: load the base from disk, convert, save the hybrid and the config) while a thread
samples the process's resident memory every 50 ms. Writes benchmarks/results/upcycle_cpu.json and a markdown
table, benchmarks/results/upcycle_cpu.md.

    nice -n 5 .venv/bin/python benchmarks/upcycle_cpu.py    # all cases
    .venv/bin/python benchmarks/upcycle_cpu.py --case llama3.2-1b/4MLA12GDN
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CASES = [  # (label, base shape, upcycle kwargs)
    ("llama3.2-1b/4MLA12GDN", "llama3.2-1b", dict(preset="llama3.2-1b/4MLA12GDN")),
    ("llama3.2-1b/16MLA (stage-1 all-MLA student)", "llama3.2-1b", dict(layout="16MLA")),
    ("qwen3-1.7b/7MLA21GDN", "qwen3-1.7b", dict(preset="qwen3-1.7b/7MLA21GDN")),
    ("qwen3-1.7b/14MLA14M2", "qwen3-1.7b", dict(preset="qwen3-1.7b/14MLA14M2")),
]
OUT_DIR = Path(__file__).parent / "results"


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


class PeakRSS:
    """Samples VmRSS every `interval` s in a thread; .peak is the maximum seen (GiB)."""

    def __init__(self, interval=0.05):
        self.interval, self.peak, self._stop = interval, rss_gib(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_gib())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_gib())


def run_case(label: str, dtype_name: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    from hylo_lab.config import BASE_SHAPES
    from hylo_lab.upcycle_io import upcycle_to_dir

    _, shape_name, kwargs = next(c for c in CASES if c[0] == label)
    dtype = getattr(torch, dtype_name)
    shape = dict(BASE_SHAPES[shape_name])
    cls = LlamaConfig if shape["base_model_type"] == "llama" else Qwen3Config
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings",
            "rope_parameters")
    torch.manual_seed(0)
    t0 = time.time()
    base = AutoModelForCausalLM.from_config(cls(**{k: shape[k] for k in keys}), dtype=dtype)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        base.save_pretrained(f"{tmp}/base")
        n_base = sum(p.numel() for p in base.parameters())
        del base
        build_s = time.time() - t0
        rss_before = rss_gib()
        with PeakRSS() as peak:
            t1 = time.time()
            text = upcycle_to_dir(f"{tmp}/base", f"{tmp}/out", **kwargs)
            convert_s = time.time() - t1
        out_bytes = sum(f.stat().st_size for f in Path(f"{tmp}/out").iterdir())
    return dict(case=label, dtype=dtype_name, base_params=n_base, build_and_save_base_s=round(build_s, 1),
                upcycle_to_dir_s=round(convert_s, 1), rss_before_gib=round(rss_before, 2),
                peak_rss_gib=round(peak.peak, 2), output_gib=round(out_bytes / 2**30, 2),
                summary=text.splitlines()[:1] + [ln for ln in text.splitlines() if ln.startswith("parameters")])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", help="one case label (default: all, each in its own process)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out-dir", default=str(OUT_DIR), help="where upcycle_cpu.json and upcycle_cpu.md go")
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.dtype)))
        return
    import torch

    results = []
    for label, _, _ in CASES:
        proc = subprocess.run([sys.executable, __file__, "--case", label, "--dtype", args.dtype],
                              capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            results.append(dict(case=label, error=proc.stderr.strip().splitlines()[-1]))
        else:
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    meta = dict(machine=f"{platform.machine()}, {os.cpu_count()} cores, "
                        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
                torch=torch.__version__, threads=torch.get_num_threads(),
                load_average_at_end=os.getloadavg(),
                note="shared machine: other engineers' jobs ran at the same time; times are upper bounds")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "upcycle_cpu.json").write_text(json.dumps(dict(meta=meta, results=results), indent=2) + "\n")
    (out_dir / "upcycle_cpu.md").write_text(markdown(meta, results, args.dtype))
    print(f"wrote {out_dir / 'upcycle_cpu.json'} and {out_dir / 'upcycle_cpu.md'}")


def markdown(meta: dict, results: list[dict], dtype: str) -> str:
    """The results as a short markdown note: one table row per case."""
    lines = [
        "# Upcycling on the CPU machine: time and peak memory",
        "",
        f"`benchmarks/upcycle_cpu.py` (random-weight bases of the paper's shapes, {dtype} checkpoints, "
        f"`upcycle_to_dir` = load the base from disk, convert, save the hybrid). Machine: {meta['machine']}, "
        f"torch {meta['torch']}, {meta['threads']} threads, load average at the end "
        f"{', '.join(f'{x:.1f}' for x in meta['load_average_at_end'])}. Note: {meta['note']}.",
        "",
        "| case | base params | build+save base (s) | upcycle_to_dir (s) | RSS before (GiB) | peak RSS (GiB) "
        "| output (GiB) | hybrid |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']} | failed: {r['error']} | | | | | | |")
            continue
        hybrid = next((s for s in r["summary"] if s.startswith("parameters")), "").replace("|", "/")
        cells = [r["case"], f"{r['base_params'] / 1e9:.2f} B", r["build_and_save_base_s"], r["upcycle_to_dir_s"],
                 r["rss_before_gib"], r["peak_rss_gib"], r["output_gib"], hybrid]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "Peak RSS is the resident memory of the converting process sampled every 50 ms while "
              "`upcycle_to_dir` ran (RSS before = what the process held on entry: Python, torch, transformers). "
              "Most of the conversion time is the two float32 truncated SVDs per MLA layer (LAPACK), so layouts with "
              "more MLA layers take longer; Mamba2 / GDN layers are plain copies.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
