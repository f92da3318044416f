"""Sample text from a trained model, streaming the text to the console.

    python -m experiments.generate --workdir=runs/demo --prompt "def fib(n):" \
        [--max-new-tokens=200 --temperature=0.8 --top-p=0.95 --seed=0 --step=N] [--sharding=fsdp_tp]
    python -m experiments.generate --hf-dir=DIR --prompt "hello"   # a Hugging Face checkpoint
    python -m experiments.generate --config=configs/tiny.py --prompt "hello"   # untrained smoke test

Tokens are the run's tokenizer's (`data.tokenizer`; the workdir keeps a copy of its
tokenizer.json) or, for --hf-dir, the directory's tokenizer.json with the BOS/EOS ids of its
config.json; byte-level (vocab 256, the default) without one. The prompt is encoded (after BOS
when the tokenizer has one), the output decoded as it arrives (invalid UTF-8 shown as U+FFFD),
and generation stops at the tokenizer's EOS. The model is restored from the latest (or --step)
checkpoint of the training run in --workdir, with the run's recorded config (<workdir>/config.json);
a --config given with a --workdir that holds checkpoints must describe the same model (its model
section replaces the recorded one, and restoring refuses a different architecture, naming the
differing fields). --config without checkpoints runs a freshly initialised model.

Reads only: a missing workdir creates nothing. Errors (a bad flag, a workdir without checkpoints
and no --config, an invalid config.json, another model) are one line, exit status 2.

Importable: `load_model(workdir, config)`, `load_tokenizer_for(...)` and
`generate_text(model, prompt, tokenizer=..., ...)`.
"""
from __future__ import annotations

import json
import logging as std_logging
import sys
import time
from pathlib import Path
from typing import Callable

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from sparse_lm.config import ConfigError, ModelConfig
from sparse_lm.data.tfds_source import DataError
from sparse_lm.data.tokenizer import ByteTokenizer, HFTokenizer, TokenizerError, check_vocab
from sparse_lm.inference import Decoder, InferenceError, generate, validate_sampling
from sparse_lm.model import build_model
from sparse_lm.sharding.mesh import ShardingError
from sparse_lm.sharding.presets import load_preset
from sparse_lm.train import checkpoint as ckpt_lib
from sparse_lm.train.checkpoint import CheckpointError
from sparse_lm.train.config_check import exit_with, run_main
from sparse_lm.train.loop import load_for_eval, run_tokenizer

