"""Evaluate a training run's latest checkpoint: validation bits/byte and needle-retrieval
accuracy by context length, with sparse and with dense attention on the same parameters.

    python -m experiments.evaluate --workdir=runs/demo [--step=N] [--config=...]

The config defaults to the one the run recorded in <workdir>/config.json. "dense" means the CSA
layers attend every visible compressed entry instead of the indexer's top-k (HCA and the window
are the same in both). Results are printed as a table and written to <workdir>/eval.json.
"""
from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from sparse_lm.train.evaluation import config_from_workdir, evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (default: the run's own).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value if _CONFIG.value is not None else config_from_workdir(_WORKDIR.value)
    evaluate(config, _WORKDIR.value, _STEP.value)


if __name__ == "__main__":
    app.run(main)
