"""Packing documents into fixed-length rows with segment ids, deterministically and resumably.

A row holds `seq_len + 1` tokens: the model reads tokens[:seq_len] and predicts tokens[1:]
(and, for MTP, tokens[2:]). Documents are written one after another; each starts at a position
that is a multiple of `align` (pass the largest compress ratio so every document is compressed on
its own grid: compression windows never straddle two documents). The gap before an aligned start
is padding: token 0, segment id 0, never a target. Segment ids of documents count from 1 within a
row. A document longer than the space left continues in the next row as a new segment.

A document is a 1-D token array, or {"tokens", "target_mask"} (both [n]) for a source that says
which of its tokens are trained on (the synthetic tasks' answers: `data.synthetic_loss="answers"`).
Rows of such a source carry "target_mask" [seq_len + 1] bool too: token t is a target only where
it is set (padding: never); every document of the source must then be of that form.

The whole reading position is `PackerState` (epoch, cursor into the epoch's document order,
offset inside the current document): three integers that a checkpoint stores, so a resumed run
produces exactly the batches the interrupted one would have.

Each process reads only its own documents (index = process_index mod process_count) and packs
its own rows: the per-process shard of the global batch.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import jax.numpy as jnp
import numpy as np


class DocumentSource(Protocol):
    """Random-access documents as 1-D integer arrays (byte tokens for the built-in sources), or
    {"tokens", "target_mask"} dicts of two [n] arrays."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> np.ndarray: ...


class InMemoryDocuments:
    """Documents held in memory (a list of 1-D arrays): random access, lengths known, so they
    can be `Chunked`. The in-memory sources (stdlib, local files, tokenized documents) are it."""

    def __init__(self, docs):
        self._docs = list(docs)

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, i: int) -> np.ndarray:
        return self._docs[i]

    def lengths(self) -> np.ndarray:
        return np.asarray([len(d) for d in self._docs], np.int64)


