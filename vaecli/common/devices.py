"""Data parallelism over this process's devices: how many train, and where each array lives on them.

Each global batch (train.batch_size) is split over a one-axis mesh named "data"; the weights, Adam's
state and their moving average are replicated, and so are the uint8 dataset and each epoch's index
table: they are small (MNIST's 60,000 images are 47 MB), and a replicated copy lets every device gather
its own rows of a batch where it is, with nothing crossing between devices but the gradient's all-reduce.
The model code knows nothing of this: one sharding constraint on the gathered batch, and XLA's
partitioner carries it through the step (the mesh axis is Auto; make_mesh's default, Explicit, would make
each array's sharding part of its type, for every function to handle).

A step's random draws keep their values on any layout: JAX gives the same numbers however a draw is sharded.
philox2x32 (PRNG_IMPL) computes element i of a draw from the key and i alone, as threefry does in its
partitionable mode (jax_threefry_partitionable, on by default), so each device computes only its rows of the
batch's draw; threefry without that mode computes the whole draw on every device and keeps a slice. What
changes with the device count is the order of the float sums behind the mean over the batch: losses and
weights agree with one device's to rounding, not bit for bit.

Inference (generate, reconstruct, evaluate) splits its batches over the same kind of mesh, its weights replicated
(see vaecli.models.sampling.inference_placement); each of its draws is keyed by an image's index, so the device count
changes no figure beyond rounding.

Several processes (join_processes, on JAX's own distributed runtime): the mesh spans every process's devices and
the global batch is split over all of them. Each process holds the same host data (the same seed, dataset and
checkpoint), so each builds its devices' copies of a replicated array from it (Placement.replicate). Process 0
alone writes the run (is_primary); what it saves and draws from works on its own copy of the replicated state.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import mlir
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vaecli.common.config import Config
from vaecli.common.errors import ConfigError, ProcessesError, UsageError

DATA_AXIS = "data"
# How long a process waits for the others to join (and a process other than 0 for the coordinator to answer).
JOIN_TIMEOUT_SECONDS = 300


def cluster_process_count() -> int:
    """The processes a Slurm step (srun) or an Open MPI job (mpirun) says this run has; 1 outside them.

    The same detection jax.distributed.initialize() runs with no arguments (JAX has no public API for it).
    """
    from jax._src import clusters

    for environment in (clusters.SlurmCluster, clusters.OmpiCluster):
        if environment.is_env_present():
            return environment.get_process_count()
    return 1


def check_process_flags(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Refuse a partial or impossible --coordinator / --num-processes / --process-id, before anything starts."""
    given = [flag is not None for flag in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise UsageError(
            "--coordinator HOST:PORT, --num-processes N and --process-id I go together (or none of them, "
            "under Slurm or Open MPI, which say all three)"
        )
    if not any(given):
        return
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--coordinator {coordinator!r}: give HOST:PORT, e.g. 10.0.0.1:1234")
    if num_processes < 1:
        raise UsageError(f"--num-processes must be at least 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise UsageError(f"--process-id {process_id} is out of range: give 0 to {num_processes - 1}")


def join_processes(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_seconds: int = JOIN_TIMEOUT_SECONDS,
) -> bool:
    """Join a multi-process run when the flags or a Slurm / Open MPI environment ask for one; False when none does.

    Must come before any other use of JAX in the process: the devices of all processes form one backend.
    A plain single-process run starts no coordinator.
    """
    check_process_flags(coordinator, num_processes, process_id)
    if coordinator is None and cluster_process_count() <= 1:
        return False
    if timeout_seconds < 1:
        raise UsageError(f"--join-timeout must be at least 1 second, got {timeout_seconds}")
    if coordinator is not None and process_id != 0:
        wait_for_coordinator(coordinator, timeout_seconds)
    # Collectives between processes on the CPU need an implementation (the default, none, fails them); gloo
    # ships with jaxlib. Other backends ignore the option.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout_seconds)
    except (RuntimeError, ValueError) as error:  # a backend already started, or an environment JAX cannot read
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ProcessesError(f"cannot join the other processes: {first_line}") from error
    return True


def wait_for_coordinator(coordinator: str, timeout_seconds: int) -> None:
    """Until the coordinator accepts a connection; ProcessesError after `timeout_seconds`.

    Checked here because jaxlib ends the whole process (an abort, with a stack trace) when it cannot reach it.
    """
    host, _, port = coordinator.rpartition(":")
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout_seconds)).close()
            return
        except OSError as error:
            if time.monotonic() >= deadline:
                reason = error.strerror or type(error).__name__
                raise ProcessesError(
                    f"cannot reach the coordinator {coordinator} within {timeout_seconds} s ({reason}); "
                    "start process 0 there first, or check --coordinator"
                ) from None
            time.sleep(0.25)


