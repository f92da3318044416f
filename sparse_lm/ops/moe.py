"""DeepSeekMoE routing and expert computation (spec §8), dropless.

Router math is fp32. Selection uses `affinity + bias` (score layers) or a fixed token->experts
table (hash layers); the combine weights always come from the unbiased affinities, normalised over
the chosen experts and multiplied by the route scale.

The routed-expert product has one registry (`EXPERTS`, a `kernels_pallas.registry.Op`) in the
one vocabulary: "reference" (`lax.ragged_dot`: `experts_dropless`), "xla" (padded row blocks:
`experts_blocked`, the fast form on XLA:CPU), "pallas_tpu" / "pallas_gpu" (the grouped-matmul
kernels: `experts_grouped`), "tokamax" (the optional package's grouped matmul); None = the
target platform's preference (the platform's kernel on TPU / GPU, "xla" on CPU). Old names
are aliases with one deprecation note: "ragged_dot" -> "reference", "blocked" -> "xla",
"grouped" -> the grouped-matmul registry's choice ("pallas_<target>" on TPU / GPU, "reference"
on CPU), "pallas" -> "pallas_<target>" ("pallas_tpu" interpreted on CPU).
"""
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import registry
from kernels_pallas.grouped_matmul import grouped_matmul


def affinities(u: jax.Array, gate_w: jax.Array) -> jax.Array:
    """u [T, d], gate_w [d, E] -> sqrt(softplus(u @ gate_w)) [T, E] fp32 (>= 0)."""
    logits = u.astype(jnp.float32) @ gate_w.astype(jnp.float32)
    return jnp.sqrt(jax.nn.softplus(logits))


def select_by_score(scores: jax.Array, bias: jax.Array, k: int) -> jax.Array:
    """[T, E] affinities + [E] bias -> [T, k] int32 expert ids (bias only affects the choice)."""
    _, idx = jax.lax.top_k(scores + bias.astype(jnp.float32), k)
    return idx.astype(jnp.int32)


def select_by_hash(token_ids: jax.Array, table: jax.Array) -> jax.Array:
    """token_ids [T] int, table [vocab, k] -> [T, k] int32: routing by token id alone."""
    return table[token_ids].astype(jnp.int32)


def combine_weights(scores: jax.Array, idx: jax.Array, route_scale: float) -> jax.Array:
    """[T, E] affinities, [T, k] chosen ids -> [T, k] weights s/sum(s) * route_scale."""
    chosen = jnp.take_along_axis(scores, idx, axis=-1)
    return chosen / (jnp.sum(chosen, axis=-1, keepdims=True) + 1e-20) * route_scale


def swiglu(h_gate: jax.Array, h_up: jax.Array, limit: float) -> jax.Array:
    """silu(min(gate, limit)) * clip(up, -limit, limit), in fp32 (the clamp is asymmetric)."""
    g = jnp.minimum(h_gate.astype(jnp.float32), limit)
    up = jnp.clip(h_up.astype(jnp.float32), -limit, limit)
    return jax.nn.silu(g) * up


def ffn(u, w_gate, w_up, w_down, limit: float):
    """Dense SwiGLU expert (the shared expert). u [T, d]; w_gate/w_up [d, I]; w_down [I, d]."""
    dt = u.dtype
    h = swiglu(u @ w_gate.astype(dt), u @ w_up.astype(dt), limit)
    return h.astype(dt) @ w_down.astype(dt)


def experts_gathered(u, idx, weights, w_gate, w_up, w_down, limit: float):
    """Routed experts for a few assignments (decode): each assignment gathers its expert's three
    matrices and multiplies by them; the k results of a token are summed in fp32.

    Reads only the chosen experts' weights (T*k matrices of each kind), with no sort and no
    grouped matmul. `lax.ragged_dot` has no grouped kernel on XLA:CPU: it masks the rows into
    every group and contracts over (d, E), which makes XLA transpose the whole [E, d, I] weights
    into [d, E, I] on every call (for one decoded token that transpose was most of the step).
    `experts_dropless` uses this form whenever T*k <= E. Same math as `experts_dropless`.

    u [T, d]; idx, weights [T, k]; w_gate/w_up [E, d, I]; w_down [E, I, d] -> [T, d] (u's dtype).
    """
    t, k = idx.shape
    dt = u.dtype
    flat = idx.reshape(-1)
    x = jnp.repeat(u, k, axis=0)                                   # [T*k, d], token-major
    h = swiglu(jnp.einsum("nd,ndi->ni", x, w_gate[flat].astype(dt)),
               jnp.einsum("nd,ndi->ni", x, w_up[flat].astype(dt)), limit)
    h = h * weights.reshape(-1)[:, None].astype(jnp.float32)
    y = jnp.einsum("ni,nid->nd", h.astype(dt), w_down[flat].astype(dt))
    return jnp.sum(y.astype(jnp.float32).reshape(t, k, -1), axis=1).astype(dt)


