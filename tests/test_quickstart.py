"""The main job's pieces that can be checked in seconds (the job itself is the README's first command)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from convscale_cli import quickstart
from convscale_cli.errors import UsageError
from convscale_cli.sweep import load_study

REPO = Path(__file__).resolve().parents[1]


def test_the_main_job_runs_the_power_law_study() -> None:
    assert quickstart.default_study() == quickstart.packaged_studies()["powerlaw"] == quickstart.study_file(None)
    assert quickstart.default_study().read_text() == (REPO / "examples" / "powerlaw.toml").read_text()


def test_the_study_exempts_exactly_the_skip_gains_and_the_classifier_from_agc() -> None:
    """The study's one recipe departure: AGC clips all the reference clips but the zero-initialised skip gains."""
    import jax
    import jax.numpy as jnp
    from convscale_plugins.nfnet import RECIPE

    from convscale_cli.engine.optim import param_path, path_mask
    from convscale_cli.plugins import get_registry

    study = load_study(quickstart.default_study())
    exempt = study.engine["recipe"]["agc_exclude"]
    assert set(RECIPE.agc_exclude) <= set(exempt)
    model = get_registry().architecture(study.models[-1]).build(num_classes=10)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    mask = path_mask(exempt, match=True)(shapes["params"])
    hits = [param_path(path) for path, hit in jax.tree_util.tree_flatten_with_path(mask)[0] if hit]
    gains = [h for h in hits if h.endswith("skip_gain")]
    assert len(gains) >= 6 and sorted(set(hits) - set(gains)) == ["fc/kernel"]


def test_the_main_jobs_study_is_a_branching_width_ladder_past_one_epoch() -> None:
    """A clean size axis (one depth, widths ~4x apart), budgets past one epoch, more than one rate on every cell."""
    from convscale_cli.plugins import get_registry

    study = load_study(quickstart.default_study())
    assert study.dataset == "shapes" and study.rule == "grid" and study.branching
    assert len(study.lr_grid) >= 2 and len(study.epochs) >= 5 and max(study.epochs) >= 8
    specs = [get_registry().architecture(m) for m in study.models]
    assert len(specs) >= 3 and all("width" in s.tags for s in specs)  # the width-only ladder: one depth


def _summary(root: Path, name: str, kind: str, loss: float, flops: float, status: str = "finished") -> None:
    run = root / name
    run.mkdir(parents=True)
    doc = {
        "kind": kind, "status": status, "model": "nfnet-tiny-l0", "family": "nfnet", "dataset": "shapes",
        "epochs": 1.0, "lr": 1.6, "batch_size": 64, "params": 1, "macs_per_image": 1, "train_resolution": 32,
        "num_classes": 420, "examples_seen": 1, "final": {"eval_loss": loss}, "ledger": {"train_flops": flops},
    }  # fmt: skip
    (run / "summary.json").write_text(json.dumps(doc))


def test_best_run_and_largest_compute_are_read_from_the_summaries(tmp_path: Path) -> None:
    _summary(tmp_path, "a", "pretrain", 5.0, 1e9)
    _summary(tmp_path, "b", "pretrain", 4.0, 3e9)
    _summary(tmp_path, "c", "pretrain", 3.0, 5e9, status="budget")  # not finished: neither source nor budget base
    _summary(tmp_path, "d", "finetune", 0.1, 9e9)
    best = quickstart.best_pretrain_run(tmp_path)
    assert best.path.name == "b" and best.eval_loss == 4.0
    assert quickstart.largest_flops(tmp_path) == 3e9  # finished pre-training runs only


