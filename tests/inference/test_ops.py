"""The cached path's pure functions against direct definitions.

* ring buffer: after any sequence of chunks (longer than the window too, rows of different
  lengths), slot i holds the newest token p with p mod W == i, and `ring_positions` says which;
* compressor tails: pooling chunk by chunk (any chunk size, boundaries inside windows) yields
  exactly the entries `ops.compress` pools from the whole sequence, and the tail state holds the
  current window (and, with overlap, the previous one) in the official slot layout;
* the cached indexer scores (flattened heads) equal the model's `indexer_scores`;
* sampling: temperature 0 is argmax; draws stay inside the top-p nucleus and follow the
  renormalised distribution; a nucleus of one token is argmax at any temperature.
"""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from sparse_lm.ops import kv_cache as ops
from sparse_lm.ops import masks
from sparse_lm.inference.decode import sample_tokens
from sparse_lm.ops.compress import add_position_bias, compress
from sparse_lm.ops.indexer import indexer_scores


def _chunks(lengths, chunk):
    """(start, n_new [B]) for feeding rows of `lengths` in chunks of `chunk` tokens."""
    lengths = np.asarray(lengths)
    return [(s, np.clip(lengths - s, 0, chunk)) for s in range(0, int(lengths.max()), chunk)]


@pytest.mark.parametrize("chunk", [1, 3, 5, 11])
def test_ring_buffer_holds_the_newest_token_of_each_slot(chunk):
    w, d = 4, 3
    lengths = [13, 7]
    rows = np.random.default_rng(0).normal(size=(2, 16, d)).astype(np.float32)
    ring = jnp.zeros((2, w, d))
    held = jnp.zeros((2,), jnp.int32)
    update = jax.jit(ops.ring_update)
    for start, n_new in _chunks(lengths, chunk):
        piece = np.zeros((2, chunk, d), np.float32)
        piece[:, :rows[:, start:start + chunk].shape[1]] = rows[:, start:start + chunk]
        ring = update(ring, jnp.asarray(piece), held, jnp.asarray(n_new))
        held = held + n_new
    pos = np.asarray(ops.ring_positions(held, w))
    for b, n in enumerate(lengths):
        for i in range(w):
            newest = max(p for p in range(n) if p % w == i)
            assert pos[b, i] == newest
            np.testing.assert_array_equal(np.asarray(ring)[b, i], rows[b, newest])
    assert (np.asarray(ops.ring_positions(jnp.asarray([0, 2]), w))[0] < 0).all()


