"""The kernels' shared platform choices: Pallas on TPU/GPU, the named XLA fallback elsewhere,
logged once per (kernel, platform) so a fallback is never silent; interpret iff on CPU."""
import logging

import jax
import jax.numpy as jnp
import pytest

from kernels_pallas import compat
from kernels_pallas.grouped_matmul import api as gmm_api
from kernels_pallas.indexer_topk import api as indexer_api


def test_platform_implementation_picks_pallas_on_accelerators_and_fallback_elsewhere():
    assert compat.platform_implementation("k", "xla", "tpu") == "pallas_tpu"
    assert compat.platform_implementation("k", "xla", "gpu") == "pallas_gpu"
    assert compat.platform_implementation("k", "ragged_dot", "cpu") == "ragged_dot"
    assert indexer_api.default_implementation("cpu") == "xla"
    assert gmm_api.default_implementation("cpu") == "ragged_dot"


def test_fallback_is_logged_once_per_kernel_and_platform(caplog):
    compat._fallbacks_logged.discard(("probe_kernel", "cpu"))
    with caplog.at_level(logging.INFO, logger="kernels_pallas"):
        for _ in range(3):
            compat.platform_implementation("probe_kernel", "xla", "cpu")
    msgs = [r.getMessage() for r in caplog.records if "probe_kernel" in r.getMessage()]
    assert msgs == ["probe_kernel: no compiled Pallas kernel for platform 'cpu'; using 'xla'"]


def test_resolve_interpret_and_is_concrete():
    assert compat.resolve_interpret(None) is True           # tests run on CPU
    assert compat.resolve_interpret(False) is False
    with pytest.raises(TypeError, match="allowed values True, False, None"):
        compat.resolve_interpret("yes")
    assert compat.is_concrete(jnp.ones(2))
    seen = []
    jax.jit(lambda x: seen.append(compat.is_concrete(x)) or x)(jnp.ones(2))
    assert seen == [False]
