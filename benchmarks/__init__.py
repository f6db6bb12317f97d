"""Benchmarks of samfunc, run as modules from the repository root.

    python -m benchmarks.step_time      # step time and peak memory, variant by variant
    python -m benchmarks.parity         # largest differences from the references
    python -m benchmarks.profile_step   # where one variant's step spends its time
    python -m benchmarks.small_step     # small models: time, aten ops, host syncs, Python calls

Modules of the step-time benchmark, one job each: ``models`` (the model zoo),
``variants`` (one builder per implementation, registered with ``@variant``),
``jax_port`` (the SAM step in JAX), ``timing`` (timing loop and memory probes),
``child`` (re-running one variant in a fresh process), ``machine`` (machine
description and GEMM probe) and ``report`` (markdown rendering).
"""
