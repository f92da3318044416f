"""The kernels' shared platform choices, now made by `kernels_pallas.registry`: Pallas on
TPU/GPU, the named XLA form elsewhere, the choice logged once per (op, platform) so it is never
silent; interpret iff the target platform is CPU. `compat` keeps the JAX-version helpers."""
import logging

import jax
import jax.numpy as jnp
import pytest

from kernels_pallas import compat, registry
from kernels_pallas.grouped_matmul import api as gmm_api
from kernels_pallas.indexer_topk import api as indexer_api


def test_platform_implementation_picks_pallas_on_accelerators_and_fallback_elsewhere():
    assert indexer_api.OP.default_implementation("tpu") == "pallas_tpu"
    assert indexer_api.OP.default_implementation("gpu") == "pallas_gpu"
    assert gmm_api.OP.default_implementation("cpu") == "reference"
    assert indexer_api.default_implementation("cpu") == "xla"
    assert gmm_api.default_implementation("cpu") == "reference"


def test_fallback_is_logged_once_per_kernel_and_platform(caplog):
    op = registry.Op("probe_kernel", [registry.Implementation("xla", lambda x: x)],
                     preference={p: ("xla",) for p in registry.PLATFORMS})
    registry._logged.discard(("chosen", "probe_kernel", "cpu", "xla"))
    with caplog.at_level(logging.INFO, logger="kernels_pallas"):
        for _ in range(3):
            op(1, platform="cpu")
    msgs = [r.getMessage() for r in caplog.records if "probe_kernel" in r.getMessage()]
    assert msgs == ["probe_kernel on cpu: implementation 'xla'"]


def test_resolve_interpret_and_is_concrete():
    assert registry.resolve_interpret(None) is True           # tests run on CPU
    assert registry.resolve_interpret(False) is False
    with pytest.raises(TypeError, match="allowed values True, False, None"):
        registry.resolve_interpret("yes")
    assert compat.is_concrete(jnp.ones(2))
    seen = []
    jax.jit(lambda x: seen.append(compat.is_concrete(x)) or x)(jnp.ones(2))
    assert seen == [False]
