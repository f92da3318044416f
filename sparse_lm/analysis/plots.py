"""Figures for the analysis notebooks (matplotlib, Agg canvas; no pyplot global state).

Every function takes the outputs of the pure analysis functions (`routing`, `indexer_stats`,
`attention_mass`, `internals`, `accounting`) and returns a `matplotlib.figure.Figure` with axis
labels, units, a title and a one-line caption saying what to look for. `show(fig)` displays it in
a notebook as a PNG of modest resolution (so committed notebooks stay small); `save(fig, path)`
writes it.
"""
from __future__ import annotations

import io
import textwrap
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, to_rgb
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.patches import Patch

DPI = 80
PART_COLORS = {"window": "#4c72b0", "compressed": "#dd8452", "sink": "#8c8c8c"}


# ---------------------------------------------------------------------------- plumbing
def new_figure(width: float, height: float, caption: str, *, nrows: int = 1, ncols: int = 1,
               grid: bool = False, **subplot_kw):
    """(fig, axes) with constrained layout and `caption` in italics under the axes (wrapped to
    the figure's width; the figure grows by the caption's height). axes is one Axes for a 1 x 1
    figure unless grid=True, else the [nrows, ncols] array."""
    lines = textwrap.wrap(caption, width=max(40, int(width * 13)))
    cap_h = 0.16 * len(lines) + 0.12                       # inches
    fig = Figure(figsize=(width, height + cap_h))
    FigureCanvasAgg(fig)
    bottom = cap_h / (height + cap_h)
    # rect = (left, bottom, width, height) of the area the axes may use
    fig.set_layout_engine(ConstrainedLayoutEngine(rect=(0, bottom, 1, 1 - bottom)))
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    fig.text(0.01, bottom / 2, "\n".join(lines), fontsize=8.5, style="italic", color="#333333",
             va="center", ha="left")
    return fig, (axes[0, 0] if nrows == ncols == 1 and not grid else axes)


