"""Evaluation of a trained model: validation bits/byte, needle retrieval by context length, sparse
vs dense attention on the same parameters, and naive sampling (a full forward per new byte; the
cached decoder lives in `sparse_lm.inference`).
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sparse_lm.data import pipeline
from sparse_lm.data.packing import batch_targets
from sparse_lm.data.synthetic import make_examples
from sparse_lm.config import ConfigError
from sparse_lm.data.tfds_source import DataError
from sparse_lm.data.tokenizer import ByteTokenizer
from sparse_lm.train import metrics as metrics_lib
from sparse_lm.train.losses import cross_entropy
from sparse_lm.train.loop import _atomic_write, _open_source, load_for_eval

LN2 = math.log(2.0)


def logits_fn(model, *, sparse: bool, implementation=None):
    """jitted tokens [B, S] -> logits [B, S, V] (fp32) with the model's parameters closed over
    as arguments (no retracing per call)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, tokens):
        m = nnx.merge(graphdef, state)
        return m(tokens, sparse=sparse, implementation=implementation).astype(jnp.float32)
    return functools.partial(f, state)


def split_bpb(model, batches, *, sparse: bool, implementation=None) -> float:
    """Bits per byte of next-token prediction over packed batches ({"tokens", "segment_ids"
    [, "target_mask"]}: the targets the training loss counts)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, batch):
        m = nnx.merge(graphdef, state)
        logits = m(batch["tokens"][:, :-1], segment_ids=batch["segment_ids"][:, :-1],
                   sparse=sparse, implementation=implementation)
        ce, n = cross_entropy(logits, *batch_targets(batch, 1))
        return ce * n, n
    tot = n = 0.0
    for b in batches:
        a, c = jax.device_get(f(state, {k: jnp.asarray(v) for k, v in b.items()}))
        tot += float(a)
        n += float(c)
    return tot / max(n, 1.0) / LN2


def needle_accuracy(model, lengths, n_examples: int, *, sparse: bool, pool=None, seed: int = 0,
                    batch: int = 8, implementation=None, task: str = "needle",
                    needles: int = 1) -> dict[int, dict]:
    """{length: {"exact": share of examples with every answer byte right (greedy, teacher
    forced), "bytes": share of answer bytes right}}; `needles` per example (task "needle")."""
    fwd = logits_fn(model, sparse=sparse, implementation=implementation)
    out = {}
    for length in lengths:
        ex = make_examples(task, n_examples, int(length), seed=seed, pool=pool, needles=needles)
        exact, right, total = 0, 0, 0
        for i in range(0, n_examples, batch):
            toks = ex["tokens"][i:i + batch]
            mask = ex["answer_mask"][i:i + batch]
            pred = np.asarray(jnp.argmax(fwd(jnp.asarray(toks)), axis=-1))   # pred[t] ~ tok[t+1]
            hit = (pred[:, :-1] == toks[:, 1:]) | ~mask[:, 1:]
            exact += int(np.sum(np.all(hit, axis=-1)))
            right += int(np.sum(hit & mask[:, 1:]))
            total += int(np.sum(mask[:, 1:]))
        out[int(length)] = {"exact": exact / n_examples, "bytes": right / max(total, 1)}
    return out


def sample_bytes(model, prompt: bytes, n_bytes: int, *, context: int, temperature: float = 0.7,
                 seed: int = 0, sparse: bool = True) -> bytes:
    """Autoregressive sampling with a full forward over a fixed [1, context] buffer per byte
    (causality makes the padding after the cursor irrelevant). When the buffer is full, it keeps
    the last half."""
    fwd = logits_fn(model, sparse=sparse)
    buf = np.zeros((1, context), np.int32)
    ids = list(prompt)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_bytes):
        if len(ids) >= context:
            ids = ids[-context // 2:]
        buf[0, :] = 0
        buf[0, :len(ids)] = ids
        logits = np.asarray(fwd(jnp.asarray(buf))[0, len(ids) - 1], np.float64)
        if temperature <= 0:
            nxt = int(np.argmax(logits))
        else:
            p = np.exp((logits - logits.max()) / temperature)
            nxt = int(rng.choice(256, p=p / p.sum()))
        ids.append(nxt)
        out.append(nxt)
    return bytes(out)


def validation_batches(config, run, num_batches: int):
    """(source, batches) of the validation split; DataError when it is unreadable or empty."""
    src = _open_source(config.data, config.data.eval_split, "validation")
    batches = pipeline.eval_batches(src, seq_len=int(config.train.seq_len),
                                    local_batch=run.local_batch, align=run.align,
                                    num_batches=num_batches, tokenizer=run.tokenizer)
    if not batches:
        raise DataError(f"the validation split {config.data.eval_split!r} of data.source="
                        f"{config.data.source!r} gives no batch of train.seq_len="
                        f"{config.train.seq_len} tokens")
    return src, batches


def target_bytes(batches, tokenizer) -> int:
    """UTF-8 bytes of the predicted tokens of packed batches (every token of a segment but its
    first), as the tokenizer decodes them: the denominator of bits per byte for a tokenizer whose
    tokens are not bytes."""
    n = 0
    for b in batches:
        for toks, segs in zip(b["tokens"], b["segment_ids"]):
            for s in range(1, int(segs.max()) + 1):
                n += len(tokenizer.decode(toks[segs == s][1:]).encode("utf-8"))
    return n


def filler_pool(source, max_bytes: int = 2_000_000) -> np.ndarray:
    """Concatenated documents of a source (real text/code to hide needles in)."""
    parts, n = [], 0
    for i in range(len(source)):
        d = np.asarray(source[i], np.uint8)
        parts.append(d)
        n += len(d)
        if n >= max_bytes:
            break
    return np.concatenate(parts) if parts else None


def config_from_workdir(workdir):
    """The config a training run recorded in <workdir>/config.json (ConfigError naming the file
    when it is missing or not a config record)."""
    p = Path(workdir) / "config.json"
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist: is {workdir} a training workdir? "
                                f"(or pass --config)")
    try:
        doc = json.loads(p.read_text())
        cfg = doc["config"]
        if not isinstance(cfg, dict):
            raise TypeError("'config' is not an object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p} is not a valid run config (expected JSON with a 'config' object, "
                          f"as experiments.train writes it): {type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]}") from None
    return ml_collections.ConfigDict(cfg)


def evaluate(config, workdir, step=None, *, log=print) -> dict:
    """Validation bits/byte and needle accuracy by length, sparse vs dense, of a checkpoint;
    printed as a table, written to <workdir>/eval.json and, as a record of kind "evaluate", by
    the run's metrics writer (metrics.jsonl + TensorBoard)."""
    run, model, step = load_for_eval(config, workdir, step)
    e = config.eval
    src, batches = validation_batches(config, run, int(e.batches))
    res = {"step": step, "validation_tokens": int(sum(int(np.sum(b["segment_ids"][:, :-1] > 0))
                                                      for b in batches)),
           "bits_per_byte": {}, "needle": {}}
    # Needle tasks are byte strings: with another tokenizer they are not run. Its loss per token
    # is converted to bits per byte by the bytes its predicted tokens decode to.
    byte_level = isinstance(run.tokenizer, ByteTokenizer)
    lengths = [int(x) for x in e.needle_lengths] if byte_level else []
    pool = filler_pool(src) if lengths else None
    if not byte_level:
        res["tokenizer"] = run.tokenizer.describe()
        res["bits_per_token"] = {}
        res["validation_bytes"] = target_bytes(batches, run.tokenizer)
        n_targets = sum(int(np.sum((b["segment_ids"][:, :-1] > 0)
                                   & (b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1])))
                        for b in batches)
    for mode, sparse in (("sparse", True), ("dense", False)):
        bits = split_bpb(model, batches, sparse=sparse)
        if byte_level:
            res["bits_per_byte"][mode] = bits
        else:
            res["bits_per_token"][mode] = bits
            res["bits_per_byte"][mode] = bits * n_targets / max(res["validation_bytes"], 1)
        res["needle"][mode] = needle_accuracy(model, lengths, int(e.needle_examples),
                                                 sparse=sparse, pool=pool)
        log(f"[evaluate] {mode}: validation {res['bits_per_byte'][mode]:.4f} bits/byte"
            + ("" if byte_level else f" ({res['bits_per_token'][mode]:.4f} bits/token)"))
    log(f"[evaluate] step {step}, {res['validation_tokens']:,} validation tokens")
    log(f"  {'':24s}{'sparse':>10s}{'dense':>10s}")
    log(f"  {'validation bits/byte':24s}{res['bits_per_byte']['sparse']:10.4f}"
        f"{res['bits_per_byte']['dense']:10.4f}")
    for n in lengths:
        s, d = res["needle"]["sparse"][n], res["needle"]["dense"][n]
        log(f"  {'needle @' + str(n) + ' exact / bytes':24s}{s['exact']:5.2f}/{s['bytes']:4.2f}"
            f"{d['exact']:5.2f}/{d['bytes']:4.2f}")
    _atomic_write(Path(workdir) / "eval.json", json.dumps(res, indent=1))
    scalars = {k: res[k] for k in ("bits_per_byte", "bits_per_token", "needle",
                                   "validation_tokens", "validation_bytes") if k in res}
    with metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0,
                                   tensorboard=bool(config.train.get("tensorboard", True))) as w:
        w.write(step, scalars, kind="evaluate")     # beside the run's own metrics
    return res
