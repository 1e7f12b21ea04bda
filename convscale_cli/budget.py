"""Compute units: hardware peaks, utilisation, and budgets such as ``10k-core-hours`` or ``250-h100-hours``.

Smith et al. (2023) measure every pre-training budget in **TPU-v4 core-hours**, estimated by eye from steps per second
(their footnote 2), not counted in FLOPs; docs/paper-notes.md derives the numbers below. This module turns that
axis into FLOPs and back, so runs on other hardware (and the planner) can be placed on the paper's plots:

* A *model FLOP* budget is ``6 x MACs x examples`` (forward + backward ~ 3 forward passes, 2 FLOPs per MAC), the
  convention of :class:`convscale_cli.registry.ModelCount`.
* A device-hour budget on hardware ``h`` holds ``hours x 3600 x peak(h) x mfu`` model FLOPs, where ``peak`` is the dense
  bf16 peak per device (per *TensorCore* for TPUs, the unit the paper counts) and ``mfu`` the model-FLOP utilisation.
* The TPU-v4 utilisation is **calibrated** on the paper's one stated end point: NFNet-F7+ pre-trained for 8 epochs of
  JFT-4B (4e9 images) at 224 px with a 30k-class head "takes roughly 110k TPU-v4 core hours". With convscale's NFNet
  counts (100.86 GMACs, mid-128 rounding) that is 1.94e22 FLOPs in 5.45e22 peak FLOPs: MFU ~ 0.356.
* TPU-v3 is calibrated the same way on the paper's "250 TPU-v3 core hours" for the same run (read as 250k):
  MFU ~ 0.35, consistent with "roughly double the theoretical flops" per core (footnote 1).
* GPUs default to the TPU-v4 utilisation (equal-utilisation conversion). The paper warns that NFNets "perform less
  well" off TPU-v4, so pass a measured ``mfu`` when you have one (``convscale plan --mfu``).

Nothing here imports jax: ``convscale plan`` must answer in well under a second.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from convscale_cli.errors import UsageError, did_you_mean

SECONDS_PER_HOUR = 3600.0

# Training FLOPs per forward multiply-accumulate: the backward pass costs about two forwards, and a MAC is 2 FLOPs
# (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", §2.1: C ~ 6 N per token).
TRAIN_FLOPS_PER_MAC = 6.0


def train_flops(macs: float) -> float:
    """Training FLOPs of one example whose forward pass takes ``macs`` multiply-accumulates: 6 x MACs."""
    return TRAIN_FLOPS_PER_MAC * macs


# The calibration run (Smith et al. 2023; docs/paper-notes.md): NFNet-F7+, 8 epochs of JFT-4B, 224 px, 30k classes.
CALIBRATION_MACS_PER_IMAGE = 100.86e9  # F7+ forward MACs at 224 px with a 30k head (mid-128 rounding)
CALIBRATION_EXAMPLES = 8 * 4.0e9  # 8 epochs of JFT-4B's "roughly 4 billion" images (Smith et al. 2023 §2)
CALIBRATION_TRAIN_FLOPS = train_flops(CALIBRATION_MACS_PER_IMAGE) * CALIBRATION_EXAMPLES
CALIBRATION_TPU_V4_CORE_HOURS = 110e3  # "roughly 110k TPU-v4 core hours to pre-train"
CALIBRATION_TPU_V3_CORE_HOURS = 250e3  # "250 TPU-v3 core hours", almost certainly 250k

TPU_V4_CORE_PEAK_FLOPS = 137.5e12  # 275 TFLOP/s per chip, 2 TensorCores (Cloud TPU v4 docs)
TPU_V3_CORE_PEAK_FLOPS = 61.5e12  # 123 TFLOP/s per chip, 2 TensorCores (Cloud TPU v3 docs)

TPU_V4_MFU = CALIBRATION_TRAIN_FLOPS / (CALIBRATION_TPU_V4_CORE_HOURS * SECONDS_PER_HOUR * TPU_V4_CORE_PEAK_FLOPS)
TPU_V3_MFU = CALIBRATION_TRAIN_FLOPS / (CALIBRATION_TPU_V3_CORE_HOURS * SECONDS_PER_HOUR * TPU_V3_CORE_PEAK_FLOPS)

# The CPU has no published peak: it is configured (env var), measured by the caller, or this default. The default is
# a 2-core laptop-class x86 CPU in fp32: 2 cores x 2.5 GHz x 32 FLOPs/cycle (two 8-wide AVX2 FMA units) = 160 GFLOP/s.
CPU_PEAK_ENV = "CONVSCALE_CPU_PEAK_FLOPS"
DEFAULT_CPU_PEAK_FLOPS = 160e9
# XLA's CPU convolutions on tiny, grouped, 32 px layers use a small fraction of the FMA peak: the NFNet ladder of
# examples/quickstart.toml trains at 0.4-0.8 GFLOP/s of model FLOPs on the shared 2-core CI CPU (1-4% of a float32
# matmul's rate there). 0.01 of the default peak (1.6 GFLOP/s) makes `plan --budget N-cpu-hours` fit in
# about N hours for those studies; larger models at higher resolution reach more, so pass a measured --mfu.
DEFAULT_CPU_MFU = 0.01
# The largest budget accepted, in model FLOPs: ~5e12 TPU-v4 core-hours, some 10^4 times the largest training runs
# published so far. Past it a typo (1e308-flops, 1e300-core-hours) would overflow to inf, or plan runs of 1e286 epochs.
MAX_BUDGET_FLOPS = 1e30


def check_mfu(mfu: float) -> float:
    """Return ``mfu`` if it is a utilisation in (0, 1]; raise UsageError otherwise."""
    if not (isinstance(mfu, (int, float)) and math.isfinite(mfu) and 0.0 < mfu <= 1.0):
        raise UsageError(f"MFU {mfu!r} is not a fraction in (0, 1], e.g. 0.35")
    return float(mfu)


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One accelerator kind: its dense peak per counted unit and the default model-FLOP utilisation.

    Attributes:
        name: table key (``tpu-v4``, ``h100``, ``cpu``).
        peak_flops: dense peak FLOP/s of one counted unit (a TPU TensorCore, a GPU, the whole CPU) in the precision
            training uses (bf16; fp32 for the CPU).
        mfu: default model-FLOP utilisation used to convert between device-hours and model FLOPs.
        hour_unit: how one hour of the unit is spelled in budgets (``core-hours`` for TPUs, ``hours`` otherwise).
        description: one line for tables and errors.
    """

    name: str
    peak_flops: float
    mfu: float
    hour_unit: str
    description: str

    def __post_init__(self) -> None:
        if not (math.isfinite(self.peak_flops) and self.peak_flops > 0):
            raise UsageError(f"peak FLOP/s of {self.name} must be a positive number, got {self.peak_flops!r}")
        check_mfu(self.mfu)

    @property
    def unit(self) -> str:
        """The budget unit of one hour of this hardware, e.g. ``h100-hours``."""
        return f"{self.name}-{self.hour_unit}"

    def flops_per_hour(self, mfu: float | None = None) -> float:
        """Model FLOPs one unit-hour delivers at ``mfu`` (default: this hardware's)."""
        return SECONDS_PER_HOUR * self.peak_flops * (self.mfu if mfu is None else check_mfu(mfu))


