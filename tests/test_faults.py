"""Reliability under faults: a failed save ends the process, a foreign directory is never taken over, labels outside
the classifier are refused, writes never follow planted symlinks.

Training uses the engine tests' tiny setup (a small CNN on in-memory colours, 8 px); the processes that must exit
on their own run as subprocesses of ``tests/_engine_helpers.py``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import types
import warnings
from pathlib import Path
from typing import Any

import _engine_helpers as helpers
import numpy as np
import pytest
from convscale_plugins.datasets import arrayrecord

from convscale_cli import interrupts
from convscale_cli.cli import main
from convscale_cli.data.records import encode_record, write_manifest
from convscale_cli.engine.api import pretrain
from convscale_cli.engine.build import host_batch
from convscale_cli.engine.checkpoint import CheckpointWarning
from convscale_cli.errors import CheckpointError, DataError, RunInterrupted, UsageError

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def registry() -> Any:
    return helpers.registry()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return env


def test_a_failed_checkpoint_save_ends_the_process(tmp_path: Path) -> None:
    # The step-8 save cannot create its directory (as a read-only checkpoints/ does; root ignores chmod, so the
    # failure is injected where Orbax creates it). Orbax's save threads then wait five minutes for a signal that
    # never comes, and the interpreter used to wait for them at exit.
    child = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(TESTS)!r})
        real = os.makedirs
        def makedirs(name, *args, **kwargs):
            if os.path.basename(str(name)).startswith("8.orbax-checkpoint-tmp"):
                raise PermissionError(13, "Permission denied", str(name))
            return real(name, *args, **kwargs)
        os.makedirs = makedirs
        import _engine_helpers
        sys.exit(_engine_helpers.main([{str(tmp_path / "run")!r}]))
        """
    )
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", child], env=_env(), capture_output=True, text=True, timeout=240
    )  # without the fix: no exit for 300 s after the error, so TimeoutExpired
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "saving a checkpoint at step 8 failed (PermissionError" in proc.stderr
    assert "the checkpoint of step 4 is intact" in proc.stderr
    assert time.monotonic() - start < 200
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["4"]


def test_a_full_disk_during_a_save_is_one_error_line(tmp_path: Path) -> None:
    # Every file Orbax writes from Python for the step-8 save (metadata, the JSON items) fails with ENOSPC. The
    # failure used to surface again when the checkpoints were closed, as a raw OSError that replaced the one-line
    # error (exit 1, its traceback, then "Event loop is closed" from the save's threads).
    child = textwrap.dedent(
        f"""
        import errno, logging, sys
        sys.path.insert(0, {str(TESTS)!r})
        import etils.epath as epath
        from orbax.checkpoint._src.path import async_path

        def full(path):
            return "8.orbax-checkpoint-tmp" in str(path)

        real_async, real_sync = async_path.write_text, epath.Path.write_text

        async def write_text(path, text):
            if full(path):
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return await real_async(path, text)

        def sync_write_text(self, *args, **kwargs):
            if full(self):
                raise OSError(errno.ENOSPC, "No space left on device", str(self))
            return real_sync(self, *args, **kwargs)

        async_path.write_text, epath.Path.write_text = write_text, sync_write_text
        logging.getLogger("absl").setLevel(logging.CRITICAL)  # as the CLI does: Orbax logs its own failures
        import _engine_helpers
        sys.exit(_engine_helpers.main([{str(tmp_path / "run")!r}]))
        """
    )
    proc = subprocess.run([sys.executable, "-c", child], env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Error: saving a checkpoint at step 8 failed (OSError: [Errno 28] No space left" in proc.stderr
    assert "the checkpoint of step 4 is intact" in proc.stderr
    assert proc.stderr.count("No space left on device") == 1, proc.stderr[-3000:]  # the error line, no traceback
    assert "During handling" not in proc.stderr and "never retrieved" not in proc.stderr, proc.stderr[-3000:]
    assert "Event loop is closed" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # Nothing half-written is left: the failed step's temporary directory is gone, step 4 is the newest.
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["4"]


def _foreign(root: Path) -> dict[str, bytes]:
    """A Hugging Face-like model directory: a JSON-object config.json, a metrics.jsonl, checkpoints/ and tb/."""
    (root / "checkpoints").mkdir(parents=True)
    (root / "tb").mkdir()
    files = {
        "config.json": json.dumps({"model_type": "vit", "hidden_size": 768}).encode(),
        "metrics.jsonl": b'{"step": 1, "split": "train", "loss": 2.0}\n',
        "checkpoints/weights.bin": b"\x00\x01",
        "tb/events": b"e",
        "README.md": b"mine",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_a_directory_convscale_did_not_write_is_never_taken_over(registry: Any, tmp_path: Path, force: bool) -> None:
    out = tmp_path / "hf-model"
    files = _foreign(out)
    with pytest.raises(CheckpointError, match="not written by convscale"):
        pretrain(helpers.config(out, force=force), registry)
    for name, data in files.items():
        assert (out / name).read_bytes() == data
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "checkpoints", "config.json", "metrics.jsonl", "tb"]


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param({"checkpoints/notes.txt": "mine"}, id="checkpoints-only"),
        pytest.param({"config.json": "[1, 2]", "tb/x": "mine"}, id="unreadable-config"),
        pytest.param({"notes.txt": "mine"}, id="other-files"),
    ],
)
def test_force_never_clears_a_directory_that_is_not_a_convscale_run(
    registry: Any, tmp_path: Path, layout: dict[str, str]
) -> None:
    out = tmp_path / "mine"
    for name, text in layout.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    with pytest.raises(CheckpointError, match="empty it yourself"):
        pretrain(helpers.config(out, force=True), registry)
    assert {str(p.relative_to(out)): p.read_text() for p in out.rglob("*") if p.is_file()} == layout