class Chunked:
    """View of an in-memory source with every document cut into pieces of at most `max_len`
    tokens, each piece its own document. Shuffling pieces (rather than whole files) keeps one
    long file from filling many consecutive rows of a batch."""

    def __init__(self, source, max_len: int):
        if max_len < 2:
            raise ValueError(f"max_len={max_len} is invalid: must be >= 2")
        lengths = np.asarray(source.lengths(), np.int64)
        n_pieces = np.maximum(1, -(-lengths // max_len))
        self.doc = np.repeat(np.arange(len(lengths)), n_pieces)
        first = np.cumsum(n_pieces) - n_pieces
        self.start = (np.arange(len(self.doc)) - first[self.doc]) * max_len
        self.source, self.max_len = source, max_len

    def __len__(self) -> int:
        return len(self.doc)

    def __getitem__(self, i: int) -> np.ndarray:
        cut = slice(int(self.start[i]), int(self.start[i]) + self.max_len)
        doc = self.source[int(self.doc[i])]
        if isinstance(doc, dict):
            return {k: v[cut] for k, v in doc.items()}
        return doc[cut]


@dataclasses.dataclass
class PackerState:
    epoch: int = 0
    cursor: int = 0     # position in the epoch's (shuffled) order of this process's documents
    offset: int = 0     # tokens of the current document already written

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d) -> "PackerState":
        return cls(**{k: int(d[k]) for k in ("epoch", "cursor", "offset")})


class Packer:
    """Packs this process's documents of `source` into rows of `seq_len + 1` tokens.

    shuffle: a new permutation of the documents every epoch (seeded by seed, epoch and process);
    without it documents come in index order and `epochs` bounds the pass (validation).
    """

    def __init__(self, source: DocumentSource, *, seq_len: int, align: int = 1, seed: int = 0,
                 shuffle: bool = True, process_index: int = 0, process_count: int = 1,
                 epochs: int | None = None):
        if seq_len < 1 or align < 1 or seq_len % align:
            raise ValueError(f"seq_len={seq_len} must be a positive multiple of align={align}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        self.docs = np.arange(process_index, len(source), process_count)
        if len(self.docs) == 0:
            raise ValueError(f"process {process_index} of {process_count} has no documents "
                             f"(the source has {len(source)})")
        self.source, self.seq_len, self.align = source, seq_len, align
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        self.process_index = process_index
        self.state = PackerState()
        self._order_epoch, self._order = None, None
        self.masked = isinstance(source[int(self.docs[0])], dict)

    def _order_for(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch, self.process_index])
                self._order = self.docs[rng.permutation(len(self.docs))]
            else:
                self._order = self.docs
            self._order_epoch = epoch
        return self._order

    def exhausted(self) -> bool:
        return self.epochs is not None and self.state.epoch >= self.epochs

    def _document(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        doc = self.source[i]
        if isinstance(doc, dict) != self.masked:
            raise ValueError(f"document {i} is {'a dict' if isinstance(doc, dict) else 'an array'}"
                             f" but the source's first is not: a source gives every document "
                             f"with a target_mask or none")
        if not self.masked:
            return np.asarray(doc), None
        toks, mask = np.asarray(doc["tokens"]), np.asarray(doc["target_mask"], bool)
        if mask.shape != toks.shape:
            raise ValueError(f"document {i}: target_mask {mask.shape} does not match tokens "
                             f"{toks.shape}")
        return toks, mask

    def _next_piece(self, space: int):
        """(up to `space` tokens of the current document, their target mask or None); advances
        the state. None at the end."""
        st = self.state
        while True:
            if self.exhausted():
                return None
            order = self._order_for(st.epoch)
            if st.cursor >= len(order):
                st.epoch, st.cursor, st.offset = st.epoch + 1, 0, 0
                continue
            doc, mask = self._document(int(order[st.cursor]))
            if st.offset >= len(doc):          # empty document (or fully consumed)
                st.cursor, st.offset = st.cursor + 1, 0
                continue
            cut = slice(st.offset, st.offset + space)
            piece = doc[cut]
            if st.offset + len(piece) >= len(doc):
                st.cursor, st.offset = st.cursor + 1, 0
            else:
                st.offset += len(piece)
            return piece, None if mask is None else mask[cut]

    def _empty_row(self) -> dict[str, np.ndarray]:
        n = self.seq_len + 1
        row = {"tokens": np.zeros(n, np.int32), "segment_ids": np.zeros(n, np.int32)}
        if self.masked:
            row["target_mask"] = np.zeros(n, bool)
        return row

    def next_row(self) -> dict[str, np.ndarray] | None:
        """{"tokens", "segment_ids"} [seq_len + 1] int32 (+ "target_mask" bool for a masked
        source), or None when a bounded pass is over (a partly filled last row is still
        returned)."""
        row = self._empty_row()
        pos, seg = 0, 0
        while pos < self.seq_len:       # documents start at aligned positions < seq_len
            got = self._next_piece(self.seq_len + 1 - pos)
            if got is None:
                break
            piece, mask = got
            seg += 1
            end = pos + len(piece)
            row["tokens"][pos:end] = piece
            row["segment_ids"][pos:end] = seg
            if mask is not None:
                row["target_mask"][pos:end] = mask
            pos = -(-end // self.align) * self.align
        if seg == 0:
            return None
        return row

    def next_batch(self, rows: int) -> dict[str, np.ndarray] | None:
        """The rows of `next_row` stacked: [rows, seq_len + 1] each. A bounded pass pads its last
        batch with empty rows (segment 0: no targets); None once nothing is left."""
        out = []
        for _ in range(rows):
            r = self.next_row()
            if r is None:
                break
            out.append(r)
        if not out:
            return None
        out += [self._empty_row() for _ in range(rows - len(out))]
        return {k: np.stack([r[k] for r in out]) for k in out[0]}


def targets_and_masks(tokens, segment_ids, offset: int, target_mask=None):
    """Targets `offset` tokens ahead and where they count, for rows of seq_len + 1 tokens.

    tokens, segment_ids [B, S+1] -> (targets [B, S], mask [B, S] bool): position t predicts
    token t+offset iff both are in the same (non-padding) document and, given target_mask
    [B, S+1] bool, token t+offset is marked a target. numpy or jax arrays in, jax arrays out.
    """
    if offset < 1:
        raise ValueError(f"offset={offset} is invalid: must be >= 1")
    s = tokens.shape[1] - 1
    pad = ((0, 0), (0, offset - 1))
    tgt = jnp.pad(jnp.asarray(tokens)[:, offset:], pad)
    seg_t = jnp.pad(jnp.asarray(segment_ids)[:, offset:], pad)    # padding segment 0: masked
    seg_in = jnp.asarray(segment_ids)[:, :s]
    mask = (seg_in > 0) & (seg_t == seg_in)
    if target_mask is not None:
        mask = mask & jnp.pad(jnp.asarray(target_mask, bool)[:, offset:], pad)
    return tgt, mask


def batch_targets(batch, offset: int):
    """`targets_and_masks` of a packed batch {"tokens", "segment_ids"[, "target_mask"]}."""
    return targets_and_masks(batch["tokens"], batch["segment_ids"], offset,
                             batch.get("target_mask"))


def packing_efficiency(batch: dict[str, np.ndarray]) -> float:
    """Share of input positions that belong to a document (not alignment padding)."""
    s = batch["tokens"].shape[1] - 1
    return float(np.mean(batch["segment_ids"][:, :s] > 0))


def describe_rows(batch: dict[str, np.ndarray]) -> Sequence[int]:
    """Number of segments per row (diagnostics)."""
    return [int(r.max()) for r in batch["segment_ids"]]
