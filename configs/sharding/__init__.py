"""Sharding presets: one config file per named preset (see sparse_lm/sharding/presets.py)."""
