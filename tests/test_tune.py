"""The two-trial learning-rate rule (Smith et al. 2023 §2), ``tune-lr`` and resumable ``sweep``, with a fake trainer."""

from __future__ import annotations

import json
import math
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from convscale_cli import interrupts, tuning
from convscale_cli import plugins as plugin_loader
from convscale_cli.cli import main
from convscale_cli.errors import ConfigError, ExitCode, TrainingError, UsageError
from convscale_cli.hookspecs import hookimpl
from convscale_cli.registry import ArchitectureSpec, DatasetInfo, DatasetSpec, ModelCount, Registry
from convscale_cli.runs_dir import RunRecord
from convscale_cli.sweep import StudyConfig, load_study, plan_cells, run_sweep

SIZES = {"toy-s": 1_000, "toy-m": 4_000, "toy-l": 16_000}  # params; MACs = 10 x params at 32 px
TRAIN_SIZE = 1_000


def _arch(name: str, params: int, family: str = "toy") -> ArchitectureSpec:
    return ArchitectureSpec(
        name=name,
        family=family,
        build=lambda **_: None,
        count=lambda resolution, num_classes: ModelCount(params=params, macs=10 * params * resolution**2 // 1024),
        train_resolution=32,
        eval_resolution=32,
    )


class ToyPlugin:
    """The toy models (``toy-s/m/l`` of known size, ``other-s``) and datasets (``toyset``, ``otherset``)."""

    @hookimpl
    def register_architectures(self, register) -> None:  # noqa: ANN001
        for name, params in SIZES.items():
            register(_arch(name, params))
        register(_arch("other-s", 500, family="other"))

    @hookimpl
    def register_datasets(self, register) -> None:  # noqa: ANN001
        for name in ("toyset", "otherset"):
            info = DatasetInfo(num_classes=10, split_sizes={"train": TRAIN_SIZE, "eval": 100}, resolution=32)
            register(
                DatasetSpec(
                    name=name, description="", open=lambda split: [], info=lambda info=info: info, static_info=info
                )
            )
        register(  # a dataset with a size option, as `shapes` has
            DatasetSpec(
                name="sizedset",
                description="",
                open=lambda split, size=TRAIN_SIZE: [],
                options={"size": TRAIN_SIZE},
                info=lambda size=TRAIN_SIZE: DatasetInfo(10, {"train": size, "eval": 100}, 32),
            )
        )


def optimum(params: int, epochs: float) -> float:
    """The fake loss surface's optimal alpha: falls monotonically with size and epochs (Fig. 3's shape)."""
    return 1.6 / 2 ** (0.5 * math.log2(params / 1_000) / 2 + max(0.0, math.log2(epochs / 0.5)) * 0.75)


class FakeTrainer:
    """Writes a finished summary whose loss is a bowl in log2(lr) around :func:`optimum`; counts calls."""

    def __init__(self, diverge_above: float = math.inf) -> None:
        self.calls: list[tuple[str, float, float]] = []
        self.registries: list[Registry | None] = []  # the registry each call was given, as the engine's trainer is
        self.diverge_above = diverge_above

    def __call__(
        self,
        model: str,
        dataset: str,
        epochs: float,
        lr: float,
        out: Path,
        *,
        registry: Registry | None = None,
        **options: Any,
    ) -> dict:
        self.calls.append((model, epochs, lr))
        self.registries.append(registry)
        if lr > self.diverge_above:
            raise TrainingError(f"non-finite loss at lr {lr}")
        params = SIZES.get(model, 500)
        loss = (
            3.0
            - 0.1 * math.log10(params)
            - 0.1 * math.log2(epochs + 1)
            + 0.05 * math.log2(lr / optimum(params, epochs)) ** 2
        )
        summary = fake_summary(model, dataset, epochs, lr, loss)
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "summary.json").write_text(json.dumps(summary))
        # As the engine's resolved config.json: every option given, plus the recipe's defaults inside ``recipe``.
        config = {"dataset": dataset, **options, "recipe": {"weight_decay": 1e-6, **options.get("recipe", {})}}
        (Path(out) / "config.json").write_text(json.dumps(config))
        return summary


def fake_summary(model: str, dataset: str, epochs: float, lr: float, loss: float, family: str = "toy") -> dict:
    params = SIZES.get(model, 500)
    examples = int(epochs * TRAIN_SIZE)
    return {
        "kind": "pretrain", "status": "finished", "model": model, "family": family, "dataset": dataset,
        "epochs": epochs, "lr": lr, "batch_size": 64, "seed": 0, "params": params, "macs_per_image": 10 * params,
        "train_resolution": 32, "eval_resolution": 32, "num_classes": 10, "examples_seen": examples, "steps": 1,
        "final": {"eval_loss": loss, "eval_top1": 0.5, "eval_top5": 0.9},
        "ledger": {"train_flops": 60.0 * params * examples, "core_hours": 1e-9},
    }  # fmt: skip


def write_run(root: Path, model: str, epochs: float, lr: float, loss: float, **kw: Any) -> None:
    run = root / tuning.run_name(model, epochs, lr)
    run.mkdir(parents=True)
    (run / "summary.json").write_text(
        json.dumps(fake_summary(model, kw.pop("dataset", "toyset"), epochs, lr, loss, **kw))
    )


@pytest.fixture
def registry() -> Iterator[Registry]:
    loaded = plugin_loader.load_plugins(extra=[("toy", ToyPlugin())], entry_points=lambda: [])
    plugin_loader.use_plugins(loaded)
    yield loaded.registry


def _log(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / tuning.TUNING_LOG).read_text().splitlines()]


def test_the_start_alpha_comes_from_the_cells_the_report_reads(registry: Registry, tmp_path: Path) -> None:
    """A budget-stopped cell one level down is a cell of the study for ``report``, and so for the two-trial rule."""
    write_run(tmp_path / "earlier", "toy-s", 0.5, 0.4, 1.9)
    summary_path = tmp_path / "earlier" / tuning.run_name("toy-s", 0.5, 0.4) / "summary.json"
    summary_path.write_text(json.dumps({**json.loads(summary_path.read_text()), "status": "budget"}))
    fake = FakeTrainer()
    result = tuning.tune_cell("toy-m", 0.5, tmp_path, registry=registry, trainer=fake)  # the dataset inferred
    assert result.start_lr == 0.4 and result.source == "best of cell toy-s x 0.5 epochs"
    assert [lr for _, _, lr in fake.calls] == [0.4, 0.2] and result.dataset == "toyset"


def test_two_trials_without_a_smaller_cell_start_at_the_recipe_alpha(registry: Registry, tmp_path: Path) -> None:
    fake = FakeTrainer()
    result = tuning.tune_cell("toy-s", 0.5, tmp_path, dataset="toyset", registry=registry, trainer=fake)
    assert [lr for _, _, lr in fake.calls] == [1.6, 0.8]
    assert result.start_lr == 1.6 and "recipe default" in result.source
    # The optimum of toy-s x 0.5 is 1.6: the upper trial won, so the rule offers the probe above it.
    assert result.best_lr == 1.6 and result.next_lr == 3.2
    assert "alpha won, so the optimum may lie higher: try alpha 3.2 next" in result.message()
    assert result.best_run == "toy-s-e0.5-lr1.6"
    [entry] = _log(tmp_path)
    assert entry["best_lr"] == 1.6 and [t["lr"] for t in entry["trials"]] == [1.6, 0.8]


def test_a_study_start_lr_replaces_the_recipe_alpha_only_for_the_first_cell(registry: Registry, tmp_path: Path) -> None:
    fake = FakeTrainer()
    first = tuning.tune_cell("toy-s", 0.5, tmp_path, dataset="toyset", registry=registry, trainer=fake, start_lr=6.4)
    assert [lr for _, _, lr in fake.calls] == [6.4, 3.2]
    assert first.start_lr == 6.4 and "start_lr" in first.source
    second = tuning.tune_cell("toy-s", 1, tmp_path, dataset="toyset", registry=registry, trainer=fake, start_lr=6.4)
    assert second.start_lr == first.best_lr and "best of cell" in second.source  # the rule takes over
    with pytest.raises(UsageError, match="`start_lr` must be a positive number"):
        tuning.tune_cell("toy-m", 1, tmp_path, dataset="toyset", registry=registry, trainer=fake, start_lr=-1.0)


def test_alpha_half_winning_offers_the_next_trial(registry: Registry, tmp_path: Path) -> None:
    fake = FakeTrainer()
    result = tuning.tune_cell("toy-l", 4, tmp_path, dataset="toyset", registry=registry, trainer=fake)
    assert len(fake.calls) == 2
    assert result.best_lr == 0.8 and result.next_lr == 0.4
    assert "optimum may lie lower" in result.message() and "alpha 0.4" in result.message()


def test_start_alpha_comes_from_the_nearest_smaller_cell(registry: Registry, tmp_path: Path) -> None:
    write_run(tmp_path, "toy-s", 0.5, 0.8, 2.9)
    write_run(tmp_path, "toy-s", 0.5, 0.4, 2.7)  # best of (toy-s, 0.5): 0.4
    write_run(tmp_path, "toy-m", 1, 0.2, 2.5)  # the target cell itself: not a neighbour, but its 0.2 trial is reused
    write_run(tmp_path, "toy-s", 2, 0.1, 2.5)  # more epochs than the target: not eligible
    write_run(tmp_path, "toy-l", 0.5, 0.05, 2.5)  # larger model: not eligible
    write_run(tmp_path, "toy-s", 1, 0.025, 2.0, dataset="otherset")  # other dataset: ignored
    write_run(tmp_path, "other-s", 1, 0.0125, 2.0, family="other")  # other family: ignored
    fake = FakeTrainer()
    result = tuning.tune_cell("toy-m", 1, tmp_path, dataset="toyset", registry=registry, trainer=fake)
    assert result.start_lr == 0.4 and result.source == "best of cell toy-s x 0.5 epochs"
    assert [lr for _, _, lr in fake.calls] == [0.4]
    assert [(t.lr, t.status) for t in result.trials] == [(0.4, "trained"), (0.2, "reused")]


def test_hidden_cells_are_no_neighbours_and_record_decision_false_logs_nothing(
    registry: Registry, tmp_path: Path
) -> None:
    write_run(tmp_path, "toy-s", 0.5, 0.4, 2.7)
    write_run(tmp_path, "toy-s", 1, 0.1, 2.5)  # the nearest cell, but a sweep's worker has not decided it yet
    fake = FakeTrainer()
    result = tuning.tune_cell(
        "toy-m", 1, tmp_path, dataset="toyset", registry=registry, trainer=fake, hidden=[("toy-s", 1.0)],
        record_decision=False,
    )  # fmt: skip
    assert result.source == "best of cell toy-s x 0.5 epochs" and result.start_lr == 0.4
    assert not (tmp_path / tuning.TUNING_LOG).exists()
    assert tuning.tune_cell("toy-s", 2, tmp_path, dataset="toyset", registry=registry, trainer=fake).start_lr == 0.1


def test_nearest_cell_prefers_the_closest_in_log_space() -> None:
    def cell(model: str, size: float, epochs: float) -> tuning.Cell:
        run = RunRecord.from_summary(Path(model), fake_summary("toy-s", "toyset", epochs, 0.8, 2.0))
        return tuning.Cell(model, "toy", epochs, size, (run,))

    cells = [cell("a", 1e3, 0.25), cell("a", 1e3, 1.0), cell("b", 4e3, 0.5), cell("c", 16e3, 0.25)]
    assert tuning.nearest_cell(cells, "x", 4e3, 1.0).model == "b"
    assert tuning.nearest_cell(cells, "x", 1e3, 2.0).epochs == 1.0
    assert tuning.nearest_cell(cells, "x", 500, 2.0) is None


def test_rerun_reuses_trials_and_trains_nothing(registry: Registry, tmp_path: Path) -> None:
    tuning.tune_cell("toy-m", 1, tmp_path, dataset="toyset", registry=registry, trainer=FakeTrainer())
    again = FakeTrainer()
    result = tuning.tune_cell("toy-m", 1, tmp_path, dataset="toyset", registry=registry, trainer=again)
    assert again.calls == [] and result.trained == 0
    assert {t.status for t in result.trials} == {"reused"}
    assert len(_log(tmp_path)) == 1


def test_a_finished_trial_with_other_settings_is_refused_not_reused(registry: Registry, tmp_path: Path) -> None:
    options = {"batch_size": 64, "progress": "none", "recipe": {"agc_exclude": ("fc",)}}
    tuning.tune_cell("toy-m", 1, tmp_path, dataset="toyset", registry=registry, trainer=FakeTrainer(), options=options)
    # Output settings may change between invocations; a list equals the tuple it was saved from.
    same = options | {"progress": "plain", "recipe": {"agc_exclude": ["fc"]}}
    again = FakeTrainer()
    result = tuning.tune_cell("toy-m", 1, tmp_path, dataset="toyset", registry=registry, trainer=again, options=same)
    assert again.calls == [] and {t.status for t in result.trials} == {"reused"}
    for other, needle in [
        ({"batch_size": 32}, "batch_size 32 here, but the runs in .* used 64 "),
        ({"recipe": {"weight_decay": 1e-4}}, r"recipe.weight_decay 0.0001 here, but the runs in .* used 1e-06 "),
    ]:
        with pytest.raises(UsageError, match=needle):
            tuning.tune_cell(
                "toy-m", 1, tmp_path, dataset="toyset", registry=registry, trainer=again, options=options | other
            )
    write_run(tmp_path, "toy-s", 1, 1.6, 2.0, dataset="otherset")
    with pytest.raises(UsageError, match="dataset 'otherset' there, 'toyset' here"):
        tuning.tune_cell("toy-s", 1, tmp_path, dataset="toyset", registry=registry, trainer=again, start_lr=1.6)
    assert again.calls == []


def test_a_diverged_trial_loses(registry: Registry, tmp_path: Path) -> None:
    fake = FakeTrainer(diverge_above=1.0)
    result = tuning.tune_cell("toy-s", 0.5, tmp_path, dataset="toyset", registry=registry, trainer=fake)
    assert [t.status for t in result.trials] == ["failed", "trained"]
    assert result.best_lr == 0.8 and "alpha 1.6: failed" in result.message()


