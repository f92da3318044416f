"""A larger grid (not the default): the mlp_router's estimators and k rules against the
lightning indexer, same model and budget as configs/ablations/default.py.

    nice -n 5 python -m experiments.ablate --grid=configs/ablations/estimators.py --workdir=DIR
"""
import ml_collections

from configs.ablations import default


def get_grid() -> ml_collections.ConfigDict:
    g = default.get_grid()
    router = {"selector": "mlp_router", "selector_sparsity_weight": 0.01}
    g.variants = {
        "lightning": {},
        "mlp_ste_fixed_k": dict(router, selector_estimator="ste"),
        "mlp_ste_adaptive": dict(router, selector_estimator="ste", selector_k_fraction=0.25),
        "mlp_gumbel_fixed_k": dict(router, selector_estimator="gumbel",
                                   selector_temperature=(2.0, 0.3), selector_anneal_steps=200),
        "mlp_gumbel_adaptive": dict(router, selector_estimator="gumbel", selector_k_fraction=0.25,
                                    selector_temperature=(2.0, 0.3), selector_anneal_steps=200),
    }
    return g
