"""A run directory is only resumed when it provably holds the same run, and refusing never costs data.

The engine tests' tiny setup (a 12-step run of a small CNN on in-memory colours): each test copies one finished run
and damages or reuses it the way a user or a crash might.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import _engine_helpers as helpers
import pytest

from convscale_cli.engine.api import pretrain
from convscale_cli.errors import CheckpointError, UsageError


@pytest.fixture(scope="module")
def registry() -> Any:
    return helpers.registry()


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, registry: Any) -> Path:
    out = tmp_path_factory.mktemp("run") / "finished"
    pretrain(helpers.config(out), registry)
    return out


def copy(finished: Path, tmp_path: Path, *, keep_summary: bool = False) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    if not keep_summary:
        (out / "summary.json").unlink()
    return out


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda c: c.unlink(), id="missing"),
        pytest.param(lambda c: c.write_text(c.read_text()[:200]), id="truncated"),
        pytest.param(lambda c: c.write_bytes(b"\xff\xfe\x00bad"), id="binary"),
        pytest.param(lambda c: c.write_text("[]"), id="not-an-object"),
        pytest.param(lambda c: (c.unlink(), c.mkdir()), id="a-directory"),
    ],
)
def test_a_trained_run_without_a_readable_config_is_never_resumed(
    finished: Path, registry: Any, tmp_path: Path, damage: Any
) -> None:
    out = copy(finished, tmp_path, keep_summary=True)
    damage(out / "config.json")
    before = snapshot(out)
    with pytest.raises(CheckpointError, match=r"empty it yourself"):
        pretrain(helpers.config(out, lr=0.8), registry)
    assert snapshot(out) == before  # nothing written, nothing deleted (the summary included)
    # Without its marked config nothing proves the directory is a convscale run: --force does not clear it either.
    with pytest.raises(CheckpointError, match=r"empty it yourself"):
        pretrain(helpers.config(out, lr=0.8, steps=4, force=True), registry)
    assert snapshot(out) == before


def test_a_run_refused_after_the_claim_reruns_once_the_input_is_fixed(registry: Any, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(UsageError, match="min_area"):
        pretrain(helpers.config(out, augment={"min_area": 0.0}), registry)
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert pretrain(helpers.config(out, steps=4), registry)["steps"] == 4


def test_a_directory_that_is_not_a_run_is_refused_and_kept(registry: Any, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "notes.txt").write_text("mine")
    (out / "important.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="holds checkpoints but no config.json"):
        pretrain(helpers.config(out), registry)
    assert (out / "checkpoints" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "important.txt"]


def test_foreign_metric_lines_do_not_stop_a_resume(finished: Path, registry: Any, tmp_path: Path) -> None:
    out = copy(finished, tmp_path)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": "abc", "split": "train"}\n[1, 2]\n')
    assert pretrain(helpers.config(out), registry)["status"] == "finished"


def test_rerunning_a_finished_run_writes_nothing(finished: Path, registry: Any, tmp_path: Path) -> None:
    out = copy(finished, tmp_path, keep_summary=True)
    pretrain(helpers.config(out), registry)  # records the new --out of the moved run, the only change
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert pretrain(helpers.config(out), registry)["status"] == "finished"
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_an_unreadable_ledger_heartbeat_is_ignored(finished: Path, registry: Any, tmp_path: Path) -> None:
    out = copy(finished, tmp_path)
    shutil.rmtree(out / "checkpoints" / "12")
    (out / "ledger.json").write_bytes(b"\xff\xfe")
    summary = pretrain(helpers.config(out), registry)
    assert summary["steps"] == 12 and json.loads((out / "summary.json").read_text())["status"] == "finished"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"augment": {"fooo": 1}}, "unknown augmentation option 'fooo'"),
        ({"hardware": "tpu-v9"}, "unknown hardware 'tpu-v9'"),
    ],
)
def test_bad_settings_are_named_before_the_directory_is_touched(
    finished: Path, registry: Any, tmp_path: Path, overrides: dict, needle: str
) -> None:
    out = copy(finished, tmp_path, keep_summary=True)  # a finished run: checked even though nothing would train
    before = snapshot(out)
    with pytest.raises(UsageError, match=needle):
        pretrain(helpers.config(out, **overrides), registry)
    assert snapshot(out) == before
    with pytest.raises(UsageError, match=needle):
        pretrain(helpers.config(tmp_path / "new", **overrides), registry)
    assert not (tmp_path / "new").exists()
