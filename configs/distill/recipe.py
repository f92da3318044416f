"""Distillation of three domain specialists into one student (experiments/distill_recipe.py).

    python -m experiments.distill --config=configs/distill/recipe.py --workdir=DIR \
        --config.distill.mode=on_policy|off_policy|sft [--config.distill.topk=16]

Domains (byte-level): `code` = the stdlib corpus, `retrieval` = the synthetic associative-recall
task, `docs` = docstrings and comments extracted from the stdlib (a JSONL file the recipe
writes). The teachers are the specialists the recipe fine-tunes from one base with
train.init_from; the student starts from the same base. Paths are under `runs/distill_recipe`
(the recipe's --root).
"""
import ml_collections

from configs.train_base import base

ROOT = "runs/distill_recipe"
DOMAINS = ("code", "docs", "retrieval")


def recipe_model() -> ml_collections.ConfigDict:
    """A 2-layer byte-level model of the tiny preset (SWA, then CSA with its indexer)."""
    m = base().model
    m.update(dict(num_layers=2, hidden_size=64, mtp_depth=0, moe_impl="xla"))
    return m


def domain_sources(root: str = ROOT) -> dict:
    return {"code": "stdlib", "docs": f"jsonl:{root}/docstrings.jsonl",
            "retrieval": "synthetic:recall"}


def get_config() -> ml_collections.ConfigDict:
    c = base()
    c.model = recipe_model()
    c.data.update(dict(synthetic_docs=2000, synthetic_length=128, val_fraction=0.05))
    c.train.update(dict(steps=100, batch_size=12, log_every=10, eval_every=0,
                        checkpoint_every=50, keep_checkpoints=2,
                        init_from=f"{ROOT}/base"))
    c.schedule.update(dict(peak_lr=1e-3, warmup_steps=10, decay_steps=90, final_lr=1e-4,
                           mtp_weight=0.0))
    c.distill = ml_collections.ConfigDict(dict(
        mode="on_policy",             # on_policy | off_policy (teacher samples) | sft (the data)
        prompts=domain_sources(),
        teachers={d: f"{ROOT}/specialist_{d}" for d in DOMAINS},
        prompt_len=32,                # prompt tokens (a window of the domain's documents)
        new_tokens=32,                # sampled completion tokens per prompt
        temperature=1.0,
        top_p=1.0,
        topk=0,                       # reverse KL over the student's top-k (renormalised); 0 = all
        stop_token=-1,                # completion ends after this token (-1: fixed length)
        eval_len=128,                 # validation windows per domain after training
        eval_windows=48,
    ))
    return c
