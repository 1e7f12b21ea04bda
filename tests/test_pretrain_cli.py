"""``convscale pretrain`` on the command line: config file + flags, resume messages, exit codes of bad input."""

from __future__ import annotations

import json
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
