"""End-to-end pre-training runs of a tiny CNN on an in-memory dataset (in process, CPU, fp32, 8 px)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import types
from pathlib import Path
from typing import Any

import _engine_helpers as helpers
import numpy as np
import pytest

import convscale_cli.data as data
from convscale_cli.budget import parse_budget
from convscale_cli.engine.api import pretrain
from convscale_cli.engine.checkpoint import CheckpointWarning
from convscale_cli.engine.ledger import Ledger
from convscale_cli.errors import CheckpointError, ExitCode, RunInterrupted, TrainingError, UnknownNameError, UsageError
from convscale_cli.runs_dir import scan_runs

SUMMARY_KEYS = {
    "kind", "status", "model", "family", "dataset", "epochs", "lr", "batch_size", "seed", "params", "macs_per_image",
    "train_resolution", "eval_resolution", "num_classes", "examples_seen", "steps", "final", "ledger", "config",
    "versions",
}  # fmt: skip


@pytest.fixture(scope="module")
def registry() -> Any:
    return helpers.registry()


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, registry: Any) -> tuple[Path, dict[str, Any]]:
    """One uninterrupted 12-step run shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("run") / "full"
    return out, pretrain(helpers.config(out), registry)


def _sigterm_after(batches: int) -> Any:
    """A pipeline whose training iterator sends this process SIGTERM after ``batches`` batches."""

    def train_loader(*args: Any, **kwargs: Any) -> Any:
        loader = data.train_loader(*args, **kwargs)
        original_iter = type(loader).__iter__

        class Interrupting(type(loader)):  # type: ignore[misc]
            def __iter__(self) -> Any:
                for i, batch in enumerate(original_iter(self)):
                    if i == batches:
                        os.kill(os.getpid(), signal.SIGTERM)
                    yield batch

        loader.__class__ = Interrupting
        return loader

    return types.SimpleNamespace(
        train_loader=train_loader, eval_loader=data.eval_loader, normalize=data.normalize, to_global=data.to_global
    )


def test_run_writes_summary_metrics_and_config(finished: tuple[Path, dict[str, Any]]) -> None:
    out, summary = finished
    assert SUMMARY_KEYS <= set(summary)
    assert summary["status"] == "finished" and summary["kind"] == "pretrain"
    assert summary["steps"] == 12 and summary["examples_seen"] == 192
    assert summary["final"]["eval_top1"] > 0.5  # the colour classes are learnable in 12 steps
    ledger = summary["ledger"]
    assert ledger["train_flops"] == pytest.approx(6 * summary["macs_per_image"] * 192)
    assert ledger["xla_flops"] > 0 and ledger["core_hours"] > 0 and 0 < ledger["mfu"] < 1
    assert ledger["host_peak_memory_bytes"] > 10 << 20  # at least the interpreter and jax
    assert set(ledger["device_seconds"]) == {"train", "eval", "compile", "checkpoint", "lost", "loader_startup"}
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary, default=str))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [4, 8, 12]
    assert train[-1]["loss"] < train[0]["loss"]
    assert records[-1]["split"] == "eval"
    assert json.loads((out / "config.json").read_text())["derived"]["total_steps"] == 12
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8, 12]


def test_finished_run_is_not_trained_again(finished: tuple[Path, dict[str, Any]], registry: Any) -> None:
    out, summary = finished
    # A changed checkpoint cadence is not a different run.
    again = pretrain(helpers.config(out, checkpoint_every=2), registry)
    assert again["finished_at"] == summary["finished_at"]


