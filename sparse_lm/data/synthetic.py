"""Synthetic long-context tasks with known answers (byte-level), to measure whether sparse
selection keeps what matters.

- needle retrieval: `# key XXXX = 123456` hidden at a chosen depth inside filler text; the
  sequence ends with the question `# key XXXX = ` and the answer `123456`.
- associative recall: a list of `key=value` pairs, then one key again; the answer is its value.
- repeat: a random string of `period` letters repeated to the end; after the first period every
  byte is a copy of the byte `period` earlier (attention must reach back past a short window).

Every example is exactly `length` bytes; `answer_mask` marks the answer bytes, which a model must
predict from the token before each of them. Generation is a pure function of (seed, index).
"""
from __future__ import annotations

import string

import numpy as np

TASKS = ("needle", "recall", "repeat")
_LETTERS = np.frombuffer(string.ascii_lowercase.encode(), np.uint8)
_DIGITS = np.frombuffer(string.digits.encode(), np.uint8)


def _rand(rng, alphabet, n) -> bytes:
    return alphabet[rng.integers(0, len(alphabet), n)].tobytes()


def _filler(rng, n: int, pool: np.ndarray | None) -> np.ndarray:
    """n bytes of filler: a random slice of `pool` (e.g. real code) or random words."""
    if n <= 0:
        return np.zeros(0, np.uint8)
    if pool is not None and len(pool) > n:
        s = int(rng.integers(0, len(pool) - n))
        return np.asarray(pool[s:s + n], np.uint8)
    words = []
    total = 0
    while total < n:
        w = _rand(rng, _LETTERS, int(rng.integers(2, 9))) + b" "
        words.append(w)
        total += len(w)
    return np.frombuffer(b"".join(words)[:n], np.uint8)


def needle_question(key: bytes) -> bytes:
    """The question that asks for the needle of `key`: a newline, `# key `, the key, ` = `."""
    return b"\n# key " + key + b" = "


def needle_text(key: bytes, value: bytes) -> bytes:
    """One needle as it sits in the filler: its question's bytes, the value, a newline."""
    return needle_question(key) + value + b"\n"


def _check_needles(task: str, needles: int) -> None:
    if needles < 1 or (needles > 1 and task != "needle"):
        raise ValueError(f"needles={needles} is invalid: >= 1, and 1 unless task='needle'")


def needle_example(rng: np.random.Generator, length: int, *, depth: float | None = None,
                   pool: np.ndarray | None = None, key_len: int = 4, value_len: int = 6,
                   needles: int = 1):
    """(tokens [length] int32, answer_mask [length] bool, needle_start) for one needle example.

    `needles` needles with distinct keys at random depths (the asked one at `depth` when given);
    the question asks for one of them, drawn uniformly, so with needles > 1 the answer needs the
    key matched, not just the last `= ` copied. needle_start: where the asked needle starts."""
    if needles < 1:
        raise ValueError(f"needles={needles} is invalid: must be an integer >= 1")
    keys: list[bytes] = []
    while len(keys) < needles:
        k = _rand(rng, _LETTERS, key_len)
        if k not in keys:
            keys.append(k)
    values = [_rand(rng, _DIGITS, value_len) for _ in keys]
    asked = int(rng.integers(0, needles)) if needles > 1 else 0
    texts = [needle_text(k, v) for k, v in zip(keys, values)]
    question = needle_question(keys[asked])
    n_fill = length - sum(len(t) for t in texts) - len(question) - value_len
    if n_fill < 0:
        raise ValueError(f"length={length} is too short for a needle example "
                         f"(needs >= {length - n_fill})")
    # (one needle: the same draws as before needles existed, so recorded examples stay put)
    depths = [depth if i == asked and depth is not None else float(rng.random())
              for i in range(needles)]
    cuts = [int(round(d * n_fill)) for d in depths]
    fill = _filler(rng, n_fill, pool)
    pieces, at, start = [], 0, 0
    for i in sorted(range(needles), key=lambda i: (cuts[i], i)):
        pieces.append(fill[at:cuts[i]])
        if i == asked:
            start = sum(len(p) for p in pieces)
        pieces.append(np.frombuffer(texts[i], np.uint8))
        at = cuts[i]
    pieces += [fill[at:], np.frombuffer(question + values[asked], np.uint8)]
    seq = np.concatenate(pieces).astype(np.int32)
    mask = np.zeros(length, bool)
    mask[length - value_len:] = True
    return seq, mask, start


