"""The import graph of sparse_lm/ and kernels_pallas/: no cycles between files, no import of the
config files (`configs/`) or the entry points (`experiments/`), and every import inside a
function says why it is not at module top.

Imports are read from the AST (module level and inside functions), so an import hidden in a
function to dodge a cycle still counts. `from a.b import c` names the file a/b/c.py when it
exists, else a/b.py or a/b/__init__.py. A package's __init__.py importing files of its own
package is not a cycle (that is what an __init__ is for), so those edges are left out.
"""
from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sparse_lm", "kernels_pallas")

# Floors, bottom up: a file may import files of its own floor or below, never above. The most
# specific prefix names a file's floor.
FLOORS = {
    # 0: the math (ops, masks, kernels), the model config and presets, the data pipeline
    "kernels_pallas": 0, "sparse_lm/ops": 0, "sparse_lm/config.py": 0,
    "sparse_lm/presets.py": 0, "sparse_lm/data": 0,
    # 1: meshes, logical axis rules, sharding presets, constraints, expert parallelism (the
    #    model uses them; they know nothing of the model)
    "sparse_lm/sharding": 1,
    # 2: the model
    "sparse_lm/model": 2,
    # 3: training (steps, loop, the sharded plan), inference, checkpoint conversion, and the
    #    analytic accounting that the training metrics use
    "sparse_lm/train": 3, "sparse_lm/inference": 3, "sparse_lm/convert": 3,
    "sparse_lm/analysis/accounting.py": 3,
    # 4: ahead-of-time comparison on TPU topologies, analysis for the notebooks
    "sparse_lm/aot": 4, "sparse_lm/analysis": 4,
    # distillation: samples with inference (the Decoder) and updates with train's pieces
    "sparse_lm/distill": 4,
    # 5: the package's public face
    "sparse_lm/__init__.py": 5,
}
FORBIDDEN = ("configs", "experiments")

# Function-level imports that need no comment: optional packages that one function uses, so that
# a missing one breaks only that function and not the import of its module (plots and their
# images: matplotlib, PIL; tables: pandas; TensorBoard files: tensorboardX; TFDS corpora:
# tensorflow_datasets / tensorflow; notebook display: IPython, ipywidgets; the optional MoE
# kernel library: tokamax).
OPTIONAL_OK = {
    "matplotlib", "PIL", "pandas", "tensorboardX", "tensorflow_datasets", "tensorflow",
    "IPython", "ipywidgets", "tokamax",
}


def _files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(dotted: str) -> Path | None:
    """File of a dotted module name inside the repository, or None (a third-party module)."""
    base = ROOT.joinpath(*dotted.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imports(path: Path):
    """(dotted target, line, inside a function?, node) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out = []

    def visit(node, in_func):
        for child in ast.iter_child_nodes(node):
            f = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    out.append((a.name, child.lineno, in_func, child, None))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    up = pkg.split(".")
                    up = up[:len(up) - (child.level - 1)] if child.level > 1 else up
                    mod = ".".join(up + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                for a in child.names:
                    out.append((mod, child.lineno, in_func, child, a.name))
            visit(child, f)

    visit(tree, False)
    return out


def _targets(mod: str, name: str | None) -> list[Path]:
    if name is not None and name != "*":
        sub = _resolve(f"{mod}.{name}")
        if sub is not None:
            return [sub]
    p = _resolve(mod)
    return [p] if p is not None else []


def import_graph() -> dict[Path, set[Path]]:
    graph: dict[Path, set[Path]] = {}
    for f in _files():
        edges = graph.setdefault(f, set())
        for mod, _, _, _, name in _imports(f):
            for t in _targets(mod, name):
                if t == f:
                    continue
                if f.name == "__init__.py" and f.parent in t.parents:
                    continue        # a package's __init__ importing its own files
                edges.add(t)
    return graph


def find_cycles(graph: dict[Path, set[Path]]) -> list[list[Path]]:
    """One cycle per strongly connected component with more than one file (Tarjan)."""
    index, low, stack, on, comps = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    import sys       # the recursion depth of Tarjan's walk is the longest import chain
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 10000))
    try:
        for v in sorted(graph):
            if v not in index:
                strong(v)
    finally:
        sys.setrecursionlimit(old)
    cycles = []
    for comp in comps:
        members = set(comp)
        start = min(comp)
        # shortest path back to `start` inside the component (breadth first)
        prev, frontier, found = {start: None}, [start], None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        found = v
                        break
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path, v = [], found
        while v is not None:
            path.append(v)
            v = prev[v]
        cycles.append(list(reversed(path)) + [start])
    return cycles


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles between files:\n" + "\n".join(
        " -> ".join(_rel(p) for p in c) for c in cycles)


def test_library_does_not_import_configs_or_experiments():
    bad = [f"{_rel(f)}:{line} imports {mod}" for f in _files()
           for mod, line, _, _, _ in _imports(f) if mod.split(".")[0] in FORBIDDEN]
    assert not bad, ("sparse_lm/ and kernels_pallas/ must not import configs/ or experiments/ "
                     "(configs are read by the entry points):\n" + "\n".join(bad))


def floor_of(path: Path) -> int:
    rel = _rel(path)
    best = max((k for k in FLOORS if rel == k or rel.startswith(k + "/")), key=len, default=None)
    assert best is not None, f"{rel} has no floor: add it to FLOORS in tests/test_layering.py"
    return FLOORS[best]


def test_imports_go_down_the_floors():
    """No file imports a file of a higher floor (e.g. sharding -> model, model -> train)."""
    bad = [f"{_rel(a)} (floor {floor_of(a)}) imports {_rel(b)} (floor {floor_of(b)})"
           for a, targets in sorted(import_graph().items()) for b in sorted(targets)
           if b.suffix == ".py" and b.relative_to(ROOT).parts[0] in PACKAGES
           and floor_of(b) > floor_of(a)]
    assert not bad, "imports up the floors:\n" + "\n".join(bad)


def _has_reason(lines: list[str], lineno: int) -> bool:
    """A comment on the import's own line or on the line just above it."""
    here = lines[lineno - 1]
    above = lines[lineno - 2].strip() if lineno >= 2 else ""
    return "#" in here or above.startswith("#")


def test_function_level_imports_say_why():
    missing = []
    for f in _files():
        lines = f.read_text().splitlines()
        for mod, line, in_func, node, _ in _imports(f):
            if not in_func or mod.split(".")[0] in OPTIONAL_OK:
                continue
            if not _has_reason(lines, line):
                missing.append(f"{_rel(f)}:{line} import {mod}")
    assert not missing, ("imports inside functions need a reason comment on the same or the "
                         "previous line (or belong at module top):\n" + "\n".join(sorted(set(missing))))


def test_graph_reader_resolves_files():
    """The reader itself: `from sparse_lm.sharding import mesh` names sharding/mesh.py."""
    g = import_graph()
    presets = ROOT / "sparse_lm" / "sharding" / "presets.py"
    assert ROOT / "sparse_lm" / "sharding" / "mesh.py" in g[presets]
    assert find_cycles({Path("a"): {Path("b")}, Path("b"): {Path("a")}}) == [[Path("a"), Path("b"), Path("a")]]