def to_png(fig: Figure, dpi: int = DPI, colors: int | None = 128) -> bytes:
    """PNG bytes of `fig`; with `colors`, quantised to a palette of that many colours (plots
    need few; it makes the embedded images about 3x smaller)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    if not colors:
        return buf.getvalue()
    from PIL import Image
    buf.seek(0)
    img = Image.open(buf).convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=True)
    return out.getvalue()


def show(fig: Figure, dpi: int = DPI) -> None:
    """Display in a notebook as an embedded PNG at `dpi`."""
    from IPython.display import Image, display
    display(Image(data=to_png(fig, dpi)))


def save(fig: Figure, path, dpi: int = 100, colors: int | None = 128) -> None:
    """Write `fig` as a PNG (palette-quantised like `to_png`)."""
    with open(path, "wb") as f:
        f.write(to_png(fig, dpi, colors))


def _expert_cmap(n: int) -> ListedColormap:
    base = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
            "#8c8c8c", "#ccb974", "#64b5cd", "#1f3a5f", "#7f3c10", "#2d5a2d", "#6b1f22",
            "#3d3366", "#4a3b2f"]
    return ListedColormap([base[i % len(base)] for i in range(n)])


# ---------------------------------------------------------------------------- routing
def expert_load_heatmap(counts, names: Sequence[str], routing: Sequence[str] | None = None,
                        *, title: str = "Expert load per layer"):
    """counts [L, E] -> heatmap of load / fair share (1 = balanced), annotated."""
    c = np.asarray(counts, np.float64)
    rel = c / np.maximum(c.mean(-1, keepdims=True), 1e-12)
    l, e = c.shape
    fig, ax = new_figure(max(6.0, 0.55 * e + 2.5), 0.45 * l + 2.0,
                         "Look for: rows far from 1 (white) are unbalanced; 0 = a dead expert. "
                         "Hash-routed layers are balanced by construction over the vocabulary, "
                         "not over this text.")
    vmax = max(2.0, float(rel.max()))
    im = ax.imshow(rel, cmap="RdBu_r", vmin=0.0, vmax=vmax, aspect="auto")
    for i in range(l):
        for j in range(e):
            ax.text(j, i, f"{rel[i, j]:.1f}", ha="center", va="center", fontsize=7,
                    color="black" if 0.4 < rel[i, j] / vmax < 0.8 or rel[i, j] < 1.6 else "white")
    labels = [f"{n} ({r})" for n, r in zip(names, routing)] if routing is not None else list(names)
    ax.set_yticks(range(l), labels, fontsize=8)
    ax.set_xticks(range(e), [str(j) for j in range(e)], fontsize=8)
    ax.set_xlabel("routed expert")
    ax.set_ylabel("layer (routing)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="load / fair share (tokens per expert / mean)")
    return fig


def load_over_training(df, *, sparse_from: float | None = None):
    """Long DataFrame (step, layer, stat, value) of `routing.load_over_training` -> load CV and
    dead experts per layer against the training step."""
    fig, axes = new_figure(10, 3.8, "Look for: the load CV of score-routed layers falling as the "
                           "router bias learns; hash layers stay where the hash put them.",
                           ncols=2)
    for ax, stat, label in ((axes[0, 0], "load_cv", "load CV (std / mean of tokens per expert)"),
                            (axes[0, 1], "dead", "dead experts (no token in the interval)")):
        sub = df[df["stat"] == stat]
        for name, g in sub.groupby("layer", sort=False):
            ax.plot(g["step"], g["value"], marker="o", ms=2.5, lw=1.2, label=name)
        if sparse_from is not None:
            ax.axvline(sparse_from, color="tab:red", lw=0.8, ls="--", label="sparse stage starts")
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    axes[0, 0].set_title("Expert-load imbalance over training")
    axes[0, 1].set_title("Dead experts over training")
    return fig


def bias_trajectory(steps: Sequence[int], biases: Mapping[str, np.ndarray]):
    """{layer: [T, E]} router biases at checkpoint steps -> one panel per layer, a line per
    expert."""
    names = list(biases)
    n = len(names)
    fig, axes = new_figure(3.0 * n + 1.2, 3.4, "Look for: experts that were overloaded early get "
                           "their bias pushed down (and vice versa); a bias moves by at most "
                           "rate x steps.", ncols=n, grid=True, sharey=True)
    fig.suptitle("Router bias of each expert over training (score-routed layers)", fontsize=10)
    for ax, name in zip(axes[0], names):
        b = np.asarray(biases[name])
        cmap = _expert_cmap(b.shape[1])
        for x in range(b.shape[1]):
            ax.plot(steps, b[:, x], color=cmap(x), lw=1.2, label=f"e{x}")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("router bias (affinity units)")
    axes[0, -1].legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def bias_effect(names: Sequence[str], cv_with: Sequence[float], cv_without: Sequence[float]):
    """Load CV of the same batch routed with the learned bias and with the bias removed."""
    x = np.arange(len(names))
    fig, ax = new_figure(max(5.0, 1.3 * len(names) + 2), 3.6,
                         "Look for: the bias bars (blue) lower than the no-bias bars: the learned "
                         "bias balances the load without an auxiliary loss.")
    ax.bar(x - 0.2, cv_with, 0.4, label="with the learned bias", color="#4c72b0")
    ax.bar(x + 0.2, cv_without, 0.4, label="bias set to 0", color="#c44e52")
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("load CV on this batch (std / mean)")
    ax.set_xlabel("score-routed layer")
    ax.set_title("What the aux-loss-free bias does to the load")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def token_expert_strip(chars: Sequence[str], experts_by_layer: Sequence[np.ndarray],
                       names: Sequence[str], num_experts: int, *, per_row: int = 48):
    """Each character of a snippet coloured by the expert of highest weight, one band per layer.

    chars [T]; experts_by_layer: per layer [T] expert ids (the first routed slot)."""
    t = len(chars)
    lines = -(-t // per_row)
    nl = len(names)
    cmap = _expert_cmap(num_experts)
    fig, ax = new_figure(0.2 * per_row + 2.0, 0.22 * lines * (nl + 1) + 1.6,
                         "Look for: bands of one colour over words, indentation or punctuation "
                         "(an expert that specialises); hash layers colour by byte value alone.")
    rows_img, ylabels = [], []
    for li in range(lines):
        for k, name in enumerate(names):
            row = np.full(per_row, np.nan)
            seg = np.asarray(experts_by_layer[k])[li * per_row:(li + 1) * per_row]
            row[:len(seg)] = seg
            rows_img.append(row)
            ylabels.append(name if li == 0 else "")
        rows_img.append(np.full(per_row, np.nan))
        ylabels.append("")
    img = np.asarray(rows_img)
    ax.imshow(np.ma.masked_invalid(img), cmap=cmap, vmin=-0.5, vmax=num_experts - 0.5,
              aspect="auto", interpolation="nearest")
    for li in range(lines):
        for k in range(nl):
            r = li * (nl + 1) + k
            for j, ch in enumerate(chars[li * per_row:(li + 1) * per_row]):
                ax.text(j, r, ch, ha="center", va="center", fontsize=6.5, family="monospace",
                        color="white")
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=7)
    ax.set_xticks([])
    ax.set_xlabel(f"snippet, {per_row} bytes per line (colour = top expert id)")
    ax.set_ylabel("layer (one band per line of the snippet)")
    ax.set_title("Token -> expert map over a code snippet")
    handles = [Patch(color=cmap(x), label=f"e{x}") for x in range(num_experts)]
    ax.legend(handles=handles, fontsize=6, ncol=min(num_experts, 8), loc="upper center",
              bbox_to_anchor=(0.5, -0.06), frameon=False)
    return fig


def class_expert_heatmap(df, layer: str):
    """`routing.class_expert_matrix` -> heatmap token class x expert (share of the class)."""
    mat = df.drop(columns=["tokens"]).to_numpy()
    fig, ax = new_figure(0.5 * mat.shape[1] + 3, 0.45 * mat.shape[0] + 1.8,
                         "Look for: rows concentrated on one or two experts (specialisation by "
                         "token class); uniform rows mean no specialisation.")
    im = ax.imshow(mat, cmap="viridis", vmin=0, aspect="auto")
    ax.set_yticks(range(len(df.index)), [f"{c} ({n})" for c, n in zip(df.index, df["tokens"])],
                  fontsize=8)
    ax.set_xticks(range(mat.shape[1]), list(df.columns[:-1]), fontsize=8)
    ax.set_xlabel("routed expert")
    ax.set_ylabel("token class (count)")
    ax.set_title(f"Which token classes go to which experts ({layer})")
    fig.colorbar(im, ax=ax, label="share of the class's assignments")
    return fig


# ---------------------------------------------------------------------------- sparse attention
def selection_over_text(doc: bytes, queries: Sequence[int], topk: np.ndarray, mass: np.ndarray,
                        ratio: int, window: int, *, per_row: int = 64, title: str = ""):
    """For each query position, the document as a character grid: the query (red), its window
    (grey), and the compressed blocks its indexer selected (orange, darker = more dense
    attention mass). topk [S, K] and mass [S, N] of one row."""
    s = len(doc)
    lines = -(-s // per_row)
    nq = len(queries)
    fig, axes = new_figure(0.16 * per_row + 1.2, (0.2 * lines + 0.6) * nq + 1.0,
                           "Look for: selected blocks (orange) far outside the grey window, on "
                           "text that matters for the query (names defined earlier, matching "
                           "brackets); darker = more dense attention mass.", nrows=nq, grid=True)
    for ax, t in zip(axes[:, 0], queries):
        img = np.ones((lines * per_row, 3))
        m = np.asarray(mass[t], np.float64)
        share = m / max(m.sum(), 1e-12)
        sel = [int(x) for x in np.asarray(topk[t]) if x >= 0]
        top = max([share[x] for x in sel] + [1e-12])
        for x in sel:
            a = 0.25 + 0.75 * share[x] / top
            c = np.array(to_rgb("#dd8452"))
            img[x * ratio:(x + 1) * ratio] = 1 - a * (1 - c)
        lo = max(0, t - window + 1)
        img[lo:t + 1] = to_rgb("#d0d0d0")
        img[t] = to_rgb("#e04040")
        ax.imshow(img.reshape(lines, per_row, 3), aspect="auto", interpolation="nearest")
        for i in range(min(s, lines * per_row)):
            ch = doc[i]
            txt = chr(ch) if 33 <= ch < 127 else ("·" if ch == 32 else ("↵" if ch == 10 else "?"))
            ax.text(i % per_row, i // per_row, txt, ha="center", va="center", fontsize=6,
                    family="monospace", color="#222222" if ch != 32 else "#bbbbbb")
        ax.set_yticks(range(lines), [str(r * per_row) for r in range(lines)], fontsize=6)
        ax.set_xticks([])
        ax.set_ylabel("byte offset", fontsize=7)
        recall = float(sum(share[x] for x in sel))
        ax.set_title(f"query at byte {t}: {len(sel)} blocks of {ratio} bytes selected, keeping "
                     f"{recall:.0%} of the dense mass on compressed entries", fontsize=8.5)
    axes[-1, 0].set_xlabel(f"{per_row} bytes per line; red = query, grey = its window of {window}, "
                           f"orange = selected blocks of {ratio} bytes")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def selection_map(topk: np.ndarray, visible: np.ndarray, mass: np.ndarray, *, layer: str = ""):
    """Query x entry map of one row: dense attention mass (normalised per query) in colour,
    invisible entries blank, the indexer's picks as dots."""
    v = np.asarray(visible, bool)
    m = np.asarray(mass, np.float64)
    share = m / np.maximum(m.sum(-1, keepdims=True), 1e-12)
    img = np.where(v, share, np.nan)
    fig, ax = new_figure(6.5, 5.0, "Look for: dots on the bright cells (the indexer picks the "
                         "entries attention wants); a bright diagonal = recent blocks matter most.")
    vmax = float(np.nanpercentile(img, 99)) if v.any() else 1.0
    im = ax.imshow(np.ma.masked_invalid(img), cmap="magma_r", aspect="auto",
                   interpolation="nearest", vmin=0, vmax=max(vmax, 1e-6))
    q, k = np.nonzero(np.asarray(topk) >= 0)
    ax.scatter(np.asarray(topk)[q, k], q, s=1.5, c="#1f77b4", marker="s", lw=0,
               label="selected by the indexer")
    ax.set_xlabel("compressed entry (block index)")
    ax.set_ylabel("query position (byte)")
    ax.set_title(f"Dense mass on entries vs top-k picks {layer}".strip(), fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.colorbar(im, ax=ax, label="share of the query's dense mass on entries (clipped at p99)")
    return fig


def recall_vs_k(ks: Sequence[int], recall: Mapping[str, np.ndarray],
                oracle: Mapping[str, np.ndarray] | None = None, *, model_k: int | None = None):
    """Recall of the dense attention mass on compressed entries against k, per CSA layer."""
    fig, ax = new_figure(6.5, 4.0, "Look for: the indexer's curve close to the oracle's (the best "
                         "any k-subset can do); the gap at the model's k is what sparsity costs.")
    for i, (name, r) in enumerate(recall.items()):
        color = f"C{i}"
        ax.plot(ks, r, marker="o", ms=3, color=color, label=f"{name}: indexer top-k")
        if oracle is not None and name in oracle:
            ax.plot(ks, oracle[name], ls="--", color=color, lw=1, label=f"{name}: oracle top-k")
    if model_k is not None:
        ax.axvline(model_k, color="gray", ls=":", label=f"model's k = {model_k}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (compressed entries kept per query)")
    ax.set_ylabel("recall of dense attention mass on entries")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("How much of the dense attention the top-k keeps")
    return fig


def bits_vs_k(bits: Mapping[int, float], *, model_k: int | None = None,
              dense_bits: float | None = None):
    """Next-token loss (bits per byte) when every CSA layer keeps only k entries."""
    ks = sorted(bits)
    fig, ax = new_figure(6.0, 3.8, "Look for: a flat curve down to the trained k (the selection "
                         "is enough), rising as k shrinks; k = 0 leaves only window and HCA.")
    xs = [max(k, 0.5) for k in ks]
    ax.plot(xs, [bits[k] for k in ks], marker="o", color="C0", label="sparse, k entries")
    if dense_bits is not None:
        ax.axhline(dense_bits, color="C2", ls="--", label="dense CSA (every visible entry)")
    if model_k is not None:
        ax.axvline(model_k, color="gray", ls=":", label=f"trained k = {model_k}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(k) for k in ks])
    ax.set_xlabel("k (compressed entries kept per query; 0 = none)")
    ax.set_ylabel("next-byte loss (bits per byte)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Quality as k shrinks")
    return fig


def mass_bars(rows: Sequence[Mapping]):
    """Stacked bars per layer of the mean window / compressed / sink mass."""
    names = [f"{r['layer']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = new_figure(max(5.5, 1.1 * len(rows) + 2), 3.8,
                         "Look for: how much CSA and HCA layers lean on compressed entries vs "
                         "the local window; a large sink share means heads that opt out.")
    bottom = np.zeros(len(rows))
    for part in ("window", "compressed", "sink"):
        v = np.asarray([r[part] for r in rows])
        ax.bar(x, v, 0.6, bottom=bottom, color=PART_COLORS[part], label=part)
        for i, (b, h) in enumerate(zip(bottom, v)):
            if h > 0.06:
                ax.text(i, b + h / 2, f"{h:.0%}", ha="center", va="center", fontsize=7, color="white")
        bottom += v
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("share of attention probability")
    ax.set_xlabel("layer")
    ax.set_ylim(0, 1.0)
    ax.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1.0, 1.18), ncol=3)
    ax.set_title("Where attention goes (mean over queries and heads)", loc="left", fontsize=10)
    return fig


