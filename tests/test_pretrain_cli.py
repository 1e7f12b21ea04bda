"""``convscale pretrain`` on the command line: config file + flags, resume messages, exit codes of bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import _engine_helpers as helpers
import pytest

from convscale_cli import plugins
from convscale_cli.cli import main


@pytest.fixture(autouse=True)
def tiny_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI looks models up in the process registry: serve it the tiny test model and dataset."""
    registry = helpers.registry()
    monkeypatch.setattr(plugins, "get_registry", lambda: registry)


def _base(out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--model", "tiny-cnn", "--dataset", "colours", "--out", str(out), *extra]


def test_config_file_flags_and_overrides_then_finished_message(tmp_path: Path, capsys: Any) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        '[pretrain]\nmodel = "tiny-cnn"\ndataset = "colours"\nepochs = 3.0\nbatch_size = 16\nprecision = "fp32"\n'
        "[pretrain.recipe]\nweight_decay = 1e-4\n"
    )
    out = tmp_path / "run"
    argv = ["pretrain", "--config", str(config), "--out", str(out), "--steps", "6", "--lr", "0.8", "--eval-every", "3",
            "--set", "recipe.warmup_fraction=0.0", "--set", "progress=plain", "--json"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # with --json, stdout is the summary alone: progress goes to stderr
    assert summary["steps"] == 6 and summary["lr"] == 0.8 and summary["peak_lr"] == pytest.approx(0.8 * 16 / 16)
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["recipe"]["weight_decay"] == 1e-4 and resolved["recipe"]["warmup_fraction"] == 0.0
    assert resolved["epochs"] is None and resolved["steps"] == 6  # the flag's duration replaced the file's
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in records if r["split"] == "eval"]
    assert evals == [3, 6]
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        assert not (out / "tb").exists()
    else:
        assert any((out / "tb").glob("events.out.tfevents.*"))
    assert "step 6/6" in captured.err
    assert main(argv[:-1]) == 0
    assert "run already finished at step 6; nothing to do" in capsys.readouterr().out
    assert main([*argv[:-1], "--lr", "0.4"]) == 2
    assert "different config (lr differs)" in capsys.readouterr().err
    # Evaluation settings do not change what trained: never suggest deleting the run over them.
    assert main([*argv[:-1], "--eval-resolution", "16"]) == 2
    err = capsys.readouterr().err
    assert "eval_resolution" in err and "--force" not in err
    assert f"convscale eval {out} --dataset colours --resolution 16" in err
    assert (out / "summary.json").exists()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--epochs", "1", "--model", "tiny-cn"], "unknown model 'tiny-cn': did you mean 'tiny-cnn'?"),
        (["--epochs", "1", "--dataset", "colors"], "unknown dataset 'colors': did you mean 'colours'?"),
        (["--epochs", "0"], "epochs = 0.0 must be > 0"),
        (["--epochs", "1", "--lr", "-1"], "lr = -1.0 must be > 0"),
        (["--epochs", "1", "--precision", "fp8"], "precision = 'fp8' is not one of 'bf16', 'fp32'"),
        (["--epochs", "1", "--set", "recipe.momentun=0.5"], "did you mean 'recipe.momentum'"),
        (["--epochs", "1", "--set", "stepz=3"], "unknown config key 'stepz'"),
        (["--epochs", "1", "--set", "recipe.grad_clip_norm=0"], "grad_clip_norm must be a finite number > 0"),
        (["--epochs", "1", "--set", "recipe.momentum=1.5"], "invalid config recipe: momentum must be in [0, 1)"),
        (["--epochs", "1", "--set", "recipe.lr=nan"], "invalid config recipe: lr must be a finite number > 0, got nan"),
        (["--epochs", "1", "--set", "recipe.weight_decay=-1"], "weight_decay must be a finite number >= 0, got -1.0"),
        (["--epochs", "1", "--budget", "3-lightyears"], "unknown budget unit"),
        (["--epochs", "1", "--steps", "4"], "give one duration, not epochs and steps"),
        (["--epochs", "1", "--data-option", "root=/nowhere"], "unknown colours data option 'root'"),
        (["--epochs", "1", "--data-option", "size=abc"], "colours data option size = 'abc' has the wrong type"),
        (["--epochs", "1", "--tracker", "wandbb"], "unknown tracker 'wandbb'"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: Any, extra: list[str], needle: str) -> None:
    argv = _base(tmp_path / "bad", "--batch-size", "16")
    for i in range(0, len(extra), 2):  # a repeated option replaces the base one
        if extra[i] in argv and extra[i] not in ("--set", "--data-option"):
            argv[argv.index(extra[i]) + 1] = extra[i + 1]
        else:
            argv += extra[i : i + 2]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: ") and needle in err and "\n" not in err


