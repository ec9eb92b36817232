"""Devices: joining a multi-host run, the mesh, and where arrays live on it.

The mesh has two axes, `data` and `fsdp`. A batch is split over both (every device sees
different examples); parameters and optimizer state are either replicated or, when `fsdp > 1`,
split over `fsdp` along their largest dimension that the axis size divides. The rule looks only
at shapes, so the same function places parameters, Adam moments and anything else in the state.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXES = ("data", "fsdp")


def initialize_distributed(heartbeat_timeout_seconds: int = 100) -> None:
    """Joins the other processes when launched on several hosts; a no-op on one host.

    Must run before anything touches a device. `jax.distributed.initialize()` finds the
    coordinator itself on TPU pods, SLURM and Open MPI, or from `JAX_COORDINATOR_ADDRESS`
    together with `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (e.g. several processes on one
    machine).

    Args:
      heartbeat_timeout_seconds: `mesh.heartbeat_timeout_seconds`: how long the others wait
        for a process that died before they stop with JAX's message that another task died.
    """
    if jax.distributed.is_initialized() or not _launched_on_several_hosts():
        return
    settings = _distributed_settings(os.environ)
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_seconds, **settings)


def _distributed_settings(env) -> dict:
    """Keyword arguments of `jax.distributed.initialize` given by the environment."""
    names = {
        "JAX_NUM_PROCESSES": "num_processes",
        "JAX_PROCESS_ID": "process_id",
    }
    settings = {}
    for variable, argument in names.items():
        value = env.get(variable)
        if value is None:
            continue
        if not value.isdigit():
            raise ValueError(f"{variable} must be a whole number, got {value!r}.")
        settings[argument] = int(value)
    return settings


def _launched_on_several_hosts() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    counts = (env.get("SLURM_NTASKS", "1"), env.get("OMPI_COMM_WORLD_SIZE", "1"))
    return any(count.isdigit() and int(count) > 1 for count in counts)


def mesh_shape(mesh_config: ml_collections.ConfigDict, device_count: int) -> tuple[int, int]:
    """The (data, fsdp) sizes `config.mesh` asks for on `device_count` devices.

    Raises:
      ValueError: the sizes do not fit the devices (or the processes).
    """
    data, fsdp = mesh_config.data, mesh_config.fsdp
    if data == -1:
        data = device_count // fsdp if device_count % fsdp == 0 else 0
    elif fsdp == -1:
        fsdp = device_count // data if device_count % data == 0 else 0
    if data < 1 or fsdp < 1 or data * fsdp > device_count or (data * fsdp) % jax.process_count():
        raise ValueError(
            f"mesh.data={mesh_config.data} x mesh.fsdp={mesh_config.fsdp} does not fit the "
            f"{device_count} devices of {jax.process_count()} process(es); choose sizes whose "
            f"product divides into {device_count} devices (e.g. --config.mesh.data=-1)."
        )
    return data, fsdp


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
    """The (data, fsdp) mesh the config asks for.

    Args:
      mesh_config: `config.mesh`; one axis may be -1 for "all remaining devices".
      devices: devices to use (default: all of them).

    Raises:
      ValueError: the axis sizes do not fit the number of devices.
    """
    devices = jax.devices() if devices is None else devices
    data, fsdp = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(
        (data, fsdp), DATA_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices[: data * fsdp]
    )


def partition_spec(shape: tuple[int, ...], fsdp_size: int) -> PartitionSpec:
    """Replicated, or split over `fsdp` along the largest dimension it divides (the last of
    equal ones)."""
    if fsdp_size == 1:
        return PartitionSpec()
    candidates = [(size, dim) for dim, size in enumerate(shape) if size % fsdp_size == 0]
    if not candidates:
        return PartitionSpec()
    _, dim = max(candidates)
    spec = [None] * len(shape)
    spec[dim] = "fsdp"
    return PartitionSpec(*spec)


def tree_shardings(abstract_tree, mesh: Mesh):
    """NamedShardings for every leaf of a tree of arrays or ShapeDtypeStructs."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, partition_spec(tuple(leaf.shape), fsdp_size)),
        abstract_tree,
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over all devices of the mesh."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh, field: str) -> None:
    """A global batch must split evenly over the mesh's devices."""
    if batch_size % mesh.size:
        raise ValueError(
            f"{field}={batch_size} does not split over the {mesh.size} devices of the mesh "
            f"{dict(mesh.shape)}; use a multiple of {mesh.size}."
        )


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict:
    """Assembles each process's slice of a batch into global arrays split by `sharding`."""
    processes = jax.process_count()

    def assemble(local: np.ndarray) -> jax.Array:
        global_shape = (local.shape[0] * processes, *local.shape[1:])
        return jax.make_array_from_process_local_data(sharding, local, global_shape)

    return jax.tree.map(assemble, local_batch)


def host_to_global(tree, shardings):
    """Places host (NumPy) leaves onto their shardings; leaves that are already global
    `jax.Array`s stay as they are. Every process must pass the same host values."""

    def place(value, sharding):
        if isinstance(value, jax.Array):
            return value
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(place, tree, shardings)
