"""A sweep split across worker processes (``--shard I/N``) gives the one-process sweep's runs and decisions, bit for
bit, and survives a worker killed mid-cell; ``--plan`` shows the waves and the critical path; bad ``--shard`` values
are one-line errors.

Training uses the engine tests' tiny setup (small CNNs on in-memory colours, 8 px, fp32, CPU), three widths of it.
"""

from __future__ import annotations

import dataclasses
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
from convscale_cli.errors import ExitCode
from convscale_cli.hookspecs import hookimpl
from convscale_cli.recipe import Recipe
from convscale_cli.registry import ArchitectureSpec, ModelCount
from convscale_cli.sweep import StudyConfig, SweepStalled, run_sweep
from convscale_cli.sweep_graph import Shard, study_graph

TESTS = Path(__file__).resolve().parent
EXAMPLES = TESTS.parent / "examples"
WIDTHS = (4, 8, 12)


def _spec(width: int) -> ArchitectureSpec:
    def build(num_classes: int, dtype: str = "float32", stochdepth_rate: float = 0.0, drop_rate: float = 0.0) -> Any:
        return helpers.build_tiny(num_classes, dtype, stochdepth_rate, drop_rate, width=width)

    def count(resolution: int, num_classes: int) -> ModelCount:
        half = -(-resolution // 2)
        params = 28 * width + 9 * width * width + width + (width + 1) * num_classes
        return ModelCount(params, resolution**2 * 27 * width + half**2 * 9 * width * width + width * num_classes)

    recipe = Recipe(lr=0.4, base_batch_size=16, weight_decay=1e-5, agc_exclude=(r"^head/kernel$",))
    return ArchitectureSpec(
        name=f"tiny-w{width}", family="tiny", build=build, count=count, train_resolution=8, eval_resolution=8,
        recipe=recipe, tags=("tiny",),
    )  # fmt: skip


class Widths:
    @hookimpl
    def register_architectures(self, register: Any) -> None:
        for width in WIDTHS:
            register(_spec(width))


def registry() -> Any:
    from convscale_plugins import trackers

    from convscale_cli.plugins import load_plugins

    extra = [("engine-test", helpers.TinyPlugin()), ("widths", Widths()), ("trackers", trackers)]
    return load_plugins(extra=extra, entry_points=lambda: []).registry


ENGINE = {
    "precision": "fp32",
    "progress": "none",
    "tensorboard": False,
    "log_every": 2,
    "checkpoint_every": 3,
    "checkpoint_minutes": 0.0,
}


def study(out: Path) -> StudyConfig:
    # 3 widths x 2 budgets of 96 images at batch 16 (3 and 6 steps), two trials per cell: 12 runs in 4 waves.
    return StudyConfig(
        out=str(out), dataset="colours", models=tuple(f"tiny-w{w}" for w in WIDTHS), epochs=(0.5, 1.0), batch_size=16,
        start_lr=0.8, engine=ENGINE,
    )  # fmt: skip


def trainer(reg: Any, pipeline: Any = None) -> Any:
    from convscale_cli.config import from_dict
    from convscale_cli.engine.api import pretrain
    from convscale_cli.engine.config import PretrainConfig

    def train(model: str, dataset: str, epochs: float, lr: float, out: Path, **options: Any) -> dict:
        fields = {"model": model, "dataset": dataset, "epochs": epochs, "lr": lr, "out": str(out), **options}
        return pretrain(from_dict(PretrainConfig, fields), reg, pipeline=pipeline)

    return train


def worker(out: str, index: int, count: int, slow: float = 0.0) -> None:
    """A worker process's body (see CHILD)."""
    reg = registry()
    pipeline = helpers.slow_pipeline(slow) if slow else None
    run_sweep(study(Path(out)), reg, trainer=trainer(reg, pipeline), shard=Shard(index, count), poll_seconds=0.2)


CHILD = """
import sys
sys.path.insert(0, {tests!r})
import test_sweep_shard as t
t.worker({out!r}, {index}, {count}, {slow})
"""


def start(out: Path, index: int, count: int, slow: float = 0.0) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    code = textwrap.dedent(CHILD.format(tests=str(TESTS), out=str(out), index=index, count=count, slow=slow))
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr.decode()[-3000:]


def outcome(out: Path) -> dict[str, Any]:
    """Every run's final numbers, and tuning.jsonl without the time stamps."""
    runs = {
        p.name: json.loads((p / "summary.json").read_text())["final"]
        for p in sorted(out.iterdir())
        if (p / "summary.json").exists()
    }
    lines = [json.loads(line) for line in (out / "tuning.jsonl").read_text().splitlines()]
    return {"runs": runs, "tuning": [{k: v for k, v in line.items() if k != "time"} for line in lines]}


def without_status(tuning: list[dict]) -> list[dict]:
    return [{**d, "trials": [{k: v for k, v in t.items() if k != "status"} for t in d["trials"]]} for d in tuning]


def same_params(a: Path, b: Path) -> None:
    for name in outcome(a)["runs"]:
        expected, got = helpers.final_params(a / name), helpers.final_params(b / name)
        assert expected.keys() == got.keys()
        for key, value in expected.items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"{name}: {key}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process sweep."""
    out = tmp_path_factory.mktemp("one") / "runs"
    reg = registry()
    result = run_sweep(study(out), reg, trainer=trainer(reg))
    assert (len(result.results), result.trained) == (6, 12)
    return out


def test_the_graph_chains_cells_as_the_two_trial_rule_reads_them() -> None:
    graph = study_graph(study(Path("unused")), registry())
    waves = [[f"{m}:{e:g}" for m, e in wave] for wave in graph.waves()]
    assert waves == [["tiny-w4:0.5"], ["tiny-w4:1", "tiny-w8:0.5"], ["tiny-w12:0.5", "tiny-w8:1"], ["tiny-w12:1"]]
    assert graph.deps[("tiny-w12", 1.0)] == tuple((f"tiny-w{w}", e) for w, e in graph_order(graph)[:-1])
    path, cost = graph.critical_path()
    assert path[0] == ("tiny-w4", 0.5) and path[-1] == ("tiny-w12", 1.0) and len(path) == 4
    assert cost < sum(graph.cost((c.model, c.epochs)) for c in graph.cells)
    owners = graph.assign(2)
    assert set(owners.values()) == {0, 1}  # the wide waves are split
    assert graph.assign(2) == owners and set(graph.assign(1).values()) == {0}
    assert graph.makespan(1) > graph.makespan(2) >= cost


def test_a_grid_study_waits_only_for_the_first_cell_and_a_branching_one_chains_each_model() -> None:
    grid = dataclasses.replace(study(Path("unused")), rule="grid", lr_grid=(0.8, 0.4))
    graph = study_graph(grid, registry())
    assert graph.trials == {"tiny": 2} and len(graph.waves()) == 2  # the first cell sets the inherited resolution
    fixed = study_graph(dataclasses.replace(grid, resolution=8), registry())
    assert len(fixed.waves()) == 1 and max(graph.assign(3).values()) == 2
    wsd = {**ENGINE, "recipe": {"schedule": "wsd"}}
    branching = study_graph(dataclasses.replace(grid, resolution=8, branching=True, engine=wsd), registry())
    assert branching.deps[("tiny-w8", 1.0)] == (("tiny-w8", 0.5),)  # its trunks are extended by one cell at a time
    assert [len(w) for w in branching.waves()] == [3, 3]


def graph_order(graph: Any) -> list[tuple[int, float]]:
    return [(int(c.model.removeprefix("tiny-w")), c.epochs) for c in graph.cells]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 3])
