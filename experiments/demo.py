"""`make demo`: train a small DeepSeek-V4 on the embedded stdlib corpus on CPU, evaluate it,
sample code from it, and plot the loss and the expert load.

    python -m experiments.demo [--workdir=runs/demo] [--config=configs/demo.py ...]

Prints the validation bits/byte beside the corpus's unigram and bigram conditional entropies
(what byte counts alone achieve), and where every output is.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sparse_lm.data.stdlib_corpus import byte_entropies
from sparse_lm.train import evaluation as ev
from sparse_lm.train.config_check import main_guard, EXIT_FAILED, exit_with, run_main
from sparse_lm.train.evaluation import evaluate
from sparse_lm.train.loop import RUN_ERRORS, USER_ERRORS, load_for_eval, train
from sparse_lm.train.metrics import layer_names, read_metrics

if __name__ == "__main__":      # before the flags: config_flags applies the overrides to a
    main_guard(default_config="configs/demo.py")   # default config file when the flag is defined

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Demo config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Run directory.")


def plot_loss(records, evals, h1, h2, path):
    import matplotlib          # optional package, needed only for the figures
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    tok = [r["tokens_seen"] / 1e6 for r in records]
    ax.plot(tok, [r["bits_per_byte"] for r in records], lw=1.2, label="train")
    per_step = records[0]["tokens_seen"] / records[0]["step"] if records else 1.0
    if evals:
        ax.plot([e["step"] * per_step / 1e6 for e in evals], [e["bits_per_byte"] for e in evals],
                "o-", label="validation")
    ax.axhline(h1, color="gray", ls="--", lw=1, label=f"unigram entropy {h1:.2f}")
    ax.axhline(h2, color="gray", ls=":", lw=1, label=f"bigram conditional entropy {h2:.2f}")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("bits per byte")
    top = max(6.0, h1 + 0.5)
    ax.set_ylim(1.5, top)
    sparse_from = next((r["tokens_seen"] for r in records if r.get("sparse")), None)
    if sparse_from is not None:
        ax.axvline(sparse_from / 1e6, color="tab:red", lw=0.8, alpha=0.6)
        ax.text(sparse_from / 1e6, top - 0.1, " sparse stage ->", color="tab:red", va="top",
                fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("DeepSeek-V4-style model on the Python stdlib (byte level)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_expert_load(records, layer_names, hash_layers, path):
    import matplotlib          # optional package, needed only for the figures
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    steps = [r["step"] for r in records]
    for n in layer_names:
        key = f"moe/{n}/load_cv"
        if key in records[0]:
            label = n + (" (hash-routed)" if n in hash_layers else "")
            axes[0].plot(steps, [r[key] for r in records], label=label)
            axes[1].plot(steps, [r[f"moe/{n}/load_max"] for r in records], label=label)
    axes[0].set_title("expert load CV (std / mean) per layer")
    axes[1].set_title("max expert load / mean load per layer")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: flags are --name=value")
    try:
        _main()
    except USER_ERRORS as e:
        exit_with(e)
    except RUN_ERRORS as e:
        exit_with(e, EXIT_FAILED, with_type=True)


def _main():
    logging.set_verbosity(logging.WARNING)
    t_start = time.time()
    config = _CONFIG.value
    workdir = Path(_WORKDIR.value)
    from sparse_lm.train.loop import setup, validate_train_config
    validate_train_config(config)          # before the corpus statistics: fail fast
    setup(config, workdir)
    print(f"[demo] backend {jax.default_backend()}, {jax.device_count()} device(s); workdir {workdir}")

    # 1. Corpus and the count-based baselines.
    from sparse_lm.train.loop import _open_source
    train_src = _open_source(config.data, config.data.train_split, "train")
    h1, h2 = byte_entropies(train_src[i] for i in range(len(train_src)))
    print(f"[demo] corpus: Python {train_src.info.python_version} stdlib, {train_src.info.num_files} "
          f"files, {train_src.info.num_bytes / 1e6:.1f} MB, fingerprint {train_src.fingerprint}; "
          f"train split {len(train_src)} files")
    print(f"[demo] byte entropies of the train split: unigram {h1:.3f}, bigram conditional "
          f"{h2:.3f} bits/byte")
    del train_src

    # 2. Train (resumes if the workdir already has checkpoints).
    t0 = time.time()
    summary = train(config, workdir)
    t_train = time.time() - t0
    print(f"[demo] training took {t_train / 60:.1f} min (compilation "
          f"{sum(summary['compile_s'].values()):.0f} s)")

    # 3. Evaluate: validation bits/byte and needle retrieval, sparse vs dense.
    t0 = time.time()
    res = evaluate(config, workdir, log=print)
    t_eval = time.time() - t0

    # 4. Sample a few lines of code.
    run, model, step = load_for_eval(config, workdir)
    prompt = str(config.eval.sample_prompt).encode()
    t0 = time.time()
    text = ev.sample_bytes(model, prompt, int(config.eval.sample_bytes),
                           context=int(config.train.seq_len), temperature=0.6, seed=0)
    t_sample = time.time() - t0
    sample = (prompt + text).decode("utf-8", errors="replace")
    (workdir / "sample.txt").write_text(sample)

    # 5. Plots and the routing summary.
    records = read_metrics(workdir, "train")
    evals = read_metrics(workdir, "eval")
    if not any(e["step"] == step for e in evals):          # the final evaluation above
        evals.append({"step": step, "bits_per_byte": res["bits_per_byte"]["sparse"]})
    plot_loss(records, evals, h1, h2, workdir / "loss.png")
    names = layer_names(run.model_cfg)
    hashed = {n for n, spec in zip(names, run.model_cfg.layers) if spec.routing == "hash"}
    plot_expert_load(records, names, hashed, workdir / "expert_load.png")
    first, last = records[0], records[-1]
    cv0, cv1 = first["moe/load_cv_score_layers"], last["moe/load_cv_score_layers"]

    bpb = res["bits_per_byte"]["sparse"]
    print("\n" + "=" * 78)
    print(f"validation bits/byte (sparse attention): {bpb:.3f}   (dense CSA: "
          f"{res['bits_per_byte']['dense']:.3f})")
    print(f"  corpus unigram entropy {h1:.3f}, bigram conditional entropy {h2:.3f} bits/byte "
          f"-> the model {'beats' if bpb < h2 else 'does not beat'} the bigram baseline by "
          f"{h2 - bpb:.2f} bits/byte")
    print(f"expert load CV of score-routed layers: {cv0:.3f} (step {first['step']}) -> "
          f"{cv1:.3f} (step {last['step']})  [{'falls' if cv1 < cv0 else 'does not fall'}]")
    if "indexer/recall" in last:
        print(f"indexer recall (dense attention mass kept by the top-{run.model_cfg.index_topk}): "
              f"{first['indexer/recall']:.3f} -> {last['indexer/recall']:.3f}")
    print(f"sample (prompt {prompt!r}, temperature 0.6, {t_sample:.0f} s):")
    print("-" * 78)
    print(sample)
    print("-" * 78)
    print(f"time: training {t_train / 60:.1f} min, evaluation {t_eval / 60:.1f} min, "
          f"total {(time.time() - t_start) / 60:.1f} min")
    for name, what in (("config.json", "resolved config, corpus fingerprint"),
                       ("metrics.jsonl", "training and evaluation metrics"),
                       ("tensorboard/", "TensorBoard event files"),
                       ("checkpoints/", "orbax checkpoints (resume by re-running)"),
                       ("optimizer_split.json", "Muon / AdamW parameter split"),
                       ("eval.json", "evaluation results"), ("loss.png", "loss curve"),
                       ("expert_load.png", "expert load over training"),
                       ("sample.txt", "the sample above")):
        print(f"  {workdir / name}  ({what})")
    (workdir / "demo_summary.json").write_text(json.dumps({
        "validation_bits_per_byte": res["bits_per_byte"], "unigram_entropy": h1,
        "bigram_conditional_entropy": h2, "load_cv_first": cv0, "load_cv_last": cv1,
        "train_minutes": t_train / 60, "total_minutes": (time.time() - t_start) / 60,
        "needle": res["needle"]}, indent=1))
    print(f"[done] demo: validation {bpb:.3f} bits/byte (sparse) after {summary['steps']} steps "
          f"in {(time.time() - t_start) / 60:.1f} min; outputs in {workdir}")


if __name__ == "__main__":
    run_main(main, default_config="configs/demo.py")
