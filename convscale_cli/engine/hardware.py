"""The peak FLOP/s of the devices a run uses, for its MFU (hardware table in :mod:`convscale_cli.budget`)."""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp

from convscale_cli.budget import CPU_PEAK_ENV, detect_hardware, get_hardware


@functools.cache
def measure_cpu_peak(size: int = 512, repeats: int = 5) -> float:
    """FLOP/s of the host CPU on a float32 matmul (best of ``repeats``), measured once per process.

    A CPU has no published peak; a large matmul is close to the best XLA reaches on it, so MFU against this number
    says how far a model's step is from the machine's practical limit.
    """
    x = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / max(best, 1e-9)


def device_peak(hardware: str | None = None, peak_flops: float | None = None) -> tuple[str, float]:
    """``(hardware key, peak FLOP/s per device)`` for this process's devices.

    Args:
        hardware: a hardware table key to use instead of detecting it from ``device_kind``.
        peak_flops: a per-device peak to use instead of the table's (or, on CPU, the measured one).

    On CPU the peak is ``CONVSCALE_CPU_PEAK_FLOPS`` when set, else measured by :func:`measure_cpu_peak`; XLA's
    virtual CPU devices share the host's cores, so each gets an equal share.

    Raises:
        UsageError: an unknown hardware name or device kind.
    """
    device = jax.local_devices()[0]
    name = hardware or detect_hardware("cpu" if device.platform == "cpu" else device.device_kind)
    get_hardware(name)  # an unknown name fails here, with close matches
    if peak_flops is not None:
        return name, float(peak_flops)
    if name != "cpu":
        return name, get_hardware(name).peak_flops
    if os.environ.get(CPU_PEAK_ENV, "").strip():
        total = get_hardware("cpu").peak_flops
    else:
        total = measure_cpu_peak()
    return name, total / jax.local_device_count()
