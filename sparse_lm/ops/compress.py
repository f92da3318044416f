"""Token-level compression (spec §5): gated, per-channel softmax pooling of m-token windows.

Windows sit on the global grid [m*i, m*i + m) of the (packed) row. A window is *valid* only if all
its tokens belong to one document (segment); documents aligned to multiples of m are therefore
compressed independently and a document's tail shorter than m yields no entry. With `overlap`
(CSA), entry i pools 2m slots: the first channel half of window i-1 (if it is a valid window of
the same document) and the second channel half of window i.
"""
import jax
import jax.numpy as jnp

from sparse_lm.ops.masks import entry_segments, window_validity


def add_position_bias(gate: jax.Array, ape: jax.Array, slots: jax.Array) -> jax.Array:
    """gate [B, S, w] + ape[slots] -> [B, S, w] fp32; slots [B, S] = each token's index in its
    window (row index mod m). What `compress` adds itself when given `ape`; decode caches keep
    gates in this biased form (spec §13.1)."""
    return gate.astype(jnp.float32) + jnp.take(ape.astype(jnp.float32), slots, axis=0)


def compress(kv: jax.Array, gate: jax.Array, ape: jax.Array | None, *, ratio: int, overlap: bool,
             segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Pool windows of `ratio` tokens.

    kv, gate: [B, S, w] projections (w = 2c with overlap, else c); ape: [m, w] gate bias by
    position in the window, or None when `gate` already includes it (`add_position_bias`).
    Returns entries [B, N, c] (fp32, before norm/RoPE) and valid [B, N].
    Tokens past the last complete window are ignored (they are still seen through the window).
    """
    b, s, w = kv.shape
    m = ratio
    n = s // m
    valid = window_validity(segment_ids, b, s, m)
    if n == 0:      # shorter than one window: no entry (the tokens are seen through the window)
        return jnp.zeros((b, 0, w // 2 if overlap else w), jnp.float32), valid
    kv = kv[:, : n * m].astype(jnp.float32).reshape(b, n, m, w)
    g = gate[:, : n * m].astype(jnp.float32).reshape(b, n, m, w)
    if ape is not None:
        g = g + ape.astype(jnp.float32)
    if not overlap:
        p = jax.nn.softmax(g, axis=2)
        return jnp.sum(p * kv, axis=2), valid
    c = w // 2
    # Slots 0..m-1: first channel half of the previous window; slots m..2m-1: second half of this one.
    prev_kv = jnp.pad(kv[:, :-1, :, :c], ((0, 0), (1, 0), (0, 0), (0, 0)))
    prev_g = jnp.pad(g[:, :-1, :, :c], ((0, 0), (1, 0), (0, 0), (0, 0)), constant_values=-jnp.inf)
    seg = (jnp.zeros((b, n), jnp.int32) if segment_ids is None
           else entry_segments(segment_ids, n, m))
    prev_ok = jnp.concatenate([jnp.zeros((b, 1), bool), valid[:, :-1] & (seg[:, :-1] == seg[:, 1:])],
                              axis=1)
    prev_g = jnp.where(prev_ok[:, :, None, None], prev_g, -jnp.inf)
    slots_kv = jnp.concatenate([prev_kv, kv[..., c:]], axis=2)   # [B, N, 2m, c]
    slots_g = jnp.concatenate([prev_g, g[..., c:]], axis=2)
    p = jax.nn.softmax(slots_g, axis=2)
    return jnp.sum(p * slots_kv, axis=2), valid


def entry_positions(positions: jax.Array, ratio: int) -> jax.Array:
    """[B, S] token positions -> [B, S // ratio] RoPE position of each entry (its window's first token)."""
    n = positions.shape[1] // ratio
    return positions[:, : n * ratio : ratio]
