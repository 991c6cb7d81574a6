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
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.interpreters import mlir
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vaecli.config import Config
from vaecli.errors import ConfigError

DATA_AXIS = "data"


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
    """How many devices train: train.devices, or all of this process's when it is null."""
    available = len(local_devices())
    wanted = config.train.devices
    if wanted is None:
        return available
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
        """A full copy of every array of `tree` on every device (no copy made where it is one already)."""
        return jax.device_put(tree, self.replicated)

    def shard_batch(self, batch: jax.Array) -> jax.Array:
        """Inside a jitted function: ask XLA to split `batch` by its first axis over the devices."""
        return jax.lax.with_sharding_constraint(batch, self.batch)

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
        return jax.tree.map(jnp.copy, jax.device_put(tree, self.mesh.devices.flat[0]))


def placement_over(count: int) -> Placement:
    """A Placement on the first `count` of this process's devices."""
    mesh = jax.make_mesh((count,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=local_devices()[:count])
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