def test_runs_of_another_study_in_out_are_refused_before_anything_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An earlier quickstart's runs (another study: other models, other data) would train the whole study and then
    break its report; the job says so at once, in one line, and leaves them as they were."""
    from convscale_cli.cli import main

    runs = tmp_path / "quickstart" / "runs"
    _summary(runs, "nfnet-tiny-l0-e1-lr25.6", "pretrain", 4.7, 1e9)
    _summary(runs, "finetune-digits", "finetune", 0.1, 1e8)  # not a pre-training run: no cell to match
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["quickstart", "--out", str(tmp_path / "quickstart")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds pre-training runs that are not this study's (nfnet-tiny-l0-e1-lr25.6)" in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_the_studys_own_runs_finished_or_not_are_resumed(tmp_path: Path) -> None:
    from convscale_cli.plugins import get_registry
    from convscale_cli.sweep import plan_cells

    cells = plan_cells(load_study(quickstart.default_study()), get_registry())
    runs = tmp_path / "runs"
    quickstart.check_runs_are_the_studys(runs, cells)  # no runs directory yet
    for name, model, epochs, status in [
        ("nfnet-w16-e8-lr25.6", "nfnet-w16", 8, "finished"),
        ("nfnet-w64-e0.5-lr51.2", "nfnet-w64", 0.5, "paused"),
        ("trunks/nfnet-w32-e8-lr25.6", "nfnet-w32", 8, "paused"),
    ]:
        (runs / name).mkdir(parents=True)
        doc = {"kind": "pretrain", "status": status, "model": model, "epochs": epochs}
        (runs / name / "summary.json").write_text(json.dumps(doc))
    quickstart.check_runs_are_the_studys(runs, cells)
    (runs / "nfnet-w16-e3-lr25.6").mkdir()  # a budget the study does not have
    (runs / "nfnet-w16-e3-lr25.6" / "summary.json").write_text(json.dumps({"model": "nfnet-w16", "epochs": 3}))
    with pytest.raises(UsageError, match=r"not this study's \(nfnet-w16-e3-lr25.6\)"):
        quickstart.check_runs_are_the_studys(runs, cells)


def test_the_job_chains_the_library_steps_on_their_return_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The four steps in order, each fed by what the one before returned; the stand-ins write no files the job could
    read back (no tuning.jsonl, fit.json or fine-tuning summary.json), so the summary must come from return values."""
    import convscale_cli.finetune.api as finetune_api
    import convscale_cli.report as report
    from convscale_cli.sweep import SweepResult
    from convscale_cli.tuning import Trial, TuneResult

    calls: list[str] = []
    runs = tmp_path / "job" / "runs"

    def sweep(study: Any, registry: Any) -> SweepResult:
        calls.append("sweep")
        assert study.out == str(runs)
        _summary(runs, "l0", "pretrain", 5.0, 1e9)
        _summary(runs, "l1", "pretrain", 4.0, 3e9)
        trials = (Trial(1.6, "l0", 5.0, "trained"), Trial(0.8, "l1", 4.0, "trained"))
        cell = TuneResult("m", "shapes", 1.0, "two-trial", 1.6, "recipe", trials, 0.8, "l1", 0.4)
        return SweepResult(results=(cell,), grid_sizes=(4,))

    def finetune(config: Any, registry: Any = None) -> dict[str, Any]:
        calls.append("scratch" if config.scratch else "finetune")
        assert Path(config.pretrained).name == "l1"  # the lowest held-out loss
        top1 = 0.9 if config.scratch else 0.99
        return {"final": {"eval_top1": top1}, "final_ema": {"eval_top1": top1 - 0.01}}

    def build_report(runs_dir: Path, out_dir: Path, **kw: Any) -> dict[str, Any]:
        calls.append("report")
        return {"verdicts": [{"claim": "log-log law", "text": "supported"}]}

    def plan(study: Any, registry: Any, runs_dir: Path, budget_flops: float) -> str:
        calls.append("plan")
        assert budget_flops == quickstart.PLAN_BUDGET_FACTOR * 3e9  # 10x the largest finished run
        return "the plan"

    monkeypatch.setattr(finetune_api, "finetune", finetune)
    monkeypatch.setattr(report, "build_report", build_report)
    monkeypatch.setattr(quickstart, "plan_from_runs", plan)
    shown: list[Any] = []
    display = quickstart.Display(sweep=sweep, report=lambda fit, out: shown.append(fit), plan=shown.append)
    lines: list[str] = []
    result = quickstart.run(tmp_path / "job", study="quickstart", display=display, echo=lines.append)
    assert calls == ["sweep", "finetune", "scratch", "report", "plan"]
    assert shown == [result.fit, "the plan"] and result.plan == "the plan"
    summary = result.to_dict()
    assert summary["finetune"]["top1"] == 0.99 and summary["finetune"]["scratch"]["top1"] == 0.9
    assert summary["runs_used"] == 2 and summary["best_pretrain_run"] == "l1"
    assert summary["study"] == str(quickstart.packaged_studies()["quickstart"])
    assert summary["cells"] == 1 and summary["full_grid_runs"] == 4  # the sweep's grid, not a hard-coded one
    assert summary["verdicts"] == [{"claim": "log-log law", "text": "supported"}]
    assert "  two-trial rule: 2 runs for 1 cells (a full 4-point lr grid needs 4)" in lines
    assert any("99.0% (EMA 98.0%) fine-tuned from l1, 90.0% (EMA 89.0%) from scratch" in line for line in lines)
    assert not (runs / "tuning.jsonl").exists() and not (runs / "finetune-digits" / "summary.json").exists()


