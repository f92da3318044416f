"""Hugging Face DeepSeek-V4 checkpoints <-> sparse_lm models (see docs/hf_weights.md).

    model, config = sparse_lm.convert.load_hf(hf_dir, dtype=jnp.bfloat16, mesh=None)
    logits = model(input_ids)              # [B, S] int32 -> [B, S, vocab]

CLIs: `python -m sparse_lm.convert.hf_to_orbax` and `python -m sparse_lm.convert.orbax_to_hf`.
"""
from sparse_lm.convert.core import (CheckReport, check_hf, check_inventory, load_hf, load_state,
                                    restore_checkpoint, save_checkpoint, state_to_hf, write_hf)
from sparse_lm.convert.hf_config import from_hf_config, to_hf_config

__all__ = ["CheckReport", "check_hf", "check_inventory", "load_hf", "load_state", "restore_checkpoint", "save_checkpoint", "state_to_hf",
           "write_hf", "from_hf_config", "to_hf_config"]
