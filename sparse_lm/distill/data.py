"""Prompts per domain, and the docstring/comment corpus of the recipe.

A domain's prompt source is any data source of `sparse_lm.data.pipeline` (stdlib, synthetic
tasks, files / JSONL, ...), tokenized with the run's tokenizer. Prompts are fixed-length windows
of its documents, drawn by a pure function of (seed, step, domain): a resumed run draws the same
prompts as an uninterrupted one, so the data position is the step.
"""
from __future__ import annotations

import ast
import io
import tokenize
import warnings

import numpy as np

from sparse_lm.data import pipeline
from sparse_lm.data.tfds_source import DataError


class WindowSource:
    """Fixed-length token windows of the documents of one split of a data source."""

    def __init__(self, documents: list[np.ndarray], name: str, length: int):
        self.name, self.length = name, int(length)
        self.docs = [d for d in documents if len(d) >= self.length]
        if not self.docs:
            longest = max((len(d) for d in documents), default=0)
            raise DataError(f"{name} is empty: no document has the {self.length} tokens a "
                            f"window needs ({len(documents)} documents, longest {longest})")
        sizes = np.asarray([len(d) - self.length + 1 for d in self.docs], np.float64)
        self._p = sizes / sizes.sum()       # every window start equally likely

    def windows(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """[n, length] int32 windows, uniform over all window positions of all documents."""
        docs = rng.choice(len(self.docs), size=n, p=self._p)
        out = np.empty((n, self.length), np.int32)
        for i, d in enumerate(docs):
            start = int(rng.integers(0, len(self.docs[d]) - self.length + 1))
            out[i] = self.docs[d][start:start + self.length]
        return out


def open_windows(data_cfg, source: str, split: str, tokenizer, length: int,
                 name: str) -> WindowSource:
    """WindowSource of `split` of `source` (a data.source value) with data_cfg's other fields;
    DataError naming `name` when it cannot be read or holds no window."""
    cfg = data_cfg.copy_and_resolve_references()
    cfg.source = source
    try:
        src = pipeline.make_source(cfg, split)
        docs = tokenizer.encode_documents([src[i] for i in range(len(src))])
    except DataError as e:
        raise DataError(f"{name}: {e}") from None
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise DataError(f"{name}={source!r} ({split} split) cannot be read: "
                        f"{type(e).__name__}: {e}") from None
    return WindowSource(docs, f"{name}={source!r} ({split} split)", length)


def docstrings_and_comments(source: bytes | str) -> str:
    """The docstrings (module, classes, functions) and `#` comments of Python source, in source
    order, one per paragraph; '' for source that does not parse."""
    text = source.decode("utf-8", "replace") if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():        # e.g. invalid escape sequences of old files
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return ""
    pieces = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                line = 0 if isinstance(node, ast.Module) else node.lineno
                pieces.append((line, doc))
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.COMMENT and len(tok.string) > 2:
                pieces.append((tok.start[0], tok.string))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    pieces.sort(key=lambda p: p[0])
    return "\n\n".join(p for _, p in pieces)
