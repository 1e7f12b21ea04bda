"""Cooldown branching (Hägele et al. 2024): a wsd branch from a trunk equals the run trained from scratch, bit for bit;
a branching sweep gives the same decisions and runs as one without branching, resumes after SIGKILL, and refuses
what it cannot branch in one line.

Training uses the engine tests' tiny setup (a small CNN on in-memory colours, 8 px, fp32, CPU).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import _engine_helpers as helpers
import numpy as np
import pytest

from convscale_cli.cli import main
from convscale_cli.config import from_dict
from convscale_cli.engine.api import pretrain
from convscale_cli.engine.config import PretrainConfig
from convscale_cli.errors import CheckpointError, ConfigError, ExitCode, UsageError
from convscale_cli.sweep import TRUNKS, StudyConfig, load_study, run_sweep, study_compute

TESTS = Path(__file__).resolve().parent
WSD = {"schedule": "wsd", "warmup_steps": 2}


@pytest.fixture(scope="module")
def registry() -> Any:
    return helpers.registry()


def _assert_same_params(a: Path, b: Path) -> None:
    expected, got = helpers.final_params(a), helpers.final_params(b)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.fixture(scope="module")
def trunk(registry: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 20-step wsd trunk (cooldown from step 16) paused at 8, then extended to 16; its branch points 8 and 16."""
    out = tmp_path_factory.mktemp("branching") / "trunk"
    # keep=1 with a checkpoint every 2 steps: only the kept branch points survive besides the newest.
    settings = dict(steps=20, recipe=WSD, keep=1, checkpoint_every=2, keep_steps=(8, 16))
    first = pretrain(helpers.config(out, stop_step=8, **settings), registry)
    assert (first["status"], first["steps"], first["final"]) == ("paused", 8, None)
    again = pretrain(helpers.config(out, stop_step=8, **settings), registry)
    assert again["steps"] == 8  # reached: nothing to do
    extended = pretrain(helpers.config(out, stop_step=16, **settings), registry)
    assert (extended["status"], extended["steps"], extended["ledger"]["examples"]) == ("paused", 16, 16 * 16)
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [8, 16]
    return out


@pytest.mark.parametrize(("steps", "point"), [(10, 8), (20, 16)])
def test_a_branch_equals_the_direct_wsd_run_bit_for_bit(
    trunk: Path, registry: Any, tmp_path: Path, steps: int, point: int
) -> None:
    # 10 steps cool down from step 8 (trunk paused there first); 20 steps are the trunk's own length, from 16.
    branch = pretrain(
        helpers.config(tmp_path / "branch", steps=steps, recipe=WSD, branch_from=str(trunk), branch_step=point),
        registry,
    )
    direct = pretrain(helpers.config(tmp_path / "direct", steps=steps, recipe=WSD), registry)
    _assert_same_params(tmp_path / "direct", tmp_path / "branch")
    assert branch["final"] == direct["final"]
    mine, theirs = branch["ledger"], direct["ledger"]
    assert (mine["steps"], mine["examples"], mine["train_flops"]) == (steps, theirs["examples"], theirs["train_flops"])
    assert mine["core_hours"] == theirs["core_hours"]  # the scaling law's axis: the trunk's share included
    assert (mine["trunk_run"], mine["trunk_step"], mine["trunk_examples"]) == (str(trunk), point, point * 16)
    assert 0 < mine["trunk_core_hours"] < mine["core_hours"]
    assert "trunk_run" not in theirs
    records = [json.loads(line) for line in (tmp_path / "branch" / "metrics.jsonl").read_text().splitlines()]
    assert min(r["step"] for r in records) > point  # the branch logs its own steps only


def test_a_branch_from_a_trunk_with_another_warm_up_is_refused(registry: Any, tmp_path: Path) -> None:
    # Warm-ups as a fraction of each run: round(0.05 x 20) = 1 step for the trunk, round(0.05 x 10) = 0 for the
    # branch, so their learning rates differ from the first step although their configs agree.
    wsd = {"schedule": "wsd"}
    pretrain(helpers.config(tmp_path / "trunk", steps=20, recipe=wsd, stop_step=8), registry)
    config = helpers.config(tmp_path / "b", steps=10, recipe=wsd, branch_from=str(tmp_path / "trunk"), branch_step=8)
    with pytest.raises(UsageError, match="warms up over 1 steps to a peak lr of 0.4, this run over 0 steps to 0.4"):
        pretrain(config, registry)
    direct = helpers.config(tmp_path / "b", steps=10, recipe=WSD, branch_from=str(tmp_path / "trunk"), branch_step=8)
    with pytest.raises(UsageError, match=r"recipe\.warmup_steps differs"):
        pretrain(direct, registry)


