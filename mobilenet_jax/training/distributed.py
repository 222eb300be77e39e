"""Devices, processes and the data-parallel mesh.

Synchronous data parallelism is written with ``jax.shard_map`` over a 1-D mesh whose
only axis, ``'batch'``, spans every device of every process. The step function sees
its shard of the global batch and all-reduces gradients with ``lax.pmean`` — the
semantics of pmap training, but ``jax.pmap`` is in maintenance mode (and built on
shard_map since JAX 0.8), and shard_map keeps the collectives explicit where
``jit`` with shardings would leave them to the partitioner.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXIS = "batch"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None):
    """Joins a multi-process run when one is configured or detected; a no-op for one process.

    Explicit arguments (or ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
    ``JAX_PROCESS_ID``) start a run by hand, e.g. two processes on one CPU machine;
    without them, JAX's own detection handles TPU pods, SLURM and Open MPI.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    explicit = coordinator_address is not None
    detected = _cluster_detected()
    if not (explicit or detected):
        return
    if explicit and (num_processes is None or process_id is None):
        raise ValueError("A coordinator address needs the number of processes and this process's id as well.")
    # Cross-process collectives on CPU devices need an implementation; gloo ships with
    # jaxlib. The setting only concerns the CPU client, so GPU/TPU runs are unaffected.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    logging.info(
        "Process %d of %d, %d local devices.", jax.process_index(), jax.process_count(), jax.local_device_count()
    )


def _cluster_detected() -> bool:
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    mpi = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    return slurm or tpu_pod or mpi


def make_mesh() -> Mesh:
    """A 1-D mesh over all devices of all processes."""
    return Mesh(np.asarray(jax.devices()), (BATCH_AXIS,))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    devices = mesh.devices.size
    if global_batch_size <= 0 or global_batch_size % devices:
        raise ValueError(
            f"batch_size={global_batch_size} must be a positive multiple of the device count ({devices}); "
            f"try {max(devices, global_batch_size // devices * devices)}."
        )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Assembles each process's numpy batch into one global array sharded over the batch axis."""
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def to_host(tree):
    """Numpy copies of replicated arrays, read from this process's first local shard.

    ``jax.device_get`` refuses arrays that span other processes' devices; a
    replicated array holds the whole value on every device.
    """
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array) else a, tree)


def as_numpy(batch: dict) -> dict:
    """A host batch (tf.data's tensors or arrays) as NumPy arrays."""
    return {k: np.asarray(v) for k, v in batch.items()}
