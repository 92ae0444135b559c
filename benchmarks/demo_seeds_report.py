"""The demo over seeds (benchmarks/demo_seeds.yaml) -> README-ready tables, goals and a figure with intervals.

Reads the sweep's exported points (results/demo_seeds/points/*.json: no MLflow needed) and writes
OUT/demo_seeds.{json,md} and OUT/niah_vs_length.png:
- per model and length: mean NIAH over seeds with its 95% bootstrap interval over seeds, and the Wilson interval
  over every evaluation sample pooled across seeds (32 per task and seed; 8 for the plain teacher beyond 4x);
- per seed: the hybrid's NIAH at each length, the teacher with YaRN beyond 4x, perplexity ratio;
- the issue's goals: hybrid >= 0.80 at 32x in each seed and mean >= 0.85; hybrid above teacher + YaRN at 8x, 16x
  and 32x by a paired difference (seeds paired) whose 95% interval excludes 0; perplexity within 10%.

    python benchmarks/demo_seeds_report.py benchmarks/results/demo_seeds/points --out benchmarks/results/demo_seeds
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from hylo_lab import plots, stats
from hylo_lab.data.toy import TOY_TRAIN_LEN
from hylo_lab.executors import read_exports

MODELS = ("teacher", "teacher_yarn", "hybrid")
TASKS = 2  # NIAH tasks per length (niah_single_1, niah_single_2)


def samples_per_task(model: str, length: int, params: dict) -> int:
    per_task = int(params.get("eval_samples", 32))
    if model == "teacher" and length > 4 * TOY_TRAIN_LEN:
        return min(int(params.get("long_eval_samples", 8)), per_task)
    return per_task


def collect(points: dict) -> tuple[list[dict], dict]:
    rows, where = [], {}
    for key, p in sorted(points.items()):
        if p.get("status") != "FINISHED":
            continue
        seed = int(p["axes"].get("seed", p["parameters"].get("seed", 0)))
        where[seed] = p.get("where", {})
        for name, value in p["metrics"].items():
            m = re.fullmatch(r"eval/(\w+)/(niah|ppl)/(\d+)", name)
            if m and m.group(1) in MODELS:
                rows.append(dict(seed=seed, model=m.group(1), metric=m.group(2), length=int(m.group(3)),
                                 value=float(value), per_task=samples_per_task(m.group(1), int(m.group(3)),
                                                                               p["parameters"])))
    return rows, where


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("points", help="folder of exported points (results/demo_seeds/points)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import pandas as pd

    rows, where = collect(read_exports(args.points))
    if not rows:
        raise SystemExit(f"demo_seeds_report: no finished points with NIAH metrics in {args.points}")
    df = pd.DataFrame(rows)
    niah = df[df.metric == "niah"]
    seeds = sorted(niah.seed.unique())
    lengths = sorted(niah.length.unique())
    table = []
    for (model, length), part in niah.groupby(["model", "length"]):
        over_seeds = stats.mean_ci(part.value.tolist())
        n = int(part.per_task.iloc[0]) * TASKS * len(part)
        pooled = stats.accuracy_ci(int(round(sum(v * int(k) * TASKS for v, k in zip(part.value, part.per_task)))), n)
        table.append(dict(model=model, length=int(length), multiple=length / TOY_TRAIN_LEN, mean=over_seeds["mean"],
                          seeds_low=over_seeds["low"], seeds_high=over_seeds["high"], seeds=over_seeds["n"],
                          pooled_low=pooled["low"], pooled_high=pooled["high"], samples=n))
    table = pd.DataFrame(table)
    per_seed = niah.pivot_table(index=["seed"], columns=["model", "length"], values="value")
    ppl = df[df.metric == "ppl"].pivot_table(index="seed", columns="model", values="value")
    longest = max(lengths)
    hybrid_longest = per_seed[("hybrid", longest)]
    paired = {}
    for mult in (8, 16, 32):
        length = mult * TOY_TRAIN_LEN
        if ("hybrid", length) in per_seed and ("teacher_yarn", length) in per_seed:
            paired[mult] = stats.paired_difference(per_seed[("hybrid", length)].to_dict(),
                                                   per_seed[("teacher_yarn", length)].to_dict())
    ppl_ratio = (ppl["hybrid"] / ppl["teacher"]) if {"hybrid", "teacher"} <= set(ppl) else pd.Series(dtype=float)
    goals = {
        f"hybrid >= 0.80 at {longest // TOY_TRAIN_LEN}x in every seed": bool((hybrid_longest >= 0.80).all()),
        f"hybrid mean >= 0.85 at {longest // TOY_TRAIN_LEN}x": bool(hybrid_longest.mean() >= 0.85),
        **{f"hybrid - teacher+YaRN at {m}x: 95% interval excludes 0": bool(d["low"] > 0) for m, d in paired.items()},
        "perplexity within 10% of the teacher's (every seed)": bool(((ppl_ratio - 1).abs() <= 0.10).all())
        if len(ppl_ratio) else False,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(seeds=[int(s) for s in seeds], where={int(k): v for k, v in where.items()},
                  per_length=table.to_dict("records"),
                  per_seed={int(s): {f"{m}/{n}": float(per_seed.loc[s, (m, n)]) for m, n in per_seed.columns}
                            for s in per_seed.index},
                  ppl_ratio={int(s): float(v) for s, v in ppl_ratio.items()},
                  paired_hybrid_minus_teacher_yarn={m: {k: v for k, v in d.items()} for m, d in paired.items()},
                  goals=goals)
    (out / "demo_seeds.json").write_text(json.dumps(result, indent=2, default=str))

    lines = [f"# The quickstart over {len(seeds)} seeds ({', '.join(map(str, seeds))}; world_seed 0)", "",
             "NIAH accuracy per model and length: mean over seeds [95% bootstrap interval over seeds] and the Wilson",
             "interval over every evaluation sample pooled across seeds (n samples).", "",
             "| model | length | multiple | mean | seeds 95% CI | pooled 95% CI | n |", "|---|---|---|---|---|---|---|"]
    for r in table.sort_values(["model", "length"]).itertuples():
        lines.append(f"| {r.model} | {r.length} | {r.multiple:g}x | {r.mean:.3f} | [{r.seeds_low:.3f}, {r.seeds_high:.3f}]"
                     f" | [{r.pooled_low:.3f}, {r.pooled_high:.3f}] | {r.samples} |")
    lines += ["", "Hybrid NIAH per seed, and the teacher with YaRN at the longest length:", "",
              "| seed | " + " | ".join(f"{n // TOY_TRAIN_LEN}x" for n in lengths) + " | teacher+YaRN "
              f"{longest // TOY_TRAIN_LEN}x | ppl hybrid/teacher |",
              "|---|" + "---|" * (len(lengths) + 2)]
    for s in per_seed.index:
        cells = " | ".join(f"{per_seed.loc[s, ('hybrid', n)]:.2f}" for n in lengths)
        ty = per_seed.loc[s, ("teacher_yarn", longest)] if ("teacher_yarn", longest) in per_seed else float("nan")
        lines.append(f"| {s} | {cells} | {ty:.2f} | {ppl_ratio.get(s, float('nan')):.3f} |")
    lines += ["", "Paired difference hybrid - teacher with YaRN (seeds paired, 95% bootstrap interval):", ""]
    lines += [f"- {m}x: {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] over {d['n']} seeds" for m, d in paired.items()]
    lines += ["", "Goals (issue 16, point 5):", ""] + [f"- {'met' if ok else 'NOT met'}: {g}" for g, ok in goals.items()]
    (out / "demo_seeds.md").write_text("\n".join(lines) + "\n")

    curve = niah.rename(columns={"value": "niah"})[["model", "length", "seed", "niah"]]
    fig = plots.context_curve(curve, train_len=TOY_TRAIN_LEN, labels={"hybrid": "hybrid 2MLA2GDN",
                              "teacher_yarn": "teacher + YaRN", "teacher": "teacher"}, bar=0.80,
                              title=f"NIAH vs context length over {len(seeds)} seeds")
    fig.savefig(out / "niah_vs_length.png", dpi=120, bbox_inches="tight")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
