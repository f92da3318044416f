"""Ahead-of-time analysis of sharded training on TPU topologies, compiled on a CPU host.

  topology   Cloud TPU slice names -> abstract devices, chip facts, a collective cost model
  hlo_stats  FLOPs and collectives of compiled HLO text, loop trip counts included
  compare    one (preset, topology) row: memory, FLOPs, communication, time estimates

Above the training floor: `compare` builds the training plan (`sparse_lm.train.plan`) and
compiles the full train step. Entry point: `python -m experiments.compare_sharding`.
"""