HARDWARE: dict[str, Hardware] = {
    "tpu-v4": Hardware(
        "tpu-v4", TPU_V4_CORE_PEAK_FLOPS, TPU_V4_MFU, "core-hours", "TPU v4 TensorCore (the paper's unit)"
    ),
    "tpu-v3": Hardware("tpu-v3", TPU_V3_CORE_PEAK_FLOPS, TPU_V3_MFU, "core-hours", "TPU v3 TensorCore"),
    "a100": Hardware("a100", 312e12, TPU_V4_MFU, "hours", "NVIDIA A100 SXM, dense bf16"),
    "h100": Hardware("h100", 989e12, TPU_V4_MFU, "hours", "NVIDIA H100 SXM, dense bf16"),
    "h200": Hardware("h200", 989e12, TPU_V4_MFU, "hours", "NVIDIA H200 (H100 compute, more HBM), dense bf16"),
    "cpu": Hardware("cpu", DEFAULT_CPU_PEAK_FLOPS, DEFAULT_CPU_MFU, "hours", "host CPU, fp32 (configurable peak)"),
}

# "core-hours" alone means the paper's unit.
_ALIASES = {"core-hours": "tpu-v4"}
_SUFFIXES = {"k": 1e3, "K": 1e3, "M": 1e6}
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_BUDGET_RE = re.compile(
    rf"^\s*(?P<number>{_NUMBER})(?P<suffix>[kKM])?[\s_-]*(?P<unit>[A-Za-z][\w\s.-]*?)?\s*$",
    re.ASCII,  # ASCII digits only
)


