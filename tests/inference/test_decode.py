"""Cached inference reproduces the full forward pass.

Specifications checked (fp32, 1e-5):
  * chunked prefill with chunk sizes 1, 3, 4, 127, 128, 129 gives the full forward's logits at
    every position, for a batch of prompts of different lengths, on a model with every layer
    kind (SWA, CSA, HCA; hash and score routing; scanned cycle layers), across many CSA (4) and
    HCA (8) window boundaries and chunk boundaries inside windows;
  * the cache contents do not depend on how the prompt was chunked;
  * prefill followed by single-token decode steps matches the full forward, rows of different
    lengths decoding together;
  * the same at the release window / HCA ratio (128 / 128) with S = 300;
  * rows with no new tokens are left unchanged;
  * greedy generation equals repeated argmax of the full forward; sampling is reproducible;
  * a compiled decode step makes no copy or transpose as large as a layer's entries buffer
    (its work outside attention does not grow with max_len) and consumes the donated cache;
  * bad input gives errors that name the problem.

Compilation dominates the run time, so one Decoder per config serves every test (jit once per
chunk length): chunks of 1, 3 and 4 tokens run through a 4-token step and chunks of 127, 128 and
129 through a 129-token step, the shorter ones padded (`n_new` < T), as a server would bucket
chunk lengths. Decode uses the 1-token step.
"""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from sparse_lm.inference import Decoder, InferenceError, generate
from sparse_lm.model import build_model
from tests.conftest import tiny_config

# SWA (hash-routed) + a scanned (CSA, HCA) cycle x 2: every layer kind, windows 8, ratios 4 / 8.
MIX = dict(num_layers=5, layer_prefix=("swa",), layer_cycle=("csa", "hca"), layer_tail=(),
           num_hash_layers=1)
LENGTHS = (300, 261, 130)       # three prompts of different lengths in one batch
MAX_LEN = 320


def _ids(seed, b, s):
    return np.asarray(jax.random.randint(jax.random.key(seed), (b, s), 0, 256), np.int32)


@pytest.fixture(scope="module")
def mix():
    cfg = tiny_config(**MIX)
    assert cfg.layer_groups.num_cycles == 2            # per-layer slices of the scanned cycle
    model = build_model(cfg, seed=3)
    ids = _ids(5, len(LENGTHS), max(LENGTHS))
    fwd = nnx.jit(lambda m, i: m(i))
    full = np.asarray(fwd(model, jnp.asarray(ids)))
    return model, Decoder(model), ids, full, fwd


def _chunked(dec, ids, lengths, chunk, bucket, max_len=MAX_LEN):
    """Feed every row in chunks of `chunk` tokens through a `bucket`-token step."""
    b = len(lengths)
    lengths = np.asarray(lengths)
    cache = dec.init_cache(b, max_len)
    outs = np.zeros(ids.shape[:2] + (dec.cfg.vocab_size,), np.float32)
    for start in range(0, int(lengths.max()), chunk):
        n_new = np.clip(lengths - start, 0, chunk)
        tok = np.zeros((b, bucket), np.int32)
        piece = ids[:, start:start + chunk]
        tok[:, :piece.shape[1]] = piece
        logits, cache = dec.step(cache, tok, n_new, logits="all")
        logits = np.asarray(logits)
        for r in range(b):
            outs[r, start:start + n_new[r]] = logits[r, :n_new[r]]
    return outs, cache


def _assert_rows_match(got, full, lengths, atol=1e-5):
    for r, n in enumerate(lengths):
        np.testing.assert_allclose(got[r, :n], full[r, :n], atol=atol, rtol=0,
                                   err_msg=f"row {r} (length {n})")


@pytest.mark.parametrize("chunk", [1, 3, 4, 127, 128, 129])
def test_chunked_prefill_matches_full_forward(mix, chunk):
    model, dec, ids, full, _ = mix
    got, cache = _chunked(dec, ids, LENGTHS, chunk, bucket=4 if chunk <= 4 else 129)
    _assert_rows_match(got, full, LENGTHS)
    np.testing.assert_array_equal(np.asarray(cache.lengths), LENGTHS)


