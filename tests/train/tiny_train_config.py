"""A training config small enough for end-to-end tests on CPU (every layer kind, MTP)."""
from configs.train_base import base


def get_config():
    c = base()
    c.model.update(dict(
        hidden_size=32, num_layers=3, num_heads=2, head_dim=16, rope_head_dim=8, q_lora_rank=16,
        o_groups=1, o_lora_rank=16, sliding_window=8, layer_prefix=("swa",),
        layer_cycle=("csa", "hca"), layer_tail=(), compress_ratio_csa=4, compress_ratio_hca=8,
        index_n_heads=2, index_head_dim=8, index_topk=2, n_routed_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=16, num_hash_layers=1,
        yarn_original_max_position=64, moe_impl="xla"))
    c.data.val_fraction = 0.05
    c.train.update(dict(steps=16, batch_size=2, seq_len=32, sparse_start_step=0, log_every=1,
                        eval_every=0, checkpoint_every=4, keep_checkpoints=3, progress=False,
                        tensorboard=False))
    c.schedule.update(dict(peak_lr=3e-3, warmup_steps=2, decay_steps=6, final_lr=3e-4))
    return c
