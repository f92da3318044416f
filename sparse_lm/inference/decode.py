"""Jitted prefill / decode / sampling over `(params, cache)`, and `generate`.

    dec = Decoder(model)
    cache = dec.init_cache(batch=2, max_len=1024)
    logits, cache = dec.prefill(cache, [prompt_a, prompt_b], chunk_size=128)   # [B, V]
    logits, cache = dec.decode(cache, next_tokens)                             # [B] -> [B, V]

    tokens = generate(model, [prompt], max_new_tokens=64, temperature=0.8, top_p=0.95, seed=0)

The model's layers are split once per layer (`layer_blocks`: the scanned cycle's stacked
parameters sliced per cycle, a copy of the cycle's weights held by the Decoder), the rest of it
(embedding, mHC head, norm, LM head) once; every step is a `jax.jit` function of
`(params, per-layer params, cache, tokens, n_new)` with the cache donated and updated in place: a decode step writes only the new rows of each
layer's cache, so its work outside attention does not grow with the context. The layers are
unrolled in the step (see `sparse_lm.inference.step`), so compilation time grows with the number
of layers. One compilation per distinct chunk length: prefill pads every chunk to the same
length, decode is a chunk of 1. Prompts of different lengths share a batch: each row continues
at its own length and rows without new tokens in a chunk stay unchanged.

The MTP block is not used: it is a training objective here; speculative decoding with it is out
of scope.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_lm.inference.cache import Cache, init_cache
from sparse_lm.inference.sharded import inference_layout, with_config
from sparse_lm.inference.step import LOGITS_MODES, forward_chunk


class InferenceError(ValueError):
    """Bad input to prefill / decode / generate; the message names the argument."""


def validate_sampling(temperature: float, top_p: float) -> None:
    """Raise InferenceError unless temperature >= 0 (finite) and 0 < top_p <= 1."""
    if not np.isfinite(temperature) or temperature < 0:
        raise InferenceError(f"temperature={temperature!r} is invalid: must be a finite number "
                             ">= 0 (0 = greedy)")
    if not np.isfinite(top_p) or not 0 < top_p <= 1:
        raise InferenceError(f"top_p={top_p!r} is invalid: must be in (0, 1]")


def sample_tokens(logits: jax.Array, key: jax.Array, temperature, top_p) -> jax.Array:
    """[B, V] logits -> [B] int32 tokens. temperature 0 = greedy (argmax); otherwise softmax of
    logits / temperature restricted to the nucleus: the most likely tokens whose probabilities
    sum to at least top_p (the most likely token is always kept; tokens tied with the last one
    kept are kept too). temperature and top_p may be traced scalars."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    ordered = -jnp.sort(-scaled, axis=-1)                               # descending
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs                         # mass ranked above
    kept = jnp.maximum(jnp.sum(before < top_p, axis=-1), 1)              # >= 1
    cutoff = jnp.take_along_axis(ordered, (kept - 1)[:, None], axis=-1)
    masked = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
    sampled = jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def _validate_tokens(name: str, seqs, vocab: int) -> list[np.ndarray]:
    out = []
    for i, s in enumerate(seqs):
        a = np.asarray(s)
        if a.ndim != 1 or not (a.size == 0 or np.issubdtype(a.dtype, np.integer)):
            raise InferenceError(f"{name}[{i}] must be a 1-D sequence of integer token ids")
        if a.size and (a.min() < 0 or a.max() >= vocab):
            raise InferenceError(f"{name}[{i}] has token ids outside [0, vocab_size={vocab})")
        out.append(a.astype(np.int32))
    return out


def _place(tree, shardings):
    """Arrays put on their shardings; ShapeDtypeStructs given them (abstract models)."""
    def one(x, s):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        return jax.device_put(x, s)
    return jax.tree.map(one, tree, shardings)