def test_cache_contents_do_not_depend_on_chunking(mix):
    _, dec, ids, _, _ = mix
    _, a = _chunked(dec, ids, LENGTHS, 3, bucket=4)
    _, b = _chunked(dec, ids, LENGTHS, 129, bucket=129)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)


def test_prefill_then_decode_matches_full_forward(mix):
    _, dec, ids, full, _ = mix
    prompt_lens = (37, 128, 9)          # then decode to the LENGTHS, rows finishing at different steps
    cache = dec.init_cache(3, MAX_LEN)
    logits, cache = dec.prefill(cache, [ids[r, :n] for r, n in enumerate(prompt_lens)],
                                chunk_size=4, logits="all")
    for r, n in enumerate(prompt_lens):
        np.testing.assert_allclose(np.asarray(logits[r]), full[r, :n], atol=1e-5, rtol=0)
    pos = np.asarray(prompt_lens)
    lengths = np.asarray(LENGTHS)
    while (pos < lengths).any():
        active = pos < lengths
        tok = ids[np.arange(3), np.minimum(pos, ids.shape[1] - 1)]
        step_logits, cache = dec.decode(cache, tok, active=active)
        step_logits = np.asarray(step_logits)
        for r in np.nonzero(active)[0]:
            np.testing.assert_allclose(step_logits[r], full[r, pos[r]], atol=1e-5, rtol=0,
                                       err_msg=f"row {r} position {pos[r]}")
        pos = pos + active
    np.testing.assert_array_equal(np.asarray(cache.lengths), LENGTHS)


def test_rows_without_new_tokens_are_unchanged(mix):
    _, dec, ids, _, _ = mix
    cache = dec.init_cache(3, MAX_LEN)
    _, cache = dec.prefill(cache, [ids[0, :5], ids[1, :6], ids[2, :7]], chunk_size=4,
                           logits="all")
    before = _rows(cache, [0, 2])
    _, cache = dec.decode(cache, ids[:, 7], active=[False, True, False])
    after = _rows(cache, [0, 2])
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(x, y)
    assert np.asarray(cache.lengths).tolist() == [5, 7, 7]


def _rows(cache, rows):
    """The cache's arrays restricted to some batch rows."""
    return jax.tree.map(lambda a: np.asarray(a)[rows], (cache.lengths, cache.layers))


def test_decode_step_copies_no_cache_sized_buffer(mix):
    """The 1-token step writes its rows in place: no copy/transpose instruction in the compiled
    step is as large as the smallest entries buffer (a scan over stacked caches copied every
    cache; an einsum over the cached keys transposed them), and the input cache is donated."""
    model, dec, ids, _, _ = mix
    cache = dec.init_cache(1, 4096)
    smallest = min(a.size for lc in cache.layers for cc in (lc.compressor, lc.indexer)
                   if cc is not None for a in [cc.entries])
    text = dec.lower(cache, ids[:1, :1], np.ones(1, np.int32)).compile().as_text()
    for line in text.splitlines():
        head = line.split("=", 1)[-1].strip()
        if " copy(" in line or " transpose(" in line:
            dims = [int(x) for x in head[head.index("[") + 1:head.index("]")].split(",") if x]
            assert int(np.prod(dims)) < smallest, line.strip()[:200]
    _, new = dec.decode(cache, ids[:1, 0])
    assert all(a.is_deleted() for a in jax.tree.leaves(cache.layers))
    assert np.asarray(new.lengths).tolist() == [1]


