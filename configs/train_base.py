"""Base experiment config: every field the launcher reads, with defaults.

    python -m experiments.train --config=configs/train_base.py --workdir=DIR \
        --config.train.steps=100 --config.model.hidden_size=128 --config.model.attention_impl=xla

The fields and their defaults are defined in `sparse_lm/train/defaults.py` (`base()`); experiment
files (configs/demo.py, ...) start from `base()` and override. The model section is a full set of
`ModelConfig` fields (sparse_lm/presets.py); `model_preset` picks it.
"""
import ml_collections

from sparse_lm.train.defaults import base  # noqa: F401  (experiment files import it from here)


def get_config() -> ml_collections.ConfigDict:
    return base()