def _without_layers(model):
    """A view of `model` without its layers (they run from `layer_blocks`) and without the MTP
    block: embedding, mHC head, final norm and LM head, sharing the model's arrays. The step
    then holds each layer's weights once, not the stacked cycle beside its slices."""
    shell = nnx.merge(*nnx.split(model))
    shell.head_layers = nnx.List([])
    shell.tail_layers = nnx.List([])
    shell.cycles = None
    shell.mtp = None
    return shell


class Decoder:
    """Cached inference for one model: jitted chunk steps with the cache donated; with a
    sharding preset, parameters / caches / rows laid out over a mesh and every step sharded."""

    def __init__(self, model, *, sparse: bool = True, sharding=None, mesh=None):
        """model: a DeepseekV4 (or `nnx.eval_shape` of one, to lower steps ahead of time).
        sharding: a preset (name with overrides, file, or ShardingPreset; see
        `sparse_lm.inference.sharded`) to place parameters, caches and rows by; mesh: the mesh to
        resolve it on (default: the preset's over every device)."""
        self.layout = None
        if sharding is not None:
            self.layout = inference_layout(sharding, model.cfg, mesh)
            model = with_config(model, self.layout.model_cfg)
        elif mesh is not None:
            raise InferenceError("mesh= is given without sharding=: name the sharding preset "
                                 "that lays the model out on it")
        self.cfg = model.cfg
        self.graphdef = self.block_defs = None
        self.load_weights(model)
        self.sparse = sparse
        self._step = jax.jit(self._step_fn, static_argnames=("logits",), donate_argnames=("cache",))
        self._sample = jax.jit(sample_tokens)

    def load_weights(self, model) -> None:
        """Take `model`'s current weights (a model of this Decoder's architecture, e.g. the
        student of a training run after an update): the jitted steps are reused, nothing is
        recompiled."""
        split = [nnx.split(b) for b in model.layer_blocks()]
        graphdef, self.params = nnx.split(_without_layers(model))
        if self.graphdef is not None and graphdef != self.graphdef:
            raise InferenceError("load_weights got a model of another architecture than the "
                                 "Decoder's")
        self.graphdef, self.block_defs = graphdef, [g for g, _ in split]
        self.block_params = [p for _, p in split]
        if self.layout is not None:
            self.params = _place(self.params, self.layout.state(self.params))
            self.block_params = [_place(p, self.layout.state(p)) for p in self.block_params]

    def _step_fn(self, params, block_params, cache, tokens, n_new, *, logits):
        def run():
            model = nnx.merge(self.graphdef, params)
            blocks = [nnx.merge(g, p) for g, p in zip(self.block_defs, block_params)]
            return forward_chunk(model, cache, tokens, n_new, blocks=blocks, sparse=self.sparse,
                                 logits=logits)
        if self.layout is None:
            return run()
        with self.layout.rules_context():
            out, new_cache = run()
        return out, self.layout.constrain_cache(new_cache)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> Cache:
        """The model's compressed cache (`init_cache`), created in the layout's shardings; a
        `init_full_kv_cache` cache works too for window-only models (the dense baseline).
        max_len may not exceed the model's `max_context` (when set)."""
        self._check_context(max_len, "max_len")
        if self.layout is None:
            return init_cache(self.cfg, batch, max_len, dtype)
        make = functools.partial(init_cache, self.cfg, batch, max_len, dtype)
        return jax.jit(make, out_shardings=self.layout.cache(jax.eval_shape(make)))()

    def abstract_cache(self, batch: int, max_len: int, dtype=None) -> Cache:
        """ShapeDtypeStructs of `init_cache(batch, max_len)` carrying the layout's shardings
        (for `lower` ahead of time)."""
        shapes = jax.eval_shape(functools.partial(init_cache, self.cfg, batch, max_len, dtype))
        return shapes if self.layout is None else _place(shapes, self.layout.cache(shapes))

    def _rows(self, x) -> jax.Array:
        if self.layout is None or isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.device_put(x, self.layout.rows(x.shape))

    def step(self, cache: Cache, tokens, n_new, *, logits: str = "last"):
        """One jitted chunk: tokens [B, T], n_new [B] -> (logits, cache); the input cache is
        donated (do not use it afterwards). No host-side checks: use prefill/decode for those."""
        if logits not in LOGITS_MODES:
            raise InferenceError(f"logits={logits!r} is invalid: allowed values {LOGITS_MODES}")
        return self._step(self.params, self.block_params, cache,
                          self._rows(jnp.asarray(tokens, jnp.int32)),
                          self._rows(jnp.asarray(n_new, jnp.int32)), logits=logits)

    def lower(self, cache: Cache, tokens, n_new, *, logits: str = "last"):
        """The jitted step lowered for these arguments (`.compile().as_text()` gives the
        compiled HLO, e.g. to check that no cache-sized copy is made). Arguments may be
        ShapeDtypeStructs (`abstract_cache`, and tokens [B, T] / n_new [B] with `row_struct`)."""
        def arg(x):
            return x if isinstance(x, jax.ShapeDtypeStruct) else self._rows(jnp.asarray(x, jnp.int32))
        return self._step.lower(self.params, self.block_params, cache, arg(tokens), arg(n_new),
                                logits=logits)

    def row_struct(self, shape) -> jax.ShapeDtypeStruct:
        """An int32 ShapeDtypeStruct of token rows [B, T] or n_new [B] in the layout."""
        sharding = None if self.layout is None else self.layout.rows(tuple(shape))
        return jax.ShapeDtypeStruct(tuple(shape), jnp.int32, sharding=sharding)

    def _check_context(self, tokens: int, what: str) -> None:
        """InferenceError if `tokens` of context exceed the model's max_context (0 = no limit)."""
        limit = self.cfg.max_context
        if limit and tokens > limit:
            raise InferenceError(f"{what}={tokens} exceeds the model's max_context={limit} "
                                 "(model.max_context; YaRN reaches yarn_factor * "
                                 "yarn_original_max_position)")

    def _check_room(self, cache: Cache, add: np.ndarray, what: str) -> np.ndarray:
        held = np.asarray(cache.lengths)
        self._check_context(int((held + add).max()), f"{what}: tokens held + new")
        over = np.nonzero(held + add > cache.max_len)[0]
        if over.size:
            b = int(over[0])
            raise InferenceError(
                f"{what} of row {b} does not fit the cache: {int(held[b])} tokens held + "
                f"{int(add[b])} new > max_len={cache.max_len}; allocate a larger cache")
        return held

    def prefill(self, cache: Cache, prompts: Sequence[Sequence[int]], *, chunk_size: int = 128,
                logits: str = "last", progress: Callable[[int, int], None] | None = None,
                sync: bool = False):
        """Append one prompt per row (any lengths >= 1) in chunks of `chunk_size` tokens.

        Returns (logits, cache): logits "last" -> [B, V] at each row's last prompt token;
        "all" -> a list of [len(prompt_b), V] arrays; "none" -> None. The cache passed in is
        donated. progress(done_chunks, total_chunks) is called after each chunk; sync=True waits
        for each chunk's step to finish first (so progress sees compute time, not dispatch).
        """
        if logits not in LOGITS_MODES:
            raise InferenceError(f"logits={logits!r} is invalid: allowed values {LOGITS_MODES}")
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise InferenceError(f"chunk_size={chunk_size!r} is invalid: must be an integer >= 1")
        if len(prompts) != cache.batch:
            raise InferenceError(f"got {len(prompts)} prompts for a cache of batch {cache.batch}")
        seqs = _validate_tokens("prompts", prompts, self.cfg.vocab_size)
        lens = np.asarray([len(s) for s in seqs], np.int32)
        if (lens == 0).any():
            raise InferenceError(f"prompts[{int(np.argmin(lens))}] is empty: every prompt needs "
                                 ">= 1 token")
        self._check_room(cache, lens, "the prompt")
        t = min(chunk_size, int(lens.max()))
        n_chunks = -(-int(lens.max()) // t)
        padded = np.zeros((len(seqs), n_chunks * t), np.int32)
        for i, s in enumerate(seqs):
            padded[i, :len(s)] = s
        last = None
        per_chunk = []
        for c in range(n_chunks):
            n_new = np.clip(lens - c * t, 0, t)
            out, cache = self.step(cache, padded[:, c * t:(c + 1) * t], n_new, logits=logits)
            if logits == "last":   # keep each row's logits from the chunk holding its last token
                ends_here = (n_new > 0) & (lens <= (c + 1) * t)
                last = out if last is None else jnp.where(jnp.asarray(ends_here)[:, None], out, last)
            elif logits == "all":
                per_chunk.append(out)
            if sync:
                jax.block_until_ready((out, cache))
            if progress is not None:
                progress(c + 1, n_chunks)
        if logits == "all":
            full = jnp.concatenate(per_chunk, axis=1)
            return [full[i, :n] for i, n in enumerate(lens)], cache
        return last, cache

    def decode(self, cache: Cache, tokens, active=None):
        """One token per row: tokens [B] -> (logits [B, V], cache). Rows with active=False are
        left unchanged (their logits are garbage). The cache passed in is donated."""
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        if tokens.shape[0] != cache.batch:
            raise InferenceError(f"tokens has {tokens.shape[0]} rows for a cache of batch "
                                 f"{cache.batch}")
        _validate_tokens("tokens", [tokens], self.cfg.vocab_size)
        n_new = (np.ones_like(tokens) if active is None
                 else np.asarray(active, bool).astype(np.int32).reshape(-1))
        self._check_room(cache, n_new, "the next token")
        return self.step(cache, tokens[:, None], n_new, logits="last")

    def sample(self, logits, key, temperature: float = 1.0, top_p: float = 1.0) -> jax.Array:
        validate_sampling(temperature, top_p)
        return self._sample(logits, key, jnp.float32(temperature), jnp.float32(top_p))


def generate(model_or_decoder, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             chunk_size: int = 128, max_len: int | None = None,
             on_tokens: Callable[[int, np.ndarray], None] | None = None) -> list[list[int]]:
    """Sample `max_new_tokens` tokens after each prompt; returns the new tokens per row.

    temperature 0 = greedy; top_p in (0, 1] = nucleus sampling; `seed` fixes the draws.
    max_len (default: longest prompt + max_new_tokens) sizes the cache. on_tokens(step, tokens
    [B]) is called as soon as each step's tokens exist (streaming).
    """
    dec = (model_or_decoder if isinstance(model_or_decoder, Decoder)
           else Decoder(model_or_decoder))
    validate_sampling(temperature, top_p)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise InferenceError(f"max_new_tokens={max_new_tokens!r} is invalid: must be an "
                             "integer >= 1")
    if not prompts:
        raise InferenceError("prompts is empty: give at least one prompt")
    longest = max(len(p) for p in prompts)
    need = longest + max_new_tokens
    dec._check_context(need, "the longest prompt + max_new_tokens")
    if max_len is None:
        max_len = need
    elif max_len < need:
        raise InferenceError(f"max_len={max_len} is too small: the longest prompt ({longest} "
                             f"tokens) + max_new_tokens={max_new_tokens} need {need}")
    cache = dec.init_cache(len(prompts), max_len)
    logits, cache = dec.prefill(cache, prompts, chunk_size=chunk_size)
    key = jax.random.key(seed)
    out = []
    for i in range(max_new_tokens):
        key, sub = jax.random.split(key)
        tok = dec.sample(logits, sub, temperature, top_p)
        host = np.asarray(tok)
        out.append(host)
        if on_tokens is not None:
            on_tokens(i, host)
        if i + 1 < max_new_tokens:
            logits, cache = dec.decode(cache, host)
    return np.stack(out, axis=1).tolist()