def experts_dropless(u, idx, weights, w_gate, w_up, w_down, limit: float):
    """Routed experts without capacity limits: sort assignments by expert, grouped matmuls
    (`lax.ragged_dot`), weight, scatter-add back. With at most E assignments (T*k <= E: a
    decode step) it is `experts_gathered` instead, which reads only the chosen experts.

    u [T, d]; idx, weights [T, k]; w_gate/w_up [E, d, I]; w_down [E, I, d] -> [T, d] (u's dtype).
    """
    t, k = idx.shape
    e = w_gate.shape[0]
    if t * k <= e:
        return experts_gathered(u, idx, weights, w_gate, w_up, w_down, limit)
    dt = u.dtype
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token_of = order // k
    group_sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    x = u[token_of]
    h = swiglu(jax.lax.ragged_dot(x, w_gate.astype(dt), group_sizes),
               jax.lax.ragged_dot(x, w_up.astype(dt), group_sizes), limit)
    h = h * weights.reshape(-1)[order][:, None].astype(jnp.float32)
    y = jax.lax.ragged_dot(h.astype(dt), w_down.astype(dt), group_sizes)
    return jnp.zeros((t, u.shape[-1]), jnp.float32).at[token_of].add(y.astype(jnp.float32)).astype(dt)


def experts_blocked(u, idx, weights, w_gate, w_up, w_down, limit: float, block: int = 128):
    """Routed experts without capacity limits, as batched matmuls over fixed-size row blocks.

    Assignments are sorted by expert and each expert's rows are padded to a multiple of `block`;
    every block then multiplies by its expert's matrices (gathered per block). The number of
    blocks is static (ceil(T*k/block) + E), so the padding costs at most E blocks. Same result
    as `experts_dropless`; on XLA:CPU it is several times faster than `lax.ragged_dot`.

    u [T, d]; idx, weights [T, k]; w_gate/w_up [E, d, I]; w_down [E, I, d] -> [T, d] (u's dtype).
    """
    t, k = idx.shape
    e = w_gate.shape[0]
    dt = u.dtype
    n = t * k
    nb = -(-n // block) + e
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    expert_sorted = flat[order]
    sizes = jnp.bincount(flat, length=e)
    padded = -(-sizes // block) * block
    start = jnp.cumsum(sizes) - sizes
    padded_end = jnp.cumsum(padded)
    dest = (padded_end - padded)[expert_sorted] + jnp.arange(n) - start[expert_sorted]
    token_of = order // k
    src = jnp.full((nb * block,), t, jnp.int32).at[dest].set(token_of.astype(jnp.int32))
    x = jnp.concatenate([u, jnp.zeros((1, u.shape[1]), dt)])[src].reshape(nb, block, -1)
    block_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(nb) * block, side="right"),
                               e - 1)
    h = swiglu(jnp.einsum("bcd,bdi->bci", x, w_gate.astype(dt)[block_expert]),
               jnp.einsum("bcd,bdi->bci", x, w_up.astype(dt)[block_expert]), limit)
    y = jnp.einsum("bci,bid->bcd", h.astype(dt), w_down.astype(dt)[block_expert])
    y = y.reshape(nb * block, -1)[dest].astype(jnp.float32)
    y = y * weights.reshape(-1)[order][:, None].astype(jnp.float32)
    return jnp.zeros((t, u.shape[-1]), jnp.float32).at[token_of].add(y).astype(dt)


def experts_grouped(u, idx, weights, w_gate, w_up, w_down, limit: float,
                    implementation: str | None = None, interpret: bool | None = None):
    """`experts_dropless` with its three grouped matmuls taken from the kernel registry
    (`kernels_pallas.grouped_matmul`): implementation None = the target platform's choice
    (Pallas kernel on TPU/GPU, `lax.ragged_dot` on CPU), or "reference" / "pallas_tpu" /
    "pallas_gpu" / "tokamax". Same shapes and result as `experts_dropless`; differentiable (the
    Pallas kernels carry their own backward grouped matmuls).
    """
    t, k = idx.shape
    e = w_gate.shape[0]
    dt = u.dtype
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token_of = order // k
    group_sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    x = u[token_of]

    def gmm(a, w):
        return grouped_matmul(a, w.astype(dt), group_sizes, implementation=implementation,
                              interpret=interpret, preferred_element_type=jnp.float32)

    h = swiglu(gmm(x, w_gate), gmm(x, w_up), limit)
    h = h * weights.reshape(-1)[order][:, None].astype(jnp.float32)
    y = gmm(h.astype(dt), w_down)
    return jnp.zeros((t, u.shape[-1]), jnp.float32).at[token_of].add(y).astype(dt)