def test_out_is_a_file_exits_2(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "taken"
    path.write_text("")
    assert main(_base(path, "--steps", "1", "--batch-size", "16")) == 2
    assert "is a file" in capsys.readouterr().err


def test_help_states_the_lr_convention(capsys: Any) -> None:
    assert main(["pretrain", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "alpha x batch / 4096" in text and "--data-option" in text and "--fsdp" in text


@pytest.mark.parametrize(
    "backend, saved, expected",
    [
        ("cpu", None, "fp32"),  # XLA:CPU emulates bf16 arithmetic: slower than fp32
        ("gpu", None, "bf16"),
        ("tpu", None, "bf16"),
        ("cpu", {"precision": "bf16"}, "bf16"),  # a resumed run keeps the precision it started with
        ("gpu", {"precision": "fp32"}, "fp32"),
        ("cpu", {"precision": "fp8"}, "fp32"),  # not a precision of ours: ignored
    ],
)
def test_default_precision_follows_the_backend_and_the_run_being_resumed(
    backend: str, saved: dict[str, Any] | None, expected: str
) -> None:
    from convscale_cli.engine.resolve import default_precision

    precision, why = default_precision(backend, saved)
    assert precision == expected and why


def test_header_before_compiling_names_model_data_steps_lr_precision_and_devices(
    tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from convscale_cli.engine import trainer
    from convscale_cli.errors import UsageError

    def no_compiling(*args: Any, **kwargs: Any) -> Any:
        raise UsageError("stopped before building")

    monkeypatch.setattr(trainer, "build", no_compiling)
    out = tmp_path / "run"
    assert main([*_base(out, "--steps", "6", "--batch-size", "16"), "--set", "progress=plain"]) == 2
    header = capsys.readouterr().out
    assert "tiny-cnn" in header and "colours" in header and "6 steps" in header and "batch 16" in header
    assert "peak lr 0.4" in header and re.search(r"\b\d+ cpu devices?\b", header)
    # On CPU the default is fp32, said so, and recorded in the run's config.
    assert "precision fp32 (default on CPU" in header
    assert json.loads((out / "config.json").read_text())["precision"] == "fp32"


def test_finetune_precision_defaults_like_pretraining() -> None:
    from convscale_cli.engine.resolve import with_precision
    from convscale_cli.finetune.config import FinetuneConfig

    config = FinetuneConfig(pretrained="x", dataset="colours", out="o", steps=4)
    assert config.precision is None  # resolved per backend at run time, as in pre-training
    assert with_precision(config, "cpu", None)[0].precision == "fp32"
    assert with_precision(config, "gpu", None)[0].precision == "bf16"
    given = FinetuneConfig(pretrained="x", dataset="colours", out="o", steps=4, precision="bf16")
    assert with_precision(given, "cpu", None) == (given, "given")


def test_out_inside_another_runs_checkpoints_is_refused(tmp_path: Path, capsys: Any) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"convscale_run": {"kind": "pretrain", "version": "0"}}))
    for inner in (run / "checkpoints" / "x", run / "tb" / "y"):
        assert main(_base(inner, "--steps", "1", "--batch-size", "16")) == 2
        err = capsys.readouterr().err
        assert "inside" in err and str(run) in err and not inner.exists()


def test_live_bar_keeps_step_counter_and_eta_at_80_columns() -> None:
    import io

    from convscale_cli.engine.progress import Progress

    stream = io.StringIO()  # not a terminal: Rich renders it 80 columns wide
    fields = {"epoch": 1.2345, "loss": 5.4321, "img/s": 1234.5, "mfu": 0.01234, "core-h": 1.23e-5}
    with Progress(12000, mode="rich", stream=stream) as progress:
        progress.update(3712, {**fields, "budget": "0.0123 cpu-hours / 0.1 cpu-hours"})
    last = [line for line in stream.getvalue().splitlines() if "3712" in line][-1]
    assert "3712/12000" in last and ("-:--:--" in last or re.search(r"\d:\d\d:\d\d", last))
    assert len(last) <= 80 and "loss" in last


def test_grad_accum_steps_trains_like_the_large_batch(tmp_path: Path, capsys: Any) -> None:
    common = ["--steps", "3", "--batch-size", "16", "--set", "progress=plain", "--json"]
    assert main(_base(tmp_path / "one", *common)) == 0
    one = json.loads(capsys.readouterr().out)
    assert main(_base(tmp_path / "two", *common, "--grad-accum-steps", "2")) == 0
    two = json.loads(capsys.readouterr().out)
    assert two["final"]["eval_loss"] == pytest.approx(one["final"]["eval_loss"], rel=1e-4)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["grad_accum_steps"] == 2
    assert main(_base(tmp_path / "bad", *common, "--grad-accum-steps", "3")) == 2
    assert "does not split into 3 micro-batches" in capsys.readouterr().err
