"""Every notebook runs top to bottom in fast mode (SPARSE_LM_NOTEBOOK_FAST=1): any cell error
fails the test. The notebooks share one quick-model workdir (the first one trains it, four steps)
and one JAX compilation cache, so the whole file stays cheap. The committed notebooks must carry
their outputs (they are read on a code host) and stay small."""
import base64
import os
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ["routing_explorer", "sparse_attention_explorer", "efficiency", "sharding_comparison"]
MAX_BYTES = 450_000


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """Environment of the notebook kernels (they inherit the test process's)."""
    base = tmp_path_factory.mktemp("notebooks")
    env = {"SPARSE_LM_NOTEBOOK_FAST": "1", "SPARSE_LM_NOTEBOOK_WORKDIR": str(base / "quick"),
           "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(base / "jax_cache"),
           "MPLBACKEND": "Agg"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _pngs(nb) -> list[bytes]:
    return [base64.b64decode(o["data"]["image/png"]) for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if "data" in o and "image/png" in o["data"]]


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)      # in this order: the first one trains the model
def test_notebook_runs_in_fast_mode(name, kernel_env):
    from nbclient import NotebookClient
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    for c in nb.cells:                           # run from a clean slate, not the stored outputs
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    pngs = _pngs(nb)
    assert pngs, f"{name} drew no figure"
    assert all(p[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.get("output_type") == "error"]
    assert not errors


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_outputs_and_stays_small(name):
    path = ROOT / "notebooks" / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), f"{name} has cells never executed"
    assert not [o for c in code for o in c.outputs if o.get("output_type") == "error"]
    assert _pngs(nb), f"{name} was committed without its figures"
    assert path.stat().st_size < MAX_BYTES, f"{name}.ipynb is {path.stat().st_size} bytes"
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, f"{name} needs exactly one cell tagged 'parameters'"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_readme_links_the_notebook_with_its_committed_figure(name):
    """README.md links each notebook next to docs/figures/<name>.png, and that picture is the
    figure of the notebook's cell tagged 'readme-figure' as committed (run_notebooks.py writes it)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "notebooks" / "run_notebooks.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    fig = ROOT / "docs" / "figures" / f"{name}.png"
    assert fig.exists(), f"{fig} missing: python notebooks/run_notebooks.py --figures-only"
    assert fig.read_bytes() == runner.readme_figure(nb), f"{fig} is not the notebook's figure"
    assert fig.stat().st_size < 60_000
    readme = (ROOT / "README.md").read_text()
    assert f"notebooks/{name}.ipynb" in readme and f"docs/figures/{name}.png" in readme
