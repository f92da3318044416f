"""The default ablation grid (issue 23): every token selector with the v4 router, every router
with the lightning selector; a 3-layer byte-level model (swa, csa, hca) on the embedded corpus,
2 seeds, equal data and token budget. Sized for ~35 min on 2 shared CPU cores:

    nice -n 5 python -m experiments.ablate --grid=configs/ablations/default.py --workdir=DIR

A grid file defines get_grid() -> ConfigDict(base=<training config>, seeds, variants={name:
{model field: value}}, eval=...). Every variant trains from `base` with its model overrides.
"""
import ml_collections

from sparse_lm.train.defaults import base


def get_grid() -> ml_collections.ConfigDict:
    c = base("tiny")
    c.model.update(dict(num_layers=3, layer_prefix=("swa",), layer_cycle=("csa", "hca"),
                        layer_tail=(), num_hash_layers=1, mtp_depth=0, index_topk=4,
                        attention_impl="xla", moe_impl="xla"))
    c.train.update(dict(steps=200, batch_size=8, seq_len=128, log_every=25, eval_every=200,
                        eval_batches=8, checkpoint_every=200, keep_checkpoints=1,
                        async_checkpoint=False, tensorboard=False))
    c.schedule.update(dict(warmup_steps=20, decay_steps=170))
    selector = {
        "lightning": {},
        "dense": {"selector": "dense"},
        "fixed": {"selector": "fixed", "fixed_local": 2, "fixed_global": 1, "fixed_stride": 4,
                  "fixed_block": 1},
        "dsa_tokens": {"selector": "dsa_tokens"},
        # adaptive k: 25% of the visible entries, at most index_topk
        "mlp_router_ste": {"selector": "mlp_router", "selector_estimator": "ste",
                           "selector_k_fraction": 0.25, "selector_sparsity_weight": 0.01},
    }
    router = {"router_capacity": {"moe_router": "capacity",
                                  "router_capacity_range": (1.0, 2.0)},
              "router_top2_softmax": {"moe_router": "top2_softmax"}}
    return ml_collections.ConfigDict(dict(
        base=c, seeds=(0, 1), variants={**selector, **router},
        # the variant the others are compared with, for the claims
        reference="lightning",
        eval=dict(batches=8, recall_lengths=(128,), recall_examples=32)))