def distance_histogram(edges, selected: Mapping[str, np.ndarray],
                       uniform: Mapping[str, np.ndarray] | None = None):
    """Share of picks per distance bin (tokens from the query to the block's last token)."""
    edges = np.asarray(edges)
    centers = np.sqrt(np.maximum(edges[:-1], 1) * edges[1:])
    fig, ax = new_figure(6.5, 3.8, "Look for: mass at large distances (the indexer reaches back "
                         "beyond the window) vs a uniform pick among visible blocks (dashed).")
    for i, (name, h) in enumerate(selected.items()):
        ax.plot(centers, h, marker="o", ms=3, color=f"C{i}", label=f"{name}: selected")
        if uniform is not None and name in uniform:
            ax.plot(centers, uniform[name], ls="--", lw=1, color=f"C{i}",
                    label=f"{name}: all visible blocks")
    ax.set_xscale("log")
    ax.set_xlabel("distance from the query to the selected block's last token (bytes)")
    ax.set_ylabel("share of selections in the bin")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("How far back the indexer reaches")
    return fig


def head_agreement(matrix: np.ndarray, *, layer: str = "", k: int | None = None):
    """[Hi, Hi] mean Jaccard overlap of the heads' own top-k sets."""
    m = np.asarray(matrix)
    fig, ax = new_figure(4.6, 3.9, "Look for: off-diagonal values well below 1: heads that pick "
                         "different blocks, which the weighted sum combines.")
    im = ax.imshow(m, cmap="viridis", vmin=0, vmax=1)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if m[i, j] < 0.6 else "black")
    ax.set_xlabel("indexer head")
    ax.set_ylabel("indexer head")
    ax.set_xticks(range(m.shape[0]))
    ax.set_yticks(range(m.shape[0]))
    ax.set_title(f"Indexer head agreement {layer} (top-{k})".strip(), fontsize=9)
    fig.colorbar(im, ax=ax, label="mean Jaccard overlap of top-k sets")
    return fig


