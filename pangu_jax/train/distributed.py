"""Starting a training process: its share of each GPU's memory, and the run's other processes (hosts),
joined by `jax.distributed.initialize` when a launcher started them."""

from __future__ import annotations

import os

import jax

__all__ = ["claim_device_memory", "initialize_if_launched"]

# What the launchers JAX knows set in each process it starts.
LAUNCHER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "MEGASCALE_COORDINATOR_ADDRESS")


def claim_device_memory(fraction: float = 0.95) -> None:
    """Let XLA's allocator take `fraction` of each GPU's memory instead of its default three quarters,
    unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.

    A training step fills the card (2.6B with several micro-batches a step
    does not fit in three quarters of 80 GB). Effective only before JAX
    first uses a device.
    """
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(fraction))


def initialize_if_launched() -> bool:
    """Join the run's other processes when a launcher started this one (SLURM, Open MPI, or the JAX_*
    variables: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); alone, do nothing.

    Returns whether this process is one of several.
    """
    if not any(os.environ.get(name) for name in LAUNCHER_ENV):
        return False
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:  # started by hand: JAX reads the address itself, the process count and id from us
        try:
            count, index = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except (KeyError, ValueError):
            raise ValueError("JAX_COORDINATOR_ADDRESS is set: set JAX_NUM_PROCESSES and JAX_PROCESS_ID too "
                             "(whole numbers: how many processes, and which this one is from 0)") from None
        jax.distributed.initialize(address, count, index)
    else:  # SLURM or Open MPI: JAX reads the launcher's variables
        jax.distributed.initialize()
    return jax.process_count() > 1
