"""Evaluate a training run's latest checkpoint: validation bits/byte and needle-retrieval
accuracy by context length, with sparse and with dense attention on the same parameters.
With a tokenizer other than bytes (data.tokenizer) the loss per token is also reported and
bits/byte counts the bytes its predicted tokens decode to; the needle tasks (byte strings) are
not run.

    python -m experiments.evaluate --workdir=runs/demo [--step=N] [--config=...]

The config defaults to the one the run recorded in <workdir>/config.json. "dense" means the CSA
layers attend every visible compressed entry instead of the indexer's top-k (HCA and the window
are the same in both). Results are printed as a table and written to <workdir>/eval.json and,
as a record of kind "evaluate", by the run's metrics writer (metrics.jsonl + TensorBoard).

Reads only (eval.json and that record are all it writes): a missing workdir, a workdir without
checkpoints, an unreadable config.json or a step that does not exist (the steps there are listed)
is one line, exit status 2; --verbose adds the traceback.
"""
from __future__ import annotations

import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from sparse_lm.train.config_check import exit_with, run_main
from sparse_lm.train.evaluation import config_from_workdir, evaluate
from sparse_lm.train.loop import USER_ERRORS

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (default: the run's own).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: flags are --name=value")
    t0 = time.perf_counter()
    workdir = _WORKDIR.value
    try:
        if not Path(workdir).is_dir():
            raise FileNotFoundError(f"--workdir={workdir} does not exist: give the workdir of a "
                                    f"training run (python -m experiments.train --workdir=...)")
        config = _CONFIG.value if _CONFIG.value is not None else config_from_workdir(workdir)
        res = evaluate(config, workdir, _STEP.value)
    except USER_ERRORS as e:
        exit_with(e)
    per_token = res.get("bits_per_token")      # runs with a tokenizer other than bytes
    print(f"[done] evaluated step {res['step']} in {time.perf_counter() - t0:.1f} s: validation "
          f"{res['bits_per_byte']['sparse']:.4f} bits/byte sparse, "
          f"{res['bits_per_byte']['dense']:.4f} dense"
          + (f" ({per_token['sparse']:.4f} / {per_token['dense']:.4f} bits/token, "
             f"{res['validation_bytes'] / max(res['validation_tokens'], 1):.2f} bytes/token)"
             if per_token else "") + f"; wrote {Path(workdir) / 'eval.json'}")


if __name__ == "__main__":
    run_main(main)