def recall_example(rng: np.random.Generator, length: int, *, key_len: int = 3, value_len: int = 2):
    """(tokens [length] int32, answer_mask [length] bool, query pair index): `k=v` pairs, then
    `? k=` and the answer v. Keys are distinct."""
    pair = key_len + 1 + value_len + 1                   # "key=vv "
    tail = 2 + key_len + 1 + value_len                   # "? key=vv"
    n_pairs = (length - tail) // pair
    if n_pairs < 1:
        raise ValueError(f"length={length} is too short for associative recall")
    keys = set()
    while len(keys) < n_pairs:
        keys.add(_rand(rng, _LETTERS, key_len))
    keys = sorted(keys)
    keys = [keys[i] for i in rng.permutation(n_pairs)]
    values = [_rand(rng, _DIGITS, value_len) for _ in range(n_pairs)]
    q = int(rng.integers(0, n_pairs))
    body = b"".join(k + b"=" + v + b" " for k, v in zip(keys, values))
    pad = length - len(body) - tail
    text = b" " * pad + body + b"? " + keys[q] + b"=" + values[q]
    seq = np.frombuffer(text, np.uint8).astype(np.int32)
    mask = np.zeros(length, bool)
    mask[length - value_len:] = True
    return seq, mask, q


def repeat_example(rng: np.random.Generator, length: int, *, min_period: int = 20,
                   max_period: int = 48):
    """(tokens [length] int32, answer_mask [length] bool, period): answers = every byte after
    the first period."""
    period = int(rng.integers(min_period, max_period + 1))
    block = np.frombuffer(_rand(rng, _LETTERS, period), np.uint8)
    seq = np.resize(block, length).astype(np.int32)
    mask = np.arange(length) >= period
    return seq, mask, period


def make_examples(task: str, n: int, length: int, *, seed: int = 0,
                  pool: np.ndarray | None = None, needles: int = 1) -> dict[str, np.ndarray]:
    """n examples: {"tokens" [n, length] int32, "answer_mask" [n, length] bool}. The asked
    needle's depths are spread evenly over [0, 1] so every length tests near and far needles
    alike; `needles` per example (the needle task only)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is invalid: allowed values {TASKS}")
    _check_needles(task, needles)
    toks, masks = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, length, i])
        if task == "needle":
            t, m, _ = needle_example(rng, length, depth=(i + 0.5) / n, pool=pool,
                                     needles=needles)
        elif task == "recall":
            t, m, _ = recall_example(rng, length)
        else:
            t, m, _ = repeat_example(rng, length)
        toks.append(t)
        masks.append(m)
    return {"tokens": np.stack(toks), "answer_mask": np.stack(masks)}


LOSSES = ("all", "answers")


class SyntheticSource:
    """A document source of `num_docs` synthetic examples (for training on the tasks).

    loss="all": documents are token arrays and every byte is a target; "answers": documents are
    {"tokens", "target_mask"} with only the answer bytes as targets (`answer_mask`)."""

    def __init__(self, task: str, num_docs: int, length: int, *, seed: int = 0,
                 pool: np.ndarray | None = None, needles: int = 1, loss: str = "all"):
        if task not in TASKS:
            raise ValueError(f"task={task!r} is invalid: allowed values {TASKS}")
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} is invalid: allowed values {LOSSES}")
        _check_needles(task, needles)
        self.task, self.num_docs, self.length, self.seed, self.pool = task, num_docs, length, seed, pool
        self.needles, self.loss = needles, loss

    @property
    def target_masks(self) -> bool:
        """Whether documents carry a target mask (read by `grain_pipeline.documents`)."""
        return self.loss == "answers"

    def __len__(self) -> int:
        return self.num_docs

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [length] int32, answer_mask [length] bool) of document i."""
        rng = np.random.default_rng([self.seed, 7919, i])
        if self.task == "needle":
            return needle_example(rng, self.length, pool=self.pool, needles=self.needles)[:2]
        if self.task == "recall":
            return recall_example(rng, self.length)[:2]
        return repeat_example(rng, self.length)[:2]

    def __getitem__(self, i: int):
        tokens, answers = self.example(i)
        return {"tokens": tokens, "target_mask": answers} if self.target_masks else tokens

    def lengths(self) -> np.ndarray:
        return np.full(self.num_docs, self.length, np.int64)

    @property
    def fingerprint(self) -> str:
        extra = (f"-needles{self.needles}" if self.needles > 1 else "") + (
            f"-pool{len(self.pool)}" if self.pool is not None else "") + (
            "-answers" if self.target_masks else "")
        return f"synthetic-{self.task}-{self.num_docs}x{self.length}-seed{self.seed}{extra}"

    def describe(self) -> dict:
        return {"source": f"synthetic:{self.task}", "documents": self.num_docs,
                "length": self.length, "loss": self.loss, "fingerprint": self.fingerprint}
