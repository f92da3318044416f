"""Every figure of `sparse_lm.analysis.plots` has a title, labelled axes and a "Look for:" caption,
and renders to a PNG (small inputs built by hand)."""
import numpy as np
import pandas as pd
import pytest

from sparse_lm.analysis import plots, routing

RNG = np.random.default_rng(0)


def _cases():
    counts = RNG.integers(0, 50, (3, 8))
    hist = routing.load_over_training(
        [{"step": s, **{f"moe/l{i}/{k}": float(RNG.uniform()) for i in range(2)
                        for k in ("load_cv", "dead")}} for s in (5, 10, 15)], ["l0", "l1"])
    topk = np.full((32, 3), -1)
    topk[8:, :2] = RNG.integers(0, 2, (24, 2))
    vis = np.tril(np.ones((32, 8), bool), -1)[:, :8]
    mass = RNG.uniform(size=(32, 8)) * vis
    rows = [{"layer": "a", "window": 0.5, "compressed": 0.4, "sink": 0.1},
            {"layer": "b", "window": 0.9, "compressed": 0.0, "sink": 0.1}]
    toks = RNG.integers(32, 127, 40)
    return {
        "expert_load_heatmap": lambda: plots.expert_load_heatmap(counts, ["a", "b", "c"], ["hash", "score", "score"]),
        "load_over_training": lambda: plots.load_over_training(hist, sparse_from=10),
        "bias_trajectory": lambda: plots.bias_trajectory([1, 2], {"a": RNG.normal(size=(2, 4))}),
        "bias_effect": lambda: plots.bias_effect(["a", "b"], [0.1, 0.2], [0.5, 0.4]),
        "token_expert_strip": lambda: plots.token_expert_strip(
            [chr(t) for t in toks], [toks % 4, toks % 3], ["a", "b"], 4, per_row=16),
        "class_expert_heatmap": lambda: plots.class_expert_heatmap(
            routing.class_expert_matrix(toks, (toks % 4)[:, None], 4), "a"),
        "selection_over_text": lambda: plots.selection_over_text(bytes(range(65, 97)), [10, 31], topk, mass, 4, 4, per_row=16),
        "selection_map": lambda: plots.selection_map(topk, vis, mass),
        "recall_vs_k": lambda: plots.recall_vs_k([1, 2, 4], {"a": np.array([0.2, 0.4, 0.8])},
                                                 {"a": np.array([0.3, 0.5, 0.9])}, model_k=2),
        "bits_vs_k": lambda: plots.bits_vs_k({0: 3.0, 2: 2.5, 4: 2.4}, model_k=2, dense_bits=2.4),
        "mass_bars": lambda: plots.mass_bars(rows),
        "distance_histogram": lambda: plots.distance_histogram([0, 4, 16, 64], {"a": np.array([0.2, 0.5, 0.3])},
                                                               {"a": np.array([0.1, 0.3, 0.6])}),
        "head_agreement": lambda: plots.head_agreement(np.eye(3), layer="a", k=2),
        "efficiency_curves": lambda: plots.efficiency_curves(
            [1024, 2048], {"x": [1.0, 2.0], "base": [2.0, 8.0]}, ylabel="FLOPs per token",
            title="t", caption="Look for: x", ratio_to="base", mark=2048),
        "stacked_breakdown": lambda: plots.stacked_breakdown(
            [1024, 2048], {"a": [1, 2], "b": [2, 1]}, ylabel="FLOPs per token", title="t",
            caption="Look for: x"),
        "sharding_bars": lambda: plots.sharding_bars(
            ["p1", "p2"], {"params": [1.0, 2.0], "temp": [3.0, np.nan]}, ylabel="GB per device",
            title="t", caption="Look for: x", limit=4.0, hatch_mask=[False, True], log=True,
            bar_labels=["3 GB", "2 GB\ndoes not fit"]),
        "grouped_bars": lambda: plots.grouped_bars(
            ["p1", "p2"], {"compute": [1.0, 2.0], "ICI": [0.5, 3.0]}, ylabel="seconds per step",
            title="t", caption="Look for: x", markers={"estimate": [1.0, 3.0], "measured": [np.nan, np.nan]},
            log=True, hatch_mask=[False, True]),
    }


CASES = _cases()


def test_every_plot_function_is_covered():
    public = {n for n in dir(plots) if callable(getattr(plots, n)) and not n.startswith("_")
              and getattr(getattr(plots, n), "__module__", "") == plots.__name__}
    helpers = {"new_figure", "to_png", "show", "save"}
    assert public - helpers == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_figure_is_labelled_captioned_and_renders(name):
    """A caption, a title, and every axis labelled: its own label or, for panels in a grid, the
    label of the bottom panel of its column (x) and the left panel of its row (y)."""
    fig = CASES[name]()
    assert any(t.get_text().startswith("Look for:") for t in fig.texts), f"{name}: no caption"
    axes = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    titles = [a.get_title() or a.get_title(loc="left") for a in axes]
    assert any(titles) or (fig._suptitle and fig._suptitle.get_text()), f"{name}: no title"
    xl, yl = {}, {}
    for a in axes:
        ss = a.get_subplotspec()
        xl.setdefault(ss.colspan.start, []).append(a.get_xlabel())
        yl.setdefault(ss.rowspan.start, []).append(a.get_ylabel())
    assert all(any(v) for v in xl.values()), f"{name}: an x axis without a label"
    assert all(any(v) for v in yl.values()), f"{name}: a y axis without a label"
    png = plots.to_png(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < len(plots.to_png(fig, colors=None))


def test_sharding_bars_log_axis_keeps_every_bar_and_the_limit_in_view():
    """Memory needs spanning decades on a log axis: the floor is under the smallest bar and the
    HBM line, the top above the largest bar and its label."""
    fig = plots.sharding_bars(["dp", "fsdp", "ep"], {"state": [2000.0, 30.0, 0.5], "temp": [100.0, 1200.0, 0.1]},
                              ylabel="GB per device", title="t", caption="Look for: x", limit=100.0,
                              log=True, bar_labels=["2100 GB", "1230 GB", "0.6 GB"])
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert ax.get_yscale() == "log"
    assert lo < 0.6 and hi > 2100 and lo < 100 < hi
    assert [t.get_text() for t in ax.texts] == ["2100 GB", "1230 GB", "0.6 GB"]
