"""Devices to compile for: a TPU topology described by libtpu (no TPU needed) or N CPU devices.

    devices_for("v5p:2x2x4")   # 16 compile-only TPU v5p devices (needs libtpu: the jax[tpu] extra)
    devices_for("cpu:8")       # 8 CPU devices (simulated: set before JAX starts, see cpu_flags)
    mesh_for(devices, (1, -1, 1))
    chip_memory(devices)       # bytes of memory per chip (HBM), the limit a program must fit in
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Sequence

from dms_jax import sharding as shd

GIB = 1024 ** 3
# HBM per chip by jax's device_kind (public Cloud TPU figures)
HBM_BY_KIND = {
    "TPU v2": 16 * GIB,  # 2 cores x 8 GiB
    "TPU v3": 32 * GIB,  # 2 cores x 16 GiB
    "TPU v4": 32 * GIB,
    "TPU v4 lite": 8 * GIB,
    "TPU v5 lite": 16 * GIB,  # v5e
    "TPU v5": 95 * GIB,  # v5p
    "TPU v5p": 95 * GIB,
    "TPU v6 lite": 32 * GIB,  # v6e (Trillium)
    "TPU7x": 192 * GIB,
}
TOPOLOGY_EXAMPLES = "v5e:2x2, v5e:4x4, v5p:2x2x1, v5p:2x2x4, v4:2x2x1, v6e:2x2, or cpu:8"
_CPU = re.compile(r"^cpu:(\d+)$")


class TopologyError(ValueError):
    """A topology string that names no devices we can compile for, or a mesh that does not fit it."""


def cpu_count_of(topology: str) -> int | None:
    """N of "cpu:N", else None (a TPU topology)."""
    match = _CPU.match(topology.strip())
    if match is None:
        if topology.strip().lower().startswith("cpu"):
            raise TopologyError(f"--topology {topology!r}: CPU devices are written cpu:N (e.g. cpu:8)")
        return None
    count = int(match.group(1))
    if count < 1:
        raise TopologyError(f"--topology {topology!r}: cpu:N needs N >= 1")
    return count


def simulate_cpu_devices(count: int) -> None:
    """Ask JAX for `count` CPU devices; must run before JAX initialises its backends (the CLI
    does it first thing). Elsewhere (a test process) the devices already there are used."""
    import jax

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    try:
        if not os.environ.get("JAX_PLATFORMS"):
            jax.config.update("jax_platforms", "cpu")  # no accelerator plugin is started
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # backends already initialised: keep what is there
        pass


def libtpu_available() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def devices_for(topology: str) -> list:
    """The devices of `topology`: compile-only TPU devices from libtpu, or the first N CPU devices."""
    import jax

    count = cpu_count_of(topology)
    if count is not None:
        devices = jax.devices("cpu")
        if len(devices) < count:
            raise TopologyError(
                f"--topology cpu:{count} needs {count} CPU devices but this process has "
                f"{len(devices)}: start Python with XLA_FLAGS=--xla_force_host_platform_device_count="
                f"{count} (python -m dms_jax.aot sets it itself when it starts JAX)")
        return devices[:count]
    if not libtpu_available():
        raise TopologyError(
            f"--topology {topology!r} is a TPU topology, and compiling for one needs libtpu, which is "
            f"not installed: pip install -e '.[aot]' (the jax[tpu] extra matching jax "
            f"{jax.__version__}); without it, use --topology cpu:N")
    # compile-only devices never take the chips: let several such processes share libtpu
    # (otherwise the second one fails on libtpu's lockfile)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(topology_name=topology.strip(), platform="tpu")
    except Exception as err:  # libtpu's errors: unknown chip, malformed bounds
        raise TopologyError(
            f"--topology {topology!r} is not a topology libtpu knows ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); write chip:bounds, e.g. "
            f"{TOPOLOGY_EXAMPLES}") from err
    return list(desc.devices)


def chip_memory(devices: Sequence[Any], override_gib: float | None = None) -> int | None:
    """Bytes of memory per device: `override_gib`, else the chip's HBM by its kind; for CPU
    devices the host's available RAM shared by them; None when unknown."""
    if override_gib:
        return int(override_gib * GIB)
    device = devices[0]
    if device.platform == "cpu":
        from dms_jax.plan import available_memory

        free = available_memory(device)
        return None if free is None else free // len(devices)
    return HBM_BY_KIND.get(device.device_kind)


def describe(devices: Sequence[Any]) -> str:
    device = devices[0]
    kind = "CPU" if device.platform == "cpu" else device.device_kind
    return f"{len(devices)} x {kind}"


def parse_mesh(text: str | Sequence[int]) -> tuple[int, ...]:
    """"(1,-1,2)", "1,-1,2" or a sequence -> (data, fsdp, tensor)."""
    if not isinstance(text, str):
        return tuple(int(s) for s in text)
    try:
        shape = tuple(int(s) for s in text.strip().strip("()[]").split(",") if s.strip())
    except ValueError:
        shape = ()
    if len(shape) != len(shd.MESH_AXES):
        raise TopologyError(f"--mesh {text!r}: give {len(shd.MESH_AXES)} integers "
                            f"{shd.MESH_AXES}, e.g. 1,-1,1 (-1 fills one axis)")
    return shape


def mesh_for(devices: Sequence[Any], shape: Sequence[int], topology: str = ""):
    """A (data, fsdp, tensor) mesh over all of `devices`; the error names --mesh and the count."""
    shape = tuple(int(s) for s in shape)
    fixed = math.prod(s for s in shape if s != -1)
    fits = (len(devices) % fixed == 0) if -1 in shape else fixed == len(devices)
    if len(shape) != len(shd.MESH_AXES) or not fits or shape.count(-1) > 1 or any(
            s == 0 or s < -1 for s in shape):
        where = f"topology {topology} has" if topology else "there are"
        raise TopologyError(
            f"mesh {shape} (data, fsdp, tensor) does not fit: {where} {len(devices)} chips; "
            f"give --mesh whose product is {len(devices)} (or with one -1 that fills it, e.g. "
            f"--mesh 1,-1,1), or a topology with {fixed} chips")
    return shd.make_mesh(shape, devices)
