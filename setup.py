"""sparse-lm: DeepSeek-V4-style sparse-attention language models in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="sparse-lm",
    version="0.1.0",
    description="DeepSeek-V4-style models (CSA/HCA sparse attention, lightning indexer, "
    "DeepSeekMoE, mHC, MTP) in JAX/Flax NNX with Pallas kernels.",
    python_requires=">=3.12",
    packages=find_packages(include=["sparse_lm*", "kernels_pallas*", "configs*", "experiments*"]),
    # Pinned versions live in requirements.txt (the one place for pins); these are the floors.
    install_requires=[
        "jax>=0.11.2", "flax>=0.12", "optax", "orbax-checkpoint", "chex", "ml-collections",
        "numpy", "absl-py", "tqdm",
    ],
)
