"""Tokenizers: byte-level (the default: vocab 256, no special tokens) or a Hugging Face
`tokenizers` tokenizer read from a `tokenizer.json` (the file a released checkpoint ships, or one
trained locally with tools/train_tokenizer.py).

Documents arrive as UTF-8 bytes from every source. `encode_document` turns one into the tokens
the packer writes: the bytes themselves for the byte tokenizer; BOS + the text's tokens + EOS for
a tokenizer that has those special tokens (a document continued in the next row carries no second
BOS: the packer cuts tokens, not text). `decode` / `stream_decoder` turn sampled ids back into
text; generation stops at `eos_id`.

`data.tokenizer` is "bytes" or the path of a tokenizer.json (or of a directory holding one).
BOS/EOS are the special tokens named in a `tokenizer_config.json` beside the file (as
transformers writes it), else the first of the usual names the vocabulary has, else none.
"""
from __future__ import annotations

import codecs
import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from sparse_lm.data.tfds_source import DataError

BYTES = "bytes"
# Names tokenizers give their sequence delimiters (Llama, DeepSeek, GPT-2, Gemma, ours).
_BOS_NAMES = ("<s>", "<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<bos>", "<|bos|>")
_EOS_NAMES = ("</s>", "<｜end▁of▁sentence｜>", "<|end_of_text|>", "<|endoftext|>", "<eos>",
              "<|eos|>")


class TokenizerError(DataError):
    """A tokenizer cannot be used as configured; the message names the field."""


class StreamDecoder:
    """Incremental decoding of sampled ids: `step(id)` -> the text that token completes ('' while
    a character is still open); `finish()` -> what is left at the end (U+FFFD for an unfinished
    UTF-8 sequence)."""

    def __init__(self, step, finish):
        self.step, self.finish = step, finish

    def __call__(self, i: int) -> str:
        return self.step(i)


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, no special tokens, lossless on any text."""
    name = BYTES
    vocab_size = 256
    bos_id = None
    eos_id = None
    fingerprint = BYTES

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_document(self, data: bytes | np.ndarray) -> np.ndarray:
        """Document bytes [n] -> tokens [n] int32 (the bytes themselves)."""
        return np.asarray(np.frombuffer(bytes(data), np.uint8) if isinstance(data, (bytes, bytearray))
                          else data).astype(np.int32)

    def encode_documents(self, docs: Sequence) -> list[np.ndarray]:
        return [self.encode_document(d) for d in docs]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> "StreamDecoder":
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return StreamDecoder(lambda i: dec.decode(bytes([int(i)])),
                             lambda: dec.decode(b"", final=True))

    def describe(self) -> dict:
        return {"tokenizer": BYTES, "vocab_size": 256}


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` from a tokenizer.json file."""

    def __init__(self, path: str | Path, *, field: str = "data.tokenizer",
                 bos_id: int | None = None, eos_id: int | None = None):
        from tokenizers import Tokenizer    # an optional dependency: imported only when used

        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise TokenizerError(f"{field}={str(path)!r} is invalid: {p} does not exist; give "
                                 f"{BYTES!r} or the path of a tokenizer.json (train one with "
                                 f"python -m tools.train_tokenizer)")
        try:
            self.tok = Tokenizer.from_file(str(p))
        except Exception as e:             # noqa: BLE001 - the library's own parse error, named
            raise TokenizerError(f"{field}={str(path)!r} is not a readable tokenizer.json: "
                                 f"{' '.join(str(e).split())[:200]}") from None
        self.path = p.resolve()
        self.name = str(self.path)
        self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))
        named = _special_tokens_named_beside(p)
        self.bos_id = bos_id if bos_id is not None else self._special_id(named.get("bos"), _BOS_NAMES)
        self.eos_id = eos_id if eos_id is not None else self._special_id(named.get("eos"), _EOS_NAMES)
        self.fingerprint = hashlib.sha256(p.read_bytes()).hexdigest()[:16]

    def _special_id(self, named: str | None, usual: Sequence[str]) -> int | None:
        for name in ([named] if named else []) + list(usual):
            i = self.tok.token_to_id(name)
            if i is not None:
                return int(i)
        return None

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def _frame(self, ids) -> np.ndarray:
        head = [self.bos_id] if self.bos_id is not None else []
        tail = [self.eos_id] if self.eos_id is not None else []
        return np.asarray(head + list(ids) + tail, np.int32)

    def encode_document(self, data: bytes | np.ndarray) -> np.ndarray:
        """Document UTF-8 bytes -> [BOS] + tokens + [EOS] int32 (invalid UTF-8 as U+FFFD)."""
        return self._frame(self.encode(_text(data)))

    def encode_documents(self, docs: Sequence) -> list[np.ndarray]:
        """Many documents at once (the Rust tokenizer encodes the batch in parallel)."""
        encs = self.tok.encode_batch([_text(d) for d in docs], add_special_tokens=False)
        return [self._frame(e.ids) for e in encs]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def stream_decoder(self) -> "StreamDecoder":
        from tokenizers.decoders import DecodeStream   # same optional dependency as above
        stream = DecodeStream(skip_special_tokens=True)
        return StreamDecoder(lambda i: stream.step(self.tok, int(i)) or "", lambda: "")

    def describe(self) -> dict:
        return {"tokenizer": self.name, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "tokenizer_fingerprint": self.fingerprint}


