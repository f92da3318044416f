"""The embedded default corpus: the running interpreter's standard-library sources, as bytes.

No download: every machine with Python has it. Documents are whole `.py` files (byte-level tokens,
vocab 256). The train/validation split is decided per file by a hash of its path relative to the
stdlib root, so it does not depend on which other files exist (interpreters differ between
machines). The file list is fingerprinted and recorded in every run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np

from sparse_lm.data.packing import InMemoryDocuments

SPLITS = ("train", "validation")
_SALT = b"sparse-lm/stdlib-split/v1:"
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    """Directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(root: Path) -> list[str]:
    """Sorted relative paths (POSIX separators) of every `.py` file under root, skipping
    third-party and cache directories."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for f in filenames:
            if f.endswith(".py"):
                out.append(Path(dirpath, f).relative_to(root).as_posix())
    return sorted(out)


def split_of(relpath: str, val_fraction: float) -> str:
    """'validation' for a stable pseudo-random `val_fraction` of paths, else 'train'."""
    h = int.from_bytes(hashlib.sha256(_SALT + relpath.encode()).digest()[:8], "big")
    return "validation" if h / 2.0 ** 64 < val_fraction else "train"


@dataclasses.dataclass(frozen=True)
class CorpusInfo:
    """What a run records about the corpus it trained on."""
    root: str
    python_version: str
    num_files: int
    num_bytes: int
    fingerprint: str      # sha256 over (path, size) of every file, both splits
    split_files: dict
    split_bytes: dict


class StdlibCorpus(InMemoryDocuments):
    """Random-access documents (uint8 arrays) of one split of the stdlib corpus.

    val_fraction: share of files in the validation split (by path hash). root: defaults to the
    running interpreter's stdlib (tests pass a small directory).
    """

    def __init__(self, split: str = "train", *, val_fraction: float = 0.02,
                 root: str | os.PathLike | None = None):
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is invalid: allowed values {SPLITS}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction!r} is invalid: must be in (0, 1)")
        self.root = Path(root) if root is not None else stdlib_root()
        if not self.root.is_dir():
            raise FileNotFoundError(f"stdlib corpus root {self.root} is not a directory")
        files = list_files(self.root)
        if not files:
            raise FileNotFoundError(f"no .py files under {self.root}")
        sizes = {f: (self.root / f).stat().st_size for f in files}
        splits = {f: split_of(f, val_fraction) for f in files}
        digest = hashlib.sha256()
        for f in files:
            digest.update(f"{f}\t{sizes[f]}\n".encode())
        self.split = split
        self.paths = [f for f in files if splits[f] == split]
        if not self.paths:
            raise ValueError(f"the {split} split of {self.root} is empty "
                             f"({len(files)} files, val_fraction={val_fraction})")
        super().__init__(np.frombuffer((self.root / f).read_bytes(), np.uint8) for f in self.paths)
        self.info = CorpusInfo(
            root=str(self.root), python_version=sys.version.split()[0], num_files=len(files),
            num_bytes=sum(sizes.values()), fingerprint=digest.hexdigest()[:16],
            split_files={s: sum(1 for f in files if splits[f] == s) for s in SPLITS},
            split_bytes={s: sum(sizes[f] for f in files if splits[f] == s) for s in SPLITS})

    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    def describe(self) -> dict:
        return {"source": "stdlib", "split": self.split, "documents": len(self),
                **dataclasses.asdict(self.info)}


def byte_entropies(docs, max_bytes: int | None = None) -> tuple[float, float]:
    """(unigram entropy H(X), bigram conditional entropy H(X_t | X_t-1)) in bits per byte,
    from counts over the documents (pairs never cross a document boundary).

    These are what a model that only knows byte frequencies (or the previous byte) can reach;
    a language model must go below them to have learned more than counts.
    """
    uni = np.zeros(256, np.int64)
    pairs = np.zeros(256 * 256, np.int64)
    seen = 0
    for d in docs:
        d = np.asarray(d, np.int64)
        if max_bytes is not None and seen >= max_bytes:
            break
        uni += np.bincount(d, minlength=256)
        if len(d) > 1:
            pairs += np.bincount(d[:-1] * 256 + d[1:], minlength=256 * 256)
        seen += len(d)
    p = uni[uni > 0] / uni.sum()
    h1 = float(-(p * np.log2(p)).sum())
    joint = pairs.reshape(256, 256)
    prev = joint.sum(axis=1, keepdims=True)
    nz = joint > 0
    cond = joint[nz] / np.broadcast_to(prev, joint.shape)[nz]
    h21 = float(-(joint[nz] * np.log2(cond)).sum() / joint.sum())
    return h1, h21