def test_a_convscale_run_is_marked_and_force_still_starts_it_over(registry: Any, tmp_path: Path) -> None:
    out = tmp_path / "run"
    pretrain(helpers.config(out, steps=4), registry)
    marker = json.loads((out / "config.json").read_text())["convscale_run"]
    assert marker["kind"] == "pretrain"
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="steps differs"):
        pretrain(helpers.config(out, steps=8), registry)
    assert pretrain(helpers.config(out, steps=8, force=True), registry)["steps"] == 8
    assert (out / "notes.txt").read_text() == "mine"


def test_a_run_written_before_the_marker_is_still_resumed(registry: Any, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = pretrain(helpers.config(out, steps=4), registry)
    config = json.loads((out / "config.json").read_text())
    del config["convscale_run"]
    (out / "config.json").write_text(json.dumps(config))
    assert pretrain(helpers.config(out, steps=4), registry)["finished_at"] == first["finished_at"]  # nothing to do
    with pytest.raises(CheckpointError, match="not written by convscale"):
        pretrain(helpers.config(out, steps=8, force=True), registry)  # differs, so not provably a convscale run


def test_a_classifier_smaller_than_the_dataset_is_refused_before_the_directory_is_touched(
    registry: Any, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    with pytest.raises(UsageError, match=r"num_classes 2 is smaller than dataset 'colours'.s 4 classes"):
        pretrain(helpers.config(out, num_classes=2), registry)
    assert not out.exists()


def test_the_cli_names_a_too_small_classifier_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["pretrain", "--model", "nfnet-test", "--dataset", "shapes", "--set", "num_classes=2", "--steps", "1"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("Error: num_classes 2 is smaller than dataset 'shapes''s 420 classes") and err.count("\n") == 1
    )


def test_labels_outside_the_classifier_stop_the_batch() -> None:
    batch = {
        "image": np.zeros((4, 2, 2, 3), np.uint8),
        "label": np.array([0, 3, 1, 9]),
        "mask": np.array([1.0, 1.0, 1.0, 0.0]),  # the padded last example's label is never used
    }
    assert host_batch(batch, False, 4)["label"].tolist() == [0, 3, 1, 9]
    for bad in (4, -1):
        with pytest.raises(DataError, match=f"label {bad} is outside the classifier's 4 classes"):
            host_batch({**batch, "label": np.array([0, bad, 1, 9])}, False, 4)


def _shards(root: Path, records: list[bytes], classes: int = 3) -> Path:
    """A one-shard ``arrayrecord`` dataset holding ``records`` in both splits."""
    from array_record.python.array_record_module import ArrayRecordWriter

    root.mkdir(parents=True)
    for split in ("train", "eval"):
        writer = ArrayRecordWriter(str(root / f"{split}.array_record"), "group_size:1")
        for record in records:
            writer.write(record)
        writer.close()
    splits = {split: {"count": len(records), "shards": [f"{split}.array_record"]} for split in ("train", "eval")}
    write_manifest(root, classes=[f"c{i}" for i in range(classes)], splits=splits, multi_label=False)
    return root


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("record", "needle"),
    [
        pytest.param(
            lambda: encode_record(_png(), [99], 5), r"record 1 \(id 5\) has label 99; the manifest lists 3", id="99"
        ),
        pytest.param(lambda: encode_record(_png(), [-1], 5), "has label -1", id="negative"),
        pytest.param(lambda: encode_record(_png(), [], 5), "has no label", id="no-label"),
        pytest.param(lambda: b"CSR", "shorter than the 16-byte record header", id="3-bytes"),
        pytest.param(
            lambda: encode_record(b"", [], 5)[:12] + struct.pack("<I", 2**32 - 1) + b"x",
            "announces 4294967295 labels",
            id="huge-count",
        ),
    ],
)
def test_arrayrecord_records_with_bad_labels_are_data_errors(tmp_path: Path, record: Any, needle: str) -> None:
    root = _shards(tmp_path / "ar", [encode_record(_png(), [1], 0), record()])
    source = arrayrecord.open_split("train", root=str(root))
    assert source[0]["label"] == 1
    with pytest.raises(DataError, match=needle):
        source[1]


@pytest.mark.parametrize(
    "name", ["ledger.json.tmp", "config.json.tmp", "summary.json.tmp", "metrics.jsonl.tmp", "metrics.jsonl"]
)
def test_writes_never_follow_a_planted_symlink(registry: Any, tmp_path: Path, name: str) -> None:
    out = tmp_path / "run"
    pretrain(helpers.config(out, steps=4, checkpoint_every=2, log_every=2), registry)
    # Resumable from step 2, so the rerun writes the ledger, metrics and summary again; for config.json nothing is
    # left to resume, so a changed learning rate replaces the config.
    (out / "summary.json").unlink()
    shutil.rmtree(out / "checkpoints" / ("" if name.startswith("config") else "4"))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / name).unlink(missing_ok=True)
    (out / name).symlink_to(victim)
    lr = 0.5 if name.startswith("config") else 0.4
    assert pretrain(helpers.config(out, steps=4, checkpoint_every=2, log_every=2, lr=lr), registry)["steps"] == 4
    assert victim.read_text() == "precious"
    assert json.loads((out / "config.json").read_text())["lr"] == lr


