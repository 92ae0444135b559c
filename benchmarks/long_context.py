"""Long-context inference on one GPU: TTFT, TPOT and peak memory from 8K to 2M tokens.

Models (random bf16 weights: speed and memory only):
  llama3.2-1b/4MLA12GDN, llama3.2-1b/4MLA12M2, llama3.2-3b/6MLA22M2, llama3.2-3b/14MLA14GDN
                      HyloForCausalLM, kernel_backend auto
  llama-1b-baseline   transformers LlamaForCausalLM with Llama-3.2-1B shapes, SDPA, DynamicCache
Hybrids: hylo_lab.inference: chunked prefill (--chunk tokens) into a preallocated cache, first token, then
`--eager-steps` eager static decode steps (TPOT eager = median) and `--graph-steps` replays of the decode step
captured in a CUDA graph (TPOT graph = mean over the replays, CUDA events). Baseline: one-shot prefill (as
environment.md's reference numbers) and eager decode steps with explicit position_ids.
Peak memory: torch.cuda.max_memory_allocated, reset before each length (weights included).
Bandwidth floor of a decode step: bytes that must be read per token (every weight once, the MLA latents or
the baseline's K/V at that length once, linear states read and written) / the device-to-device copy bandwidth
measured here ((read + write bytes) / time of a 2 GiB copy). ratio = TPOT / floor (1.0 is the floor).

Order of work is a priority list (1B GDN up to 512K, the baseline, the other hybrids, then 1M / 2M); a config
is skipped when its predicted time (previous length's time scaled quadratically) exceeds the --budget-s left.
The baseline is not run past its first out-of-memory length. Lengths are resumable: each row is written to
OUT's JSON as it finishes and a later call keeps the ok / oom rows already there (--fresh starts over), so
lengths beyond one 10-minute call are measured over several calls (--models / --lengths pick the work).
MLA decode uses ops.mla_decode's Triton split-K kernel on CUDA (--decode-backend torch: the PyTorch reference).
--compile-decode: the decode step under torch.compile before capture; --pack-decode: GDN's input projections and
short convs as one kernel each per step (inference.pack_decode_projections).

    PYTHONPATH=. python benchmarks/long_context.py --out benchmarks/results --budget-s 420     # H100
    PYTHONPATH=. python benchmarks/long_context.py --smoke --out /tmp/lc                      # tiny, CPU
Writes OUT/long_context.json (after every configuration), OUT/long_context.md and OUT/long_context.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch


from hylo_lab import HyloConfig
from hylo_lab.cache import cache_footprint
from hylo_lab.inference import GraphDecoder, allocate_cache, chunked_prefill, decode_step, pack_decode_projections
from hylo_lab.model import HyloForCausalLM

K = 1024
HYBRIDS = ("llama3.2-1b/4MLA12GDN", "llama3.2-1b/4MLA12M2", "llama3.2-3b/6MLA22M2", "llama3.2-3b/14MLA14GDN")
BASELINE = "llama-1b-baseline"
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                tie_word_embeddings=True, max_position_embeddings=131072,
                rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=8192))
FULL_PLAN = [
    (HYBRIDS[0], [8 * K, 32 * K, 128 * K, 512 * K]),
    (BASELINE, [8 * K, 32 * K, 128 * K]),
    (HYBRIDS[1], [8 * K, 32 * K, 128 * K, 512 * K]),
    (HYBRIDS[0], [2048 * K]),
    (HYBRIDS[2], [8 * K, 32 * K, 128 * K, 512 * K]),
    (BASELINE, [512 * K]),
    (HYBRIDS[0], [1024 * K]),
    (HYBRIDS[1], [1024 * K, 2048 * K]),
    (HYBRIDS[2], [1024 * K, 2048 * K]),
    (HYBRIDS[3], [8 * K, 32 * K, 128 * K, 512 * K, 1024 * K, 2048 * K]),
    (BASELINE, [1024 * K]),
]
SMOKE_PLAN = [(HYBRIDS[0], [40, 72]), (HYBRIDS[1], [40]), (HYBRIDS[3], [40]), (BASELINE, [40, 72])]
GiB = 2 ** 30


def smoke_hybrid(name):
    """A tiny config with the preset's layout (same mixers, tiny dims) for the CPU smoke run."""
    layout = name.split("/")[1]
    n = 4 if "1b" in name else 6
    mla = [1, 3] if n == 4 else [0, 3]
    return HyloConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=n, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, layout=f"2MLA{n - 2}{'GDN' if 'GDN' in layout else 'M2'}",
                      mla_layers=mla, kv_lora_rank=24, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                      v_head_dim=16, gdn_num_heads=2, gdn_head_dim=16, chunk_size=16, max_position_embeddings=512)


