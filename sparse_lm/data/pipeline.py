"""Data from a config: sources, the resumable training iterator, evaluation batches, and global
arrays built from each process's shard.

`config.data` fields (see configs/train_base.py):
  source       "stdlib" | "tfds:<name>" | "synthetic:needle" | "synthetic:recall" |
               "synthetic:repeat" | "files:<glob>" | "jsonl:<path>" | "parquet:<path>" |
               "arrayrecord:<glob>" (local files: sparse_lm/data/file_sources.py)
  data_dir     tfds data directory (local path or gs://); nothing is downloaded
  text_key     tfds feature / JSONL key / parquet column holding the text
  tokenizer    "bytes" (vocab 256) or the path of a Hugging Face tokenizer.json
  prefetch     training batches packed ahead in a worker thread (0 = none)
  train_split, eval_split
  val_fraction stdlib: share of files in the validation split (by path hash)
  align        document start alignment; 0 = the model's largest compress ratio
  chunk_docs   in-memory sources: cut documents into pieces of seq_len + 1 tokens before shuffling
  synthetic_docs, synthetic_length
  synthetic_needles  synthetic:needle: needles per example (distinct keys; one is asked)
  synthetic_filler   synthetic:needle filler: "words" (random words) | "stdlib" (slices of the
                     stdlib corpus's train split, the long-context prompt's filler)
  synthetic_loss     "all" (every byte is a target) | "answers" (only the answer bytes: rows
                     carry a "target_mask" and the loss counts those bytes alone)
  seed         shuffling seed
"""
from __future__ import annotations

import jax
import numpy as np

from sparse_lm.data import grain_pipeline
from sparse_lm.data.file_sources import KINDS as FILE_KINDS, FileSource
from sparse_lm.data.packing import Packer
from sparse_lm.data.stdlib_corpus import StdlibCorpus
from sparse_lm.data.synthetic import LOSSES as SYNTHETIC_LOSSES, TASKS, SyntheticSource
from sparse_lm.data.tfds_source import DataError, TfdsSource
from sparse_lm.data.tokenizer import ByteTokenizer

SOURCES = ("stdlib", "tfds:<name>", "synthetic:needle", "synthetic:recall", "synthetic:repeat",
           "files:<glob>", "jsonl:<path>", "parquet:<path>", "arrayrecord:<glob>")


FILLERS = ("words", "stdlib")


