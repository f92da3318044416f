"""Needle retrieval through the cached decoder: one prefilled prefix, every needle asked from it.

    logits, cache = dec.prefill(dec.init_cache(1, context), [prefix])     # the haystack, once
    rows = ask_needles(dec, cache, needles)       # [{key, value, decoded, exact, digits}, ...]

A prefix holds needles `# key XXXX = 123456` with distinct keys (`sparse_lm.data.synthetic`'s
format). For each needle the question `\\n# key XXXX = ` is prefilled onto a copy of the prefix's
cache (the decoder's steps donate the cache they are given, so the prefix's own cache must stay
untouched), then the value's digits are decoded greedily and scored: `exact` (every digit right)
and `digits` (the share of digits right, position by position). One prefill of a long prefix
thus scores several depths, which is what makes a 1M-token grid affordable on a CPU.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparse_lm.data.synthetic import needle_question
from sparse_lm.inference.cache import Cache


def question(key: str) -> np.ndarray:
    """The question of a needle: `\\n# key XXXX = ` as int32 bytes [13 for a 4-letter key]."""
    return np.frombuffer(needle_question(key.encode()), np.uint8).astype(np.int32)


def score_answer(decoded: Sequence[int], value: str) -> dict:
    """{"decoded": the decoded bytes as text, "exact": every byte equals the value's,
    "digits": share of the value's bytes matched at their position}."""
    want = value.encode("latin-1")
    got = bytes(int(t) for t in decoded)
    if len(got) != len(want):
        raise ValueError(f"decoded {len(got)} tokens for a {len(want)}-byte value {value!r}")
    right = sum(a == b for a, b in zip(got, want))
    return {"decoded": got.decode("latin-1"), "exact": right == len(want),
            "digits": right / len(want)}


def copy_cache(cache: Cache) -> Cache:
    """A fresh copy of every array of the cache (a step donates its input cache)."""
    return jax.tree.map(jnp.copy, cache)


def answer(dec, cache: Cache, key: str, n_tokens: int, *, chunk: int = 64) -> list[int]:
    """Greedy tokens [n_tokens] after the question of `key`, continued from a copy of `cache`
    (left untouched). dec: a `Decoder`; its cache must hold room for the question + n_tokens."""
    logits, c = dec.prefill(copy_cache(cache), [question(key)], chunk_size=chunk)
    out = []
    for i in range(n_tokens):
        tok = np.asarray(jnp.argmax(logits, axis=-1), np.int32)
        out.append(int(tok[0]))
        if i + 1 < n_tokens:
            logits, c = dec.decode(c, tok)
    return out


def ask_needles(dec, cache: Cache, needles: Sequence[dict]) -> list[dict]:
    """Each needle ({"key", "value", ...}) asked from the prefix `cache` and scored: the needle's
    fields with `score_answer`'s added."""
    return [{**n, **score_answer(answer(dec, cache, n["key"], len(n["value"])), n["value"])}
            for n in needles]


def summarize(rows: Sequence[dict]) -> dict:
    """{"exact": share of needles exactly right, "digits": mean share of digits right}."""
    if not rows:
        raise ValueError("summarize: no needles were asked")
    return {"exact": float(np.mean([r["exact"] for r in rows])),
            "digits": float(np.mean([r["digits"] for r in rows]))}
