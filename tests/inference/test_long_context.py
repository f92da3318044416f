"""The cached path's cost follows what is visible (issue 24), with the same results.

Specifications checked:
  * `blocked_indexer_topk` picks exactly what `select_topk(indexer_scores(...))` over the whole
    cache picks (same indices, same order), for entry counts that are not a multiple of the
    block, chunks that straddle block edges and rows at different positions;
  * the block scorer (multiply-adds for a small decode step, the matmul form otherwise) scores
    the key block at its start as `indexer_scores` does;
  * `blocked_entries_part` equals the dense part over every visible entry (out and lse), also
    where a row sees nothing;
  * the loops run ceil(visible / block) blocks, counted by the loop itself: an early decode
    step runs fewer blocks than a late one for the same max_len;
  * chunked prefill over 2,000 tokens in chunks of 64, then decode steps, equal the full
    forward (fp32, 1e-5), with blocks small enough that every layer's loops cross many blocks;
  * the compiled prefill and decode steps hold no array with an axis of the entries' length
    other than the cache buffers [B, N, c] themselves (no [T, N] scores, no [T, H, N] logits);
  * max_context: validated in the config (against YaRN's reach), and Decoder / generate refuse
    a longer cache or prompt before any compute.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm.config import ConfigError
from sparse_lm.inference import Decoder, InferenceError, generate
from sparse_lm.model import build_model
from sparse_lm.ops import masks, visible
from sparse_lm.ops.attention import _dense_part, blocked_entries_part
from sparse_lm.ops.indexer import (FMA_TERMS, block_scorer, blocked_indexer_topk,
                                   indexer_scores, select_topk)
from tests.conftest import tiny_config


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("n, block, t", [(37, 8, 5), (50, 16, 1), (37, 8, 12)])
def test_blocked_topk_equals_whole_cache_topk(n, block, t):
    """t * 3 heads * 8 dims <= FMA_TERMS: the multiply-add scorer; t = 12: the matmul form."""
    ratio, k = 4, 6
    q, w, keys = _normal(0, (2, t, 3, 8)), _normal(1, (2, t, 3)), _normal(2, (2, n, 8))
    q_pos = jnp.asarray([[9], [4 * n - t]]) + jnp.arange(t)      # an early and a late row
    got, ran = jax.jit(lambda *a: blocked_indexer_topk(*a, ratio=ratio, k=k,
                                                               block=block))(q, w, keys, q_pos)
    want = select_topk(indexer_scores(q, w, keys, masks.entry_visible(q_pos, n, ratio),
                                      flat=True), k)
    np.testing.assert_array_equal(got, want)
    assert int(ran) == -(-min(n, (4 * n) // ratio) // block)


def test_block_scorer_reads_the_block_at_start_and_equals_indexer_scores():
    """Both scorer forms (multiply-adds on one query x 4 heads x 16; the matmul form on 8
    queries) score the key block at `start` as `indexer_scores` does, within fp32 rounding."""
    n, block, start = 40, 16, 24
    keys = _normal(2, (2, n, 16))
    rows = jax.lax.dynamic_slice_in_dim(keys, start, block, axis=1)
    for t in (1, 8):
        q, w = _normal(0, (2, t, 4, 16)), _normal(1, (2, t, 4))
        vis = jnp.ones((2, t, block), bool).at[:, :, -3:].set(False)
        scorer = jax.jit(block_scorer(q, w, keys, block))
        got = scorer(rows, vis, jnp.int32(start))
        want = indexer_scores(q, w, rows, vis)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert np.isneginf(np.asarray(got)[:, :, -3:]).all()
    assert 1 * 4 * 16 <= FMA_TERMS < 8 * 4 * 16


def test_blocked_entries_part_equals_dense_part():
    n, block, ratio = 45, 8, 8
    q, entries = _normal(3, (2, 4, 2, 16)), _normal(4, (2, n, 16))
    q_pos = jnp.asarray([[2], [200]]) + jnp.arange(4)   # row 0 sees no entry at first
    out, lse, _ = blocked_entries_part(q, entries, q_pos, ratio=ratio, scale=0.25,
                                               block=block)
    want_out, want_lse = _dense_part(q, entries, masks.entry_visible(q_pos, n, ratio), 0.25,
                                     jnp.float32, flat=True)
    np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5, rtol=0)
    assert np.isneginf(np.asarray(lse)[0, 0]).all()


def test_early_decode_step_runs_fewer_blocks_than_late():
    """Same cache (max_len 64K: 16K indexer keys, 512 HCA entries), one query at position
    1000 vs 60000: the loops' own counters."""
    max_len, block = 1 << 16, 1024
    keys = jnp.zeros((1, max_len // 4, 8))
    entries = jnp.zeros((1, max_len // 128, 16))
    q, w, qa = jnp.ones((1, 1, 2, 8)), jnp.ones((1, 1, 2)), jnp.ones((1, 1, 2, 16))
    topk = jax.jit(lambda p: blocked_indexer_topk(q, w, keys, p, ratio=4, k=8,
                                                          block=block)[1])
    hca = jax.jit(lambda p: blocked_entries_part(qa, entries, p, ratio=128, scale=1.0,
                                                         block=64)[2])
    early, late = jnp.asarray([[1000]]), jnp.asarray([[60000]])
    assert (int(topk(early)), int(topk(late))) == (1, 15)      # ceil(250/1024), ceil(15000/1024)
    assert (int(hca(early)), int(hca(late))) == (1, 8)         # ceil(7/64), ceil(468/64)


# --------------------------------------------------------------------------- through the Decoder
SEQ, CHUNK, MAX_LEN = 2000, 64, 12000


@pytest.fixture(scope="module")
def small_blocks():
    """Blocks small enough that a 2,000-token prompt crosses several (the defaults are up to
    4096 / 1024 entries); read when a step is traced."""
    mp = pytest.MonkeyPatch()
    mp.setattr(visible, "INDEXER_KEY_BLOCK", 128)
    mp.setattr(visible, "ENTRIES_BLOCK", 32)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def long_model(small_blocks):
    cfg = tiny_config(num_layers=3, layer_prefix=("swa",), layer_cycle=("csa", "hca"),
                      layer_tail=(), num_hash_layers=1, index_topk=4)
    return build_model(cfg, seed=4)


@pytest.fixture(scope="module")
def long_decoder(long_model):
    return Decoder(long_model)


def test_chunked_prefill_and_decode_equal_full_forward(long_model, long_decoder):
    """1,996 prompt tokens in chunks of 64, then 4 decode steps, in a cache of MAX_LEN tokens
    (the loops stop at what is visible, so the larger cache costs nothing)."""
    ids = np.asarray(jax.random.randint(jax.random.key(8), (1, SEQ), 0, 256), np.int32)
    full = np.asarray(nnx.jit(lambda m, i: m(i))(long_model, jnp.asarray(ids)))[0]
    dec = long_decoder
    n = SEQ - 4
    logits, cache = dec.prefill(dec.init_cache(1, MAX_LEN), [ids[0, :n]], chunk_size=CHUNK,
                                logits="all")
    np.testing.assert_allclose(np.asarray(logits[0]), full[:n], atol=1e-5, rtol=0)
    for p in range(n, SEQ):
        step, cache = dec.decode(cache, ids[:, p])
        np.testing.assert_allclose(np.asarray(step)[0], full[p], atol=1e-5, rtol=0,
                                   err_msg=f"position {p}")


def _shapes(text):
    for m in re.finditer(r"\b(?:f32|s32|pred|bf16|f16|u32|s8|u8)\[([\d,]+)\]", text):
        yield tuple(int(x) for x in m.group(1).split(","))


@pytest.mark.parametrize("t", [CHUNK, 1])
def test_compiled_steps_hold_no_chunk_by_entries_buffer(long_model, long_decoder, t):
    """MAX_LEN 12,000 (3,000 CSA entries, 1,500 HCA entries at ratios 4 / 8): every array of
    the compiled step with an axis of either length is a cache buffer [N, c] (up to axes of
    size 1): no [T, N] scores, no [T, H, N] logits, no [N] masks."""
    cfg = long_model.cfg
    dec = long_decoder
    counts = {MAX_LEN // cfg.compress_ratio_csa, MAX_LEN // cfg.compress_ratio_hca}
    widths = {cfg.head_dim, cfg.index_head_dim}
    text = dec.lower(dec.abstract_cache(1, MAX_LEN), dec.row_struct((1, t)),
                     dec.row_struct((1,))).compile().as_text()
    seen = set()
    for shape in _shapes(text):
        if counts & set(shape):
            core = tuple(x for x in shape if x != 1)
            assert len(core) == 2 and core[0] in counts and core[1] in widths, \
                f"{shape} in the compiled {t}-token step"
            seen.add(core)
    assert len(seen) >= 2          # the entries caches are there (the check looked at them)
    assert " while(" in text        # the visible-block loops


# --------------------------------------------------------------------------- max_context
def test_max_context_is_validated():
    with pytest.raises(ConfigError, match="max_context"):
        tiny_config(max_context=-1)
    reach = tiny_config().yarn_reach
    with pytest.raises(ConfigError, match="max_context.*YaRN reaches"):
        tiny_config(max_context=reach + 1)
    assert tiny_config(max_context=reach).max_context == reach
    assert tiny_config(yarn=False, max_context=10 * reach).max_context == 10 * reach


def test_longer_prompt_than_max_context_fails_before_compute(monkeypatch):
    cfg = tiny_config(num_layers=1, layer_prefix=(), layer_cycle=("swa",), layer_tail=(),
                      num_hash_layers=0, max_context=32)
    dec = Decoder(build_model(cfg, seed=0))
    monkeypatch.setattr(dec, "_step", None)       # any compute would fail on this
    with pytest.raises(InferenceError, match="max_len=33 exceeds the model's max_context=32"):
        dec.init_cache(1, 33)
    with pytest.raises(InferenceError, match="max_context=32"):
        generate(dec, [[1] * 30], max_new_tokens=3)
    cache = dec.init_cache(1, 32)
    with pytest.raises(InferenceError, match="does not fit|max_context"):
        dec.prefill(cache, [[1] * 33])