def _grouped(implementation):
    def experts(u, idx, weights, w_gate, w_up, w_down, limit: float, interpret=None):
        return experts_grouped(u, idx, weights, w_gate, w_up, w_down, limit,
                               implementation=implementation, interpret=interpret)
    return experts


def _grouped_choice(platform: str) -> str:
    """What the old "grouped" meant: the grouped-matmul registry's choice for the target."""
    return registry.PALLAS.get(platform, "reference")


EXPERTS = registry.Op(
    "moe_experts",
    [registry.Implementation("reference", experts_dropless),
     registry.Implementation("xla", experts_blocked),
     registry.Implementation("pallas_tpu", _grouped("pallas_tpu"), platforms=("tpu",),
                             interpretable=True),
     registry.Implementation("pallas_gpu", _grouped("pallas_gpu"), platforms=("gpu",),
                             interpretable=True),
     registry.Implementation("tokamax", _grouped("tokamax"))],
    preference={"cpu": ("xla",), "tpu": ("pallas_tpu", "xla"), "gpu": ("pallas_gpu", "xla")},
    aliases={"ragged_dot": "reference", "blocked": "xla", "grouped": _grouped_choice,
             "pallas": registry.pallas_for})


class _ExpertImplementations(Mapping):
    """name -> experts(u, idx, weights, w_gate, w_up, w_down, limit) through `EXPERTS`; the
    keys are the vocabulary (None = the target platform's preference), old names are read as
    aliases (resolved, with their deprecation note, when the experts run: at trace time, on
    the target platform of the compile)."""

    def __getitem__(self, name):
        if name is not None and name not in EXPERTS.names and name not in EXPERTS.aliases:
            raise KeyError(name)

        def experts(u, idx, weights, w_gate, w_up, w_down, limit: float):
            return EXPERTS(u, idx, weights, w_gate, w_up, w_down, limit, implementation=name)
        return experts

    def __iter__(self):
        return iter((None,) + EXPERTS.names)

    def __len__(self):
        return len(EXPERTS.names) + 1


EXPERT_IMPLEMENTATIONS = _ExpertImplementations()


def experts_dense_reference(u, idx, weights, w_gate, w_up, w_down, limit: float):
    """Every expert on every token, combined by a [T, E] weight matrix. Obviously correct, O(E)."""
    e = w_gate.shape[0]
    comb = jnp.sum(jax.nn.one_hot(idx, e, dtype=jnp.float32) * weights[..., None], axis=1)  # [T, E]
    h = swiglu(jnp.einsum("td,edi->tei", u, w_gate), jnp.einsum("td,edi->tei", u, w_up), limit)
    y = jnp.einsum("tei,eid->ted", h * comb[..., None], w_down.astype(jnp.float32))
    return jnp.sum(y, axis=1).astype(u.dtype)


def expert_counts(idx: jax.Array, num_experts: int, kept: jax.Array | None = None) -> jax.Array:
    """[..., k] expert ids -> [E] float32 number of assignments per expert (only those where
    `kept` [..., k] bool is set, if given)."""
    w = None if kept is None else kept.reshape(-1).astype(jnp.float32)
    return jnp.bincount(idx.reshape(-1), weights=w, length=num_experts).astype(jnp.float32)


def sequence_balance_loss(scores: jax.Array, idx: jax.Array, k: int) -> jax.Array:
    """Sequence-wise balance loss sum_i f_i P_i, averaged over sequences (spec §8.7, without alpha).

    scores [B, S, E] affinities; idx [B, S, k]. f_i = E/(k S) #{t: i chosen}, P_i = mean_t s_i/sum_j s_j.
    """
    b, s, e = scores.shape
    f = jnp.sum(jax.nn.one_hot(idx, e, dtype=jnp.float32), axis=(1, 2)) * (e / (k * s))  # [B, E]
    p = jnp.mean(scores / (jnp.sum(scores, axis=-1, keepdims=True) + 1e-20), axis=1)     # [B, E]
    return jnp.mean(jnp.sum(jax.lax.stop_gradient(f) * p, axis=-1))