def test_a_seed_and_a_grid_study_are_what_the_job_runs_and_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--seed` replaces the study's seed; the main job's grid study's summary names its grid, not the two-trial
    rule."""
    import convscale_cli.finetune.api as finetune_api
    import convscale_cli.report as report
    from convscale_cli.sweep import SweepResult
    from convscale_cli.tuning import Trial, TuneResult

    seen: list[Any] = []

    def sweep(study: Any, registry: Any) -> SweepResult:
        seen.append(study)
        _summary(Path(study.out), "w32", "pretrain", 2.0, 1e9)
        trials = (Trial(25.6, "w32", 2.0, "trained"), Trial(51.2, "w32b", 2.1, "trained"))
        return SweepResult(
            results=(TuneResult("m", "shapes", 1.0, "grid", 25.6, "grid", trials, 25.6, "w32", None),), grid_sizes=(2,)
        )

    monkeypatch.setattr(finetune_api, "finetune", lambda config, registry=None: {"final": {"eval_top1": 0.9}})
    regimes = [  # as the report computes it (tests/test_report.py): past the transient, then still in it
        {"classes": 70, "chance_loss": 4.248, "best_loss": 1.274, "fraction_of_chance": 0.3, "early_transient": False},
        {"classes": 70, "chance_loss": 4.248, "best_loss": 2.9, "fraction_of_chance": 0.68, "early_transient": True},
    ]
    verdicts = [{"finding": "log_log_law", "status": "supported"}, {"finding": "lr_falls", "status": "inconclusive"}]
    monkeypatch.setattr(report, "build_report", lambda *a, **kw: {"verdicts": verdicts, "regime": regimes.pop(0)})
    monkeypatch.setattr(quickstart, "plan_from_runs", lambda *a: "plan")
    display = quickstart.Display(sweep=sweep, report=lambda fit, out: None, plan=lambda plan: None)
    lines: list[str] = []
    result = quickstart.run(tmp_path / "job", seed=2, display=display, echo=lines.append)  # the main job's study
    assert seen[0].seed == 2 and seen[0].rule == "grid" and seen[0].models == load_study(POWERLAW).models
    assert any("seed 2, learning rates alpha 25.6, 51.2 on every cell" in line for line in lines)
    assert "  lr grid of 2: 2 runs for 1 cells" in lines and not any("two-trial" in line for line in lines)
    assert "  regime: the best cell's held-out loss 1.274 is 30% of chance (ln 70 = 4.25)" in lines
    assert result.to_dict()["regime"]["fraction_of_chance"] == 0.3
    # Past the transient, with a verdict short of supported: one seed's verdicts are draws, and pooling is named.
    pool = [line for line in lines if line.startswith("  seed 2 only: each verdict is one draw")]
    assert pool and pool[0].endswith("pool several seeds' jobs in one report (README, \"The main job's study\")")
    lines.clear()  # a grid per family is named family by family
    families = REPO / "examples" / "convnet-vs-vit.toml"
    quickstart.run(tmp_path / "job2", study=families, display=display, echo=lines.append)
    assert any("learning rates alpha nfnet 25.6, 51.2; vit " in line for line in lines), lines
    (line,) = [line for line in lines if line.startswith("  regime:")]
    hint = f"a study past it: convscale quickstart --study powerlaw --out {tmp_path / 'powerlaw'}"
    transient = "68% of chance (ln 70 = 4.25): the early transient, where only the log-log law can show; "
    assert line.endswith(transient + hint)
    assert not any("one draw" in line for line in lines)  # in the transient the design, not the noise, decides


POWERLAW = REPO / "examples" / "powerlaw.toml"


def test_the_packaged_studies_are_the_documented_examples() -> None:
    studies = quickstart.packaged_studies()
    assert set(studies) == {"quickstart", "powerlaw"}
    for name, path in studies.items():
        assert path.read_text() == (REPO / "examples" / f"{name}.toml").read_text(), name


def test_study_names_a_packaged_study_or_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from convscale_cli.errors import UsageError

    assert quickstart.study_file("quickstart") == quickstart.packaged_studies()["quickstart"]
    assert quickstart.study_file("powerlaw") == quickstart.packaged_studies()["powerlaw"]
    assert quickstart.study_file("mine.toml") == Path("mine.toml")  # a file, even one that is missing
    monkeypatch.chdir(tmp_path)
    Path("powerlaw").write_text("")  # a file in the working directory wins over the packaged name
    assert quickstart.study_file("powerlaw") == Path("powerlaw")
    with pytest.raises(UsageError, match=r"unknown study 'powerlow': name a packaged study \(powerlaw, quickstart\)"):
        quickstart.study_file("powerlow")


def test_an_unknown_study_name_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from convscale_cli.cli import main

    assert main(["quickstart", "--study", "powerlow", "--out", str(tmp_path / "job")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: unknown study 'powerlow'") and err.count("\n") == 1
    assert not (tmp_path / "job").exists()


def test_the_plan_stays_on_the_studys_ladder_and_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The plan ranks the study's ladder (larger rungs included) on the study's data setting (70 classes, not the
    dataset's default 420), so it does not carry the law fitted on one ladder over to another."""
    import convscale_cli.plan_fit as plan_fit
    from convscale_cli.plugins import get_registry

    requests: list[Any] = []
    monkeypatch.setattr(plan_fit, "plan_fitted", lambda request, registry, runs_dir: requests.append(request))
    study = load_study(REPO / "examples" / "powerlaw.toml")
    quickstart.plan_from_runs(study, get_registry(), tmp_path, 1e12)
    (request,) = requests
    assert request.dataset.num_classes == 70 and request.dataset.size == 16384 and request.batch_size == 32
    assert set(request.models) == {"nfnet-w64", "nfnet-w32", "nfnet-w16", "nfnet-w8", "nfnet-w4", "nfnet-w2"}