def is_primary() -> bool:
    """Whether this process writes the run (process 0 does; the others train their share and keep nothing)."""
    return jax.process_index() == 0


def agreed_by_all_processes(flag: Callable[[], bool]) -> Callable[[], bool]:
    """`flag` itself in one process; with several, true for all of them when it is true for any.

    Each call is a small collective, so every process must call it at the same points (the training loop
    asks once per chunk): a stop request seen by one process then stops all of them at the same step.
    """
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    def any_process() -> bool:
        return bool(np.any(multihost_utils.process_allgather(np.asarray(bool(flag())))))

    return any_process


def wait_for_all_processes(name: str) -> None:
    """A barrier across processes (none in a single-process run); `name` must be the same in each."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def started_together(prepare: Callable[[], Any]) -> Any:
    """prepare() (this process's part of starting a run: loading the data, taking the run's lock), then agreement
    that every process's part succeeded, before the first step's collectives.

    A process whose part raised tells the others before its error goes on; they stop with one line naming it,
    instead of each waiting in a collective for a process that has left (or dying on a transport error). Every
    process must call this once, at the same point, with no collective inside `prepare`.
    """
    if jax.process_count() == 1:
        return prepare()
    from jax.experimental import multihost_utils

    def failed_processes(failed: bool) -> list[int]:
        flags = multihost_utils.process_allgather(np.asarray(failed, np.int32))
        return [int(index) for index in np.flatnonzero(flags)]

    try:
        prepared = prepare()
    except BaseException:
        # Telling the others must not replace this process's own error (the one its user needs) with a transport one.
        with contextlib.suppress(Exception):
            failed_processes(True)
        raise
    failed = failed_processes(False)
    if failed:
        names = ", ".join(map(str, failed))
        raise ProcessesError(
            f"process {names} could not start the run (its own error says why); this process stops too"
        )
    return prepared


def local_devices() -> list[jax.Device]:
    """The devices this process drives (all of them in a single-process run)."""
    return jax.local_devices()


def devices_phrase(count: int) -> str:
    """'4 cpu devices', '1 gpu device'."""
    return f"{count} {local_devices()[0].platform} device{'s' if count != 1 else ''}"


def describe_devices(count: int) -> str:
    """'4 cpu devices, 1 process': where training runs, for the start line."""
    processes = jax.process_count()
    return f"{devices_phrase(count)}, {processes} process{'es' if processes != 1 else ''}"


def device_count_for(config: Config) -> int:
    """How many devices train: train.devices, or all of them (every process's) when it is null."""
    available = len(jax.devices())
    wanted = config.train.devices
    if wanted is None:
        return available
    if jax.process_count() > 1 and wanted != available:
        raise ConfigError(
            f"train.devices is {wanted}, but a run of {jax.process_count()} processes trains on all of their "
            f"{available} devices; set train.devices to null"
        )
    if wanted > available:
        raise ConfigError(
            f"train.devices is {wanted}, but this process has {devices_phrase(available)}; "
            f"set train.devices to at most {available}, or to null for all of them"
        )
    return wanted


def check_batch_splits(config: Config, count: int) -> None:
    """Refuse a global batch that cannot be shared out equally among `count` devices."""
    batch_size = config.train.batch_size
    if batch_size % count:
        multiple = -(-batch_size // count) * count
        raise ConfigError(
            f"train.batch_size {batch_size} does not split evenly over {count} devices (each takes an equal share "
            f"of the global batch); set train.batch_size to a multiple of {count} such as {multiple}, "
            f"or train.devices to a number that divides {batch_size}"
        )


@dataclass(frozen=True)
class Placement:
    """The mesh training runs on: the batch split along its "data" axis, everything else replicated."""

    mesh: Mesh

    @property
    def count(self) -> int:
        return self.mesh.size

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch(self) -> NamedSharding:
        """Leading (batch) axis split over the devices, the other axes whole."""
        return NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

    def replicate(self, tree: Any) -> Any:
        """A full copy of every array of `tree` on every device (no copy made where it is one already).

        With several processes, each must pass the same values: each builds its own devices' copies from them.
        """
        if self.count == 1:  # plainly on the device, so programs skip the SPMD partitioner (see jit_options)
            return jax.device_put(tree, self.mesh.devices.flat[0])
        if jax.process_count() == 1:
            return jax.device_put(tree, self.replicated)

        def global_copy(leaf):
            # device_put cannot reach another process's devices: one global array, each process filling its own.
            host = np.asarray(leaf)
            return jax.make_array_from_callback(host.shape, self.replicated, lambda index: host[index])

        return jax.tree.map(global_copy, tree)

    def shard_batch(self, batch: jax.Array) -> jax.Array:
        """Inside a jitted function: ask XLA to split `batch` by its first axis over the devices (on one device,
        nothing: see jit_options)."""
        if self.count == 1:
            return batch
        return jax.lax.with_sharding_constraint(batch, self.batch)

    def place_batch(self, batch: Any) -> jax.Array:
        """Outside a jitted function: `batch` placed split by its first axis over the devices (as shard_batch asks
        inside one). An array already committed to one device could not enter a program that spans several."""
        if self.count == 1:
            return jax.device_put(batch, self.mesh.devices.flat[0])
        return jax.device_put(batch, self.batch)

    def jit_options(self) -> dict[str, Any]:
        """jax.jit's options for a function whose results are replicated: out_shardings on several devices, none
        on one. A program given shardings goes through XLA's SPMD partitioner even for one device, and there
        the conv model's step ran 3.2x slower (measured: 36 against 115 images/s on 2 CPU cores)."""
        return {"out_shardings": self.replicated} if self.count > 1 else {}

    def splits(self, batch_size: int) -> bool:
        """Whether a batch of `batch_size` can be split evenly (else it is computed whole on every device)."""
        return batch_size % self.count == 0

    def copy_to_one_device(self, tree: Any) -> Any:
        """A copy of `tree` on the mesh's first device, apart from any buffer a later step donates.

        What is saved and drawn from an epoch's state (checkpoints, pictures) works on one device: it needs
        no all-reduce, and a checkpoint then restores in a process with any number of devices.
        """
        # jnp.copy: device_put from a replicated array hands back its first shard's buffer, even when
        # told may_alias=False (JAX 0.10.2), and the next step would donate that buffer.
        if jax.process_count() > 1:
            # The mesh's first device may be another process's: each process takes its own first copy of the
            # replicated state, the whole of it (process 0 saves and draws from it, on its own device).
            return jax.tree.map(lambda leaf: jnp.copy(leaf.addressable_data(0)), tree)
        return jax.tree.map(jnp.copy, jax.device_put(tree, self.mesh.devices.flat[0]))


def placement_over(count: int) -> Placement:
    """A Placement on the first `count` devices (this process's; with several processes, all of theirs)."""
    mesh = jax.make_mesh((count,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:count])
    if count > 1:
        lower_mulhi_from_halves()
    return Placement(mesh)


def mulhi_from_halves(x: jax.Array, y: jax.Array) -> jax.Array:
    """The high half of the double-width product x * y, from products of half-width limbs (exact, any int dtype)."""
    unsigned = jnp.dtype(f"uint{x.dtype.itemsize * 8}")
    half = x.dtype.itemsize * 4
    mask = unsigned.type((1 << half) - 1)
    a, b = jax.lax.bitcast_convert_type(x, unsigned), jax.lax.bitcast_convert_type(y, unsigned)
    a_low, a_high, b_low, b_high = a & mask, a >> half, b & mask, b >> half
    low_low, low_high, high_low = a_low * b_low, a_low * b_high, a_high * b_low
    middle = (low_low >> half) + (low_high & mask) + (high_low & mask)
    high = a_high * b_high + (low_high >> half) + (high_low >> half) + (middle >> half)
    if jnp.issubdtype(x.dtype, jnp.signedinteger):  # the signed product's high half, from the unsigned one
        high = high - jnp.where(x < 0, b, 0).astype(unsigned) - jnp.where(y < 0, a, 0).astype(unsigned)
    return jax.lax.bitcast_convert_type(high, x.dtype)


@functools.cache
def lower_mulhi_from_halves() -> None:
    """From now on, lower lax.mulhi through mulhi_from_halves instead of chlo.mulhi (for every program).

    philox2x32 (PRNG_IMPL) multiplies with lax.mulhi, and jaxlib 0.10.2 fails to compile chlo.mulhi in any
    program that Shardy partitions over more than one device, even a replicated one ("Unable to convert
    MHLO to StableHLO"; tests/test_devices.py checks that it still does). The replacement gives the same
    bits from four half-width products instead of one wide one: random bits cost about twice as much (see
    make bench's data-parallel rows). Done only for a run on several devices, without trying chlo.mulhi
    first: a program that fails to compile prints MLIR's diagnostics on stderr.
    """
    mlir.register_lowering(jax.lax.mulhi_p, mlir.lower_fun(mulhi_from_halves, multiple_results=False))