# ---------------------------------------------------------------------------- efficiency
def efficiency_curves(contexts: Sequence[int], series: Mapping[str, Sequence[float]], *,
                      ylabel: str, title: str, caption: str, ratio_to: str | None = None,
                      mark: int | None = None, ratio_of: Sequence[str] | None = None):
    """Per-token cost against context length (log-log), and optionally the ratio of each series
    (or of those in `ratio_of`) to `ratio_to` in a second panel, annotated at `mark`."""
    n = 2 if ratio_to else 1
    fig, axes = new_figure(5.2 * n + 0.6, 3.9, caption, ncols=n, grid=True)
    ax = axes[0, 0]
    x = np.asarray(contexts)
    for i, (name, v) in enumerate(series.items()):
        ax.plot(x, v, marker="o", ms=3, color=f"C{i}", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if mark:
        ax.axvline(mark, color="gray", ls=":")
    if ratio_to:
        ax2 = axes[0, 1]
        base = np.asarray(series[ratio_to], np.float64)
        shown = 0
        for i, (name, v) in enumerate(series.items()):
            if name == ratio_to or (ratio_of is not None and name not in ratio_of):
                continue
            r = np.asarray(v, np.float64) / base
            ax2.plot(x, 100 * r, marker="o", ms=3, color=f"C{i}", label=f"{name} / {ratio_to}")
            if mark:
                j = int(np.argmin(np.abs(x - mark)))
                ax2.annotate(f"{100 * r[j]:.1f}% at {x[j]:,}", (x[j], 100 * r[j]),
                             textcoords="offset points", xytext=(-90, 8 + 12 * shown),
                             fontsize=8, color=f"C{i}")
            shown += 1
        ax2.set_xscale("log", base=2)
        ax2.set_xlabel("context length (tokens)")
        ax2.set_ylabel(f"% of {ratio_to}")
        ax2.set_title(f"Relative to {ratio_to}", fontsize=10)
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
        if mark:
            ax2.axvline(mark, color="gray", ls=":")
    return fig


def stacked_breakdown(contexts: Sequence[int], parts: Mapping[str, Sequence[float]], *,
                      ylabel: str, title: str, caption: str):
    """Stacked areas of cost components against context length (log x)."""
    fig, ax = new_figure(6.5, 3.9, caption)
    x = np.asarray(contexts)
    ax.stackplot(x, *[np.asarray(v) for v in parts.values()], labels=list(parts), alpha=0.85)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return fig


# ---------------------------------------------------------------------------- sharding
def sharding_bars(labels: Sequence[str], values: Mapping[str, Sequence[float]], *, ylabel: str,
                  title: str, caption: str, limit: float | None = None,
                  limit_label: str = "", hatch_mask: Sequence[bool] | None = None,
                  xlabel: str = "sharding preset", log: bool = False,
                  bar_labels: Sequence[str] | None = None):
    """Stacked bars per configuration (one segment per series), an optional horizontal limit
    (e.g. the chip's HBM); hatch_mask marks rows that do not fit / failed; bar_labels are written
    above each bar (e.g. the total and the status). log=True: logarithmic y axis (memory needs
    that span decades), its floor a decade under the smallest bar or limit."""
    x = np.arange(len(labels))
    fig, ax = new_figure(max(6.0, 0.55 * len(labels) + 2.5) + 2.2, 4.4, caption)
    bottom = np.zeros(len(labels))
    segments = []
    for i, (name, v) in enumerate(values.items()):
        v = np.nan_to_num(np.asarray(v, np.float64))
        segments.append(v)
        bars = ax.bar(x, v, 0.65, bottom=bottom, color=f"C{i}", label=name)
        if hatch_mask is not None:
            for b, h in zip(bars, hatch_mask):
                if h:
                    b.set_hatch("//")
                    b.set_edgecolor("white")
        bottom += v
    if limit is not None:
        ax.axhline(limit, color="tab:red", ls="--", lw=1, label=limit_label or "limit")
    if log:
        ax.set_yscale("log")
        top = [float(t) for t in bottom if t > 0] + ([limit] if limit else [])
        if top:
            # floor: a decade under the smallest segment worth seeing (> 1e-4 of the largest bar)
            seen = [float(t) for v in segments for t in v if t > 1e-4 * max(top)] + top
            ax.set_ylim(10 ** (np.floor(np.log10(min(seen))) - 1), 10 ** np.ceil(np.log10(max(top)) + 0.3))
    if bar_labels is not None:
        floor = ax.get_ylim()[0]
        for xi, top, text in zip(x, bottom, bar_labels):
            if text:
                ax.annotate(text, (xi, max(top, floor)), textcoords="offset points", xytext=(0, 3),
                            ha="center", va="bottom", fontsize=7)
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi * (3.0 if log else 1.12))          # room for the labels
    ax.set_xticks(x, labels, rotation=40, ha="right", fontsize=7.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))     # outside the bars
    return fig


