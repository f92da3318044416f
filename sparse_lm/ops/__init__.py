"""The functional core: pure jnp functions with shapes in their docstrings.

Modules in `sparse_lm.model` own parameters and call these; tests and kernel references compare
against them.
"""
