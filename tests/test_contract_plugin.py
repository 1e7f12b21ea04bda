"""A plugin written from docs/plugins.md alone (tests/contract_plugin.py) goes through every command.

It covers what the NFNet built-ins do not: an AdamW recipe without AGC, a dataset whose labels a horizontal flip would
swap (so its spec turns flips off), and input workers that receive the source by pickle. Every command runs with
``--json`` and its stdout must parse with ``json.loads`` alone.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from convscale_cli.cli import main

PLUGIN = Path(__file__).with_name("contract_plugin.py")


@pytest.fixture
def cli(install_plugin: Callable[..., dict[str, str]], capsys: pytest.CaptureFixture[str]) -> Callable[..., Any]:
    """Install the plugin as a distribution with a `convscale` entry point; returns `cli(*args) -> parsed stdout`."""
    install_plugin("convscale-arrows", {"arrows": "fake_plugin_arrows"}, {"fake_plugin_arrows": PLUGIN.read_text()})

    def run(*args: str) -> Any:
        code = main([*args, "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        return json.loads(out)  # stdout is the JSON document alone: progress and notices are on stderr

    return run


def test_the_plugin_loads_cleanly_and_its_source_pickles(cli: Callable[..., Any]) -> None:
    from convscale_cli.plugins import load_plugins

    loaded = load_plugins(strict=True)
    assert {"linear-tiny", "linear-small"} <= set(loaded.registry.architectures.names())
    source = loaded.registry.dataset("arrows").open("train", size=16)
    copy = pickle.loads(pickle.dumps(source))
    assert (copy[3]["image"] == source[3]["image"]).all() and copy[3]["label"] == source[3]["label"]
    rows = {row["name"]: row for row in cli("models", "linear")}
    assert rows["linear-small"]["options"] == {"width": 8}
    assert rows["linear-small"]["params"] == 8 * 8 * 3 * 8 + 8 + 8 * 2 + 2
    plan = cli("plan", "--budget", "1e9-flops", "--dataset", "arrows", "--family", "linear", "--batch-size", "32")
    assert plan["recommendation"]["model"] in {"linear-tiny", "linear-small"}


@pytest.mark.slow
def test_pretrain_sweep_tune_finetune_and_report(cli: Callable[..., Any], tmp_path: Path) -> None:
    common = [
        "--dataset",
        "arrows",
        "--batch-size",
        "32",
        "--set",
        "checkpoint_minutes=0",
        "--set",
        "tensorboard=false",
    ]
    pre = cli("pretrain", "--model", "linear-small", "--epochs", "1", "--out", str(tmp_path / "pre"), "--workers", "2",
              *common)  # fmt: skip
    assert pre["status"] == "finished" and pre["batch_size"] == 32
    # A flip gives half the training images the other class's label: the held-out loss then stays near ln 2 (0.52
    # measured with flips on, where the sign of a chance correlation can still give a high top-1); without flips the
    # classes are linearly separable and the loss falls to ~1e-6.
    assert pre["final"]["eval_loss"] < 0.05 and pre["final"]["eval_top1"] == 1.0, pre["final"]
    resolved = json.loads((tmp_path / "pre" / "config.json").read_text())
    assert resolved["recipe"]["optimizer"] == "adamw" and resolved["recipe"]["agc_clip"] is None
    assert resolved["augment"] == {"flip": False, "crop": "resize"} and resolved["worker_count"] == 2

    runs = tmp_path / "study"
    study = tmp_path / "study.toml"
    study.write_text(
        f"out = '{runs}'\ndataset = 'arrows'\nmodels = ['linear-tiny']\nepochs = [0.5]\nbatch_size = 32\n"
        "start_lr = 0.01\n[data_options]\nsize = 256\n[engine]\nprecision = 'fp32'\ncheckpoint_minutes = 0\n"
        "tensorboard = false\n"
    )
    sweep = cli("sweep", str(study))
    assert [cell["model"] for cell in sweep["cells"]] == ["linear-tiny"] and sweep["trained"] == 2

    tuned = cli("tune-lr", "--model", "linear-small", "--epochs", "0.5", "--runs", str(runs))
    assert tuned["start_lr"] == sweep["cells"][0]["best_lr"]  # alpha passed on from the smaller model's cell
    trial = json.loads((runs / tuned["best_run"] / "config.json").read_text())
    # The trial inherited the study's data options, batch size and precision.
    assert (trial["data_options"], trial["batch_size"], trial["precision"]) == ({"size": 256}, 32, "fp32")

    ft = cli("finetune", "--from", str(tmp_path / "pre"), "--dataset", "arrows", "--epochs", "1", "--out",
             str(tmp_path / "ft"), "--set", "progress=plain", *common)  # fmt: skip
    assert ft["kind"] == "finetune" and ft["status"] == "finished" and ft["final"]["eval_top1"] > 0.9

    report = cli("report", str(runs), "--out", str(tmp_path / "report"), "--bootstrap", "10")
    assert isinstance(report, dict)
    assert (tmp_path / "report" / "report.html").is_file()
