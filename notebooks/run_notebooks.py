"""Execute the notebooks in place, keeping their outputs (what is committed).

    python notebooks/run_notebooks.py                       # all four, full mode
    python notebooks/run_notebooks.py routing_explorer --set 'WORKDIR="runs/demo"'
    python notebooks/run_notebooks.py --fast --out /tmp/nb  # CI's quick pass, copies elsewhere

--set NAME=EXPR adds a cell after the cell tagged "parameters" (papermill style). After running,
consecutive stream outputs are merged and carriage returns applied (a progress bar keeps only its
final line), as a notebook front end would show them, so the files stay small.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
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
    print(f"{name}: {time.perf_counter() - t0:.0f} s, {dest.stat().st_size / 1e3:.0f} KB -> {dest}",
          flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", default=NOTEBOOKS, help=f"notebooks (default: {NOTEBOOKS})")
    ap.add_argument("--fast", action="store_true", help="set SPARSE_LM_NOTEBOOK_FAST=1")
    ap.add_argument("--out", type=Path, default=None, help="write here instead of in place")
    ap.add_argument("--set", action="append", default=[], help="NAME=EXPR parameter override")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in NOTEBOOKS]
    if unknown:
        ap.error(f"unknown notebook(s) {unknown}: allowed values {NOTEBOOKS}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.fast:
        os.environ["SPARSE_LM_NOTEBOOK_FAST"] = "1"
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    for n in args.names:
        run(n, out_dir=args.out, sets=args.set, timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
