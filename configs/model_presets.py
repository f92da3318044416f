"""Model presets: defined in `sparse_lm/presets.py` (ConfigDicts of ModelConfig fields), re-exported
here for the config files and scripts that name them as `configs.model_presets`."""
from sparse_lm.presets import MODEL_PRESETS, model_config_dict, tiny, v4_flash, v4_pro  # noqa: F401