def test_release_window_and_hca_ratio():
    """Window 128, HCA ratio 128, S = 300: several HCA entries complete mid-sequence; chunks of
    127 / 128 / 129 put their boundaries just before, on and after each HCA window end."""
    cfg = tiny_config(num_layers=3, layer_prefix=(), layer_cycle=("swa", "csa", "hca"),
                      num_hash_layers=0, sliding_window=128, compress_ratio_hca=128, index_topk=8,
                      hidden_size=32, num_heads=2, head_dim=16, rope_head_dim=8, q_lora_rank=16,
                      o_groups=1, o_lora_rank=16, index_head_dim=8, index_n_heads=2, mtp_depth=0)
    model = build_model(cfg, seed=2)
    lengths = (300, 255)
    ids = _ids(7, 2, 300)
    full = np.asarray(nnx.jit(lambda m, i: m(i))(model, jnp.asarray(ids)))
    dec = Decoder(model)
    for chunk in (127, 128, 129):
        got, _ = _chunked(dec, ids, lengths, chunk, bucket=129, max_len=384)
        _assert_rows_match(got, full, lengths)
    # prefill 250 / 200 tokens, then decode across the HCA boundary at 256.
    cache = dec.init_cache(2, 384)
    _, cache = dec.prefill(cache, [ids[0, :250], ids[1, :200]], chunk_size=129, logits="all")
    pos = np.asarray([250, 200])
    for _ in range(50):
        logits, cache = dec.decode(cache, ids[np.arange(2), pos])
        logits = np.asarray(logits)
        for r in range(2):
            np.testing.assert_allclose(logits[r], full[r, pos[r]], atol=1e-5, rtol=0)
        pos = pos + 1


def test_greedy_generation_is_repeated_argmax(mix):
    model, dec, ids, _, fwd = mix
    prompts = [ids[0, :11].tolist(), ids[1, :6].tolist(), ids[2, :1].tolist()]
    streamed = []
    out = generate(dec, prompts, max_new_tokens=5, temperature=0.0, chunk_size=4,
                   max_len=MAX_LEN, on_tokens=lambda i, t: streamed.append(t.tolist()))
    assert np.asarray(streamed).T.tolist() == out
    seqs = [list(p) for p in prompts]
    for step in range(5):       # the full forward on prompt + tokens so far (same compiled shape)
        batch = np.zeros(ids.shape, np.int32)
        for r, seq in enumerate(seqs):
            batch[r, :len(seq)] = seq
        logits = np.asarray(fwd(model, jnp.asarray(batch)))
        for r, seq in enumerate(seqs):
            assert out[r][step] == int(np.argmax(logits[r, len(seq) - 1]))
            seq.append(out[r][step])


def test_sampling_is_reproducible_and_seed_dependent(mix):
    _, dec, ids, _, _ = mix
    prompts = [ids[r, :8].tolist() for r in range(3)]     # the batch shape compiled above
    kw = dict(max_new_tokens=6, temperature=1.5, top_p=0.9, chunk_size=4, max_len=MAX_LEN)
    a = generate(dec, prompts, seed=1, **kw)
    assert a == generate(dec, prompts, seed=1, **kw)
    assert generate(dec, prompts, seed=2, **kw) != a


def test_bad_input_errors(mix):
    _, dec, ids, _, _ = mix
    with pytest.raises(InferenceError, match="does not fit the cache"):
        dec.prefill(dec.init_cache(1, 16), [ids[0, :17]])
    with pytest.raises(InferenceError, match="is empty"):
        dec.prefill(dec.init_cache(2, 16), [ids[0, :3], []])
    with pytest.raises(InferenceError, match="outside"):
        dec.prefill(dec.init_cache(1, 16), [[1, 256]])
    with pytest.raises(InferenceError, match="batch"):
        dec.prefill(dec.init_cache(2, 16), [ids[0, :3]])
    for kw, field in ((dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"),
                      (dict(top_p=1.5), "top_p"), (dict(temperature=float("nan")), "temperature"),
                      (dict(max_new_tokens=0), "max_new_tokens"),
                      (dict(max_len=4), "max_len")):
        args = dict(max_new_tokens=2) | kw
        with pytest.raises(InferenceError, match=field):
            generate(dec, [[1, 2, 3]], **args)
    with pytest.raises(InferenceError, match="prompts is empty"):
        generate(dec, [], max_new_tokens=2)
    full_rows = [np.resize(ids[r], MAX_LEN) for r in range(3)]    # fill the cache exactly
    _, cache = dec.prefill(dec.init_cache(3, MAX_LEN), full_rows, chunk_size=4, logits="all")
    with pytest.raises(InferenceError, match="does not fit the cache"):
        dec.decode(cache, ids[:, 0])
