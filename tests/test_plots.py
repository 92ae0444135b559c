"""Every figure of plots.py renders from a small fixture, and the house style holds: one colour per model,
x ticks in multiples of the training length, intervals drawn where there are several seeds."""

import io

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from hylo_lab import plots

matplotlib.use("Agg")
LENGTHS = [256, 512, 1024, 2048]


def _render(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.tell() > 1000
    return fig


def _seeded():
    rng = np.random.default_rng(0)
    return pd.DataFrame([dict(model=m, length=n, seed=s, niah=float(np.clip(base - 0.1 * i + rng.normal(0, 0.05), 0, 1)))
                         for m, base in (("teacher", 0.9), ("hybrid", 1.0)) for i, n in enumerate(LENGTHS)
                         for s in range(3)])


def test_context_curve_house_style():
    fig = _render(plots.context_curve(_seeded(), train_len=256, labels={"hybrid": "hybrid 2MLA2GDN"}, bar=0.8))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1x\n256", "2x\n512", "4x\n1K", "8x\n2K"]
    lines = {line.get_label(): to_hex(line.get_color()) for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert lines == {"teacher": plots.model_color("teacher"), "hybrid 2MLA2GDN": plots.model_color("hybrid")}
    assert len(ax.collections) == 2  # one interval band per model
    assert any("bootstrap over seeds" in t.get_text() and "n = 3 seeds" in t.get_text() for t in ax.texts)
    assert any("training length (256)" in t.get_text() for t in ax.texts)


def test_context_curve_single_run_with_sample_intervals():
    one = pd.DataFrame(dict(model="hybrid", length=LENGTHS, niah=[1.0, 0.9, 0.8, 0.7], niah_low=[0.9, 0.8, 0.7, 0.6],
                            niah_high=[1.0, 0.95, 0.9, 0.8], n=32))
    ax = _render(plots.context_curve(one, train_len=256)).axes[0]
    assert any("Wilson" in t.get_text() and "n = 32 samples" in t.get_text() for t in ax.texts)


def test_cache_curve_marks_predicted_and_ratio():
    rows = [dict(model=m, length=n, cache_bytes=b * n, cache_bytes_measured=(b * n if n <= 512 else None))
            for m, b in (("teacher", 1000), ("hybrid", 140)) for n in LENGTHS]
    ax = _render(plots.cache_curve(rows, train_len=256)).axes[0]
    hollow = [c for c in ax.collections if len(c.get_offsets()) and to_hex(c.get_facecolor()[0]) == "#ffffff"]
    assert sum(len(c.get_offsets()) for c in hollow) == 4  # 1024 and 2048 of both models are predicted
    assert any(t.get_text() == "0.14x teacher" for t in ax.texts)


def test_model_colours_are_fixed_and_stable():
    assert plots.model_color("teacher") != plots.model_color("hybrid")
    assert plots.model_color("some 4MLA12GDN") == plots.model_color("some 4MLA12GDN")


@pytest.mark.parametrize("name", ["niah_heatmap", "ruler_curve", "perplexity_figure", "efficiency_figure",
                                  "svd_spectra_figure", "layer_kl_figure", "loss_curves", "sweep_overview"])
def test_every_figure_renders(name):
    grid = pd.DataFrame([dict(model="m", length=n, depth=d, score=0.5) for n in LENGTHS for d in (0.0, 0.5, 1.0)])
    fixtures = {
        "niah_heatmap": lambda: plots.niah_heatmap(grid),
        "ruler_curve": lambda: plots.ruler_curve(pd.DataFrame(
            [dict(model=m, task=t, length=n, score=0.5, status="ok") for m in "ab" for t in ("x", "y") for n in LENGTHS])),
        "perplexity_figure": lambda: plots.perplexity_figure(
            pd.DataFrame(dict(model="m", length=LENGTHS, ppl=[3.0, 3.1, 3.2, 3.3])),
            pd.DataFrame(dict(model="m", start=[0, 128], end=[128, 256], ppl=[3.0, 2.9]))),
        "efficiency_figure": lambda: plots.efficiency_figure(pd.DataFrame(
            dict(model="m", length=LENGTHS, status=["ok", "ok", "ok", "oom"], ttft_s=[0.1, 0.2, 0.4, None],
                 tpot_s=[0.01] * 4, cache_bytes_measured=[1e6, 2e6, 4e6, None], cache_bytes_predicted=[1e6, 2e6, 4e6, 8e6]))),
        "svd_spectra_figure": lambda: plots.svd_spectra_figure(pd.DataFrame(
            [dict(layer=layer, matrix=m, index=i, energy=min(1.0, 0.3 * i), rank=2, mla=layer == 0)
             for layer in (0, 1) for m in ("q", "kv") for i in range(1, 5)])),
        "layer_kl_figure": lambda: plots.layer_kl_figure(
            pd.DataFrame([dict(layer=i, kind=k, kl=0.1 + i) for i in range(3) for k in ("mla", "gdn")]),
            mla_layers=[0], hybrid_kl=0.5),
        "loss_curves": lambda: plots.loss_curves(pd.DataFrame(
            [dict(run="r", split=s, step=i, value=1.0 / (i + 1)) for s in ("train", "eval") for i in range(3)])),
        "sweep_overview": lambda: plots.sweep_overview(pd.DataFrame(
            dict(point=["a", "b"], duration_s=[1.0, 2.0], status="FINISHED", run_id=["1", "2"], score=[0.1, 0.2]))),
    }
    _render(fixtures[name]())