def test_concurrent_workers_give_the_one_process_sweep_bit_for_bit(
    reference: Path, tmp_path: Path, workers: int
) -> None:
    out = tmp_path / "runs"
    finish([start(out, i, workers) for i in range(workers)])
    assert outcome(out) == outcome(reference)  # same runs, losses and tuning.jsonl (trial statuses included)
    same_params(reference, out)
    decided = sorted(p.name for p in (out / "cells").iterdir())
    assert len(decided) == 6


def _threaded_sweep(out: Path, workers: int) -> dict[str, Any]:
    """The toy study of test_tune (a loss bowl around a falling optimum, no training) run by ``workers`` threads,
    each trial of worker i taking i x 20 ms, so the workers reach their cells in an order of their own."""
    import threading

    import test_tune
    from test_tune import FakeTrainer, ToyPlugin

    from convscale_cli.plugins import load_plugins
    from convscale_cli.sweep import load_study

    reg = load_plugins(extra=[("toy", ToyPlugin())], entry_points=lambda: []).registry
    out.parent.mkdir(parents=True, exist_ok=True)
    toy = load_study(test_tune.toy_study(out.parent), {"out": str(out), "start_lr": 3.2})
    errors: list[BaseException] = []

    def run(index: int) -> None:
        fake = FakeTrainer()

        def train(*args: Any, **options: Any) -> dict:
            time.sleep(0.02 * index)
            return fake(*args, **options)

        try:
            run_sweep(toy, reg, trainer=train, shard=Shard(index, workers), poll_seconds=0.01, wait_timeout=60)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return outcome(out)