def build(name, smoke, device, dtype, decode_backend="auto"):
    """Random weights, initialised in float32 on `device` (RoPE tables and inits never see bf16), then cast."""
    with torch.device(device):
        if name == BASELINE:
            from transformers import LlamaConfig, LlamaForCausalLM

            shape = dict(LLAMA_1B) if not smoke else dict(
                vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=512)
            cfg = LlamaConfig(**shape)
            cfg._attn_implementation = "sdpa"
            model = LlamaForCausalLM(cfg)
        else:
            cfg = smoke_hybrid(name) if smoke else HyloConfig.from_preset(name, kernel_backend="auto")
            model = HyloForCausalLM(cfg)
    model = model.to(device=device, dtype=dtype).eval()
    for m in model.modules():
        if hasattr(m, "kv_lora_rank"):
            m.decode_backend = decode_backend
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device):
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def copy_bandwidth(device):
    """(read + write bytes) / s of copying a 1 GiB buffer on the device (median of 10), None on CPU."""
    if device.type != "cuda":
        return None
    n = GiB // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    times = []
    for i in range(12):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(s.elapsed_time(e) / 1e3)
    del a, b
    free(device)
    return 2 * n * 2 / statistics.median(times)


def decode_bytes(model, name, length):
    """Bytes a decode step must read at `length` cached tokens: weights (the tied embedding counted once, as
    the LM head) + growing cache + linear states (float32 recurrent and conv tails, read and written)."""
    params = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    weights = sum(params.values())
    if name == BASELINE:
        c = model.config
        cache = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2 * length
        return dict(weights=weights, cache=cache, states=0, total=weights + cache)
    fp = cache_footprint(model.config, length, 1, next(model.parameters()).dtype)
    states = 2 * fp["fixed_bytes"]
    return dict(weights=weights, cache=fp["growing_bytes"], states=states, total=weights + fp["growing_bytes"] + states)