def _signalling(where: str, sig: signal.Signals, *, after: int = 2) -> Any:
    """The real pipeline, sending this process ``sig`` at one point: ``start`` (building the train loader, after
    compiling), ``batch`` (after ``after`` training batches), ``final-save`` (when the final checkpoint asks for the
    loader's state) or ``final-eval`` (the end-of-run evaluation)."""
    import convscale_cli.data as data

    def send() -> None:
        os.kill(os.getpid(), sig)

    def train_loader(*args: Any, **kwargs: Any) -> Any:
        if where == "start":
            send()
        loader = data.train_loader(*args, **kwargs)
        base = type(loader)

        class Signalling(base):  # type: ignore[misc,valid-type]
            def __iter__(self) -> Any:
                for i, batch in enumerate(base.__iter__(self)):
                    if where == "batch" and i == after:
                        send()
                    yield batch

            def get_state(self) -> Any:
                if where == "final-save" and self._step == self.steps:
                    send()
                return base.get_state(self)

        loader.__class__ = Signalling
        return loader

    def eval_loader(*args: Any, **kwargs: Any) -> Any:
        if where == "final-eval":
            send()
        return data.eval_loader(*args, **kwargs)

    return types.SimpleNamespace(
        train_loader=train_loader, eval_loader=eval_loader, normalize=data.normalize, to_global=data.to_global
    )


def _leftovers(out: Path) -> list[str]:
    return (
        [p.name for p in (out / "checkpoints").iterdir() if "tmp" in p.name] if (out / "checkpoints").exists() else []
    )


