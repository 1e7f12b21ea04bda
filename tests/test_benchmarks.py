"""Every benchmark runs and prints its ratios, at the smallest sizes that exercise the whole script.

The figures are meaningless at these sizes and nothing here times anything: these tests only keep `benchmarks/`
from rotting between the sessions that measure with it. Each runs the script as a user would, in a child process on
one CPU device.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RATIO = r"\d+\.\d+x"
# One cell of the smallest ladder rung on 256 `shapes` images: the rule's 2 runs and the grid's 6 (2 of them reused).
STUDY = """
out = "unused"
dataset = "shapes"
models = ["nfnet-tiny-l0"]
epochs = [0.25]
resolution = 32
batch_size = 32
seed = 0
rule = "two-trial"
start_lr = 51.2

[data_options]
size = 256
eval_size = 64

[engine]
precision = "fp32"
eval_examples = 64
log_every = 8
"""


def bench(script: str, *args: str, cwd: Path | None = None) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    child = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    return child.stdout


def test_cli_startup_benchmark() -> None:
    out = bench("bench_cli.py", "--repeat", "1")
    for command in ("--help", "models", "plan"):  # either verdict: a loaded CI machine must not fail a smoke test
        assert re.search(rf"^{re.escape(command)}\s+\d+\.\d+\s+\d+\.\d+\s+(ok|SLOW)$", out, re.M), out


def test_loader_benchmark() -> None:
    pytest.importorskip("torch")
    out = bench("bench_loader.py", "--images", "16", "--batch-size", "4", "--batches", "2", "--workers", "0")
    assert re.search(r"^ratio grain / torch:\s+\d+\.\d+$", out, re.M), out
    assert re.search(r"^ratio grain / F0:\s+\d+\.\d+", out, re.M), out


def test_train_step_benchmark_runs_both_families_against_timm() -> None:
    pytest.importorskip("torch")  # and timm: the same test extra
    out = bench(
        "bench_train_step.py", "--models", "nfnet-f0", "vit-s/16",
        "--resolution", "32", "--batch", "2", "--steps", "1", "--rounds", "1", "--classes", "10",
    )  # fmt: skip
    assert "32 px, batch 2, fp32" in out, out
    for model in ("nfnet-f0", "vit-s/16"):
        assert re.search(rf"^{re.escape(model)}\s+\d+\.\d+\s+\d+\.\d+\s+{RATIO}\s+\d+\.\d+%$", out, re.M), out
    assert "nfnet-f0: convscale SGD-Nesterov 0.9 wd 1e-06 + optax AGC 0.01; timm fused" in out, out
    assert "vit-s/16: convscale AdamW (0.9, 0.999) wd 0.03 + clip_by_global_norm 1; timm fused" in out, out


def test_study_benchmark_compares_the_rule_with_the_grid(tmp_path: Path) -> None:
    (tmp_path / "study.toml").write_text(STUDY)
    out = bench("bench_study.py", "--runs", "runs", "--study", "study.toml", cwd=tmp_path)
    assert "grid (nfnet): alpha in 102.4, 51.2, 25.6, 12.8, 6.4, 3.2" in out, out
    assert re.search(r"^runs: rule 2, grid 6 \(3\.0x\); training FLOPs: .* \(3\.0x\)$", out, re.M), out
    regret = r"^loss regret of the rule: mean -?\d+\.\d+, max -?\d+\.\d+, zero in [01] of 1 cells$"
    assert re.search(regret, out, re.M), out


def test_study_benchmark_compares_one_worker_with_two(tmp_path: Path) -> None:
    (tmp_path / "study.toml").write_text(STUDY.replace("epochs = [0.25]", "epochs = [0.25, 0.5]"))
    out = bench("bench_study.py", "--runs", "runs", "--study", "study.toml", "--workers", "2", cwd=tmp_path)
    assert re.search(r"^1 worker: wall \d+\.\d s$", out, re.M), out
    assert re.search(rf"^2 workers: wall \d+\.\d s, {RATIO}$", out, re.M), out
    assert re.search(r"^critical path \(nfnet-tiny-l0 x 0\.25 -> nfnet-tiny-l0 x 0\.5\): \d+\.\d device-s", out, re.M)
    assert "tuning.jsonl identical apart from time stamps: yes" in out, out
