"""Compressors equal a naive per-window loop; overlap uses [previous | current] halves; segments."""
import numpy as np
import jax.numpy as jnp
import pytest

from sparse_lm.ops.compress import compress
from sparse_lm.ops.masks import sequence_entry_visible


def naive_compress(kv, gate, ape, m, overlap):
    """Per-window loop over the formulas of spec §5 (one batch row)."""
    s, w = kv.shape
    n = s // m
    c = w // 2 if overlap else w
    out = np.zeros((n, c))
    for i in range(n):
        for ch in range(c):
            vals, logits = [], []
            if overlap:
                if i > 0:
                    for j in range(m):
                        t = m * (i - 1) + j
                        vals.append(kv[t, ch]); logits.append(gate[t, ch] + ape[j, ch])
                for j in range(m):
                    t = m * i + j
                    vals.append(kv[t, c + ch]); logits.append(gate[t, c + ch] + ape[j, c + ch])
            else:
                for j in range(m):
                    t = m * i + j
                    vals.append(kv[t, ch]); logits.append(gate[t, ch] + ape[j, ch])
            p = np.exp(np.array(logits) - max(logits))
            out[i, ch] = np.dot(p / p.sum(), vals)
    return out


@pytest.mark.parametrize("overlap,m,s", [(False, 4, 18), (True, 4, 18), (False, 8, 16), (True, 2, 9)])
def test_compress_equals_naive_window_loop(overlap, m, s):
    rng = np.random.default_rng(0)
    c = 3
    w = 2 * c if overlap else c
    kv, gate = rng.normal(size=(2, s, w)), rng.normal(size=(2, s, w))
    ape = rng.normal(size=(m, w))
    got, valid = compress(jnp.asarray(kv), jnp.asarray(gate), jnp.asarray(ape), ratio=m, overlap=overlap)
    assert got.shape == (2, s // m, c) and bool(valid.all())
    for b in range(2):
        np.testing.assert_allclose(got[b], naive_compress(kv[b], gate[b], ape, m, overlap), atol=1e-5)


def test_overlap_reads_first_half_of_previous_window_and_second_half_of_current():
    rng = np.random.default_rng(1)
    kv, gate = rng.normal(size=(1, 16, 6)), rng.normal(size=(1, 16, 6))
    ape = np.zeros((4, 6))
    base, _ = compress(jnp.asarray(kv), jnp.asarray(gate), ape, ratio=4, overlap=True)
    prev_second = kv.copy(); prev_second[0, 4:8, 3:] += 5.0   # window 1, second half
    prev_first = kv.copy(); prev_first[0, 4:8, :3] += 5.0     # window 1, first half
    a, _ = compress(jnp.asarray(prev_second), jnp.asarray(gate), ape, ratio=4, overlap=True)
    b, _ = compress(jnp.asarray(prev_first), jnp.asarray(gate), ape, ratio=4, overlap=True)
    np.testing.assert_allclose(a[0, 2], base[0, 2])      # entry 2 ignores window 1's second half
    assert np.abs(b[0, 2] - base[0, 2]).min() > 1e-3     # ... but uses its first half
    assert np.abs(a[0, 1] - base[0, 1]).min() > 1e-3     # entry 1 uses window 1's second half
    np.testing.assert_allclose(b[0, 0], base[0, 0])      # entry 0 has an empty previous window


def test_windows_straddling_documents_are_invalid_and_do_not_pool_across():
    rng = np.random.default_rng(2)
    kv, gate = rng.normal(size=(1, 16, 6)), rng.normal(size=(1, 16, 6))
    seg = jnp.asarray([[0] * 8 + [1] * 6 + [2] * 2])   # doc 1 ends mid-window 3
    out, valid = compress(jnp.asarray(kv), jnp.asarray(gate), np.zeros((4, 6)), ratio=4,
                          overlap=True, segment_ids=seg)
    assert valid.tolist() == [[True, True, True, False]]
    # Entry 2 starts document 1: its previous-window slots are empty, like entry 0 of a row.
    alone, _ = compress(jnp.asarray(kv[:, 8:12]), jnp.asarray(gate[:, 8:12]), np.zeros((4, 6)),
                        ratio=4, overlap=True)
    np.testing.assert_allclose(out[0, 2], alone[0, 0], atol=1e-6)


def test_entry_visible_at_its_last_token_and_only_in_its_document():
    valid = jnp.ones((1, 4), bool)
    vis = np.asarray(sequence_entry_visible(16, 4, valid))[0]
    for t in range(16):
        assert vis[t].tolist() == [s < (t + 1) // 4 for s in range(4)]
    seg = jnp.asarray([[0] * 8 + [1] * 8])
    vis = np.asarray(sequence_entry_visible(16, 4, valid, seg))[0]
    assert not vis[8:, :2].any() and vis[15, 2:].all()