def test_an_inherited_ignored_sigint_does_not_stop_training(
    registry: Any, tmp_path: Path, terminal_signals: Any
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # `cmd &` in a script, nohup
    out = tmp_path / "run"
    with interrupts.latched():
        summary = pretrain(helpers.config(out, steps=8), registry, pipeline=_signalling("batch", signal.SIGINT))
    assert summary["status"] == "finished" and summary["steps"] == 8


@pytest.mark.parametrize("where", ["start", "final-eval"])
def test_sigterm_outside_the_loop_stops_cleanly(
    registry: Any, tmp_path: Path, terminal_signals: Any, where: str
) -> None:
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt), interrupts.latched():  # the CLI prints "Interrupted." and exits 130
        pretrain(helpers.config(out, steps=8), registry, pipeline=_signalling(where, signal.SIGTERM))
    assert not _leftovers(out) and not (out / "summary.json").exists()
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir())
    assert steps == ([] if where == "start" else [4, 8])
    assert pretrain(helpers.config(out, steps=8), registry)["status"] == "finished"


def test_sigterm_during_the_final_save_lets_it_complete(registry: Any, tmp_path: Path, terminal_signals: Any) -> None:
    out = tmp_path / "run"
    with pytest.raises(RunInterrupted, match="interrupted at step 6; checkpoint saved"), interrupts.latched():
        pretrain(helpers.config(out, steps=6), registry, pipeline=_signalling("final-save", signal.SIGTERM))
    assert not _leftovers(out) and sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [4, 6]
    summary = pretrain(helpers.config(out, steps=6), registry)
    assert summary["status"] == "finished" and summary["steps"] == 6


def _flip_a_bit(step_dir: Path) -> Path:
    """Flip one bit in the middle of the largest array-data file of a checkpoint step."""
    data = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    return data


def test_a_flipped_bit_in_a_saved_step_falls_back_to_the_previous_step(registry: Any, tmp_path: Path) -> None:
    out = tmp_path / "run"
    pretrain(helpers.config(out, steps=8), registry)
    assert all((out / "checkpoints" / s / "convscale-checksums.json").is_file() for s in ("4", "8"))
    (out / "summary.json").unlink()
    flipped = _flip_a_bit(out / "checkpoints" / "8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = pretrain(helpers.config(out, steps=8), registry)
    messages = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert len(messages) == 1, messages
    assert (
        "step 8" in messages[0]
        and f"{flipped.relative_to(out / 'checkpoints' / '8')} fails its checksum" in messages[0]
    )
    assert summary["status"] == "finished" and summary["steps"] == 8
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("unreadable-8-"))  # kept aside


def _poison(step_dir: Path) -> None:
    """Rewrite a checkpoint step's parameters as NaN in a form Orbax reads back, without checksums (as a step saved
    before them would be)."""
    import jax
    import orbax.checkpoint as ocp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sharding info not provided": host numpy arrays are wanted
        tree = ocp.PyTreeCheckpointer().restore(step_dir / "state")
    tree["params"] = jax.tree.map(lambda x: np.full_like(x, np.nan), tree["params"])
    shutil.rmtree(step_dir / "state")
    ocp.PyTreeCheckpointer().save(step_dir / "state", tree)
    (step_dir / "convscale-checksums.json").unlink()


def test_a_non_finite_loss_right_after_a_restore_tries_the_previous_checkpoint(registry: Any, tmp_path: Path) -> None:
    out = tmp_path / "run"
    pretrain(helpers.config(out, steps=8), registry)
    (out / "summary.json").unlink()
    shutil.rmtree(out / "checkpoints" / "8")
    _poison(out / "checkpoints" / "4")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = pretrain(helpers.config(out, steps=8), registry)  # restores step 4: NaN at step 5, then starts over
    messages = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert len(messages) == 1 and "step 4" in messages[0] and "non-finite loss" in messages[0], messages
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("unreadable-4-")]
    assert summary["status"] == "finished" and summary["steps"] == 8 and math.isfinite(summary["final"]["eval_loss"])


def test_out_expands_the_home_directory(registry: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert pretrain(helpers.config("~/run", steps=4), registry)["steps"] == 4
    assert (tmp_path / "home" / "run" / "summary.json").is_file() and not (tmp_path / "~").exists()


def test_a_finished_run_on_read_only_storage_says_it_is_finished(
    registry: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from convscale_cli.engine import rundir

    out = tmp_path / "run"
    first = pretrain(helpers.config(out, steps=4), registry)

    def read_only(path: Path, text: str) -> None:
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(rundir, "write_text", read_only)
    monkeypatch.chdir(tmp_path)  # the same run named another way: config.json's "out" differs, so it would be rewritten
    assert pretrain(helpers.config("run", steps=4), registry)["finished_at"] == first["finished_at"]
