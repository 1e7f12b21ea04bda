"""Compute units: budget parsing, hardware table, the paper's TPU-v4 calibration (docs/paper-notes.md)."""

from __future__ import annotations

import math

import pytest

from convscale_cli import budget as B
from convscale_cli.errors import UsageError


@pytest.mark.parametrize(
    ("text", "amount", "unit"),
    [
        ("10k-core-hours", 10e3, "tpu-v4"),
        ("110k core-hours", 110e3, "tpu-v4"),
        ("0.5-tpu-v3-core-hours", 0.5, "tpu-v3"),
        ("2-tpu-v4-core-hours", 2.0, "tpu-v4"),
        ("250-h100-hours", 250.0, "h100"),
        ("2k-a100-hours", 2e3, "a100"),
        ("1-h200-hour", 1.0, "h200"),
        ("3-cpu-hours", 3.0, "cpu"),
        ("1.5e21-flops", 1.5e21, "flops"),
        ("2M-flops", 2e6, "flops"),
        ("  7K_core_hours ", 7e3, "tpu-v4"),
    ],
)
def test_parse_accepted_forms(text: str, amount: float, unit: str) -> None:
    parsed = B.parse_budget(text)
    assert parsed.amount == pytest.approx(amount)
    assert parsed.unit == unit


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("10k", "no unit"),
        ("-5-core-hours", "must be positive"),
        ("0-core-hours", "must be positive"),
        ("1e999-flops", "not a finite"),
        ("ten-core-hours", "cannot read"),
        ("", "cannot read"),
        ("5-v100-hours", "did you mean 'h100-hours'"),
        ("3-tpu-v4-hours", "did you mean 'tpu-v4-core-hours'"),
        ("4-parsecs", "unknown budget unit"),
    ],
)
def test_parse_rejects_bad_strings_listing_accepted_forms(text: str, needle: str) -> None:
    with pytest.raises(UsageError) as info:
        B.parse_budget(text)
    message = str(info.value)
    assert needle in message
    assert "accepted forms" in message and "250-h100-hours" in message
    assert "\n" not in message


def test_tpu_v4_calibration_reproduces_paper_end_point() -> None:
    # F7+ at 224 px with a 30k head for 8 epochs of JFT-4B costs ~110k TPU-v4 core-hours (Smith et al. 2023).
    flops = 6 * 100.86e9 * 8 * 4e9
    assert B.flops_to_core_hours(flops) == pytest.approx(110e3, rel=1e-9)
    assert 0.34 < B.TPU_V4_MFU < 0.37
    assert B.core_hours_to_flops(B.flops_to_core_hours(flops)) == pytest.approx(flops)


def test_tpu_v3_calibration_matches_250k_core_hours() -> None:
    flops = B.parse_budget("250k-tpu-v3-core-hours").to_flops()
    assert flops == pytest.approx(B.CALIBRATION_TRAIN_FLOPS, rel=1e-9)


def test_conversions_round_trip_and_respect_mfu() -> None:
    h100 = B.parse_budget("250-h100-hours")
    flops = h100.to_flops()
    assert flops == pytest.approx(250 * 3600 * 989e12 * B.TPU_V4_MFU)
    assert h100.from_flops(flops) == pytest.approx(250)
    assert h100.to_flops(mfu=0.5) == pytest.approx(250 * 3600 * 989e12 * 0.5)
    # Equal-utilisation: one H100-hour is ~7.2 TPU-v4 core-hours (989 / 137.5).
    assert B.flops_to_core_hours(B.parse_budget("1-h100-hours").to_flops()) == pytest.approx(989 / 137.5)
    assert B.parse_budget("1e20-flops").to_flops(mfu=0.1) == 1e20


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, math.nan])
def test_bad_mfu_rejected(bad: float) -> None:
    with pytest.raises(UsageError, match="MFU"):
        B.parse_budget("1-h100-hours").to_flops(mfu=bad)


def test_cpu_peak_from_env_and_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(B.CPU_PEAK_ENV, raising=False)
    assert B.get_hardware("cpu").peak_flops == B.DEFAULT_CPU_PEAK_FLOPS
    monkeypatch.setenv(B.CPU_PEAK_ENV, "4e11")
    assert B.get_hardware("cpu").peak_flops == 4e11
    assert B.parse_budget("1-cpu-hours").to_flops() == pytest.approx(3600 * 4e11 * B.DEFAULT_CPU_MFU)
    assert B.get_hardware("cpu", peak_flops=1e10).peak_flops == 1e10
    monkeypatch.setenv(B.CPU_PEAK_ENV, "fast")
    with pytest.raises(UsageError, match=B.CPU_PEAK_ENV):
        B.get_hardware("cpu")


def test_unknown_hardware_suggests() -> None:
    with pytest.raises(UsageError, match="did you mean 'h100'"):
        B.get_hardware("h10")


@pytest.mark.parametrize(
    ("kind", "key"),
    [
        ("TPU v4", "tpu-v4"),
        ("TPU v3", "tpu-v3"),
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA A100-SXM4-40GB", "a100"),
        ("NVIDIA H200", "h200"),
        ("cpu", "cpu"),
    ],
)
def test_detect_hardware(kind: str, key: str) -> None:
    assert B.detect_hardware(kind) == key


def test_detect_unknown_device_raises() -> None:
    with pytest.raises(UsageError, match="Tesla V100"):
        B.detect_hardware("Tesla V100")


def test_format_in_budget_unit() -> None:
    core = B.parse_budget("10k-core-hours")
    assert core.format() == "10k core-hours"
    assert core.format(1234.0) == "1.23k core-hours"
    assert B.parse_budget("250-h100-hours").format(0.5) == "0.5 h100-hours"
    assert B.parse_budget("1.5e21-flops").format() == "1.5e+21 FLOPs"