def make_source(data_cfg, split: str):
    """The document source named by `data_cfg.source` for one split."""
    src = str(data_cfg.source)
    if src == "stdlib":
        return StdlibCorpus("train" if split == data_cfg.train_split else "validation",
                            val_fraction=float(data_cfg.val_fraction),
                            root=data_cfg.get("stdlib_root") or None)
    if src.startswith("tfds:") and len(src) > 5:
        return TfdsSource(src[5:], split, str(data_cfg.data_dir), text_key=str(data_cfg.text_key))
    if src.startswith("synthetic:"):
        task = src.split(":", 1)[1]
        if task not in TASKS:
            raise DataError(f"data.source={src!r} is invalid: synthetic tasks are {TASKS}")
        seed = int(data_cfg.seed) + (0 if split == data_cfg.train_split else 1_000_003)
        n = int(data_cfg.synthetic_docs) if split == data_cfg.train_split else max(
            64, int(data_cfg.synthetic_docs) // 50)
        needles = int(data_cfg.get("synthetic_needles", 1))
        filler = str(data_cfg.get("synthetic_filler", "words"))
        if filler not in FILLERS:
            raise DataError(f"data.synthetic_filler={filler!r} is invalid: allowed values "
                            f"{FILLERS}")
        if needles < 1 or (needles > 1 and task != "needle"):
            raise DataError(f"data.synthetic_needles={needles} is invalid: an integer >= 1, "
                            f"and 1 unless data.source='synthetic:needle'")
        if filler != "words" and task != "needle":
            raise DataError(f"data.synthetic_filler={filler!r} is invalid for {src!r}: only "
                            "synthetic:needle has filler (use 'words')")
        loss = str(data_cfg.get("synthetic_loss", "all"))
        if loss not in SYNTHETIC_LOSSES:
            raise DataError(f"data.synthetic_loss={loss!r} is invalid: allowed values "
                            f"{SYNTHETIC_LOSSES}")
        pool = stdlib_pool() if filler == "stdlib" else None
        return SyntheticSource(task, n, int(data_cfg.synthetic_length), seed=seed, pool=pool,
                               needles=needles, loss=loss)
    if src.partition(":")[0] in FILE_KINDS:
        return FileSource(src, "train" if split == data_cfg.train_split else "validation",
                          text_key=str(data_cfg.text_key), val_fraction=float(data_cfg.val_fraction))
    raise DataError(f"data.source={src!r} is invalid: allowed values {SOURCES}")


def stdlib_pool(max_bytes: int = 4_000_000) -> np.ndarray:
    """The stdlib corpus's train split, files concatenated in path order, up to max_bytes: the
    filler needles are hidden in (random slices of it)."""
    corpus = StdlibCorpus("train")
    parts, n = [], 0
    for i in range(len(corpus)):
        parts.append(np.asarray(corpus[i], np.uint8))
        n += len(parts[-1])
        if n >= max_bytes:
            break
    return np.concatenate(parts)[:max_bytes]


def resolve_align(data_cfg, model_cfg) -> int:
    """Document alignment: data.align, or 0 = the largest compress ratio of the model."""
    a = int(data_cfg.align)
    if a < 0:
        raise DataError(f"data.align={a} is invalid: must be >= 0 (0 = largest compress ratio)")
    return a or max([r for r in model_cfg.compress_ratios if r] or [1])


def describe_source(source) -> dict:
    if hasattr(source, "describe"):
        return source.describe()
    return {"documents": len(source)}


class TrainIterator:
    """Endless, shuffled, packed batches of this process's shard, read through the grain
    pipeline (sparse_lm/data/grain_pipeline.py); `state()` / `restore()` give and take the exact
    reading position (JSON-able: grain's iterator state, as of the last batch handed out)."""

    def __init__(self, source, *, seq_len: int, local_batch: int, align: int, seed: int,
                 chunk: bool, process_index: int = 0, process_count: int = 1, tokenizer=None,
                 prefetch: int = 2):
        if chunk and not hasattr(source, "lengths"):
            raise DataError("data.chunk_docs=True needs an in-memory source (stdlib, synthetic, "
                            "files, jsonl, parquet, arrayrecord); set data.chunk_docs=False for "
                            "tfds datasets")
        if prefetch < 0:
            raise DataError(f"data.prefetch={prefetch} is invalid: must be >= 0 (0 = none)")
        self.dataset = grain_pipeline.train_dataset(
            source, tokenizer or ByteTokenizer(), seq_len=seq_len, local_batch=local_batch,
            align=align, seed=seed, chunk=chunk, process_index=process_index,
            process_count=process_count, prefetch=prefetch)
        self._it = iter(self.dataset)
        self.local_batch = local_batch
        self.process_index, self.process_count = process_index, process_count
        self.batches = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        b = next(self._it)
        self.batches += 1
        return b

    def state(self) -> dict:
        return {"batches": self.batches, "process_index": self.process_index,
                "process_count": self.process_count, "grain": self._it.get_state()}

    def restore(self, state: dict) -> None:
        if int(state["process_count"]) != self.process_count:
            raise DataError(f"the checkpoint's data position was saved by {state['process_count']} "
                            f"processes, this run has {self.process_count}: the shards differ, so "
                            f"the exact position cannot be restored")
        # Checkpoints written before the grain pipeline hold the packer's position at top level.
        position = state.get("grain") or {k: state[k] for k in ("epoch", "cursor", "offset")}
        self._it.set_state(position)
        self.batches = int(state["batches"])

    def close(self) -> None:
        """Stop the prefetch thread."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def eval_batches(source, *, seq_len: int, local_batch: int, align: int, num_batches: int,
                 process_index: int = 0, process_count: int = 1,
                 tokenizer=None) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` packed batches of a split, in document order (the same every
    time). With num_batches > 0 every process returns exactly that many (a small shard wraps
    around), so multi-process evaluations stay in step; 0 = one pass over the whole split
    (single process only)."""
    if num_batches <= 0 and process_count > 1:
        raise DataError("evaluating the whole split (eval batches = 0) needs one process: the "
                        "processes' shards give different numbers of batches; set a batch count")
    docs = grain_pipeline.documents(source, tokenizer or ByteTokenizer())
    packer = Packer(docs, seq_len=seq_len, align=align, shuffle=False,
                    process_index=process_index, process_count=process_count,
                    epochs=1 if num_batches <= 0 else None)
    out = []
    while num_batches <= 0 or len(out) < num_batches:
        b = packer.next_batch(local_batch)
        if b is None:
            break
        out.append(b)
    return out


def to_global(local: dict[str, np.ndarray], sharding) -> dict:
    """Each process's rows -> global jax arrays (batch axis split over the sharding)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