@pytest.mark.parametrize("overlap,ratio", [(True, 4), (False, 8)])
@pytest.mark.parametrize("chunk", [1, 3, 8, 13])
def test_tail_pooling_chunk_by_chunk_equals_whole_sequence(overlap, ratio, chunk):
    b, s, c = 2, 37, 6
    w = (2 if overlap else 1) * c
    lengths = [37, 22]
    rng = np.random.default_rng(1)
    kv = rng.normal(size=(b, s, w)).astype(np.float32)
    gate = rng.normal(size=(b, s, w)).astype(np.float32)
    ape = rng.normal(size=(ratio, w)).astype(np.float32)
    slots = np.broadcast_to(np.arange(s) % ratio, (b, s))
    biased = np.asarray(add_position_bias(jnp.asarray(gate), jnp.asarray(ape), jnp.asarray(slots)))
    whole, _ = compress(jnp.asarray(kv), jnp.asarray(gate), jnp.asarray(ape), ratio=ratio,
                        overlap=overlap)
    p = (2 if overlap else 1) * ratio
    st_kv, st_gate = jnp.zeros((b, p, w)), jnp.full((b, p, w), -jnp.inf)
    entries = jnp.zeros((b, s // ratio, c))
    held = jnp.zeros((b,), jnp.int32)
    step = jax.jit(ops.tail_step, static_argnames=("ratio", "overlap"))
    for start, n_new in _chunks(lengths, chunk):
        pk = np.zeros((b, chunk, w), np.float32)
        pg = np.zeros((b, chunk, w), np.float32)
        m = kv[:, start:start + chunk].shape[1]
        pk[:, :m], pg[:, :m] = kv[:, start:start + chunk], biased[:, start:start + chunk]
        pooled, idx, complete, st_kv, st_gate = step(st_kv, st_gate, jnp.asarray(pk),
                                                     jnp.asarray(pg), held, jnp.asarray(n_new),
                                                     ratio=ratio, overlap=overlap)
        entries = ops.write_entries(entries, pooled, idx, complete)
        held = held + n_new
    for r, n in enumerate(lengths):
        k = n // ratio
        np.testing.assert_allclose(np.asarray(entries)[r, :k], np.asarray(whole)[r, :k],
                                   atol=1e-6, rtol=0)
        assert not np.asarray(entries)[r, k:].any()          # nothing past complete windows
        base, cur = k * ratio, n % ratio
        tail_kv, tail_g = np.asarray(st_kv)[r], np.asarray(st_gate)[r]
        off = ratio if overlap else 0
        np.testing.assert_array_equal(tail_kv[off:off + cur], kv[r, base:base + cur])
        np.testing.assert_array_equal(tail_g[off:off + cur], biased[r, base:base + cur])
        assert np.isneginf(tail_g[off + cur:]).all() and not tail_kv[off + cur:].any()
        if overlap:
            if k:
                np.testing.assert_array_equal(tail_kv[:ratio], kv[r, base - ratio:base])
                np.testing.assert_array_equal(tail_g[:ratio], biased[r, base - ratio:base])
            else:
                assert np.isneginf(tail_g[:ratio]).all()


def test_entry_visibility_rule():
    vis = np.asarray(masks.entry_visible(jnp.asarray([[0, 2, 3, 4, 7, 8]]), 3, 4))
    # query t sees entry s iff s < (t + 1) // 4: entry 0 from t = 3, entry 1 from t = 7.
    assert vis[0].tolist() == [[False] * 3, [False] * 3, [True, False, False],
                               [True, False, False], [True, True, False], [True, True, False]]


def test_sampling_greedy_nucleus_and_frequencies():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
    sample = jax.jit(sample_tokens)
    key = jax.random.key(0)
    greedy = np.asarray(sample(logits, key, 0.0, 1.0))
    assert (greedy == 0).all()
    one = np.asarray(sample(logits, key, 5.0, 0.2))            # nucleus = the top token only
    assert (one == 0).all()
    draws = np.asarray(sample(logits, key, 1.0, 0.7))          # nucleus {0, 1} (0.5 + 0.3 >= 0.7)
    assert set(np.unique(draws)) <= {0, 1}
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq[:2], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)
    full = np.asarray(sample(logits, key, 1.0, 1.0))
    np.testing.assert_allclose(np.bincount(full, minlength=4) / full.size,
                               [0.5, 0.3, 0.15, 0.05], atol=0.03)
    again = np.asarray(sample(logits, key, 1.0, 1.0))
    np.testing.assert_array_equal(full, again)


@pytest.mark.parametrize("t", [1, 3])
def test_cached_indexer_scores_equal_the_model_indexer_scores(t):
    rng = np.random.default_rng(5)
    b, h, d, n = 2, 3, 4, 9
    q = jnp.asarray(rng.normal(size=(b, t, h, d)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(b, t, h)).astype(np.float32))
    keys = jnp.asarray(rng.normal(size=(b, n, d)).astype(np.float32))
    visible = masks.entry_visible(jnp.asarray([[20 + j for j in range(t)], [7] * t]), n, 4)
    got = indexer_scores(q, w, keys, visible, flat=True)
    want = indexer_scores(q, w, keys, visible)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.isneginf(np.asarray(got)[1, :, 2:]).all()        # position 7: entries 0, 1 only
