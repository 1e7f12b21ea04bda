"""Experiment trackers: the ``register_trackers`` hook, the built-in TensorBoard, W&B (offline) and MLflow (file store).

Each test trains the tiny engine setup a few steps with a tracker and reads what the tracker recorded: the same
metrics as ``metrics.jsonl`` and the resolved config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import _engine_helpers as helpers
import pytest
from convscale_plugins import trackers as builtin_trackers

from convscale_cli.engine.api import pretrain
from convscale_cli.engine.tracking import TrackerWarning, choose_trackers
from convscale_cli.errors import UnknownNameError, UsageError
from convscale_cli.hookspecs import hookimpl
from convscale_cli.plugins import load_plugins
from convscale_cli.registry import TrackerSpec

SEEN: list[tuple[str, Any]] = []


class Recorder:
    def __init__(self, run_dir: Path, name: str) -> None:
        SEEN.append(("open", name))

    def log_config(self, config: Any) -> None:
        SEEN.append(("config", dict(config)))

    def log_metrics(self, step: int, split: str, metrics: Any) -> None:
        SEEN.append((split, (step, dict(metrics))))

    def close(self) -> None:
        SEEN.append(("close", None))


class RecorderPlugin:
    @hookimpl
    def register_trackers(self, register: Any) -> None:
        register(TrackerSpec(name="recorder", description="records calls (tests)", open=Recorder))


@pytest.fixture
def registry() -> Any:
    extra = [("engine-test", helpers.TinyPlugin()), ("trackers", builtin_trackers), ("recorder", RecorderPlugin())]
    return load_plugins(extra=extra, entry_points=lambda: []).registry


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_plugin_tracker_gets_the_config_and_every_record(registry: Any, tmp_path: Path) -> None:
    SEEN.clear()
    out = tmp_path / "run"
    pretrain(helpers.config(out, steps=8, eval_every=4, trackers=("jsonl", "recorder")), registry)
    assert SEEN[0] == ("open", "run") and SEEN[-1] == ("close", None)
    config = SEEN[1][1]
    assert config["model"] == "tiny-cnn" and config["derived"]["total_steps"] == 8
    logged = [(kind, step, metrics) for kind, (step, metrics) in (e for e in SEEN if e[0] in ("train", "eval"))]
    expected = [
        (r["split"], r["step"], {k: v for k, v in r.items() if k not in ("step", "split")}) for r in _records(out)
    ]
    assert logged == expected and any(kind == "eval" for kind, _, _ in logged)


def test_trackers_are_checked_before_anything_compiles(registry: Any, tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="unknown tracker 'recordr': did you mean 'recorder'"):
        pretrain(helpers.config(tmp_path / "a", trackers=("recordr",)), registry)
    assert not (tmp_path / "a").exists()
    missing = TrackerSpec(name="nope", description="", open=Recorder, requires="no_such_module_xyz", install="pip x")
    registry.trackers.add(missing, owner="test")
    with pytest.raises(UsageError, match="needs the 'no_such_module_xyz' package, which is not installed: pip x"):
        choose_trackers(registry, ["nope"])


def test_default_tracker_writes_tensorboard_events(registry: Any, tmp_path: Path) -> None:
    pytest.importorskip("tensorboardX")
    out = tmp_path / "tb"
    pretrain(helpers.config(out, steps=4, tensorboard=True), registry)
    assert any((out / "tb").glob("events.out.tfevents.*"))


def test_default_tensorboard_missing_warns_instead_of_vanishing(registry: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "tensorboardX" else real(name))
    with pytest.warns(TrackerWarning, match="tracker 'tensorboard' is off: tensorboardX is not installed"):
        assert choose_trackers(registry, None) == []


def _wandb_records(path: Path) -> list[Any]:
    """The protobuf records of an offline ``.wandb`` file (a LevelDB-style log: 32 KiB blocks of chunked records
    after a 7-byte header), as ``wandb sync`` reads them."""
    from wandb.proto import wandb_internal_pb2

    raw, block, pos, pending, out = path.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(raw[pos + 4 : pos + 6], "little"), raw[pos + 6]
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def test_wandb_offline_records_metrics_and_config(
    registry: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    pretrain(helpers.config(out, steps=8, eval_every=4, trackers=("wandb",)), registry)
    (log,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(log)
    config = {i.key: json.loads(i.value_json) for r in records if r.HasField("config") for i in r.config.update}
    assert config["model"] == "tiny-cnn" and config["derived"]["total_steps"] == 8
    history = [
        (r.history.step.num, {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        for r in records
        if r.HasField("history")
    ]
    logged = [(step, h["eval/eval_loss"]) for step, h in history if "eval/eval_loss" in h]
    evals = [(r["step"], pytest.approx(r["eval_loss"])) for r in _records(out) if r["split"] == "eval"]
    assert logged == evals and len(evals) == 2


def test_mlflow_file_store_records_metrics_and_config(
    registry: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "ml"
    pretrain(helpers.config(out, steps=8, eval_every=4, trackers=("mlflow",)), registry)
    client = MlflowClient(tracking_uri=(out / "mlruns").absolute().as_uri())
    experiment = client.get_experiment_by_name("convscale")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["model"] == "tiny-cnn" and run.data.params["derived.total_steps"] == "8"
    history = client.get_metric_history(run.info.run_id, "eval/eval_loss")
    evals = [r for r in _records(out) if r["split"] == "eval"]
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["eval_loss"])) for r in evals]
    assert run.info.status == "FINISHED"
