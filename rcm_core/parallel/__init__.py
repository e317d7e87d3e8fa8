"""Distributed training of the DiT: FSDP2 weight sharding, batch sharding and Ulysses context parallelism with
tangent-carrying collectives, activation checkpointing (`parallelize_dit`, `build_parallel_dit`, `net_copier`).

Order of application and the reasons: parallelize.py. Degrees: parallel_dims.py.
"""
