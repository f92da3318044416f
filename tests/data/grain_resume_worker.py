"""One process of a 2-process run of the training input pipeline with the training loop's
checkpointing (`jax.distributed` on loopback, gloo CPU collectives):

    python -m tests.data.grain_resume_worker <pid> <nproc> <port> <workdir> <steps> <kill_at>

Reads `steps` batches of its shard through `pipeline.TrainIterator` (grain, prefetching),
checkpointing every 4 steps as `sparse_lm.train.loop` does (every process's iterator state
gathered into the checkpoint's data item, beside a replicated "train state"), resuming from the
newest checkpoint in the workdir if there is one. Each batch's digest is appended to
<workdir>/batches_p<pid>.txt as `step epoch sha256`. kill_at > 0: SIGKILL itself right after
reading that step's batch (no clean shutdown, an async save possibly in flight).
"""
from __future__ import annotations

import hashlib
import os
import signal
import sys

import jax

jax.config.update("jax_num_cpu_devices", 1)
jax.config.update("jax_cpu_collectives_implementation", "gloo")

CHECKPOINT_EVERY = 4


def main(pid: int, nproc: int, port: int, workdir: str, steps: int, kill_at: int) -> None:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                               process_id=pid, initialization_timeout=120)
    import numpy as np

    from sparse_lm.data import pipeline
    from sparse_lm.train import checkpoint as ckpt_lib
    from sparse_lm.train.defaults import base
    from sparse_lm.train.loop import _gather_data_states

    data = base().data
    data.update(source="synthetic:repeat", synthetic_docs=30, synthetic_length=40)
    source = pipeline.make_source(data, data.train_split)
    it = pipeline.TrainIterator(source, seq_len=16, local_batch=2, align=4, seed=5, chunk=True,
                                process_index=pid, process_count=nproc, prefetch=2)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def state_at(step):
        return {"step": jax.make_array_from_process_local_data(replicated, np.int32(step))}
    ckpt = ckpt_lib.Checkpointer(workdir, keep=3, async_save=True)
    start = 0
    if ckpt.all_steps():
        abstract = {"step": jax.ShapeDtypeStruct((), np.int32, sharding=replicated)}
        start, state, data_states, _, _ = ckpt_lib.restore_newest_readable(ckpt, abstract)
        assert int(jax.device_get(state["step"])) == start
        it.restore(data_states[pid])
        print(f"[resume] step {start}", flush=True)
    log = open(os.path.join(workdir, f"batches_p{pid}.txt"), "a")
    for step in range(start, steps):
        batch = next(it)
        digest = hashlib.sha256(batch["tokens"].tobytes() + batch["segment_ids"].tobytes())
        log.write(f"{step} {it.state()['grain']['epoch']} {digest.hexdigest()}\n")
        log.flush()
        if step + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == steps:
            ckpt.save(step + 1, state_at(step + 1), _gather_data_states(it.state()), {},
                      force=True)
    ckpt.close()
    it.close()


if __name__ == "__main__":
    main(*(int(a) if i != 3 else a for i, a in enumerate(sys.argv[1:])))
