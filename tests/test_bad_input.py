"""Bad input is one ``Error:`` line and exit code 2, never a traceback (exit 1), whatever the file or value.

Each case builds its hostile input in ``tmp_path`` and runs the CLI's ``main`` in process; the message must name the
bad value. Checkpoint ledgers of the wrong schema are checked at the library level: a resume falls back past them.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _engine_helpers as helpers
import pytest

from convscale_cli.cli import main
from convscale_cli.engine.api import pretrain
from convscale_cli.engine.checkpoint import CheckpointWarning

SHAPES = ["pretrain", "--model", "nfnet-test", "--dataset", "shapes"]


def _toml(text: str) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        (tmp / "run.toml").write_text(text)
        return ["pretrain", "--config", str(tmp / "run.toml"), "--out", str(tmp / "out")]

    return make


def _safetensors(tensors: dict[str, tuple[str, list[int], bytes]], *extra: str) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        header, body = {}, b""
        for name, (dtype, shape, data) in tensors.items():
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(body), len(body) + len(data)]}
            body += data
        raw = json.dumps(header).encode()
        (tmp / "w.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + body)
        return ["import-weights", "timm", "dm_nfnet_f0", str(tmp / "w.safetensors"), "--out", str(tmp / "w"), *extra]

    return make


def _model_option(model: str, option: str, *extra: str) -> Callable[[Path], list[str]]:
    """``pretrain`` of ``model`` with one ``--set model_options.OPTION``."""

    def make(tmp: Path) -> list[str]:
        args = ["pretrain", "--model", model, "--dataset", "shapes", "--steps", "1", "--batch-size", "8"]
        return [*args, "--set", f"model_options.{option}", "--out", str(tmp / "o"), *extra]

    return make


def _weights_file(make_path: Callable[[Path], Any] | None) -> Callable[[Path], list[str]]:
    """``import-weights`` of a path that is no readable file: ``make_path`` creates it (None: ``/dev/zero``). A FIFO
    or ``/dev/zero`` would block or read forever, a symlink loop cannot be resolved; none of them "does not exist"."""

    def make(tmp: Path) -> list[str]:
        path = tmp / "w.safetensors"
        if make_path is None:
            path = Path("/dev/zero")
        else:
            make_path(path)
        return ["import-weights", "timm", "dm_nfnet_f0", str(path), "--out", str(tmp / "w")]

    return make


def _study(extra: str) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        study = f'out = "{tmp / "runs"}"\ndataset = "shapes"\nmodels = ["nfnet-tiny-l0"]\nepochs = [0.01]\n{extra}\n'
        (tmp / "study.toml").write_text(study)
        return ["sweep", str(tmp / "study.toml")]

    return make


def _weights_dir(meta: dict[str, Any] | None, params: bool) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        weights = tmp / "weights"
        weights.mkdir()
        base = {"format": "convscale-weights", "version": 1, "architecture": "nfnet-test", "num_classes": 10}
        merged = {key: value for key, value in {**base, **(meta or {})}.items() if value is not None}  # None: drop
        (weights / "model.json").write_text(json.dumps(merged))
        if params:
            (weights / "params").mkdir()
        return ["finetune", "--from", str(weights), "--dataset", "digits", "--steps", "1", "--out", str(tmp / "o")]

    return make


def _run_dir(config: dict[str, Any]) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        run = tmp / "run"
        (run / "checkpoints" / "4" / "state").mkdir(parents=True)
        (run / "config.json").write_text(json.dumps(config))
        return ["finetune", "--from", str(run), "--dataset", "digits", "--steps", "1", "--out", str(tmp / "o")]

    return make


def _manifest(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        root = tmp / "ar"
        root.mkdir()
        (root / "train.array_record").write_bytes(b"")
        (root / "eval.array_record").write_bytes(b"")
        manifest = {
            "format": "convscale-arrayrecord",
            "version": 1,
            "classes": ["a", "b"],
            "multi_label": False,
            "splits": {"train": {"count": 4, "shards": ["train.array_record"]}, "eval": {"count": 2, "shards": []}},
        }
        change(manifest)
        (root / "convscale-dataset.json").write_text(json.dumps(manifest))
        args = ["pretrain", "--model", "nfnet-test", "--dataset", "arrayrecord", "--data-option", f"root={root}"]
        return [*args, "--steps", "1", "--out", str(tmp / "o")]

    return make


def _set(manifest: dict[str, Any], key: str, value: Any) -> None:
    target = manifest
    *path, last = key.split(".")
    for part in path:
        target = target[part]
    if value is None:
        del target[last]
    else:
        target[last] = value


CASES = {
    "config-table-int": (_toml("pretrain = 5\n"), "pretrain = 5 in"),
    "config-table-str": (_toml('pretrain = "x"\n'), "pretrain = 'x' in"),
    "config-nested-1000": (_toml("a = " + "[" * 1000 + "]" * 1000 + "\n"), "nests tables or arrays too deeply"),
    "config-bom": (_toml('\ufeffmodel = "nfnet-test"\nsteps = 1\n'), "dataset is required"),
    "set-min-area-text": (
        lambda tmp: [*SHAPES, "--set", "augment.min_area=x", "--steps", "1", "--out", str(tmp / "o")],
        "augment.min_area = 'x' has the wrong type",
    ),
    "set-flip-maybe": (  # a bool key: neither "maybe" nor the typo "ture" is a truthy string
        lambda tmp: [*SHAPES, "--set", "augment.flip=maybe", "--steps", "1", "--out", str(tmp / "o")],
        "augment.flip = 'maybe' has the wrong type: expected bool",
    ),
    "set-flip-ture": (
        lambda tmp: [*SHAPES, "--set", "augment.flip=ture", "--steps", "1", "--out", str(tmp / "o")],
        "augment.flip = 'ture' has the wrong type: expected bool",
    ),
    "eval-resolution-522024": (
        lambda tmp: [*SHAPES, "--eval-resolution", "522024", "--steps", "1", "--out", str(tmp / "o")],
        "resolution 522024 is over the limit of 2048 px",
    ),
    "batch-over-dataset": (
        lambda tmp: [*SHAPES[:-1], "digits", "--batch-size", "939987", "--steps", "1", "--out", str(tmp / "o")],
        "batch size 939987 is larger than dataset 'digits'",
    ),
    "budget-full-width-digits": (
        lambda tmp: ["plan", "--budget", "１２-cpu-hours"],
        "cannot read budget '１２-cpu-hours'",
    ),
    "steps-2**31": (lambda tmp: [*SHAPES, "--steps", "2147483648", "--out", str(tmp / "o")], "32-bit integer"),
    "examples-over-int32": (
        lambda tmp: [*SHAPES, "--examples", "10000000000000", "--out", str(tmp / "o")],
        "is 2441406250 steps at batch 4096; the optimiser's step counter is a 32-bit integer",
    ),
    "epochs-over-int32": (
        lambda tmp: [*SHAPES, "--epochs", "10000000", "--out", str(tmp / "o")],
        "is 4882812500 steps at batch 4096",
    ),
    "config-dev-zero": (
        lambda tmp: ["pretrain", "--config", "/dev/zero", "--out", str(tmp / "o")],
        "'/dev/zero' is not a regular file",
    ),
    "study-resolution-100000": (_study("resolution = 100000"), "resolution 100000 is over the limit of 2048 px"),
    "weights-f8": (_safetensors({"head.fc.weight": ("F8_E4M3", [2, 2], b"\0" * 4)}), "unsupported dtype F8_E4M3"),
    "weights-scalar-head": (
        _safetensors({"head.fc.weight": ("F32", [], b"\0" * 4), "head.fc.bias": ("F32", [], b"\0" * 4)}),
        "does not hold a timm dm_nfnet_f0 state dict",
    ),
    "weights-10M-classes": (
        _safetensors({"head.fc.bias": ("F32", [1], b"\0" * 4)}, "--num-classes", "10000000"),
        "--num-classes must be in [1, 100000], got 10000000",
    ),
    "weights-fifo": (_weights_file(lambda path: os.mkfifo(path)), "w.safetensors' is not a regular file"),
    "weights-dev-zero": (_weights_file(None), "'/dev/zero' is not a regular file"),
    "weights-symlink-loop": (
        _weights_file(lambda path: path.symlink_to(path)),
        "cannot be read (Too many levels of symbolic links)",
    ),
    "weights-2**31-classes": (
        _safetensors({"head.fc.bias": ("F32", [1], b"\0" * 4)}, "--num-classes", "2147483648"),
        "--num-classes must be in [1, 100000], got 2147483648",
    ),
    "from-no-params": (_weights_dir(None, params=False), "no params/ directory"),
    "from-no-num-classes": (_weights_dir({"num_classes": None}, params=True), "num_classes is missing"),
    "from-no-architecture": (_weights_dir({"architecture": None}, params=True), "architecture is missing"),
    "from-wrong-types": (_weights_dir({"num_classes": "ten"}, params=True), "num_classes is 'ten'"),
    "from-model-options-5": (
        _run_dir({"model": "nfnet-test", "num_classes": 10, "model_options": 5}),
        "model_options is 5, expected a table",
    ),
    "model-option-int-as-text": (_model_option("vit-test", "resolution=abc"), "resolution = 'abc' has the wrong type"),
    "model-option-int-as-float": (_model_option("vit-test", "resolution=2.5"), "resolution = 2.5 has the wrong type"),
    "model-option-bool-as-text": (_model_option("vit-test", "qkv_bias=maybe"), "qkv_bias = 'maybe' has the wrong"),
    "model-option-text-dry-run": (
        _model_option("nfnet-test", "ws_eps=abc", "--dry-run"),
        "ws_eps = 'abc' has the wrong type",
    ),
    "model-option-resolution-100000": (
        _model_option("vit-test", "resolution=100000"),
        "resolution 100000 is over the limit of 2048 px",
    ),
    "model-option-stage1-mid-2**66": (
        _model_option("nfnet-f0+", "plus_stage1_mid=99999999999999999999"),
        "plus_stage1_mid=99999999999999999999",
    ),
    "manifest-no-splits": (_manifest(lambda m: _set(m, "splits", None)), "splits is None"),
    "manifest-splits-list": (_manifest(lambda m: _set(m, "splits", ["train"])), "splits is ['train']"),
    "manifest-classes-number": (_manifest(lambda m: _set(m, "classes", 3)), "classes is 3"),
    "manifest-count-missing": (_manifest(lambda m: _set(m, "splits.train.count", None)), "count is None"),
    "manifest-count-text": (_manifest(lambda m: _set(m, "splits.train.count", "4")), "count is '4'"),
    "manifest-shard-outside": (
        _manifest(lambda m: _set(m, "splits.train.shards", ["../../../../etc/hostname"])),
        "lies outside the dataset directory",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make, needle = CASES[case]
    code = main(make(tmp_path))
    captured = capsys.readouterr()
    assert code == 2, captured.err[-3000:]
    assert "Traceback" not in captured.out + captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and needle in errors[0], captured.err[-3000:]


@pytest.mark.parametrize(
    ("option", "value", "steps"), [("--examples", "100000000000", 24414063), ("--epochs", "100000", 48828125)]
)
def test_long_budgets_within_the_step_counter_resolve_without_overflow(
    option: str, value: str, steps: int, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # These once overflowed an int32 while resolving the run; they fit the step counter, so they are valid runs.
    assert main([*SHAPES, option, value, "--out", str(tmp_path / "o"), "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["derived"]["total_steps"] == steps
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "finished"
    pretrain(helpers.config(out, steps=8), helpers.registry())
    (out / "summary.json").unlink()
    return out


@pytest.mark.parametrize("ledger", [{"device_seconds": "x"}, [1, 2], {"device_seconds": {"train": "1"}}])
def test_a_heartbeat_of_another_schema_does_not_stop_the_resume(finished: Path, tmp_path: Path, ledger: Any) -> None:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "checkpoints" / "8")
    (out / "ledger.json").write_text(json.dumps(ledger))
    assert pretrain(helpers.config(out, steps=8), helpers.registry())["steps"] == 8


def test_a_checkpoint_ledger_of_another_schema_falls_back_to_the_previous_step(finished: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    ledger = next((out / "checkpoints" / "8" / "ledger").glob("*"))  # the JSON item's one file
    ledger.write_text(json.dumps({"steps": "eight", "device_seconds": []}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = pretrain(helpers.config(out, steps=8), helpers.registry())
    assert summary["steps"] == 8 and summary["status"] == "finished"
    messages = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert len(messages) == 1 and "step 8" in messages[0], messages
