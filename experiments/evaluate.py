"""Evaluate a training run's latest checkpoint: validation bits/byte and needle-retrieval
accuracy by context length, with sparse and with dense attention on the same parameters.

    python -m experiments.evaluate --workdir=runs/demo [--step=N] [--config=...]

The config defaults to the one the run recorded in <workdir>/config.json. "dense" means the CSA
layers attend every visible compressed entry instead of the indexer's top-k (HCA and the window
are the same in both). Results are printed as a table and written to <workdir>/eval.json.
"""
from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (default: the run's own).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")


def config_from_workdir(workdir):
    import ml_collections
    p = Path(workdir) / "config.json"
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist: is {workdir} a training workdir? "
                                f"(or pass --config)")
    return ml_collections.ConfigDict(json.loads(p.read_text())["config"])


def evaluate(config, workdir, step=None, *, log=print) -> dict:
    import numpy as np
    from sparse_lm.train import evaluation as ev
    from sparse_lm.train.loop import load_for_eval
    run, model, step = load_for_eval(config, workdir, step)
    e = config.eval
    src, batches = ev.validation_batches(config, run, int(e.batches))
    pool = ev.filler_pool(src)
    res = {"step": step, "validation_tokens": int(sum(int(np.sum(b["segment_ids"][:, :-1] > 0))
                                                      for b in batches)),
           "bits_per_byte": {}, "needle": {}}
    lengths = [int(x) for x in e.needle_lengths]
    for mode, sparse in (("sparse", True), ("dense", False)):
        res["bits_per_byte"][mode] = ev.split_bpb(model, batches, sparse=sparse)
        res["needle"][mode] = ev.needle_accuracy(model, lengths, int(e.needle_examples),
                                                 sparse=sparse, pool=pool)
        log(f"[evaluate] {mode}: validation {res['bits_per_byte'][mode]:.4f} bits/byte")
    log(f"[evaluate] step {step}, {res['validation_tokens']:,} validation tokens")
    log(f"  {'':24s}{'sparse':>10s}{'dense':>10s}")
    log(f"  {'validation bits/byte':24s}{res['bits_per_byte']['sparse']:10.4f}"
        f"{res['bits_per_byte']['dense']:10.4f}")
    for n in lengths:
        s, d = res["needle"]["sparse"][n], res["needle"]["dense"][n]
        log(f"  {'needle @' + str(n) + ' exact / bytes':24s}{s['exact']:5.2f}/{s['bytes']:4.2f}"
            f"{d['exact']:5.2f}/{d['bytes']:4.2f}")
    (Path(workdir) / "eval.json").write_text(json.dumps(res, indent=1))
    return res


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value if _CONFIG.value is not None else config_from_workdir(_WORKDIR.value)
    evaluate(config, _WORKDIR.value, _STEP.value)


if __name__ == "__main__":
    app.run(main)