@pytest.mark.parametrize(
    ("overrides", "error", "needle"),
    [
        ({"recipe": {}}, UsageError, "branch_from needs the wsd schedule"),
        ({"branch_step": 9}, UsageError, "branch_step 9 is past this run's constant phase, which ends at step 8"),
        ({"seed": 3}, UsageError, r"other settings \(seed differs\)"),
        ({"lr": 0.8}, UsageError, r"other settings \(lr differs\)"),
        ({"branch_step": 6}, CheckpointError, "holds no checkpoint of step 6"),
        ({"stop_step": 9}, UsageError, "stop_step applies to trunks"),
    ],
)
def test_a_branch_that_cannot_continue_its_trunk_is_refused(
    trunk: Path, registry: Any, tmp_path: Path, overrides: dict, error: type, needle: str
) -> None:
    settings: dict[str, Any] = dict(steps=10, recipe=WSD, branch_from=str(trunk), branch_step=8) | overrides
    with pytest.raises(error, match=needle):
        pretrain(helpers.config(tmp_path / "b", **settings), registry)


def test_branch_settings_are_checked_when_the_config_is_made(registry: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="branch_from and branch_step go together"):
        helpers.config(tmp_path, branch_from=str(tmp_path / "t"))
    with pytest.raises(ConfigError, match="keep_steps"):
        helpers.config(tmp_path, keep_steps=(0,))
    with pytest.raises(UsageError, match="recipe.warmup_steps = 9 is too long: the cooldown starts after step 8"):
        pretrain(helpers.config(tmp_path / "w", steps=10, recipe={"schedule": "wsd", "warmup_steps": 9}), registry)
    assert not (tmp_path / "w").exists()  # refused before the run directory is claimed


# --- the sweep -----------------------------------------------------------------------------------------------------

ENGINE = {
    "precision": "fp32",
    "recipe": {"schedule": "wsd"},
    "progress": "none",
    "tensorboard": False,
    "log_every": 2,
    "checkpoint_every": 2,
    "checkpoint_minutes": 0.0,
}


def tiny_study(out: Path, **overrides: Any) -> StudyConfig:
    """A branching study of ``tiny-cnn`` on ``colours`` at 1 and 2 epochs (also run by the child process below)."""
    # 96 images at batch 8: 12 and 24 steps, cooling down from steps 10 and 19; the warm-up is 5% of 12 steps.
    values: dict[str, Any] = dict(
        out=str(out), dataset="colours", models=("tiny-cnn",), epochs=(1.0, 2.0), batch_size=8, start_lr=0.4,
        branching=True, engine=ENGINE,
    )  # fmt: skip
    return StudyConfig(**(values | overrides))


def pretrain_trainer(registry: Any, pipeline: Any = None) -> Any:
    """A sweep trainer that pre-trains each cell in process with ``registry`` (and ``pipeline``, if given)."""

    def train(model: str, dataset: str, epochs: float, lr: float, out: Path, **options: Any) -> dict:
        fields = {"model": model, "dataset": dataset, "epochs": epochs, "lr": lr, "out": str(out), **options}
        return pretrain(from_dict(PretrainConfig, fields), registry, pipeline=pipeline)

    return train


def _outcome(out: Path) -> dict[str, Any]:
    """Each cell run's final held-out numbers, and the decisions."""
    runs = {
        p.name: json.loads((p / "summary.json").read_text())["final"]
        for p in sorted(out.iterdir())
        if (p / "summary.json").exists()
    }
    decisions = [json.loads(line) for line in (out / "tuning.jsonl").read_text().splitlines()]
    return {"runs": runs, "best": [(d["model"], d["epochs"], d["best_lr"], d["start_lr"]) for d in decisions]}