# The fake trainer writes summary.json in place, so a worker may read one half-written (the engine renames it in).
@pytest.mark.filterwarnings("ignore::convscale_cli.runs_dir.RunWarning")
@pytest.mark.parametrize("workers", [2, 3])
def test_workers_that_run_at_different_speeds_decide_as_one_process(tmp_path: Path, workers: int) -> None:
    one = _threaded_sweep(tmp_path / "one" / "runs", 1)
    many = _threaded_sweep(tmp_path / "many" / "runs", workers)
    assert len(one["tuning"]) == 9 and len(one["runs"]) == 18
    assert [d["start_lr"] for d in one["tuning"]].count(3.2) == 1  # every other cell started from a finished cell
    assert many == one


def _mid_cell(out: Path, names: set[str]) -> bool:
    """A run of one of ``names``'s cells that has saved a checkpoint and not finished."""
    for prefix in names:
        for run in out.glob(f"{prefix}-lr*"):
            steps = run / "checkpoints"
            if steps.is_dir() and any(steps.iterdir()) and not (run / "summary.json").exists():
                return True
    return False


@pytest.mark.slow
def test_a_worker_killed_mid_cell_and_run_again_finishes_with_the_same_results(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    owners = study_graph(study(out), registry()).assign(2)
    # Worker 0's cells after the first: it is killed while one of them trains, with worker 1 running.
    names = {f"{m}-e{e:g}" for (m, e), w in owners.items() if w == 0 and (m, e) != ("tiny-w4", 0.5)}
    victim, other = start(out, 0, 2, slow=0.2), start(out, 1, 2)
    deadline = time.monotonic() + 300
    while not _mid_cell(out, names) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert victim.poll() is None, f"worker 0 ended before the kill: {victim.stderr.read()[-2000:]!r}"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert len(list((out / "cells").iterdir())) < 6
    finish([start(out, 0, 2), other])
    got, expected = outcome(out), outcome(reference)
    assert got["runs"] == expected["runs"]
    # The killed cell's finished trial is reused by the rerun, so only its status says so.
    assert without_status(got["tuning"]) == without_status(expected["tuning"])
    same_params(reference, out)


def test_a_worker_whose_cells_wait_on_a_missing_worker_stops_with_one_line(tmp_path: Path) -> None:
    reg = registry()
    owners = study_graph(study(tmp_path), reg).assign(2)
    assert owners[("tiny-w4", 0.5)] == 0  # the first cell is worker 0's; worker 1 waits for it
    with pytest.raises(SweepStalled, match=r"worker 1/2 waited 0.3 s for cell tiny-w4 x 0.5 epochs \(worker 0/2's\)"):
        run_sweep(study(tmp_path), reg, trainer=trainer(reg), shard=Shard(1, 2), wait_timeout=0.3, poll_seconds=0.05)
    assert not list(tmp_path.glob("tiny-*"))


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("0/0", "--shard 0/0: N must be at least 1"),
        ("3/2", "--shard 3/2: worker index 3 is not below N = 2"),
        ("text", "--shard 'text' is not I/N"),
        ("1/", "--shard '1/' is not I/N"),
    ],
)
def test_a_bad_shard_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture, value: str, needle: str
) -> None:
    runs = tmp_path / "runs"
    code = main(["sweep", str(EXAMPLES / "quickstart.toml"), "--set", f"out={runs}", "--shard", value])
    err = capsys.readouterr().err.strip()
    assert code == ExitCode.USAGE_ERROR
    assert err.startswith(f"Error: {needle}") and "\n" not in err
    assert not runs.exists()


