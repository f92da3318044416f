"""The training input pipeline on `grain`: documents -> tokens -> packed rows -> batches, with a
checkpointable position and prefetching in a worker thread.

    documents(source, tokenizer)     grain.MapDataset of token documents (random access)
      -> PackedRows                  grain.IterDataset: sparse_lm.data.packing.Packer's rows
         (aligned to the compression grid, segment ids, this process's shard, a new shuffle
         every epoch)
      -> .batch(local_batch)         {"tokens", "segment_ids"} [local_batch, seq_len + 1] int32
                                     (+ "target_mask" bool for a source that marks its targets)
      -> ThreadPrefetchIterDataset   the next batches are packed while the step runs

`iterator.get_state()` is the packer's position (epoch, cursor, offset: JSON-able ints) as of the
last batch handed out (grain's prefetch keeps each element's state with it), and `set_state`
puts a fresh iterator exactly there: a resumed run reads bitwise the batches the interrupted one
would have.
"""
from __future__ import annotations

import grain
import numpy as np

from sparse_lm.data.packing import Chunked, InMemoryDocuments, Packer, PackerState
from sparse_lm.data.tokenizer import ByteTokenizer


def documents(source, tokenizer, *, chunk_len: int | None = None) -> grain.MapDataset:
    """Token documents (int32 arrays) of a byte-document source, as a grain MapDataset.

    chunk_len: cut every document into pieces of at most that many tokens (each its own
    document; needs an in-memory source with `lengths()`). Byte tokens are cut before the
    (identity) tokenization; other tokenizers tokenize the whole source once, in parallel, so
    that pieces are cut in tokens.
    """
    encode = _masked_encoder(source, tokenizer) or tokenizer.encode_document
    if chunk_len is None:
        return grain.MapDataset.source(source).map(encode)
    if not hasattr(source, "lengths"):
        raise ValueError("chunking needs an in-memory source (with lengths())")
    if isinstance(tokenizer, ByteTokenizer):                 # tokens are the bytes themselves
        return grain.MapDataset.source(Chunked(source, chunk_len)).map(encode)
    tokens = tokenizer.encode_documents([source[i] for i in range(len(source))])
    return grain.MapDataset.source(Chunked(InMemoryDocuments(tokens), chunk_len))


def _masked_encoder(source, tokenizer):
    """The encoder of a source whose documents are {"tokens", "target_mask"}, else None."""
    if not getattr(source, "target_masks", False):
        return None
    if not isinstance(tokenizer, ByteTokenizer):
        raise ValueError(f"{type(source).__name__} marks its target bytes (target_mask), which "
                         f"needs data.tokenizer='bytes' (one token per byte), not "
                         f"{tokenizer.describe()['tokenizer']!r}")

    def encode(doc):
        return {"tokens": tokenizer.encode_document(doc["tokens"]),
                "target_mask": np.asarray(doc["target_mask"], bool)}
    return encode


class PackedRows(grain.IterDataset):
    """Rows {"tokens", "segment_ids"[, "target_mask"]} [seq_len + 1] of `docs`, packed by
    `Packer` (the one packer: alignment, segments, per-process shard and per-epoch shuffle are
    its logic)."""

    def __init__(self, docs: grain.MapDataset, *, seq_len: int, align: int, seed: int,
                 process_index: int = 0, process_count: int = 1, shuffle: bool = True,
                 epochs: int | None = None):
        super().__init__()
        self.docs = docs
        self.packer_args = dict(seq_len=seq_len, align=align, seed=seed, shuffle=shuffle,
                                process_index=process_index, process_count=process_count,
                                epochs=epochs)
        Packer(docs, **self.packer_args)       # bad arguments fail here, not in a worker thread

    def __iter__(self) -> "PackedRowsIterator":
        return PackedRowsIterator(Packer(self.docs, **self.packer_args))


class PackedRowsIterator(grain.DatasetIterator):
    def __init__(self, packer: Packer):
        super().__init__()
        self.packer = packer

    def __next__(self) -> dict[str, np.ndarray]:
        row = self.packer.next_row()
        if row is None:
            raise StopIteration
        return row

    def get_state(self) -> dict:
        return self.packer.state.to_dict()

    def set_state(self, state: dict) -> None:
        self.packer.state = PackerState.from_dict(state)


def train_dataset(source, tokenizer, *, seq_len: int, local_batch: int, align: int, seed: int,
                  chunk: bool, process_index: int = 0, process_count: int = 1,
                  prefetch: int = 2) -> grain.IterDataset:
    """The endless training batches of this process: documents -> PackedRows -> batch ->
    prefetch (`prefetch` batches ahead in a worker thread; 0 = none)."""
    docs = documents(source, tokenizer, chunk_len=seq_len + 1 if chunk else None)
    ds = PackedRows(docs, seq_len=seq_len, align=align, seed=seed, process_index=process_index,
                    process_count=process_count).batch(local_batch, drop_remainder=True)
    if prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds
