"""Devices, mesh and shardings: data parallel by default, parameters sharded over the same axis with ``fsdp``.

One 1-D mesh axis ``data`` spans every device of every process. Batches are split along it; parameters and optimiser
state are replicated (data parallel) or, with ``fsdp``, each array is split along its largest dimension that the
device count divides (ZeRO-3 style; XLA inserts the all-gathers). Checkpoints are restored straight into whichever
layout the *current* run uses, so a run may resume on a different number of devices.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from convscale_cli.errors import UsageError

DATA_AXIS = "data"


def _auto_cluster() -> bool:
    """Whether the environment describes a multi-process job jax can join on its own (TPU pod slice, SLURM)."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts


def init_distributed(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Join a multi-process job before any device is touched.

    Explicit flags win; otherwise a TPU pod slice or a SLURM job with several tasks is detected from the environment
    and :func:`jax.distributed.initialize` reads its settings from there. A single process does nothing.

    Raises:
        UsageError: an incomplete set of flags.
    """
    explicit = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise UsageError(
                "multi-host needs all of coordinator_address, num_processes and process_id, got "
                f"{coordinator_address!r}, {num_processes!r}, {process_id!r}"
            )
        if not 0 <= process_id < num_processes:  # type: ignore[operator]
            raise UsageError(f"process_id {process_id} is not in [0, {num_processes})")
        if jax.distributed.is_initialized():
            return
        # CPU collectives across processes need gloo (the default is single-process only); accelerators ignore it.
        # Asking for the backend here would initialise it, which must wait until after `initialize`.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    elif _auto_cluster() and not jax.distributed.is_initialized():
        jax.distributed.initialize()


def make_mesh() -> Mesh:
    """A 1-D ``data`` mesh over all devices of all processes."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def check_batch(batch_size: int, mesh: Mesh, process_count: int) -> None:
    """Raise a UsageError unless the global batch splits evenly over devices and processes."""
    devices = mesh.size
    if batch_size % devices:
        raise UsageError(
            f"batch size {batch_size} is not divisible by {devices} devices; "
            f"use a multiple of {devices} such as {max(devices, batch_size - batch_size % devices)}"
        )
    if batch_size % process_count:
        raise UsageError(f"batch size {batch_size} is not divisible by {process_count} processes")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split the leading (batch) dimension over the data axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same array on every device."""
    return NamedSharding(mesh, PartitionSpec())


def fsdp_spec(shape: tuple[int, ...], devices: int) -> PartitionSpec:
    """How ``fsdp`` splits an array of ``shape`` over ``devices``: along its largest dimension that ``devices`` divides.

    Small or indivisible arrays (gains, biases) stay replicated, where sharding would cost more in communication than
    it saves in memory.
    """
    if devices == 1 or int(np.prod(shape, dtype=np.int64)) < 2**12:
        return PartitionSpec()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % devices == 0:
            spec: list[str | None] = [None] * len(shape)
            spec[dim] = DATA_AXIS
            return PartitionSpec(*spec)
    return PartitionSpec()


def state_shardings(abstract_state: Any, mesh: Mesh, *, fsdp: bool) -> Any:
    """Shardings for every leaf of an (abstract) train state: replicated, or FSDP-split with ``fsdp``."""

    def leaf(x: Any) -> NamedSharding:
        shape = tuple(getattr(x, "shape", ()))
        if not fsdp or not shape:
            return replicated(mesh)
        return NamedSharding(mesh, fsdp_spec(shape, mesh.size))

    return jax.tree_util.tree_map(leaf, abstract_state)