@pytest.mark.parametrize("example", ["quickstart.toml", "convnet-vs-vit-quick.toml"])
def test_plan_prints_the_waves_and_the_critical_path(capsys: pytest.CaptureFixture, example: str) -> None:
    assert main(["sweep", str(EXAMPLES / example), "--plan", "--json"]) == ExitCode.OK
    plan = json.loads(capsys.readouterr().out)
    models = 3 if example == "quickstart.toml" else 6
    assert len(plan["cells"]) == models * 3
    assert sum(len(w) for w in plan["waves"]) == models * 3
    first = plan["waves"][0]  # each family's cheapest cell (the study sets resolution, batch size and precision)
    assert first == [{"model": f"{f}-tiny-l0", "epochs": 0.25} for f in ("nfnet", "vit")[: models // 3]]
    # Within a family a cell waits for every no-larger model and budget: the grid's anti-diagonals are the waves,
    # and the critical path runs from the smallest cell to the largest through one cell per wave.
    path = plan["critical_path"]["cells"]
    assert path[0] == first[-1] and len(path) == len(plan["waves"]) == 5
    last = "nfnet-tiny-l2" if example == "quickstart.toml" else "vit-tiny-l2"
    assert path[-1] == {"model": last, "epochs": 1.0}
    assert 0 < plan["critical_path"]["train_flops"] < plan["total"]["train_flops"]
    speedups = [row["speedup"] for row in plan["workers"]]
    assert speedups[0] == pytest.approx(1.0) and speedups == sorted(speedups)
    bound = plan["total"]["train_flops"] / plan["critical_path"]["train_flops"]
    assert speedups[-1] <= bound + 1e-9
    assert main(["sweep", str(EXAMPLES / example), "--plan", "--json", "--shard", "0/3"]) == ExitCode.OK
    assert {row["worker"] for row in json.loads(capsys.readouterr().out)["cells"]} == {0, 1, 2}
    assert main(["sweep", str(EXAMPLES / example), "--plan", "--shard", "0/2"]) == ExitCode.OK
    text = capsys.readouterr().out
    assert (
        "wave 4:" in text
        and "wave 5:" not in text
        and f"critical path: {path[0]['model']} x 0.25 ->" in text
        and "worker 1/2" in text
    )


def test_a_wait_timeout_that_is_not_positive_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    argv = ["sweep", str(EXAMPLES / "quickstart.toml"), "--set", f"out={runs}", "--shard", "0/2", "--wait-timeout", "0"]
    assert main(argv) == ExitCode.USAGE_ERROR
    err = capsys.readouterr().err.strip()
    assert err == "Error: --wait-timeout must be a positive number of seconds, got 0" and not runs.exists()


@pytest.mark.filterwarnings("ignore::convscale_cli.runs_dir.RunWarning")
def test_tuning_log_keeps_other_decisions_and_a_rerun_leaves_it_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "toy" / "runs"
    out.mkdir(parents=True)
    other = {"time": "t", "model": "toy-s", "dataset": "toyset", "epochs": 0.5, "rule": "grid", "best_lr": 1.0}
    stale = {**other, "rule": "two-trial"}  # an earlier decision of one of the study's cells: replaced
    (out / "tuning.jsonl").write_text(json.dumps(stale) + "\n" + json.dumps(other) + "\n")
    _threaded_sweep(out, 2)
    lines = (out / "tuning.jsonl").read_text().splitlines()
    assert len(lines) == 10 and json.loads(lines[-1]) == other  # the study's block stands where its first line was
    assert [json.loads(line)["rule"] for line in lines[:9]] == ["two-trial"] * 9
    first = (out / "tuning.jsonl").read_bytes()
    _threaded_sweep(out, 3)  # everything reused, time stamps and trial statuses included
    assert (out / "tuning.jsonl").read_bytes() == first


def test_a_worker_that_gives_up_waiting_says_for_whom_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    runs = tmp_path / "runs"
    study = str(EXAMPLES / "quickstart.toml")
    argv = ["sweep", study, "--set", f"out={runs}", "--shard", "1/2", "--wait-timeout", "0.2"]
    assert main(argv) == ExitCode.TRAINING_FAILED
    captured = capsys.readouterr()
    assert "waiting for cell nfnet-tiny-l0 x 0.25 epochs (worker 0/2's)" in captured.out
    err = captured.err.strip()
    assert err.startswith("Error: worker 1/2 waited 0.2 s for cell nfnet-tiny-l0 x 0.25 epochs") and "\n" not in err
    assert "--shard 0/2" in err and not list(runs.glob("nfnet-*"))