def cpu_peak_flops() -> float:
    """The CPU's peak FLOP/s: ``CONVSCALE_CPU_PEAK_FLOPS`` if set (e.g. ``2.5e11``), else the documented default."""
    raw = os.environ.get(CPU_PEAK_ENV, "").strip()
    if not raw:
        return DEFAULT_CPU_PEAK_FLOPS
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{CPU_PEAK_ENV}={raw!r} is not a positive number of FLOP/s, e.g. 1.6e11")
    return value


def get_hardware(name: str, *, peak_flops: float | None = None, mfu: float | None = None) -> Hardware:
    """The hardware called ``name`` (``tpu-v4``, ``h100``, ...), optionally with a measured peak or utilisation.

    The CPU's peak comes from ``peak_flops`` (a measured value), else ``CONVSCALE_CPU_PEAK_FLOPS``, else the default.

    Raises:
        UsageError: unknown hardware (with close matches), or a non-positive peak / out-of-range MFU.
    """
    key = name.strip().lower()
    if key not in HARDWARE:
        hint = did_you_mean(key, HARDWARE)
        hint = f"{hint} " if hint else ""
        raise UsageError(f"unknown hardware {name!r}: {hint}choose from {', '.join(HARDWARE)}")
    hw = HARDWARE[key]
    if key == "cpu" and peak_flops is None:
        peak_flops = cpu_peak_flops()
    if peak_flops is not None or mfu is not None:
        hw = dataclasses.replace(
            hw,
            peak_flops=hw.peak_flops if peak_flops is None else float(peak_flops),
            mfu=hw.mfu if mfu is None else check_mfu(mfu),
        )
    return hw


def detect_hardware(device_kind: str) -> str:
    """Map a JAX ``device.device_kind`` (``"TPU v4"``, ``"NVIDIA H100 80GB HBM3"``, ``"cpu"``) to a table key.

    Unknown accelerators map to ``cpu`` only when they are CPUs; anything else raises so a ledger never silently
    uses the wrong peak.

    Raises:
        UsageError: a device kind with no entry in :data:`HARDWARE`.
    """
    kind = device_kind.lower()
    for pattern, key in (
        (r"tpu\s*v4", "tpu-v4"),
        (r"tpu\s*v3", "tpu-v3"),
        (r"a100", "a100"),
        (r"h100", "h100"),
        (r"h200|gh200", "h200"),
        (r"^cpu$|^host$", "cpu"),
    ):
        if re.search(pattern, kind):
            return key
    raise UsageError(f"no peak FLOP/s known for device kind {device_kind!r}; known hardware: {', '.join(HARDWARE)}")


def accepted_units() -> list[str]:
    """Every unit spelling :func:`parse_budget` accepts."""
    return ["core-hours", *(hw.unit for hw in HARDWARE.values()), "flops"]


def _accepted_forms() -> str:
    return (
        "accepted forms: 10k-core-hours (TPU-v4), 0.5-tpu-v3-core-hours, 250-h100-hours, 2k-a100-hours, "
        "3-cpu-hours, 1.5e21-flops (k and M suffixes allowed)"
    )