def test_a_failed_trial_keeps_its_reason(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The TrainingError that failed a trial is recorded in tuning.jsonl and shown by tune-lr and sweep."""
    monkeypatch.setattr(tuning, "engine_trainer", FakeTrainer(diverge_above=1.0))
    runs = tmp_path / "runs"
    assert main(["tune-lr", "--model", "toy-s", "--epochs", "0.5", "--runs", str(runs), "--dataset", "toyset"]) == 0
    assert "alpha 1.6: failed (non-finite loss at lr 1.6), alpha 0.8: loss" in capsys.readouterr().out
    [entry] = _log(runs)
    assert [t.get("error") for t in entry["trials"]] == ["non-finite loss at lr 1.6", None]  # none when trained
    (tmp_path / "study").mkdir()  # a study of its own: no cell passes it an alpha below 1.6
    study = str(toy_study(tmp_path / "study"))
    assert main(["sweep", study, "--set", "models=['toy-m']", "--set", "epochs=[0.5]"]) == 0
    assert "toy-m x 0.5 epochs, alpha 1.6 failed: non-finite loss at lr 1.6" in capsys.readouterr().out


def test_all_trials_diverging_offers_a_lower_lr(registry: Registry, tmp_path: Path) -> None:
    fake = FakeTrainer(diverge_above=0.5)
    result = tuning.tune_cell("toy-s", 0.5, tmp_path, dataset="toyset", registry=registry, trainer=fake)
    assert len(fake.calls) == 2 and result.next_lr == 0.4
    assert "every trial failed: try alpha 0.4" in result.message()
    # A cell with no finite loss never passes its lr on to a larger cell.
    nxt = tuning.tune_cell("toy-m", 0.5, tmp_path, dataset="toyset", registry=registry, trainer=FakeTrainer())
    assert nxt.start_lr == 1.6 and "recipe default" in nxt.source


def test_grid_runs_every_learning_rate(registry: Registry, tmp_path: Path) -> None:
    fake = FakeTrainer()
    result = tuning.tune_cell("toy-m", 2, tmp_path, dataset="toyset", registry=registry, trainer=fake, grid=True)
    assert [lr for _, _, lr in fake.calls] == [3.2, 1.6, 0.8, 0.4, 0.2, 0.1]
    assert result.rule == "grid" and result.next_lr is None
    assert result.best_lr == min(result.trials, key=lambda t: t.eval_loss).lr


def test_tune_lr_cli_prints_the_decision_and_next_command(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeTrainer()
    monkeypatch.setattr(tuning, "engine_trainer", fake)
    runs = tmp_path / "runs"
    args = ["tune-lr", "--model", "toy-l", "--epochs", "4", "--runs", str(runs), "--dataset", "toyset"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "best alpha 0.8" in out
    assert f"Next trial: convscale tune-lr --model toy-l --epochs 4 --runs {runs} --grid --lr-grid 0.4" in out
    # The dataset is inferred from the runs directory; the offered next trial runs exactly one more lr.
    assert (
        main(["tune-lr", "--model", "toy-l", "--epochs", "4", "--runs", str(runs), "--grid", "--lr-grid", "0.4"]) == 0
    )
    assert [lr for _, _, lr in fake.calls] == [1.6, 0.8, 0.4]
    assert fake.registries == [registry] * 3  # the command's registry trains the trials


class RecordingTrainer(FakeTrainer):
    """A fake trainer that also keeps the engine options of each call."""

    def __init__(self) -> None:
        super().__init__()
        self.options: list[dict[str, Any]] = []

    def __call__(self, model: str, dataset: str, epochs: float, lr: float, out: Path, **options: Any) -> dict:
        self.options.append({k: v for k, v in options.items() if k != "registry"})
        return super().__call__(model, dataset, epochs, lr, out, **options)


STUDY_SETTINGS = {"batch_size": 32, "precision": "fp32", "data_options": {"size": 256}}


def test_tune_lr_inherits_the_data_options_batch_size_and_precision_of_the_runs_it_continues(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    FakeTrainer()("toy-s", "sizedset", 0.5, 1.6, runs / "toy-s-e0.5-lr1.6", seed=0, **STUDY_SETTINGS)
    trainer = RecordingTrainer()
    monkeypatch.setattr(tuning, "engine_trainer", trainer)
    assert main(["tune-lr", "--model", "toy-m", "--epochs", "0.5", "--runs", str(runs)]) == 0
    assert [o | STUDY_SETTINGS for o in trainer.options] == trainer.options and len(trainer.options) == 2
    # The same settings given explicitly (a data option at its default spelled out or not) are the same settings.
    args = ["tune-lr", "--model", "toy-l", "--epochs", "0.5", "--runs", str(runs), "--batch-size", "32"]
    assert main([*args, "--set", "precision=fp32", "--set", "data_options.size=256"]) == 0
    assert trainer.options[-1] | STUDY_SETTINGS == trainer.options[-1]
    capsys.readouterr()
    # A different one is refused in one line naming the setting, both values and a run holding the other.
    assert main(["tune-lr", "--model", "toy-l", "--epochs", "1", "--runs", str(runs), "--batch-size", "4096"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"Error: batch_size 4096 here, but the runs in {str(runs)!r} used 32 (toy-")
    assert err.endswith("drop --batch-size to inherit it, or tune into another runs directory")
    for setting in ("precision=bf16", "data_options.size=512"):
        assert main(["tune-lr", "--model", "toy-l", "--epochs", "1", "--runs", str(runs), "--set", setting]) == 2
        assert setting.split("=")[0].split(".")[0] in capsys.readouterr().err
    assert len(trainer.options) == 4  # nothing was trained for a refused trial
    args = ["tune-lr", "--model", "toy-l", "--epochs", "1", "--runs", str(runs), "--set", "data_options.sise=256"]
    assert main(args) == 2
    assert "Error: unknown sizedset data option 'sise'" in capsys.readouterr().err


def test_tune_lr_inherits_the_resolution_and_class_count_of_the_runs_it_continues(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A study at 16 px: a trial at the model's default 32 px would join a report group of its own."""
    runs = tmp_path / "runs"
    FakeTrainer()("toy-s", "toyset", 0.5, 1.6, runs / "toy-s-e0.5-lr1.6", resolution=16, num_classes=12)
    trainer = RecordingTrainer()
    monkeypatch.setattr(tuning, "engine_trainer", trainer)
    assert main(["tune-lr", "--model", "toy-m", "--epochs", "0.5", "--runs", str(runs), "--set", "precision=fp32"]) == 0
    assert [(o["resolution"], o["num_classes"]) for o in trainer.options] == [(16, 12), (16, 12)]
    capsys.readouterr()
    assert main(["tune-lr", "--model", "toy-l", "--epochs", "1", "--runs", str(runs), "--resolution", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"Error: resolution 32 here, but the runs in {str(runs)!r} used 16 (toy-")
    assert err.endswith("drop --resolution to inherit it, or tune into another runs directory")
    assert len(trainer.options) == 2


def test_tune_lr_inherits_the_recipe_and_augmentation_of_its_familys_runs(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A trial added to a wsd study (the main job's) trains with the study's schedule, shared warm-up, AGC exemptions,
    augmentation and held-out set, not the family's defaults: else its loss joins cells it cannot be compared with."""
    runs = tmp_path / "runs"
    study = {
        "recipe": {"schedule": "wsd", "warmup_steps": 13, "agc_exclude": ["^(.*/)?skip_gain$"]},
        "augment": {"min_area": 0.35},
        "eval_examples": 2048,
    }
    FakeTrainer()("toy-s", "toyset", 0.5, 1.6, runs / "toy-s-e0.5-lr1.6", **study)
    # A run of another family in the same directory, with a recipe of its own: it does not speak for the toy family.
    other = runs / "vit-e0.5-lr1.6"
    other.mkdir()
    (other / "summary.json").write_text(json.dumps(fake_summary("vit", "toyset", 0.5, 1.6, 2.0, family="vit")))
    (other / "config.json").write_text(json.dumps({"dataset": "toyset", "recipe": {"optimizer": "adamw"}}))
    trainer = RecordingTrainer()
    monkeypatch.setattr(tuning, "engine_trainer", trainer)
    assert main(["tune-lr", "--model", "toy-m", "--epochs", "1", "--runs", str(runs)]) == 0
    assert len(trainer.options) == 2
    for options in trainer.options:
        assert options["recipe"] == {"weight_decay": 1e-6, **study["recipe"]}
        assert (options["augment"], options["eval_examples"]) == (study["augment"], 2048)
    # A recipe key given that the runs share is the same setting; one they do not share is refused, naming both.
    args = ["tune-lr", "--model", "toy-l", "--runs", str(runs), "--set"]
    assert main([*args, "recipe.schedule=wsd", "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main([*args, "recipe.schedule=cosine", "--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"Error: recipe.schedule 'cosine' here, but the runs in {str(runs)!r} used 'wsd' (toy-")
    assert err.endswith("drop --set recipe.schedule=... to inherit it, or tune into another runs directory")
    assert len(trainer.options) == 4  # nothing was trained for the refused trial


def test_tune_lr_refuses_a_runs_directory_whose_runs_differ_in_a_setting(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    FakeTrainer()("toy-s", "sizedset", 0.5, 1.6, runs / "toy-s-e0.5-lr1.6", **STUDY_SETTINGS)
    FakeTrainer()("toy-s", "sizedset", 0.5, 0.8, runs / "toy-s-e0.5-lr0.8", **{**STUDY_SETTINGS, "batch_size": 64})
    monkeypatch.setattr(tuning, "engine_trainer", RecordingTrainer())
    assert main(["tune-lr", "--model", "toy-m", "--epochs", "0.5", "--runs", str(runs)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"Error: the runs in {str(runs)!r} differ in batch_size (64 in toy-s-e0.5-lr0.8, 32 in toy-s-e0.5-lr1.6), so "
        "a new trial cannot match them; tune into a runs directory of one setting"
    )


class ChattyTrainer(FakeTrainer):
    """A fake trainer printing progress on stdout, as the engine's plain progress lines do."""

    def __call__(self, model: str, dataset: str, epochs: float, lr: float, out: Path, **options: Any) -> dict:
        print(f"step 1/1  loss 2.3  ({model} at alpha {lr})")
        return super().__call__(model, dataset, epochs, lr, out, **options)


@pytest.mark.parametrize("command", ["tune-lr", "sweep"])
def test_json_output_is_json_alone_with_progress_on_stderr(
    command: str,
    registry: Registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(tuning, "engine_trainer", ChattyTrainer())
    if command == "tune-lr":
        args = ["tune-lr", "--model", "toy-s", "--epochs", "0.5", "--runs", str(tmp_path / "r"), "--dataset", "toyset"]
    else:
        args = ["sweep", str(toy_study(tmp_path)), "--set", "models=['toy-s']", "--set", "epochs=[0.5]"]
    assert main([*args, "--json"]) == 0
    out, err = capsys.readouterr()
    assert isinstance(json.loads(out), dict)
    assert "step 1/1  loss 2.3  (toy-s at alpha 1.6)" in err


def toy_study(tmp_path: Path, **extra: Any) -> Path:
    """A study file over the toy models on ``toyset`` (runs under ``tmp_path/runs``), with ``extra`` top-level keys."""
    lines = [
        f"out = '{tmp_path / 'runs'}'",
        "dataset = 'toyset'",
        "models = ['toy-l', 'toy-s', 'toy-m']",
        "epochs = [2, 0.5, 1]",
        "seed = 3",
        *(f"{k} = {json.dumps(v)}" for k, v in extra.items()),
        "[engine]",
        "precision = 'fp32'",
    ]
    path = tmp_path / "study.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sweep_runs_cheapest_first_two_trials_each_and_resumes(registry: Registry, tmp_path: Path) -> None:
    study = load_study(toy_study(tmp_path))
    first = FakeTrainer()
    result = run_sweep(study, registry, trainer=first)
    costs = [SIZES[m] * e for m, e, _ in first.calls]
    assert costs == sorted(costs)
    assert len(first.calls) == 18 and result.trained == 18  # 9 cells x 2 trials
    assert result.runs_used == 18 and result.full_grid_runs == 54
    again = FakeTrainer()
    resumed = run_sweep(study, registry, trainer=again)
    assert again.calls == [] and resumed.trained == 0
    assert [r.best_lr for r in resumed.results] == [r.best_lr for r in result.results]
    assert len(_log(Path(study.out))) == 9


def test_sweep_passes_study_options_to_the_trainer(registry: Registry, tmp_path: Path) -> None:
    seen: list[dict] = []

    def trainer(model: str, dataset: str, epochs: float, lr: float, out: Path, **options: Any) -> dict:
        seen.append(options)
        return FakeTrainer()(model, dataset, epochs, lr, out)

    study = load_study(toy_study(tmp_path, batch_size=64, resolution=32), {"models": ["toy-s"], "epochs": [0.5]})
    run_sweep(study, registry, trainer=trainer)
    assert seen[0] == {"seed": 3, "precision": "fp32", "batch_size": 64, "resolution": 32}


def test_sweep_cli_reports_rule_versus_grid(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tuning, "engine_trainer", FakeTrainer())
    assert main(["sweep", str(toy_study(tmp_path)), "--set", "models=['toy-s','toy-m']"]) == 0
    out = capsys.readouterr().out
    assert "6 cells: the two-trial rule used 12 runs (12 trained now) where a full 6-point lr grid needs 36." in out
    assert main(["sweep", str(toy_study(tmp_path)), "--set", "models=['toy-s','toy-m']"]) == 0
    assert "(0 trained now)" in capsys.readouterr().out


def test_plan_cells_orders_by_cost(registry: Registry, tmp_path: Path) -> None:
    cells = plan_cells(load_study(toy_study(tmp_path)), registry)
    assert [c.flops for c in cells] == sorted(c.flops for c in cells)
    assert (cells[0].model, cells[0].epochs) == ("toy-s", 0.5)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"modles": ["toy-s"]}, "did you mean 'models'"),
        ({"epochs": [0]}, "epochs must be positive"),
        ({"engine": {"lr": 0.1}}, "engine.lr is set by the study's rule per trial; use the top-level key 'start_lr'"),
        ({"engine": {"model": "toy-s"}}, "engine.model is set by the study itself; use the top-level key 'models'"),
        ({"engine": {"epochs": 1}}, "engine.epochs is set by the study itself; use the top-level key 'epochs'"),
        ({"engine": {"seed": 1}}, "use the top-level key 'seed'"),
        ({"rule": "three-trial"}, "is not one of"),
        ({"models": []}, "at least one"),
    ],
)
def test_bad_study_is_a_config_error(tmp_path: Path, override: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_study(toy_study(tmp_path), override)


def test_study_defaults() -> None:
    study = StudyConfig(out="runs", dataset="toyset", models=("toy-s",), epochs=(1.0,))
    assert study.rule == "two-trial" and study.lr_grid == () and study.engine == {}


def test_quickstart_study_is_valid_for_the_builtin_plugins() -> None:
    from convscale_cli.plugins import get_registry

    study = load_study(Path(__file__).resolve().parents[1] / "examples" / "quickstart.toml")
    registry = get_registry()
    cells = plan_cells(study, registry)
    assert len(study.models) >= 3 and len(study.epochs) >= 3 and len(cells) == len(study.models) * len(study.epochs)
    assert all("ladder" in registry.architecture(m).tags for m in study.models)
    assert study.dataset == "shapes" and study.resolution == 32


class _SwallowingTrainer(FakeTrainer):
    """Ctrl-C during its first run, whose KeyboardInterrupt is swallowed (as in a garbage-collection callback)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        if not self.calls:
            try:
                os.kill(os.getpid(), signal.SIGINT)
            except KeyboardInterrupt:
                pass
        return super().__call__(*args, **kwargs)


def test_a_swallowed_ctrl_c_still_stops_the_sweep(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = _SwallowingTrainer()
    monkeypatch.setattr(tuning, "engine_trainer", fake)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal; background jobs ignore it
    try:
        assert main(["sweep", str(toy_study(tmp_path))]) == ExitCode.INTERRUPTED
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored when the command ends
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(fake.calls) == 1  # the first trial finished; nothing after it started
    assert capsys.readouterr().err.strip().endswith("Interrupted.")


def test_a_process_ignoring_ctrl_c_keeps_ignoring_it() -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # nohup, or a background job of a script
    try:
        with interrupts.latched():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_in_code_registry_trains_through_the_sweep_end_to_end(tmp_path: Path) -> None:
    """The registry a caller passes is the one the engine trains with: ``tiny-cnn`` and ``colours`` exist only in it
    (the process-wide registry has neither), so a lookup in the global one would be an UnknownNameError."""
    import _engine_helpers as helpers

    from convscale_cli.plugins import get_registry

    local = helpers.registry()
    assert "tiny-cnn" not in {s.name for s in get_registry().architectures}
    engine = {"precision": "fp32", "progress": "none", "tensorboard": False, "checkpoint_every": 0}
    study = StudyConfig(
        out=str(tmp_path / "runs"), dataset="colours", models=("tiny-cnn",), epochs=(0.5,), batch_size=16,
        resolution=helpers.NATIVE, start_lr=0.8, engine=engine,
    )  # fmt: skip
    result = run_sweep(study, local)
    assert [t.status for t in result.results[0].trials] == ["trained", "trained"]
    assert all(math.isfinite(t.eval_loss) for t in result.results[0].trials)


def test_a_branching_sweep_trains_trunks_and_branches_with_the_registry_it_was_given(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeTrainer()
    monkeypatch.setattr(tuning, "engine_trainer", fake)
    study = load_study(
        toy_study(tmp_path, branching=True, batch_size=16),
        {"models": ["toy-s"], "epochs": [0.5, 1], "engine.recipe.schedule": "wsd"},
    )
    run_sweep(study, registry)
    assert len(fake.calls) >= 4 and fake.registries == [registry] * len(fake.calls)  # trunks and runs alike