@torch.no_grad()
def run_hybrid(model, L, args, device, gen):
    ids = torch.randint(0, model.config.vocab_size, (1, L), generator=gen).to(device)
    n_e, n_g = args.eager_steps, args.graph_steps
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    cache = allocate_cache(model, 1, L + n_e + n_g + 2)
    tok = chunked_prefill(model, ids, cache, chunk_size=args.chunk).argmax(-1, keepdim=True)
    sync(device)
    row = dict(ttft_s=time.perf_counter() - t0)
    row["prefill_tokens_per_s"] = L / row["ttft_s"]
    if device.type == "cuda":
        row["peak_prefill_bytes"] = torch.cuda.max_memory_allocated()
    row["cache_bytes_measured"] = cache.nbytes()["total"]
    times = []
    for _ in range(n_e):
        t = time.perf_counter()
        tok = decode_step(model, tok, cache).argmax(-1, keepdim=True)
        sync(device)
        times.append(time.perf_counter() - t)
    row["tpot_eager_s"] = statistics.median(times) if times else None
    row["tpot_s"] = row["tpot_eager_s"]
    if device.type == "cuda" and n_g > 1:
        try:
            dec = GraphDecoder(model, cache, compile=args.compile_decode)
            dec.capture(tok)
            sync(device)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            dec.step()  # first replay uploads the graph
            s.record()
            for _ in range(n_g - 2):
                dec.step()
            e.record()
            torch.cuda.synchronize()
            row["tpot_graph_s"] = s.elapsed_time(e) / 1e3 / (n_g - 2)
            row["tpot_s"] = row["tpot_graph_s"]
        except Exception as exc:
            row["graph_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    if device.type == "cuda":
        row["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    del cache
    return row


@torch.no_grad()
def run_baseline(model, L, args, device, gen):
    ids = torch.randint(0, model.config.vocab_size, (1, L), generator=gen).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, position_ids=torch.arange(L, device=device)[None], use_cache=True, logits_to_keep=1)
    tok = out.logits[:, -1:].argmax(-1)
    sync(device)
    row = dict(ttft_s=time.perf_counter() - t0)
    row["prefill_tokens_per_s"] = L / row["ttft_s"]
    if device.type == "cuda":
        row["peak_prefill_bytes"] = torch.cuda.max_memory_allocated()
    past, times = out.past_key_values, []
    del out
    for i in range(args.eager_steps + 2):
        t = time.perf_counter()
        o = model(input_ids=tok, position_ids=torch.tensor([[L + i]], device=device), past_key_values=past,
                  use_cache=True, logits_to_keep=1)
        tok, past = o.logits[:, -1:].argmax(-1), o.past_key_values
        sync(device)
        times.append(time.perf_counter() - t)
    row["tpot_eager_s"] = row["tpot_s"] = statistics.median(times[2:] or times)
    if device.type == "cuda":
        row["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    del past, o
    return row


def is_oom(exc):
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower()


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.start = time.perf_counter()
        self.rows = []
        path = self.out / "long_context.json"
        if not args.fresh and path.exists():
            old = json.loads(path.read_text())
            self.rows = old.get("rows", [])  # ok / oom rows are kept; skipped / error ones are tried again
        self.meta = dict(device=torch.cuda.get_device_name() if self.device.type == "cuda" else platform.processor() or "cpu",
                         torch=torch.__version__, dtype=str(self.dtype), chunk=args.chunk, smoke=args.smoke,
                         eager_steps=args.eager_steps, graph_steps=args.graph_steps,
                         decode_backend=args.decode_backend, compile_decode=args.compile_decode,
                         pack_decode=args.pack_decode)
        try:
            import transformers
            self.meta["transformers"] = transformers.__version__
        except Exception:
            pass

    def left(self):
        return self.args.budget_s - (time.perf_counter() - self.start)

    def done(self, model, L):
        return any(r["model"] == model and r["length"] == L and r.get("status") in ("ok", "oom") for r in self.rows)

    def predicted(self, model, L):
        prev = [r for r in self.rows if r["model"] == model and r.get("status") == "ok" and r["length"] < L]
        if not prev:
            return 0.0
        p = max(prev, key=lambda r: r["length"])
        return p["ttft_s"] * (L / p["length"]) ** 2 + 5.0

    def record(self, row):
        self.rows = [r for r in self.rows if not (r["model"] == row["model"] and r["length"] == row["length"])]
        self.rows.append(row)
        self.save()
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)

    def main(self):
        self.meta["copy_bandwidth_bytes_per_s"] = self.bw = copy_bandwidth(self.device)
        plan = SMOKE_PLAN if self.args.smoke else FULL_PLAN
        if self.args.models:
            plan = [(m, ls) for m, ls in plan if m in self.args.models]
        if self.args.lengths:
            plan = [(m, [L for L in ls if L in self.args.lengths]) for m, ls in plan]
        gen = torch.Generator().manual_seed(0)
        model_name, model = None, None
        for name, lengths in plan:
            for L in lengths:
                if self.done(name, L):
                    continue
                if any(r["model"] == name and r.get("status") == "oom" and r["length"] <= L for r in self.rows):
                    continue
                need = self.predicted(name, L)
                if need > self.left():
                    self.record(dict(model=name, length=L, status="skipped",
                                     reason=f"predicted {need:.0f} s > {self.left():.0f} s of budget left"))
                    continue
                if model_name != name:
                    model = None
                    free(self.device)
                    model, model_name = build(name, self.args.smoke, self.device, self.dtype,
                                              self.args.decode_backend), name
                    packed = pack_decode_projections(model) if self.args.pack_decode else 0
                    self.warmup(name, model)
                row = dict(model=name, length=L, status="ok", decode_backend=self.args.decode_backend,
                           compile_decode=self.args.compile_decode, pack_decode=self.args.pack_decode,
                           packed_bytes=packed)
                try:
                    fn = run_baseline if name == BASELINE else run_hybrid
                    row.update(fn(model, L, self.args, self.device, gen))
                except Exception as exc:
                    if not is_oom(exc):
                        row.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:300]}",
                                   trace=traceback.format_exc()[-2000:])
                    else:
                        row.update(status="oom", error=str(exc)[:200])
                        if self.device.type == "cuda":
                            row["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
                free(self.device)
                if row["status"] == "ok":
                    self.floor(model, name, L, row)
                self.record(row)
        self.save(final=True)
        print(open(self.out / "long_context.md").read())
        return 0

    def warmup(self, name, model):
        """Compile / autotune at a short length (the kernels' autotune keys do not include T)."""
        if name == BASELINE:
            return
        a = self.args
        L = 2 * a.chunk + 17 if not a.smoke else 40
        try:
            run_hybrid(model, L, a, self.device, torch.Generator().manual_seed(1))
        except Exception:
            traceback.print_exc()
        free(self.device)

    def floor(self, model, name, L, row):
        b = decode_bytes(model, name, L)
        row["decode_bytes"] = b
        if self.bw:
            row["floor_s"] = b["total"] / self.bw
            row["tpot_over_floor"] = row["tpot_s"] / row["floor_s"]

    def save(self, final=False):
        (self.out / "long_context.json").write_text(json.dumps(dict(meta=self.meta, rows=self.rows), indent=2))
        self.markdown()
        try:
            self.plot()
        except Exception:
            traceback.print_exc()

    def markdown(self):
        lines = [f"# long-context inference ({self.meta['device']}, {self.meta['dtype']}, prefill chunk "
                 f"{self.meta['chunk']}, smoke={self.meta['smoke']})", ""]
        step = [k for k in ("compile_decode", "pack_decode") if self.meta.get(k)]
        lines += [f"Decode step: MLA decode backend {self.meta.get('decode_backend', 'auto')}"
                  f"{''.join(', ' + k.replace('_', ' ') for k in step)}.", ""]
        bw = self.meta.get("copy_bandwidth_bytes_per_s")
        if bw:
            lines += [f"Measured copy bandwidth: {bw / 1e12:.2f} TB/s (read + write).", ""]
        lines += ["| model | length | status | TTFT s | prefill tok/s | TPOT ms (graph) | TPOT ms (eager) | "
                  "peak GiB | floor ms | TPOT / floor |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(self.rows, key=lambda r: (r["model"], r["length"])):
            lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                r["model"], _len(r["length"]), r["status"] if r["status"] != "skipped" else "skipped (budget)",
                _g(r.get("ttft_s")), _g(r.get("prefill_tokens_per_s"), 0), _g(r.get("tpot_graph_s"), ms=True),
                _g(r.get("tpot_eager_s"), ms=True), _g(r.get("peak_memory_bytes") and r["peak_memory_bytes"] / GiB),
                _g(r.get("floor_s"), ms=True), _g(r.get("tpot_over_floor"))))
        base = {r["length"]: r for r in self.rows if r["model"] == BASELINE and r["status"] == "ok"}
        cmp = []
        for r in self.rows:
            if r["model"] != BASELINE and r["status"] == "ok" and r["length"] in base:
                cmp.append(f"- {r['model']} at {_len(r['length'])}: prefill {base[r['length']]['ttft_s'] / r['ttft_s']:.2f}x "
                           "faster than the baseline")
        if cmp:
            lines += ["", "Prefill speed-up vs the transformers Llama-3.2-1B baseline (same length):", *cmp]
        (self.out / "long_context.md").write_text("\n".join(lines) + "\n")

    def plot(self):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for name in sorted({r["model"] for r in self.rows}):
            ok = sorted((r for r in self.rows if r["model"] == name and r["status"] == "ok"), key=lambda r: r["length"])
            if ok:
                x = [r["length"] for r in ok]
                axes[0].plot(x, [r["ttft_s"] for r in ok], marker="o", label=name)
                axes[1].plot(x, [r["tpot_s"] * 1e3 for r in ok], marker="o", label=name)
                if all(r.get("peak_memory_bytes") for r in ok):
                    axes[2].plot(x, [r["peak_memory_bytes"] / GiB for r in ok], marker="o", label=name)
            for r in self.rows:
                if r["model"] == name and r["status"] == "oom":
                    for ax in axes:
                        ax.axvline(r["length"], color="red", linestyle=":", linewidth=1)
                    axes[0].annotate(f"{name} OOM", (r["length"], 0.9), xycoords=("data", "axes fraction"),
                                     color="red", fontsize=7, rotation=90)
        for ax, label in zip(axes, ("time to first token (s)", "time per output token (ms)", "peak memory (GiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"long-context inference, {self.meta['device']}")
        fig.tight_layout()
        fig.savefig(self.out / "long_context.png", dpi=110)
        plt.close(fig)


def _len(n):
    return f"{n // (1024 * K)}M" if n >= 1024 * K and n % (1024 * K) == 0 else (f"{n // K}K" if n >= K and n % K == 0 else str(n))


def _g(x, digits=3, ms=False):
    if x is None or x is False:
        return ""
    x = x * 1e3 if ms else x
    return f"{x:.{digits}g}" if digits else f"{x:,.0f}"


if __name__ == "__main__":
    if "--smoke" in sys.argv:
        torch.set_num_threads(1)  # tiny shapes: threads only contend
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script)")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip configurations predicted to overrun this")
    p.add_argument("--chunk", type=int, default=16384, help="prefill chunk (tokens)")
    p.add_argument("--eager-steps", type=int, default=4)
    p.add_argument("--graph-steps", type=int, default=32)
    p.add_argument("--models", nargs="*", help="subset of the models")
    p.add_argument("--resume", action="store_true", help="(the default) keep the rows already in OUT/long_context.json")
    p.add_argument("--fresh", action="store_true", help="ignore OUT/long_context.json and start over")
    p.add_argument("--lengths", nargs="*", type=lambda s: int(s[:-1]) * (K if s[-1] in "kK" else K * K)
                   if s[-1] in "kKmM" else int(s), help="only these lengths (8K, 512K, 2M or plain tokens)")
    p.add_argument("--compile-decode", action="store_true",
                   help="torch.compile the decode step before capturing it in the CUDA graph")
    p.add_argument("--pack-decode", action="store_true",
                   help="GDN decode reads its six input projections as one stacked matrix and runs one short conv "
                        "(inference.pack_decode_projections; the copy is in packed_bytes and the peak memory)")
    p.add_argument("--decode-backend", default="auto", choices=("auto", "torch", "triton"),
                   help="MLA decode: the Triton split-K kernel where it can run (auto), or the PyTorch reference")
    a = p.parse_args()
    if a.smoke:
        a.chunk, a.eager_steps = min(a.chunk, 32), min(a.eager_steps, 2)
    sys.exit(Bench(a).main())