def balanced_hash_table(vocab: int, num_experts: int, k: int, seed: int = 0):
    """[vocab, k] int32 table of k distinct experts per token, every expert used equally often
    (up to one). A from-scratch training choice (spec §8.9); released checkpoints ship their own.
    """
    rng = np.random.default_rng(seed)
    experts = rng.permutation(num_experts)
    slots = np.arange(vocab)[:, None] * k + np.arange(k)[None, :]     # consecutive, wrapping
    table = experts[slots % num_experts]
    return table[rng.permutation(vocab)].astype(np.int32)


# ------------------------------------------------------------------ alternative routers (ablation)
# `ModelConfig.moe_router` (one of `config.MOE_ROUTERS`) picks how score-routed layers choose
# experts; hash layers are unchanged.
#   "v4"            sqrt-softplus affinities, aux-loss-free bias, sequence-wise balance loss
#                   (the functions above; the default).
#   "capacity"      v4 affinities, plain top-k (no bias), a per-expert capacity that adapts to the
#                   batch (`batch_capacity`), overflow dropped (`capacity_keep`), and a loss on the
#                   variance of expert utilisation (`utilisation_variance_loss`).
#   "top2_softmax"  Mixtral: softmax over the experts, top-2, weights renormalised over the two;
#                   the Switch load-balancing loss (`switch_balance_loss`).


def batch_capacity(counts: jax.Array, factor_range: tuple[float, float]) -> jax.Array:
    """The per-expert capacity of one batch (the same for every expert), from its routing
    histogram counts [E] (assignments per expert before any drop, summing to T*k):

        mean = T*k / E,  cv = std(counts) / mean  (population std),
        factor = clip(1 + cv, f_min, f_max),  capacity = ceil(factor * mean)

    A balanced batch gets buffers near the mean load, an unbalanced one larger buffers, never
    outside [f_min, f_max] times the mean. -> int32 scalar. The ceil has a 1e-4 slack so that
    fp32 rounding of an integral product does not add a slot."""
    counts = counts.astype(jnp.float32)
    mean = jnp.mean(counts)
    cv = jnp.std(counts) / jnp.maximum(mean, 1e-20)
    factor = jnp.clip(1.0 + cv, factor_range[0], factor_range[1])
    return jnp.ceil(factor * mean - 1e-4).astype(jnp.int32)


def capacity_keep(idx: jax.Array, capacity: jax.Array, num_experts: int) -> jax.Array:
    """[T, k] expert ids, a capacity (int scalar) -> [T, k] bool: an assignment is kept iff fewer
    than `capacity` earlier assignments went to its expert, in token-major order (token t's slots
    before token t+1's; the Switch convention: earlier tokens win)."""
    flat = idx.reshape(-1)
    hot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)           # [T*k, E]
    rank = jnp.take_along_axis(jnp.cumsum(hot, axis=0) - 1, flat[:, None], axis=1)[:, 0]
    return (rank < capacity).reshape(idx.shape)


def utilisation_variance_loss(scores: jax.Array) -> jax.Array:
    """Squared coefficient of variation of the soft expert utilisation over the batch:
    P_e = mean_t s[t,e] / sum_j s[t,j] (sums to 1 over e), loss = Var_e(P) / mean_e(P)^2
    = E^2 * Var_e(P); 0 when every expert gets the same share. scores [T, E] affinities (>= 0)."""
    e = scores.shape[-1]
    p = jnp.mean(scores / (jnp.sum(scores, axis=-1, keepdims=True) + 1e-20), axis=0)
    return jnp.var(p) * e * e


def top2_softmax_route(logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mixtral routing: logits [T, E] -> (probs = softmax(logits) [T, E] fp32, idx [T, 2] int32
    = the two most probable experts, weights [T, 2] = their probabilities renormalised to sum
    to 1)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, idx = jax.lax.top_k(probs, 2)
    return probs, idx.astype(jnp.int32), top / jnp.sum(top, axis=-1, keepdims=True)


def switch_balance_loss(probs: jax.Array, idx: jax.Array) -> jax.Array:
    """Switch Transformer load-balancing loss over the batch: E * sum_e f_e P_e, with
    f_e = (assignments to e) / (T*k) (no gradient) and P_e = mean_t probs[t, e]; 1 when
    balanced. probs [T, E], idx [T, k]."""
    t, e = probs.shape
    f = jnp.sum(jax.nn.one_hot(idx, e, dtype=jnp.float32), axis=(0, 1)) / idx.size
    return e * jnp.sum(jax.lax.stop_gradient(f) * jnp.mean(probs, axis=0))
