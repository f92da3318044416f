"""Local files as document sources, read into memory (random access, lengths known):

  files:<glob>      every matching file is one document (its bytes)
  jsonl:<path>      every line is a JSON object; data.text_key holds the document's text
  parquet:<path>    every row; column data.text_key holds the text (needs pyarrow)
  arrayrecord:<glob> every record of ArrayRecord files (through grain's ArrayRecordDataSource)
                    is one document: its bytes (UTF-8 text)

A path may be a glob (several files, read in sorted order). The train/validation split is per
document by a hash of its name (file path, or path:line / path:row), as for the stdlib corpus,
so it does not depend on which other documents exist. Documents are UTF-8 bytes; the tokenizer
turns them into tokens. Every bad input is a DataError naming the field (data.source or
data.text_key) and what was found.
"""
from __future__ import annotations

import glob as globlib
import hashlib
import json
from pathlib import Path

import numpy as np

from sparse_lm.data.packing import InMemoryDocuments
from sparse_lm.data.stdlib_corpus import SPLITS, split_of
from sparse_lm.data.tfds_source import DataError

KINDS = ("files", "jsonl", "parquet", "arrayrecord")


def _matching(kind: str, pattern: str) -> list[Path]:
    if not pattern:
        raise DataError(f"data.source={kind}: needs a path or glob after the colon, e.g. "
                        f"{kind}:/data/corpus/*.{'txt' if kind == 'files' else kind}")
    paths = sorted(Path(p) for p in globlib.glob(pattern, recursive=True) if Path(p).is_file())
    if not paths:
        raise DataError(f"data.source={kind}:{pattern} is invalid: no file matches {pattern!r}")
    return paths


def _jsonl_texts(path: Path, text_key: str):
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise DataError(f"data.source=jsonl:{path}: line {n} is not JSON ({e})") from None
            if not isinstance(obj, dict) or text_key not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise DataError(f"data.text_key={text_key!r} is not in line {n} of {path}: "
                                f"its keys are {keys}")
            text = obj[text_key]
            if not isinstance(text, str):
                raise DataError(f"data.text_key={text_key!r} in line {n} of {path} is a "
                                f"{type(text).__name__}, not a string")
            yield f"{path.as_posix()}:{n}", text.encode("utf-8")


def _parquet_texts(path: Path, text_key: str):
    import pyarrow.parquet as pq           # only parquet sources need pyarrow

    try:
        schema = pq.read_schema(path)
    except Exception as e:                 # noqa: BLE001 - pyarrow's own error, named
        raise DataError(f"data.source=parquet:{path} is not a readable parquet file: "
                        f"{' '.join(str(e).split())[:200]}") from None
    if text_key not in schema.names:
        raise DataError(f"data.text_key={text_key!r} is not a column of {path}: columns are "
                        f"{schema.names}")
    col = pq.read_table(path, columns=[text_key]).column(text_key)
    for n, text in enumerate(col.to_pylist()):
        if text is None:
            continue
        if isinstance(text, str):
            text = text.encode("utf-8")
        if not isinstance(text, bytes):
            raise DataError(f"data.text_key={text_key!r} of {path} holds "
                            f"{type(text).__name__} values, not text")
        yield f"{path.as_posix()}:{n}", text


def _arrayrecord_texts(paths: list[Path]):
    from grain.sources import ArrayRecordDataSource   # array_record is grain's dependency

    src = ArrayRecordDataSource([str(p) for p in paths])
    for n in range(len(src)):
        yield f"record:{n}", bytes(src[n])


class FileSource(InMemoryDocuments):
    """Random-access documents (uint8 arrays) of one split of local files.

    spec: "files:<glob>", "jsonl:<path>", "parquet:<path>" or "arrayrecord:<glob>".
    """

    def __init__(self, spec: str, split: str = "train", *, text_key: str = "text",
                 val_fraction: float = 0.02):
        kind, _, pattern = spec.partition(":")
        if kind not in KINDS:
            raise DataError(f"data.source={spec!r} is invalid: file kinds are {KINDS}")
        if split not in SPLITS:
            raise DataError(f"split {split!r} is invalid for data.source={spec!r}: allowed "
                            f"values {SPLITS}")
        paths = _matching(kind, pattern)
        if kind == "files":
            items = ((p.as_posix(), p.read_bytes()) for p in paths)
        elif kind == "jsonl":
            items = (it for p in paths for it in _jsonl_texts(p, text_key))
        elif kind == "parquet":
            items = (it for p in paths for it in _parquet_texts(p, text_key))
        else:
            items = _arrayrecord_texts(paths)
        digest = hashlib.sha256()
        names, docs, total = [], [], 0
        for name, data in items:
            digest.update(f"{name}\t{len(data)}\n".encode())
            total += 1
            if split_of(name, val_fraction) == split:
                names.append(name)
                docs.append(np.frombuffer(data, np.uint8))
        if total == 0:
            raise DataError(f"data.source={spec!r} is empty: {len(paths)} file(s), no document")
        super().__init__(docs)
        self.spec, self.split, self.names = spec, split, names
        self.num_documents_all_splits = total
        self.fingerprint = digest.hexdigest()[:16]
        self.files = [p.as_posix() for p in paths]

    def describe(self) -> dict:
        return {"source": self.spec, "split": self.split, "documents": len(self),
                "documents_all_splits": self.num_documents_all_splits,
                "bytes": int(self.lengths().sum()), "files": len(self.files),
                "fingerprint": self.fingerprint}