_log = std_logging.getLogger(__name__)     # through absl's handler; --verbosity (run_main)

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags; defined only when run as a program, so that importing this module
    next to the other launchers (which define --config/--workdir too) never clashes."""
    config_flags.DEFINE_config_file(
        "config", None, "Config file: the model of an untrained smoke test, or (with --workdir) "
        "the model the checkpoint must match.")
    flags.DEFINE_string("workdir", None, "Training run directory with checkpoints.")
    flags.DEFINE_string("hf-dir", None, "A Hugging Face checkpoint directory (config.json, "
                        "*.safetensors, tokenizer.json) instead of --workdir.")
    flags.DEFINE_string("prompt", None, "Prompt text (UTF-8).")
    flags.DEFINE_integer("max-new-tokens", 200, "Tokens to generate (at most: EOS stops).")
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0 = greedy).")
    flags.DEFINE_float("top-p", 1.0, "Nucleus sampling mass in (0, 1].")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.DEFINE_integer("chunk-size", 128, "Prefill chunk length.")
    flags.DEFINE_bool("dense", False, "CSA attends every visible entry (no top-k).")
    flags.DEFINE_string("sharding", None, "A sharding preset (name[:overrides] or a preset .py "
                        "file) to lay the model and cache out over every device, e.g. fsdp_tp "
                        "or fsdp_ep:expert=8 (default: one device).")
    for name in ("max-new-tokens", "top-p", "chunk-size", "hf-dir"):
        flags.DEFINE_alias(name.replace("-", "_"), name)


class GenerateError(RuntimeError):
    """Generation cannot start; the message says why."""


def load_model(workdir: str | None = None, config=None, step: int | None = None, *,
               seed: int = 0, log: Callable[[str], None] = print):
    """(model, description) for generation.

    workdir with checkpoints: restore the latest (or `step`) with the run's recorded config; a
    given `config` must hold the same model (sparse_lm.train.checkpoint.CheckpointError
    otherwise). No checkpoint: `config` is required and the model is freshly initialised.
    """

    has_ckpt = False
    if workdir is not None:
        ck = ckpt_lib.Checkpointer(workdir, keep=1000, async_save=False)
        has_ckpt = ck.latest_step() is not None
        ck.close()
    if not has_ckpt:
        if config is None:
            where = f"no checkpoint in {Path(workdir) / 'checkpoints'}" if workdir else "no --workdir"
            raise GenerateError(f"{where}: give --workdir of a training run with checkpoints, or "
                                "--config=... to sample from an untrained model")
        cfg = ModelConfig.from_dict(config.model)
        log(f"[generate] untrained model from the config (no checkpoint"
            f"{' in ' + str(workdir) if workdir else ''}): expect noise")
        return build_model(cfg, seed=seed), "untrained"
    recorded = Path(workdir) / "config.json"
    if not recorded.exists():
        raise GenerateError(f"{recorded} does not exist: the checkpoints in {workdir} need the "
                            "run's recorded config (written by experiments.train)")
    run_config = _run_config(recorded)
    if config is not None:
        run_config.model = config.model
    _, model, step = load_for_eval(run_config, workdir, step)
    return model, f"{workdir} step {step}"


def _run_config(recorded: Path) -> ml_collections.ConfigDict:
    """The run config a training run recorded in <workdir>/config.json."""
    try:
        return ml_collections.ConfigDict(json.loads(recorded.read_text())["config"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise GenerateError(f"{recorded} is not a valid run config (expected JSON with a 'config' "
                            f"object, as experiments.train writes it): {type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}") from None


def _hf_config(hf_dir: str) -> dict:
    path = Path(hf_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise GenerateError(f"{path} is not valid JSON (a Hugging Face config.json): "
                            f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(cfg, dict):
        raise GenerateError(f"{path} holds a {type(cfg).__name__}, expected a JSON object")
    return cfg


def load_tokenizer_for(workdir: str | None = None, config=None, hf_dir: str | None = None):
    """The tokenizer that decodes a model's ids: an --hf-dir's tokenizer.json (BOS/EOS from its
    config.json), a workdir's copy of its run's tokenizer, else the config's data.tokenizer,
    else bytes."""
    if hf_dir is not None:
        path = Path(hf_dir) / "tokenizer.json"
        hf_cfg = _hf_config(hf_dir)
        if not path.is_file():
            if hf_cfg.get("vocab_size") == 256:
                return ByteTokenizer()
            raise GenerateError(f"--hf-dir={hf_dir} has no tokenizer.json: its "
                                f"{hf_cfg.get('vocab_size')}-token vocabulary cannot be decoded; "
                                f"put the release's tokenizer.json beside its config.json")
        ids = {k: hf_cfg.get(f"{k}_token_id") for k in ("bos", "eos")}
        return HFTokenizer(path, field="--hf-dir", **{f"{k}_id": v for k, v in ids.items()
                                                     if isinstance(v, int)})
    if workdir is not None and (Path(workdir) / "config.json").exists():
        return run_tokenizer(_run_config(Path(workdir) / "config.json"), workdir)
    if config is not None and "data" in config:
        return run_tokenizer(config, workdir or ".")
    return ByteTokenizer()


class _EndOfText(Exception):
    """Raised from the token callback at EOS: `generate` samples a fixed count, this ends it."""


def generate_text(model, prompt: str, *, tokenizer=None, max_new_tokens: int = 200,
                  temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                  chunk_size: int = 128, dense: bool = False,
                  stream: Callable[[str], None] | None = None, sharding=None) -> str:
    """Generate up to `max_new_tokens` tokens after `prompt` (fewer when the tokenizer's EOS is
    sampled: it ends the text and is not shown); returns the decoded continuation.

    tokenizer: sparse_lm.data.tokenizer's ByteTokenizer (default) or HFTokenizer. stream(text)
    receives each piece of decoded text as soon as its tokens complete it. sharding: a preset
    to run the Decoder under (`sparse_lm.inference.sharded`), None = one device.
    """
    tokenizer = tokenizer or ByteTokenizer()
    if isinstance(tokenizer, ByteTokenizer) and model.cfg.vocab_size != 256:
        raise GenerateError(f"byte-level generation needs model.vocab_size=256, the model has "
                            f"{model.cfg.vocab_size}: give the run's tokenizer (data.tokenizer, "
                            f"or a tokenizer.json in the workdir / --hf-dir)")
    try:
        check_vocab(tokenizer, model.cfg.vocab_size, field="the tokenizer")
    except TokenizerError as e:
        raise GenerateError(str(e)) from None
    if not prompt:
        raise GenerateError("--prompt is empty: give at least one character")
    ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(prompt)
    step = tokenizer.stream_decoder()
    pieces = []

    def on_tokens(_, toks):
        if tokenizer.eos_id is not None and int(toks[0]) == tokenizer.eos_id:
            raise _EndOfText
        text = step(int(toks[0]))
        if text:
            pieces.append(text)
            if stream is not None:
                stream(text)
    try:
        generate(Decoder(model, sparse=not dense, sharding=sharding), [ids],
                 max_new_tokens=max_new_tokens,
                 temperature=temperature, top_p=top_p, seed=seed, chunk_size=chunk_size,
                 on_tokens=on_tokens)
    except _EndOfText:
        pass
    tail = step.finish()
    if tail:
        pieces.append(tail)
        if stream is not None:
            stream(tail)
    return "".join(pieces)


def main(argv):
    logging.set_verbosity(logging.WARNING)
    f = FLAGS
    prompt, workdir, config, hf_dir = f.prompt, f.workdir, f.config, f["hf-dir"].value
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: flags are --name=value")
    if prompt is None:
        raise app.UsageError("--prompt is required")
    if workdir is None and config is None and hf_dir is None:
        raise app.UsageError("give --workdir (a training run), --hf-dir (a Hugging Face "
                             "checkpoint) or --config (an untrained model)")
    if hf_dir is not None and (workdir is not None or config is not None):
        raise app.UsageError("--hf-dir is a model on its own: give it without --workdir/--config")
    max_new, temperature, top_p = f["max-new-tokens"].value, f.temperature, f["top-p"].value
    try:
        validate_sampling(temperature, top_p)     # fail before loading anything
        if max_new < 1:
            raise GenerateError(f"--max-new-tokens={max_new} is invalid: must be >= 1")
        if not prompt:
            raise GenerateError("--prompt is empty: give at least one character")
        if f.sharding is not None:
            load_preset(f.sharding)                # a bad preset fails before the weights load
        if hf_dir is not None and not (Path(hf_dir) / "config.json").is_file():
            raise GenerateError(f"--hf-dir={hf_dir} has no config.json: give a Hugging Face "
                                f"checkpoint directory")
        tokenizer = load_tokenizer_for(workdir, config, hf_dir)     # before the weights load
        if hf_dir is not None:
            from sparse_lm.convert import load_hf      # only --hf-dir reads safetensors
            model, _ = load_hf(hf_dir, progress=False)
            where = f"{hf_dir} (Hugging Face checkpoint)"
        else:
            model, where = load_model(workdir, config, f.step, seed=f.seed,
                                      log=_log.warning)      # restore_newest_readable's warnings
        _log.info("[generate] model: %s; tokenizer: %s", where, tokenizer.name)
        sys.stdout.write(prompt)
        sys.stdout.flush()
        t0 = time.perf_counter()

        def stream(text):
            sys.stdout.write(text)
            sys.stdout.flush()
        text = generate_text(model, prompt, tokenizer=tokenizer, max_new_tokens=max_new,
                             temperature=temperature, top_p=top_p, seed=f.seed,
                             chunk_size=f["chunk-size"].value, dense=f.dense, stream=stream,
                             sharding=f.sharding)
        sys.stdout.write("\n")
        _log.info("[generate] %d characters (at most %d tokens) in %.1f s (compilation included)",
                  len(text), max_new, time.perf_counter() - t0)
    except (GenerateError, InferenceError, CheckpointError, ConfigError, DataError,
            ShardingError, FileNotFoundError) as e:
        exit_with(e)


if __name__ == "__main__":
    define_flags()
    run_main(main)