def test_wsd_schedule_is_selected_by_the_recipe_and_recorded_only_when_used(
    finished: tuple[Path, dict[str, Any]], registry: Any, tmp_path: Path
) -> None:
    # A cosine run records no schedule keys, so run directories written before wsd existed still resume.
    assert not {"schedule", "cooldown_fraction", "cooldown_shape"} & set(
        json.loads((finished[0] / "config.json").read_text())["recipe"]
    )
    out = tmp_path / "wsd"
    summary = pretrain(helpers.config(out, recipe={"schedule": "wsd", "cooldown_fraction": 0.5}), registry)
    assert summary["status"] == "finished"
    assert json.loads((out / "config.json").read_text())["recipe"]["schedule"] == "wsd"
    peak = summary["peak_lr"]
    lrs = [r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    cosine = [r["lr"] for r in map(json.loads, (finished[0] / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    # Logged after steps 4, 8, 12 (the rate of the update just taken: steps 3, 7, 11): constant until the cooldown
    # starts at step 6, then linear to 0 at step 12; cosine has already decayed by step 3.
    assert lrs == pytest.approx([peak, peak * 5 / 6, peak / 6], rel=1e-5)
    assert cosine[0] < peak


def test_different_config_is_refused_then_forced(
    finished: tuple[Path, dict[str, Any]], registry: Any, tmp_path: Path
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(finished[0], out)
    with pytest.raises(CheckpointError, match=r"different config \(lr, seed differ\).*`force`"):
        pretrain(helpers.config(out, lr=0.8, seed=3), registry)
    forced = pretrain(helpers.config(out, lr=0.8, steps=4, force=True), registry)
    assert forced["steps"] == 4 and forced["lr"] == 0.8


def test_sigterm_saves_and_resume_is_bitwise_exact(
    finished: tuple[Path, dict[str, Any]], registry: Any, tmp_path: Path
) -> None:
    out = tmp_path / "interrupted"
    with pytest.raises(RunInterrupted, match="interrupted at step 6") as info:
        pretrain(helpers.config(out), registry, pipeline=_sigterm_after(5))
    assert info.value.exit_code == ExitCode.INTERRUPTED
    assert not (out / "summary.json").exists()
    resumed = pretrain(helpers.config(out), registry)
    assert resumed["steps"] == 12 and resumed["ledger"]["examples"] == 192
    reference, got = helpers.final_params(finished[0]), helpers.final_params(out)
    for key, value in reference.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # records of redone steps were dropped on resume


def test_corrupt_latest_checkpoint_falls_back(
    finished: tuple[Path, dict[str, Any]], registry: Any, tmp_path: Path
) -> None:
    out = tmp_path / "corrupt"
    shutil.copytree(finished[0], out)
    (out / "summary.json").unlink()
    for path in (out / "checkpoints" / "12" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(b"\0" * 7)  # truncated garbage
    with pytest.warns(CheckpointWarning, match="step 12"):
        summary = pretrain(helpers.config(out), registry)
    assert summary["status"] == "finished" and summary["steps"] == 12
    got = helpers.final_params(out)
    for key, value in helpers.final_params(finished[0]).items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_failed_save_keeps_previous_checkpoint(registry: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from convscale_cli.engine import checkpoint

    out = tmp_path / "full-disk"
    real_save = checkpoint.Checkpoints.save

    def save(self: Any, step: int, *args: Any) -> None:
        if step >= 8:
            self._manager.save = _raise_disk_full
        real_save(self, step, *args)

    monkeypatch.setattr(checkpoint.Checkpoints, "save", save)
    with pytest.raises(CheckpointError, match=r"step 8 failed \(OSError.*No space left.*step 4 is intact"):
        pretrain(helpers.config(out), registry)
    monkeypatch.undo()
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [4]
    assert pretrain(helpers.config(out), registry)["steps"] == 12


@pytest.mark.parametrize("surfaced_by", ["check", "wait"])
def test_background_failure_names_the_pending_step(tmp_path: Path, surfaced_by: str) -> None:
    """Whichever call surfaces a failed background save (the loop's check() or the next save's wait), it names
    that save's step and the checkpoint before it."""
    import time

    import jax.numpy as jnp

    from convscale_cli.engine.checkpoint import Checkpoints

    checkpoints = Checkpoints(tmp_path / "checkpoints", keep=3)
    state = {"w": jnp.zeros(3)}
    checkpoints.save(4, state, {}, {"steps": 4})
    checkpoints.wait()
    checkpoints.save(8, state, {}, {"unserialisable": object()})  # fails in the background writer
    with pytest.raises(CheckpointError, match=r"at step 8 failed .*the checkpoint of step 4 is intact"):
        if surfaced_by == "wait":
            checkpoints.wait()
        for _ in range(200):  # check() is non-blocking: poll until the background writer has failed
            checkpoints.check()
            time.sleep(0.05)
    assert checkpoints.latest_step() == 4


def _raise_disk_full(*args: Any, **kwargs: Any) -> None:
    raise OSError(28, "No space left on device")


def test_non_finite_loss_stops_naming_the_step(registry: Any, tmp_path: Path) -> None:
    out = tmp_path / "nan"
    config = helpers.config(out, lr=1e30, checkpoint_every=1, log_every=1, recipe={"agc_clip": None})
    with pytest.raises(TrainingError, match=r"non-finite loss \(\w+\) at step (\d+); stopped, the last good") as info:
        pretrain(config, registry)
    assert info.value.exit_code == ExitCode.TRAINING_FAILED
    bad = int(str(info.value).split("at step ")[1].split(";")[0])
    kept = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert kept and max(kept) < bad
    assert not (out / "summary.json").exists()
    # A study's listing says why the run has no summary (it was "unfinished or crashed"); the note is the live
    # ledger's, which stays a ledger a resume can read.
    _, skipped = scan_runs(tmp_path)
    assert [(s.path, s.reason) for s in skipped] == [("nan", f"no summary.json (diverged: {info.value})")]
    Ledger.from_dict(json.loads((out / "ledger.json").read_text()))


def test_a_last_step_that_diverges_is_a_training_error_not_a_finished_run(registry: Any, tmp_path: Path) -> None:
    """The loss of the last step is computed before its update: only the final evaluation sees the diverged state.

    At lr 1e30 without clipping, step 1's loss is finite and its update blows the parameters up, so a one-step run
    used to save them, evaluate to NaN and finish with a NaN loss in its summary.
    """
    out = tmp_path / "nan-last"
    config = helpers.config(out, steps=1, lr=1e30, checkpoint_every=1, log_every=1, recipe={"agc_clip": None})
    with pytest.raises(
        TrainingError, match=r"^non-finite held-out loss \(nan\) after the last step \(1\); stopped"
    ) as info:
        pretrain(config, registry)
    assert info.value.exit_code == ExitCode.TRAINING_FAILED
    assert str(info.value).endswith("no good checkpoint is left")
    assert not (out / "summary.json").exists()
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.isdigit()]  # nothing a rerun would call finished
    with pytest.raises(
        TrainingError, match=r"after the last step \(1\)"
    ):  # a rerun trains again and fails the same way
        pretrain(config, registry)


def test_flop_budget_stops_cleanly(registry: Any, tmp_path: Path) -> None:
    out = tmp_path / "budget"
    per_step = 6 * helpers.count_tiny(8, 4).macs * 16
    summary = pretrain(helpers.config(out, budget=f"{3.5 * per_step}-flops"), registry)
    assert summary["status"] == "budget" and summary["steps"] == 4
    assert summary["budget_spent"] >= 3.5 * per_step
    assert summary["final"]["eval_loss"] > 0
    assert pretrain(helpers.config(out, budget=f"{3.5 * per_step}-flops"), registry)["steps"] == 4  # says it is done
    assert pretrain(helpers.config(out), registry)["steps"] == 12  # budget lifted: resumes


@pytest.mark.parametrize(
    "overrides, error, needle",
    [
        ({"model": "tiny-cn"}, UnknownNameError, "did you mean 'tiny-cnn'"),
        ({"dataset": "colors"}, UnknownNameError, "did you mean 'colours'"),
        ({"resolution": 0}, UsageError, "resolution = 0 must be > 0"),
        ({"batch_size": 16, "epochs": 1e-6, "steps": None}, UsageError, "< 1 example"),
        ({"data_options": {"root": "/x"}}, UnknownNameError, "unknown colours data option 'root'"),
    ],
)
def test_bad_input(registry: Any, tmp_path: Path, overrides: dict, error: type, needle: str) -> None:
    with pytest.raises(error, match=needle):
        pretrain(helpers.config(tmp_path / "bad", **overrides), registry)


def test_out_is_a_file(registry: Any, tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        pretrain(helpers.config(path), registry)


def test_partial_final_batch_is_masked_in_bf16(registry: Any, tmp_path: Path) -> None:
    summary = pretrain(helpers.config(tmp_path / "bf16", steps=None, examples=40, precision="bf16"), registry)
    assert summary["steps"] == 3 and summary["examples_seen"] == 40  # 16 + 16 + 8 real examples, one compile
    assert summary["ledger"]["train_flops"] == pytest.approx(6 * summary["macs_per_image"] * 40)
    assert np.isfinite(summary["final"]["eval_loss"])
    assert summary["epochs"] == pytest.approx(40 / helpers.TRAIN_SIZE)


def test_device_hour_budget_means_model_flops_like_plan(registry: Any, tmp_path: Path) -> None:
    # A cpu-hours budget buys what `plan` says it buys: model FLOPs at the CPU's peak x MFU. Compile time and a slow
    # machine do not eat it, so it stops at the same step as the equal FLOP budget.
    per_step = 6 * helpers.count_tiny(8, 4).macs * 16
    hours = 3.5 * per_step / parse_budget("1-cpu-hours").to_flops()
    summary = pretrain(helpers.config(tmp_path / "timed", budget=f"{hours!r}-cpu-hours"), registry)
    assert summary["status"] == "budget" and summary["steps"] == 4
    assert summary["budget_spent"] == pytest.approx(4 / 3.5 * hours)


def test_budget_below_one_step_is_an_error_before_anything_runs(registry: Any, tmp_path: Path) -> None:
    per_step = 6 * helpers.count_tiny(8, 4).macs * 16
    hours = 0.5 * per_step / parse_budget("1-cpu-hours").to_flops()
    for budget, extra in ((f"{hours!r}-cpu-hours", {}), (f"{0.5 * per_step}-flops", {"steps": None})):
        out = tmp_path / budget
        with pytest.raises(UsageError, match=r"less than one step of batch 16"):
            pretrain(helpers.config(out, budget=budget, **extra), registry)
        assert not (out / "config.json").exists()  # refused before the run directory is claimed


def test_failed_background_save_is_raised(registry: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from convscale_cli.engine.ledger import Ledger

    real = Ledger.to_dict

    def to_dict(self: Ledger) -> dict[str, Any]:
        out = real(self)
        if self.steps == 8:
            out["unserialisable"] = object()  # fails in Orbax's background writer, after save() returned
        return out

    monkeypatch.setattr(Ledger, "to_dict", to_dict)
    out = tmp_path / "async-fail"
    with pytest.raises(CheckpointError, match=r"at step 8 failed .*the checkpoint of step 4 is intact"):
        pretrain(helpers.config(out, log_every=2), registry)
    assert 8 not in [int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()]


def test_initial_checkpoint_starts_from_its_parameters_not_its_optimizer(registry: Any, tmp_path: Path) -> None:
    first = pretrain(helpers.config(tmp_path / "a", steps=4), registry)
    # A step at a negligible lr barely moves the weights: the run starts from the checkpoint's parameters...
    config = helpers.config(tmp_path / "b", steps=1, lr=1e-12, initial_checkpoint=str(tmp_path / "a"))
    second = pretrain(config, registry)
    before, after = helpers.final_params(tmp_path / "a"), helpers.final_params(tmp_path / "b")
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_allclose(after[key], before[key], atol=1e-6, err_msg=key)
    # ... with a fresh optimizer and step counter, and the run records where it started.
    assert second["steps"] == 1 and second["final"]["eval_loss"] == pytest.approx(first["final"]["eval_loss"], abs=1e-4)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["initial_checkpoint"] == str(tmp_path / "a")
    with pytest.raises(UsageError, match="initial_checkpoint .* holds a tiny-cnn with 4 classes"):
        pretrain(helpers.config(tmp_path / "c", num_classes=6, initial_checkpoint=str(tmp_path / "a")), registry)


def test_pretraining_keeps_an_ema_of_the_parameters_when_asked(registry: Any, tmp_path: Path) -> None:
    from convscale_cli.loading import load

    summary = pretrain(helpers.config(tmp_path / "ema", steps=8, ema_decay=0.9), registry)
    assert set(summary["final_ema"]) == set(summary["final"]) and summary["final_ema"] != summary["final"]
    records = [json.loads(line) for line in (tmp_path / "ema" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "eval_ema"] == [8]
    loaded = load(tmp_path / "ema", registry=registry)
    assert loaded.collection == "ema"  # load_model and fine-tuning take the average, as for a fine-tuned run
    plain = pretrain(helpers.config(tmp_path / "plain", steps=8), registry)
    assert "final_ema" not in plain and load(tmp_path / "plain", registry=registry).collection == "params"


def test_holdout_carves_a_deterministic_held_out_split_from_train(tmp_path: Path) -> None:
    from convscale_cli.engine.resolve import holdout_indices
    from convscale_cli.plugins import load_plugins
    from convscale_cli.registry import DatasetInfo, DatasetSpec

    class NoEval:  # an image folder converted without val/
        @staticmethod
        @helpers.hookimpl
        def register_datasets(register: Any) -> None:
            register(
                DatasetSpec(
                    name="colours-train-only", description="", options={},
                    open=lambda split: helpers.ColourSource(split, helpers.TRAIN_SIZE, 0),
                    info=lambda: DatasetInfo(helpers.CLASSES, {"train": helpers.TRAIN_SIZE}, helpers.NATIVE),
                )
            )  # fmt: skip

    extra = [("engine-test", helpers.TinyPlugin()), ("no-eval", NoEval())]
    registry = load_plugins(extra=extra, entry_points=lambda: []).registry
    with pytest.raises(UsageError, match=r"no held-out 'eval' split.*`holdout=0.01`"):
        pretrain(helpers.config(tmp_path / "none", dataset="colours-train-only"), registry)
    summary = pretrain(helpers.config(tmp_path / "held", dataset="colours-train-only", holdout=0.25), registry)
    assert summary["epochs"] == pytest.approx(12 * 16 / 72)  # an epoch is the 72 examples left for training
    train, held = holdout_indices(helpers.TRAIN_SIZE, 0.25)
    assert len(held) == 24 and not set(train) & set(held) and sorted([*train, *held]) == list(range(96))
    assert holdout_indices(helpers.TRAIN_SIZE, 0.25) == (train, held)  # the same split on every run
    with pytest.raises(UsageError, match="already has a held-out 'eval' split"):
        pretrain(helpers.config(tmp_path / "both", holdout=0.25), registry)


def test_loader_startup_is_charged_apart_and_one_held_out_loader_serves_every_evaluation(
    tmp_path: Path, registry: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker processes (``--workers N``) take seconds to start before the first batch: that wait is the ledger's
    ``loader_startup``, not train or eval time (which img/s and MFU divide by), and the held-out loader starts once per
    run even for a set too large to keep decoded, instead of at every evaluation."""
    import time

    from convscale_cli.data.pipeline import Loader
    from convscale_cli.engine import build

    pause, starts = 1.0, []
    dataset = Loader._dataset

    def slow_start(self: Loader, *args: Any, **kwargs: Any) -> Any:  # a loader's iteration starting its workers
        starts.append(self.kind)
        time.sleep(pause)
        return dataset(self, *args, **kwargs)

    monkeypatch.setattr(Loader, "_dataset", slow_start)
    monkeypatch.setattr(build, "EVAL_CACHE_BYTES", 0)  # read at every evaluation, never kept
    summary = pretrain(helpers.config(tmp_path / "run", eval_every=4, checkpoint_every=0), registry)
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["split"] == "eval"] == [4, 8, 12]
    assert starts == ["train", "eval"]
    ledger = summary["ledger"]
    seconds = {k: v / ledger["num_devices"] for k, v in ledger["device_seconds"].items()}
    assert seconds["loader_startup"] >= 2 * pause
    assert seconds["train"] < pause and seconds["eval"] < pause, seconds