@pytest.fixture(scope="module")
def swept(registry: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted branching sweep (1 model x 2 budgets, two trials each)."""
    out = tmp_path_factory.mktemp("sweep") / "branching"
    run_sweep(tiny_study(out), registry, trainer=pretrain_trainer(registry))
    return out


def test_a_branching_sweep_equals_the_sweep_without_branching_for_less_compute(
    swept: Path, registry: Any, tmp_path: Path
) -> None:
    direct = tmp_path / "direct"
    run_sweep(tiny_study(direct, branching=False), registry, trainer=pretrain_trainer(registry))
    assert _outcome(swept) == _outcome(direct)
    for name in _outcome(direct)["runs"]:
        _assert_same_params(direct / name, swept / name)
        config = json.loads((swept / name / "config.json").read_text())
        assert config["branch_from"].startswith(str(swept / TRUNKS))
        assert config["recipe"]["warmup_steps"] == 1  # round(0.05 x 12): the shortest budget's own warm-up
    trunks = sorted(p.name for p in (swept / TRUNKS).iterdir())
    lrs = {float(name.split("-lr")[1]) for name in _outcome(swept)["runs"]}
    assert set(trunks) == {f"tiny-cnn-e2-lr{lr:g}" for lr in lrs}  # one trunk per learning rate tried
    for name in trunks:
        summary = json.loads((swept / TRUNKS / name / "summary.json").read_text())
        assert summary["status"] == "paused" and summary["steps"] <= 19
    branching, plain = study_compute(swept), study_compute(direct)
    assert (branching.runs - branching.trunks, plain.runs, plain.trunks) == (4, 4, 0)
    # Each lr's constant phase is paid once: 19 steps of trunk where the direct runs repeat up to 10 of them.
    assert branching.train_flops < plain.train_flops
    ledgers = [json.loads((swept / n / "summary.json").read_text())["ledger"] for n in _outcome(swept)["runs"]]
    own = sum(x["train_flops"] - x["trunk_train_flops"] for x in ledgers)
    trunk_flops = sum(
        json.loads((swept / TRUNKS / n / "summary.json").read_text())["ledger"]["train_flops"] for n in trunks
    )
    assert branching.train_flops == pytest.approx(own + trunk_flops)


CHILD = """
import sys
sys.path.insert(0, {tests!r})
import _engine_helpers as helpers
import test_branching as t
registry = helpers.registry()
t.run_sweep(t.tiny_study(t.Path({out!r})), registry, trainer=t.pretrain_trainer(registry, helpers.slow_pipeline(0.1)))
"""


def _branch_mid_way(out: Path) -> bool:
    """A cell run that has saved a checkpoint of its own and not finished."""
    if not out.is_dir():
        return False
    for run in out.iterdir():
        steps = run / "checkpoints"
        if run.name != TRUNKS and steps.is_dir() and any(steps.iterdir()) and not (run / "summary.json").exists():
            return True
    return False


@pytest.mark.slow
def test_a_killed_branching_sweep_resumes_with_the_same_results(swept: Path, registry: Any, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # this process's device count: the rerun finishes here
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    code = textwrap.dedent(CHILD.format(tests=str(TESTS), out=str(out)))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not _branch_mid_way(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the sweep ended before the kill: {proc.stderr.read()[-2000:]!r}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = _outcome(out)["runs"] if (out / "tuning.jsonl").exists() else {}
    assert len(killed) < 4  # the kill landed before the end of the sweep
    run_sweep(tiny_study(out), registry, trainer=pretrain_trainer(registry))
    assert _outcome(out) == _outcome(swept)
    for name in _outcome(swept)["runs"]:
        _assert_same_params(swept / name, out / name)
        ledger = json.loads((out / name / "summary.json").read_text())["ledger"]
        assert ledger["trunk_step"] in (10, 19)  # a branch resumed from its own checkpoint still records its trunk


def test_branching_without_wsd_is_a_one_line_config_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match="branching = true needs the wsd schedule, not cosine"):
        tiny_study(tmp_path, engine={"precision": "fp32"})
    study = tmp_path / "study.toml"
    study.write_text(f'out = "{tmp_path / "runs"}"\ndataset = "shapes"\nmodels = ["nfnet-tiny-l0"]\nepochs = [1]\n')
    assert load_study(study).branching is False
    assert main(["sweep", str(study), "--set", "branching=true"]) == ExitCode.USAGE_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: branching = true needs the wsd schedule") and "\n" not in err
    assert not (tmp_path / "runs").exists()


def test_a_budget_too_short_for_a_cooldown_is_refused_before_training(registry: Any, tmp_path: Path) -> None:
    # 0.0625 epochs of 96 images at batch 8 is 1 step: 20% of it rounds to no cooldown step.
    with pytest.raises(UsageError, match="the 0.0625-epoch budget of tiny-cnn is 1 step at batch 8, too short"):
        run_sweep(tiny_study(tmp_path / "runs", epochs=(0.0625, 1.0)), registry, trainer=pretrain_trainer(registry))
    assert not (tmp_path / "runs").exists()


def test_a_study_that_names_the_default_cosine_schedule_reuses_its_finished_runs(registry: Any, tmp_path: Path) -> None:
    # A cosine run's config.json leaves the schedule keys out; naming "cosine" is still the same setting.
    study = tiny_study(
        tmp_path / "runs", epochs=(1.0,), branching=False, engine=ENGINE | {"recipe": {"schedule": "cosine"}}
    )
    first = run_sweep(study, registry, trainer=pretrain_trainer(registry))
    again = run_sweep(study, registry, trainer=pretrain_trainer(registry))
    assert (first.trained, again.trained) == (2, 0)