def _resolve_unit(text: str, unit: str) -> str:
    """Canonical unit key: a hardware name, or ``flops``."""
    unit = re.sub(r"[\s_]+", "-", unit.strip().lower())
    unit = re.sub(r"-hour$", "-hours", unit)
    if unit in ("flops", "flop"):
        return "flops"
    if unit in _ALIASES:
        return _ALIASES[unit]
    for hw in HARDWARE.values():
        if unit == hw.unit:
            return hw.name
    hint = did_you_mean(unit, accepted_units())
    hint = f"{hint} " if hint else ""
    raise UsageError(f"unknown budget unit {unit!r} in {text!r}: {hint}{_accepted_forms()}")


@dataclasses.dataclass(frozen=True)
class Budget:
    """A compute budget in its user-given unit.

    Attributes:
        amount: how many units (core-hours, device-hours or FLOPs); positive and finite.
        unit: ``flops`` or a :data:`HARDWARE` key (``tpu-v4`` for ``core-hours``).
        text: what the user typed, for messages.
    """

    amount: float
    unit: str
    text: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.amount) and self.amount > 0):
            raise UsageError(f"budget {self.text or self.amount!r} must be a positive finite amount")
        if self.unit != "flops" and self.unit not in HARDWARE:
            raise UsageError(f"budget unit {self.unit!r} is not 'flops' or one of {', '.join(HARDWARE)}")
        # At the hardware's default peak and utilisation; a plan checks again with its own (check_budget_flops).
        flops = self.amount if self.is_flops else self.amount * HARDWARE[self.unit].flops_per_hour()
        check_budget_flops(flops, self.text or self.format())

    @property
    def is_flops(self) -> bool:
        """Whether the budget is given directly in model FLOPs."""
        return self.unit == "flops"

    def hardware(self, *, peak_flops: float | None = None, mfu: float | None = None) -> Hardware | None:
        """The budget's hardware (None for a FLOP budget)."""
        return None if self.is_flops else get_hardware(self.unit, peak_flops=peak_flops, mfu=mfu)

    def to_flops(self, mfu: float | None = None, *, peak_flops: float | None = None) -> float:
        """Model FLOPs (6 x MACs x examples) the budget buys at ``mfu`` (default: the hardware's)."""
        if self.is_flops:
            return self.amount
        hw = get_hardware(self.unit, peak_flops=peak_flops)
        return self.amount * hw.flops_per_hour(mfu)

    def flops_on(self, hardware: Hardware) -> float:
        """Model FLOPs the budget buys on ``hardware`` (its peak and MFU, e.g. with a measured ``--mfu``).

        Raises:
            UsageError: a device-hour budget for a different hardware than ``hardware``.
        """
        if self.is_flops:
            return self.amount
        if hardware.name != self.unit:
            raise UsageError(
                f"budget {self.text or self.format()!r} is in {self.unit_label} but the hardware is {hardware.name!r}; "
                f"drop `hardware` or give the budget as {hardware.unit} or FLOPs"
            )
        return self.amount * hardware.flops_per_hour()

    def from_flops(self, flops: float, mfu: float | None = None, *, peak_flops: float | None = None) -> float:
        """How many of this budget's units ``flops`` model FLOPs cost."""
        if self.is_flops:
            return float(flops)
        return float(flops) / get_hardware(self.unit, peak_flops=peak_flops).flops_per_hour(mfu)

    @property
    def unit_label(self) -> str:
        """The unit as users write it (``core-hours`` for TPU-v4, the paper's axis)."""
        if self.is_flops:
            return "FLOPs"
        return "core-hours" if self.unit == "tpu-v4" else HARDWARE[self.unit].unit

    def format(self, amount: float | None = None) -> str:
        """``amount`` (default: the whole budget) in this budget's unit, e.g. ``'110k core-hours'``."""
        return format_amount(self.amount if amount is None else amount, self.unit_label)

    def __str__(self) -> str:
        return self.format()