def _text(data) -> str:
    b = data if isinstance(data, (bytes, bytearray)) else np.asarray(data, np.uint8).tobytes()
    return bytes(b).decode("utf-8", errors="replace")


def _special_tokens_named_beside(p: Path) -> dict:
    """{"bos": name, "eos": name} from a tokenizer_config.json next to the tokenizer.json."""
    cfg = p.with_name("tokenizer_config.json")
    if not cfg.is_file():
        return {}
    try:
        d = json.loads(cfg.read_text())
    except ValueError:
        return {}
    out = {}
    for k in ("bos", "eos"):
        v = d.get(f"{k}_token")
        if isinstance(v, dict):            # transformers' AddedToken form
            v = v.get("content")
        if isinstance(v, str):
            out[k] = v
    return out


def load_tokenizer(spec: str | None, *, field: str = "data.tokenizer", **special):
    """ByteTokenizer for "bytes" (or empty), else the HFTokenizer of a tokenizer.json path."""
    spec = str(spec or BYTES)
    if spec == BYTES:
        return ByteTokenizer()
    return HFTokenizer(spec, field=field, **special)


def check_vocab(tokenizer, model_vocab_size: int, *, field: str = "data.tokenizer") -> None:
    """TokenizerError when the tokenizer has ids the model's embedding cannot take (a model's
    vocabulary may be larger than its tokenizer's: released checkpoints pad it)."""
    if tokenizer.vocab_size > int(model_vocab_size):
        raise TokenizerError(
            f"{field}={tokenizer.name!r} has {tokenizer.vocab_size} tokens but "
            f"model.vocab_size={model_vocab_size}: set --config.model.vocab_size="
            f"{tokenizer.vocab_size} (or more), or use a tokenizer with at most "
            f"{model_vocab_size} tokens")


def train_bpe(documents, vocab_size: int, *, special_tokens: Sequence[str] = ("<s>", "</s>"),
              min_frequency: int = 2):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `documents` (UTF-8 bytes or str):
    lossless on any text (the 256 bytes are its alphabet), special tokens first (ids 0, 1, ...:
    the first is BOS, the second EOS). vocab_size counts everything: at least 256 + specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # optional dep.

    need = 256 + len(special_tokens)
    if vocab_size < need:
        raise TokenizerError(f"vocab_size={vocab_size} is invalid: a byte-level BPE needs at "
                             f"least {need} (256 bytes + {len(special_tokens)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator((d if isinstance(d, str) else _text(d) for d in documents),
                            trainer=trainer)
    return tok
