"""The routers of configs/ablations/default.py with the auxiliary-loss weight their recipes
use (Switch: 1e-2) instead of the base's 1e-4 (tuned for v4, where the bias does the
balancing): the capacity router's variance loss and the Switch loss then act. Not run in the
default grid (CPU budget).

    nice -n 5 python -m experiments.ablate --grid=configs/ablations/routers_alpha.py --workdir=DIR
"""
import ml_collections

from configs.ablations import default


def get_grid() -> ml_collections.ConfigDict:
    g = default.get_grid()
    g.variants = {
        "lightning": {},
        "router_capacity_alpha1e-2": {"moe_router": "capacity",
                                      "router_capacity_range": (1.0, 2.0),
                                      "loss": {"balance_alpha": 1e-2}},
        "router_top2_softmax_alpha1e-2": {"moe_router": "top2_softmax",
                                          "loss": {"balance_alpha": 1e-2}},
    }
    return g