def check_budget_flops(flops: float, text: str) -> float:
    """Return ``flops`` if it is a finite budget of at most :data:`MAX_BUDGET_FLOPS` model FLOPs.

    Raises:
        UsageError: naming the budget ``text`` and the limit (an overflow to inf included).
    """
    if not (math.isfinite(flops) and flops <= MAX_BUDGET_FLOPS):
        worth = f"{flops:.3g} model FLOPs" if math.isfinite(flops) else "its model FLOPs overflow a float"
        raise UsageError(
            f"budget {text!r} is too large: {worth}, more than the {MAX_BUDGET_FLOPS:.0e} model FLOPs "
            f"({flops_to_core_hours(MAX_BUDGET_FLOPS):.2g} TPU-v4 core-hours) convscale accepts"
        )
    return flops


def parse_budget(text: str) -> Budget:
    """Parse ``10k-core-hours``, ``250-h100-hours``, ``0.5-tpu-v3-core-hours``, ``3-cpu-hours``, ``1.5e21-flops``.

    ``core-hours`` alone means TPU-v4 core-hours (the paper's axis). ``k`` multiplies by 1e3 and ``M`` by 1e6.

    Raises:
        UsageError: malformed text, missing or unknown unit (with close matches), a non-positive or infinite amount,
            more than :data:`MAX_BUDGET_FLOPS`; the message lists the accepted forms.
    """
    match = _BUDGET_RE.match(text) if isinstance(text, str) else None
    if match is None:
        raise UsageError(f"cannot read budget {text!r}: {_accepted_forms()}")
    if not match.group("unit"):
        raise UsageError(f"budget {text!r} has no unit: {_accepted_forms()}")
    unit = _resolve_unit(text, match.group("unit"))
    amount = float(match.group("number")) * _SUFFIXES.get(match.group("suffix") or "", 1.0)
    if not math.isfinite(amount):
        raise UsageError(f"budget {text!r} is not a finite amount: {_accepted_forms()}")
    if amount <= 0:
        raise UsageError(f"budget {text!r} must be positive: {_accepted_forms()}")
    return Budget(amount=amount, unit=unit, text=text.strip())


def flops_to_core_hours(train_flops: float, mfu: float | None = None) -> float:
    """TPU-v4 core-hours (the paper's x axis) that ``train_flops`` model FLOPs take at the calibrated utilisation."""
    return float(train_flops) / HARDWARE["tpu-v4"].flops_per_hour(mfu)


def core_hours_to_flops(core_hours: float, mfu: float | None = None) -> float:
    """Model FLOPs that ``core_hours`` TPU-v4 core-hours deliver at the calibrated utilisation."""
    return float(core_hours) * HARDWARE["tpu-v4"].flops_per_hour(mfu)


def flops_to_device_hours(train_flops: float, hardware: Hardware) -> float:
    """Hours of one ``hardware`` unit that ``train_flops`` model FLOPs take at the hardware's MFU."""
    return float(train_flops) / hardware.flops_per_hour()


def format_amount(value: float, unit: str) -> str:
    """Human form of an amount: ``110k core-hours``, ``1.94e+22 FLOPs``, ``0.25 h100-hours``."""
    if unit == "FLOPs":
        return f"{value:.3g} FLOPs"
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix} {unit}"
    return f"{value:.3g} {unit}"


__all__ = [
    "CALIBRATION_TRAIN_FLOPS",
    "CPU_PEAK_ENV",
    "HARDWARE",
    "MAX_BUDGET_FLOPS",
    "TPU_V3_MFU",
    "TPU_V4_MFU",
    "Budget",
    "Hardware",
    "accepted_units",
    "check_budget_flops",
    "check_mfu",
    "core_hours_to_flops",
    "cpu_peak_flops",
    "detect_hardware",
    "flops_to_core_hours",
    "flops_to_device_hours",
    "format_amount",
    "get_hardware",
    "parse_budget",
]
