"""Execute the notebooks in place, keeping their outputs (what is committed).

    python notebooks/run_notebooks.py                       # all four, full mode
    python notebooks/run_notebooks.py routing_explorer --set 'WORKDIR="runs/demo"'
    python notebooks/run_notebooks.py --fast --out /tmp/nb  # CI's quick pass, copies elsewhere

    python notebooks/run_notebooks.py --figures-only        # only refresh docs/figures/

--set NAME=EXPR adds a cell after the cell tagged "parameters" (papermill style). After running,
consecutive stream outputs are merged and carriage returns applied (a progress bar keeps only its
final line), as a notebook front end would show them, so the files stay small. The first figure
of the cell tagged "readme-figure" is written to docs/figures/<notebook>.png (beside the --out
copies: <out>/figures/), the picture README.md shows next to the notebook's link.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIGURES = HERE.parent / "docs" / "figures"
FIGURE_TAG = "readme-figure"
NOTEBOOKS = ["routing_explorer", "sparse_attention_explorer", "efficiency", "sharding_comparison"]


def apply_carriage_returns(text: str) -> str:
    """What a terminal shows: on each line, only the text after its last carriage return."""
    text = re.sub(r"\r+\n", "\n", text)
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def coalesce_streams(nb) -> None:
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged = []
        for o in cell.outputs:
            if (o.get("output_type") == "stream" and merged
                    and merged[-1].get("output_type") == "stream" and merged[-1]["name"] == o["name"]):
                merged[-1]["text"] += o["text"]
            else:
                merged.append(o)
        for o in merged:
            if o.get("output_type") == "stream":
                o["text"] = apply_carriage_returns(o["text"])
        cell.outputs = merged


def readme_figure(nb) -> bytes:
    """The first PNG of the cell tagged "readme-figure" (exactly one such cell)."""
    import base64
    cells = [c for c in nb.cells if FIGURE_TAG in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"need exactly one cell tagged {FIGURE_TAG!r}, found {len(cells)}")
    pngs = [o["data"]["image/png"] for o in cells[0].get("outputs", [])
            if "data" in o and "image/png" in o["data"]]
    if not pngs:
        raise ValueError(f"the cell tagged {FIGURE_TAG!r} has no figure output (not executed?)")
    return base64.b64decode(pngs[0])


def write_figure(name: str, nb, fig_dir: Path) -> Path:
    fig_dir.mkdir(parents=True, exist_ok=True)
    dest = fig_dir / f"{name}.png"
    dest.write_bytes(readme_figure(nb))
    return dest


def run(name: str, *, out_dir: Path | None, sets: list[str], timeout: int) -> None:
    import nbformat
    from nbclient import NotebookClient
    path = HERE / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    if sets:
        idx = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
        nb.cells.insert(idx + 1, nbformat.v4.new_code_cell("\n".join(sets)))
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(HERE)}}).execute()
    coalesce_streams(nb)
    for c in nb.cells:                       # timing metadata changes on every run: drop it
        c.metadata.pop("execution", None)
    dest = (out_dir / path.name) if out_dir else path
    nbformat.write(nb, dest)
    fig = write_figure(name, nb, (out_dir / "figures") if out_dir else FIGURES)
    print(f"{name}: {time.perf_counter() - t0:.0f} s, {dest.stat().st_size / 1e3:.0f} KB -> {dest}; "
          f"figure {fig.stat().st_size / 1e3:.0f} KB -> {fig}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", default=NOTEBOOKS, help=f"notebooks (default: {NOTEBOOKS})")
    ap.add_argument("--fast", action="store_true", help="set SPARSE_LM_NOTEBOOK_FAST=1")
    ap.add_argument("--out", type=Path, default=None, help="write here instead of in place")
    ap.add_argument("--set", action="append", default=[], help="NAME=EXPR parameter override")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    ap.add_argument("--figures-only", action="store_true",
                    help="execute nothing: write docs/figures/<notebook>.png from the committed notebooks")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in NOTEBOOKS]
    if unknown:
        ap.error(f"unknown notebook(s) {unknown}: allowed values {NOTEBOOKS}")
    if args.figures_only:
        import nbformat
        for n in args.names:
            print(write_figure(n, nbformat.read(HERE / f"{n}.ipynb", as_version=4), FIGURES))
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.fast:
        os.environ["SPARSE_LM_NOTEBOOK_FAST"] = "1"
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    for n in args.names:
        run(n, out_dir=args.out, sets=args.set, timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
