"""Sharding presets as config files: thin wrappers of the named presets of
sparse_lm/sharding/presets.py (`load_preset` reads the library directly)."""