def grouped_bars(labels: Sequence[str], series: Mapping[str, Sequence[float]], *, ylabel: str,
                 title: str, caption: str, markers: Mapping[str, Sequence[float]] | None = None,
                 log: bool = False, xlabel: str = "sharding preset @ topology",
                 hatch_mask: Sequence[bool] | None = None):
    """Side-by-side bars per configuration (one colour per series), optional point markers per
    configuration (e.g. the step-time estimate, a measured time); hatch_mask marks
    configurations that do not fit."""
    x = np.arange(len(labels))
    n = max(len(series), 1)
    w = 0.8 / n
    fig, ax = new_figure(max(6.0, 0.7 * len(labels) + 2.5) + 2.0, 4.4, caption)
    for i, (name, v) in enumerate(series.items()):
        bars = ax.bar(x - 0.4 + w * (i + 0.5), np.nan_to_num(np.asarray(v, np.float64)), w,
                      color=f"C{i}", label=name)
        if hatch_mask is not None:
            for b, h in zip(bars, hatch_mask):
                if h:
                    b.set_hatch("//")
                    b.set_edgecolor("white")
    for j, (name, v) in enumerate((markers or {}).items()):
        v = np.asarray(v, np.float64)
        ok = np.isfinite(v)
        if ok.any():
            ax.plot(x[ok], v[ok], ["k_", "k*"][j % 2], ms=18 if j % 2 == 0 else 10, mew=2, label=name)
    if log:
        ax.set_yscale("log")
    ax.set_xticks(x, labels, rotation=40, ha="right", fontsize=7.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))     # outside the bars
    return fig
