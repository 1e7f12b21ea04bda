"""The peak FLOP/s of the devices a run uses, for its MFU (hardware table in :mod:`convscale_cli.budget`)."""

from __future__ import annotations

import jax

from convscale_cli.budget import detect_hardware, get_hardware


def device_peak(hardware: str | None = None, peak_flops: float | None = None) -> tuple[str, float]:
    """``(hardware key, peak FLOP/s per device)`` for this process's devices.

    Args:
        hardware: a hardware table key to use instead of detecting it from ``device_kind``.
        peak_flops: a per-device peak to use instead of the table's (or the configured CPU peak).

    On CPU the peak is the configured one (``CONVSCALE_CPU_PEAK_FLOPS``, else the documented default of
    :mod:`convscale_cli.budget`), not one measured per run: a timed matmul follows the machine's load of the moment,
    and runs' MFUs could not be compared. XLA's virtual CPU devices share the host's cores, so each gets an equal
    share.

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
    return name, get_hardware("cpu").peak_flops / jax.local_device_count()
