"""``convscale plan``: the paper's end points (docs/paper-notes.md), the lr prior (Fig. 3), errors and ``--json``."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from convscale_cli import planner as P
from convscale_cli import plugins as plugin_loader
from convscale_cli.budget import get_hardware, parse_budget
from convscale_cli.cli import main
from convscale_cli.errors import UnknownNameError, UsageError
from convscale_cli.hookspecs import hookimpl
from convscale_cli.plan_data import JFT4B_CLASSES, JFT4B_SIZE, DatasetPlan
from convscale_cli.recipe import Recipe
from convscale_cli.registry import ArchitectureSpec, ModelCount, Registry

# The paper's Fig. 2 models with the counts of docs/paper-notes.md (224 px, 30k-class head, mid-128 rounding).
PAPER_MODELS = {
    "nfnet-f0": (160.6e6, 9.58e9),
    "nfnet-f1": (221.8e6, 17.53e9),
    "nfnet-f3": (344.0e6, 33.43e9),
    "nfnet-f3+": (542.2e6, 51.84e9),
    "nfnet-f7": (588.6e6, 65.23e9),
    "nfnet-f7+": (948.4e6, 100.86e9),
}


def _spec(name: str, params: float, macs_224: float, family: str = "nfnet", tags: tuple[str, ...] = ("paper",), **kw):  # noqa: ANN003
    def count(resolution: int, num_classes: int) -> ModelCount:
        return ModelCount(params=int(params), macs=int(macs_224 * (resolution / 224) ** 2))

    return ArchitectureSpec(
        name=name,
        family=family,
        build=lambda **_: None,
        count=count,
        train_resolution=224,
        eval_resolution=256,
        tags=tags,
        **kw,
    )


class _PaperPlugin:
    @hookimpl
    def register_architectures(self, register) -> None:  # noqa: ANN001
        for name, (params, macs) in PAPER_MODELS.items():
            register(_spec(name, params, macs))
        register(_spec("nfnet-test", 1e5, 1e6, tags=("tiny",)))
        register(_spec("vit-l/16", 303e6, 61.4e9, family="vit", tags=(), recipe=Recipe(optimizer="adamw", lr=1e-3)))


@pytest.fixture
def registry() -> Registry:
    return plugin_loader.load_plugins(extra=[("paper", _PaperPlugin())], entry_points=lambda: []).registry


@pytest.fixture
def cli_registry(registry: Registry) -> Iterator[Registry]:
    """Make the CLI see only the fixture models."""
    loaded = plugin_loader.load_plugins(extra=[("paper", _PaperPlugin())], entry_points=lambda: [])
    plugin_loader.use_plugins(loaded)
    yield loaded.registry


def _request(budget: str, **kwargs) -> P.PlanRequest:  # noqa: ANN003
    parsed = parse_budget(budget)
    hw = get_hardware("tpu-v4" if parsed.is_flops else parsed.unit)
    dataset = DatasetPlan(None, JFT4B_SIZE, JFT4B_CLASSES, 224)
    return P.PlanRequest(budget=parsed, hardware=hw, dataset=dataset, **kwargs)


def test_smallest_paper_budget_trains_f0_for_a_quarter_epoch(registry: Registry) -> None:
    best = P.plan_prior(_request("0.4k-core-hours"), registry).recommendation
    assert best.model == "nfnet-f0"
    # The calibrated MFU prices F0 x 0.25 epochs at ~0.33k core-hours, so 0.4k buys ~0.3 epochs.
    assert 0.25 <= best.epochs <= 0.35
    assert best.lr == 1.6


def test_largest_paper_budget_trains_f7plus_for_8_epochs(registry: Registry) -> None:
    best = P.plan_prior(_request("110k-core-hours"), registry).recommendation
    assert best.model == "nfnet-f7+"
    assert best.epochs == pytest.approx(8.0, rel=1e-3)
    assert best.cost_fraction == pytest.approx(1.0, rel=1e-3)
    assert best.lr == pytest.approx(0.4)
    assert best.lr_trials == (0.4, 0.2)


def _log_budgets(low: float, high: float, n: int) -> list[float]:
    return [low * (high / low) ** (i / (n - 1)) for i in range(n)]


def test_optimal_epochs_cross_one_near_5k_core_hours(registry: Registry) -> None:
    for hours in _log_budgets(5e3, 3e5, 60):
        best = P.plan_prior(_request(f"{hours}-core-hours"), registry).recommendation
        assert best.epochs > 1.0, (hours, best)
    for hours in _log_budgets(0.4e3, 4e3, 30):
        best = P.plan_prior(_request(f"{hours}-core-hours"), registry).recommendation
        assert best.epochs <= 1.0, (hours, best)


def test_model_size_and_epochs_grow_with_compute(registry: Registry) -> None:
    picks = [P.plan_prior(_request(f"{h}-core-hours"), registry).recommendation for h in _log_budgets(400, 2e5, 40)]
    sizes = [c.macs_per_image for c in picks]
    assert sizes == sorted(sizes)
    assert picks[-1].epochs > picks[len(picks) // 2].epochs > picks[0].epochs


def test_frontier_passes_through_the_anchors() -> None:
    frontier = P.Frontier()
    for flops, examples in P.FRONTIER_ANCHORS:
        assert frontier.examples(flops) == pytest.approx(examples)
    low, high = frontier.exponents()
    assert 0.45 < low < 0.55 and 0.6 < high < 0.7  # epochs ~ C^0.5 .. C^0.67


def test_lr_prior_is_monotone_on_the_factor_two_grid() -> None:
    epochs = [0.25, 0.5, 1, 2, 4, 8, 16]
    sizes = [9.58e9, 17.53e9, 33.43e9, 51.84e9, 65.23e9, 100.86e9, 400e9]
    table = [[P.prior_lr(1.6, m, e) for e in epochs] for m in sizes]
    for row in table:
        assert all(a >= b for a, b in zip(row, row[1:], strict=False))
        assert set(row) <= {1.6, 0.8, 0.4}
    for column in zip(*table, strict=True):
        assert all(a >= b for a, b in zip(column, column[1:], strict=False))
    assert all(row[0] == row[1] == 1.6 for row in table)  # alpha ~ 1.6 at small epoch budgets
    f0, f7p = table[0], table[5]
    assert any(b < a for a, b in zip(f0, f7p, strict=True))  # large models fall faster
    assert P.prior_lr(1e-3, 100.86e9, 8) == pytest.approx(2.5e-4)  # scales with the recipe's alpha


def test_impossible_budget_names_the_smallest_feasible_budget(registry: Registry) -> None:
    with pytest.raises(UsageError) as info:
        P.plan_prior(_request("100-core-hours"), registry)
    message = str(info.value)
    assert "nfnet-f0" in message and "0.25 epochs" in message
    feasible = float(re.search(r"smallest feasible budget is ([\d.]+) core-hours", message).group(1))
    assert 300 < feasible < 350
    assert P.plan_prior(_request(f"{feasible * 1.01}-core-hours"), registry).recommendation.model == "nfnet-f0"


def test_candidates_fit_the_budget_and_are_ranked_by_frontier_distance(registry: Registry) -> None:
    plan = P.plan_prior(_request("20k-core-hours", top=6), registry)
    assert len(plan.candidates) == 6
    distances = [c.frontier_distance for c in plan.candidates]
    assert distances == sorted(distances)
    for c in plan.candidates:
        assert 0.95 < c.cost_fraction <= 1.0
        assert c.steps == math.ceil(c.examples / 4096)
        assert c.lr_trials == (c.lr, c.lr / 2)


def test_family_and_model_patterns(registry: Registry) -> None:
    vit = P.plan_prior(_request("20k-core-hours", family="vit"), registry)
    assert [c.model for c in vit.candidates] == ["vit-l/16"]
    assert vit.recommendation.lr <= 1e-3 and any("other optimizers" in n for n in vit.notes)
    assert not any("other optimizers" in n for n in P.plan_prior(_request("20k-core-hours"), registry).notes)
    only = P.plan_prior(_request("20k-core-hours", models=("nfnet-f1", "nfnet-f0")), registry)
    assert {c.model for c in only.candidates} == {"nfnet-f0", "nfnet-f1"}
    with pytest.raises(UnknownNameError, match="family"):
        P.plan_prior(_request("20k-core-hours", family="resnet"), registry)
    with pytest.raises(UsageError, match="no nfnet model matches"):
        P.plan_prior(_request("20k-core-hours", models=("nfnet-z*",)), registry)


def test_device_hour_budgets_use_their_hardware(registry: Registry) -> None:
    h100 = P.plan_prior(_request("2k-h100-hours"), registry).recommendation
    assert 0.95 < h100.device_hours / 2e3 <= 1.0
    assert h100.core_hours == pytest.approx(h100.device_hours * 989 / 137.5)


def test_round_down() -> None:
    assert P.round_down(0.30649) == 0.306
    assert P.round_down(8 * (1 - 1e-12)) == 8.0
    assert P.round_down(1234.5) == 1230.0


def test_plan_json_schema(cli_registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--budget", "110k-core-hours", "--json", "--top", "3"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {
        "mode",
        "budget",
        "hardware",
        "dataset",
        "family",
        "batch_size",
        "frontier",
        "candidates",
        "recommendation",
        "fit",
        "notes",
    }
    assert doc["mode"] == "prior" and doc["fit"] is None
    assert doc["budget"]["unit"] == "core-hours" and doc["budget"]["core_hours"] == pytest.approx(110e3)
    assert doc["dataset"] == {
        "name": None, "size": 4_000_000_000, "num_classes": 30_000, "resolution": 224, "options": {}
    }  # fmt: skip
    assert len(doc["candidates"]) == 3
    keys = {
        "model",
        "family",
        "params",
        "macs_per_image",
        "epochs",
        "examples",
        "steps",
        "flops",
        "cost",
        "cost_fraction",
        "core_hours",
        "device_hours",
        "lr",
        "lr_trials",
        "frontier_distance",
        "predicted_loss",
        "loss_interval",
        "law_interval",
        "extrapolated",
        "extrapolated_in",
        "lr_source",
    }
    assert all(set(c) == keys for c in doc["candidates"])
    rec = doc["recommendation"]
    assert rec["model"] == "nfnet-f7+" and rec["epochs"] == 8.0
    assert rec["commands"] == [
        "convscale pretrain --model nfnet-f7+ --dataset DATASET --epochs 8 --lr 0.4 --batch-size 4096 "
        "--resolution 224 --precision bf16 --out runs/nfnet-f7+-e8-lr0.4",
        "convscale pretrain --model nfnet-f7+ --dataset DATASET --epochs 8 --lr 0.2 --batch-size 4096 "
        "--resolution 224 --precision bf16 --out runs/nfnet-f7+-e8-lr0.2",
    ]


def test_plan_table_output(cli_registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--budget", "0.4k-core-hours"]) == 0
    out = capsys.readouterr().out
    assert "Recommendation: nfnet-f0 for 0.3" in out
    assert "params and GMACs at 224 px with a 30000-class head" in out  # the counts say what they count
    assert "--lr 1.6" in out and "--lr 0.8" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--budget", "10k"], "has no unit"),
        (["--budget", "100-core-hours"], "smallest feasible budget"),
        (["--budget", "250-h100-hours", "--hardware", "a100"], "drop --hardware"),
        (["--budget", "1e21-flops", "--mfu", "0.5"], "no effect on a FLOP budget"),
        (["--budget", "10k-core-hours", "--mfu", "1.5"], "MFU 1.5"),
        (["--budget", "10k-core-hours", "--batch-size", "0"], "--batch-size"),
        (["--budget", "10k-core-hours", "--family", "resnt"], "unknown family"),
    ],
)
def test_plan_bad_input_is_a_usage_error(
    cli_registry: Registry, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_plan_never_imports_jax() -> None:
    code = (
        "import sys, io, contextlib; from convscale_cli.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    rc = main(['plan', '--budget', '10k-core-hours', '--json'])\n"
        "heavy = {'jax', 'flax', 'optax', 'grain', 'orbax', 'torch', 'tensorflow'}\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & heavy)\n"
        "print(rc, heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.split("\n")[0] == "0 []", result.stdout + result.stderr


# --- fitted mode: plan --from RUNS ------------------------------------------------------------------------------------

LADDER = {"lad-0": 20_000, "lad-1": 80_000, "lad-2": 320_000, "lad-3": 1_280_000}
TOY_TRAIN = 100_000


def true_loss(params: float, examples: float) -> float:
    return 1.5 + 40 / params**0.35 + 60 / examples**0.3


class _LadderPlugin:
    @hookimpl
    def register_architectures(self, register) -> None:  # noqa: ANN001
        for name, params in LADDER.items():
            register(
                ArchitectureSpec(
                    name=name, family="toy", build=lambda **_: None, train_resolution=32, eval_resolution=32,
                    count=lambda r, c, p=params: ModelCount(p, 10 * p * r * r // 1024), tags=("ladder",),
                )
            )  # fmt: skip

    @hookimpl
    def register_datasets(self, register) -> None:  # noqa: ANN001
        from convscale_cli.registry import DatasetInfo, DatasetSpec

        info = DatasetInfo(num_classes=10, split_sizes={"train": TOY_TRAIN, "eval": 1000}, resolution=32)
        for name in ("toyset", "otherset"):
            register(DatasetSpec(name=name, description="", open=lambda s: [], info=lambda: info, static_info=info))


def _write_runs(root, models=("lad-0", "lad-1", "lad-2"), epochs=(0.25, 0.5, 1.0, 2.0), dataset="toyset") -> None:  # noqa: ANN001
    for i, model in enumerate(models):
        for j, ep in enumerate(epochs):
            for lr, penalty in ((0.8, 0.0), (0.4, 0.05)):  # the fit must use each cell's best-lr run
                params, examples = LADDER[model], int(ep * TOY_TRAIN)
                noise = 0.004 * ((3 * i + j) % 3 - 1)
                summary = {
                    "kind": "pretrain", "status": "finished", "model": model, "family": "toy", "dataset": dataset,
                    "epochs": ep, "lr": lr if model != "lad-2" else lr / 2, "batch_size": 64, "params": params,
                    "macs_per_image": 10 * params, "train_resolution": 32, "num_classes": 10,
                    "examples_seen": examples, "final": {"eval_loss": true_loss(params, examples) + noise + penalty},
                    "ledger": {"train_flops": 60.0 * params * examples},
                }  # fmt: skip
                run = root / P.run_name(model, ep, summary["lr"])
                run.mkdir(parents=True)
                (run / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def ladder() -> Registry:
    loaded = plugin_loader.load_plugins(extra=[("ladder", _LadderPlugin())], entry_points=lambda: [])
    plugin_loader.use_plugins(loaded)
    return loaded.registry


def _toy_request(budget: str = "3e13-flops", **kwargs) -> P.PlanRequest:  # noqa: ANN003
    dataset = DatasetPlan("toyset", TOY_TRAIN, 10, 32)
    return P.PlanRequest(parse_budget(budget), get_hardware("tpu-v4"), dataset, family="toy", top=4, **kwargs)


def test_fitted_plan_ranks_by_predicted_loss_with_intervals(ladder: Registry, tmp_path) -> None:  # noqa: ANN001
    from convscale_cli.plan_fit import plan_fitted

    _write_runs(tmp_path)
    plan = plan_fitted(_toy_request(), ladder, tmp_path, bootstrap=10)
    assert plan.mode == "fitted"
    assert {c.model for c in plan.candidates} == set(LADDER)  # runs' models plus same-tag registry models
    losses = [c.predicted_loss for c in plan.candidates]
    assert losses == sorted(losses)
    for c in plan.candidates:
        assert c.loss_interval[0] <= c.predicted_loss <= c.loss_interval[1]
        assert c.predicted_loss == pytest.approx(true_loss(LADDER[c.model], c.examples), rel=0.03)
    truth = {c.model: true_loss(LADDER[c.model], c.examples) for c in plan.candidates}
    assert truth[plan.recommendation.model] == pytest.approx(min(truth.values()), rel=0.01)
    assert truth[plan.recommendation.model] < max(truth.values()) - 0.1
    assert plan.fit["cells"] == 12 and plan.fit["alpha"] == pytest.approx(0.35, abs=0.1)
    by_model = {c.model: c for c in plan.candidates}
    assert by_model["lad-3"].extrapolated and by_model["lad-3"].lr == 0.4  # nearest smaller cell: lad-2's best alpha
    assert by_model["lad-0"].lr == 0.8


def test_fitted_plan_needs_five_cells_and_one_dataset(ladder: Registry, tmp_path) -> None:  # noqa: ANN001
    from convscale_cli.plan_fit import plan_fitted

    _write_runs(tmp_path / "few", models=("lad-0", "lad-1"), epochs=(0.5, 1.0))
    with pytest.raises(UsageError, match="needs at least 6 cells"):
        plan_fitted(_toy_request(), ladder, tmp_path / "few", bootstrap=0)
    _write_runs(tmp_path / "mixed")
    _write_runs(tmp_path / "mixed", models=("lad-3",), dataset="otherset")
    plain = DatasetPlan(None, TOY_TRAIN, 10, 32)
    request = P.PlanRequest(parse_budget("3e13-flops"), get_hardware("tpu-v4"), plain, family="toy")
    with pytest.raises(UsageError, match="pick one with `dataset`"):
        plan_fitted(request, ladder, tmp_path / "mixed", bootstrap=0)
    assert plan_fitted(_toy_request(), ladder, tmp_path / "mixed", bootstrap=0).fit["cells"] == 12
    with pytest.raises(UsageError, match="does not exist"):
        plan_fitted(_toy_request(), ladder, tmp_path / "missing", bootstrap=0)


def test_plan_from_runs_json(ladder: Registry, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    _write_runs(tmp_path)
    args = ["plan", "--budget", "3e13-flops", "--family", "toy", "--dataset", "toyset", "--from", str(tmp_path)]
    args += ["--bootstrap", "5"]
    assert main([*args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["mode"] == "fitted" and doc["fit"]["law"] == "L = E + A / N^alpha + B / D^beta"
    assert all(c["predicted_loss"] is not None and len(c["loss_interval"]) == 2 for c in doc["candidates"])
    # One run's interval holds the law's own: a run scatters about the law's mean.
    assert all(
        c["loss_interval"][0] <= c["law_interval"][0] <= c["law_interval"][1] <= c["loss_interval"][1]
        for c in doc["candidates"]
    )
    assert doc["recommendation"]["commands"][0].startswith(
        f"convscale pretrain --model {doc['recommendation']['model']} --dataset toyset"
    )
    assert "--data-option" not in doc["recommendation"]["commands"][0]  # toyset takes no size option
    assert main(args) == 0
    assert "pred. loss (one run, 90%)" in capsys.readouterr().out


def test_plan_from_and_report_agree_on_the_same_runs(ladder: Registry, tmp_path, capsys) -> None:  # noqa: ANN001
    """One analysis behind both: the same law, the same intervals, the same noise."""
    _write_runs(tmp_path / "runs")
    args = [
        "plan",
        "--budget",
        "3e13-flops",
        "--family",
        "toy",
        "--dataset",
        "toyset",
        "--from",
        str(tmp_path / "runs"),
    ]
    assert main([*args, "--bootstrap", "40", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["fit"]
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "r"), "--bootstrap", "40", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["parametric"]
    for key in ("E", "A", "alpha", "B", "beta", "n", "intervals", "warnings", "unquoted"):
        assert plan[key] == report[key], key


def test_extrapolation_note_names_what_lies_outside(ladder: Registry, tmp_path, capsys) -> None:  # noqa: ANN001
    _write_runs(tmp_path, models=("lad-0", "lad-1", "lad-2", "lad-3"), epochs=(0.25, 0.5))
    args = ["plan", "--budget", "1e14-flops", "--family", "toy", "--dataset", "toyset", "--from", str(tmp_path)]
    assert main([*args, "--bootstrap", "0"]) == 0
    out = capsys.readouterr().out
    # Every model size was fitted; only the example counts a larger budget buys lie outside the runs.
    assert "* example count outside the fitted runs' range" in out and "model size" not in out.split("*")[-1]


def test_plan_with_builtin_ladder_passes_the_dataset_size(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "--budget", "0.1-cpu-hours", "--dataset", "shapes", "--dataset-size", "16384"]
    assert main([*args, "--models", "nfnet-tiny-*", "--batch-size", "64", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["dataset"]["resolution"] == 32 and doc["dataset"]["options"] == {"size": 16384}
    assert all(c["model"].startswith("nfnet-tiny-") for c in doc["candidates"])
    assert all("--data-option size=16384" in cmd for cmd in doc["recommendation"]["commands"])


def test_laptop_ladders_start_from_their_measured_lr_not_the_jft_prior(capsys: pytest.CaptureFixture[str]) -> None:
    """The paper's prior moved to batch 64 left the tiny ViT at chance (alpha 0.004; the ladder's tuned optimum is
    0.4-0.8) and the tiny NFNets 30x below theirs: the ladders plan from the alpha measured on them, moved by the
    paper's epoch decay and the optimizer's batch rule, and say so."""
    args = ["plan", "--budget", "0.05-cpu-hours", "--dataset", "shapes", "--dataset-size", "16384", "--json"]
    found = {}
    for family, batch in (("vit", 64), ("vit", 256), ("nfnet", 64), ("nfnet", 256)):
        assert main([*args, "--models", f"{family}-tiny-l0", "--batch-size", str(batch)]) == 0
        found[family, batch] = json.loads(capsys.readouterr().out)["recommendation"]
    vit, nfnet = found["vit", 64], found["nfnet", 64]
    assert vit["lr"] == 0.4 and vit["lr_trials"] == [0.4, 0.2]  # 0.8 at 0.5 epochs, halved for ~4 epochs
    assert nfnet["lr"] == 25.6 and nfnet["lr_trials"] == [25.6, 12.8]
    assert "measured" in vit["lr_source"] and "convnet-vs-vit-quick.toml" in vit["lr_source"]
    assert "square-root" in vit["lr_source"] and "linear" in nfnet["lr_source"]
    assert all(f"--lr {c['lr']:g} " in c["commands"][0] for c in found.values())
    # 4x the batch: AdamW's alpha x sqrt(64/256) (its peak lr, alpha x batch/4096, grows 2x); SGD's alpha unchanged.
    assert found["vit", 256]["epochs"] == vit["epochs"] and found["vit", 256]["lr"] == vit["lr"] / 2
    assert found["nfnet", 256]["epochs"] == nfnet["epochs"] and found["nfnet", 256]["lr"] == nfnet["lr"]


class _RootedDataPlugin:
    """A dataset that, like arrayrecord and imagefolder, knows its size only once told where it lives."""

    @hookimpl
    def register_datasets(self, register) -> None:  # noqa: ANN001
        from convscale_cli.registry import DatasetInfo, DatasetSpec

        def info(root=None, strict_data=False) -> DatasetInfo:  # noqa: ANN001
            if root is None:
                raise UsageError("rooted needs --data-option root=DIR")
            return DatasetInfo(num_classes=5, split_sizes={"train": 200, "eval": 50}, resolution=32)

        register(
            DatasetSpec(
                name="rooted", description="", open=lambda s, **o: [], info=info,
                options={"root": None, "strict_data": False},
            )
        )  # fmt: skip


@pytest.fixture
def rooted() -> Registry:
    plugins = [("ladder", _LadderPlugin()), ("rooted", _RootedDataPlugin())]
    loaded = plugin_loader.load_plugins(extra=plugins, entry_points=lambda: [])
    plugin_loader.use_plugins(loaded)
    return loaded.registry


def test_plan_passes_data_options_to_the_dataset_and_the_commands(
    rooted: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["plan", "--budget", "1e12-flops", "--family", "toy", "--dataset", "rooted", "--batch-size", "16"]
    assert main([*args, "--data-option", "root=/data/x", "--data-option", "strict_data=true", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["dataset"]["size"] == 200 and doc["dataset"]["num_classes"] == 5
    assert doc["dataset"]["options"] == {"root": "/data/x", "strict_data": True}
    for command in doc["recommendation"]["commands"]:
        assert "--data-option root=/data/x --data-option strict_data=true" in command
    assert main([*args, "--data-option", "strict_data=maybe"]) == 2
    assert "rooted data option strict_data = 'maybe' has the wrong type" in capsys.readouterr().err
    assert main([*args, "--data-option", "rot=/x"]) == 2
    assert "unknown rooted data option 'rot'" in capsys.readouterr().err
    assert main(args) == 2
    assert "--data-option" in capsys.readouterr().err  # the message says how to give the options
    # Size, classes and resolution all given: nothing to ask the dataset.
    assert main([*args, "--dataset-size", "200", "--num-classes", "5", "--resolution", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dataset"]["size"] == 200


def test_run_names_never_nest_directories() -> None:
    name = P.run_name("vit-l/16", 1.0, 0.1)
    assert "/" not in name and name != P.run_name("vit-l-16", 1, 0.1)


def test_model_globs_choose_the_family(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "--budget", "0.05-cpu-hours", "--dataset", "shapes", "--dataset-size", "16384"]
    args += ["--batch-size", "64"]
    assert main([*args, "--models", "vit-tiny-*", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["family"] == "vit" and all(c["model"].startswith("vit-tiny-") for c in doc["candidates"])
    assert main([*args, "--models", "vit-tiny-*,nfnet-tiny-*"]) == 2
    assert "--family" in capsys.readouterr().err  # two families: say which


def test_prior_lr_follows_the_optimizers_batch_rule_and_says_so(registry: Registry) -> None:
    def best(budget: str, family: str, batch: int) -> P.Candidate:
        return P.plan_prior(_request(budget, family=family, batch_size=batch), registry).recommendation

    # SGD (NFNets): alpha is quoted at batch 4096 and applied linearly (Goyal et al. 2017): the same alpha.
    sgd_big, sgd_small = best("0.4k-core-hours", "nfnet", 4096), best("0.4k-core-hours", "nfnet", 64)
    assert sgd_small.lr == sgd_big.lr == 1.6 and "linear" in sgd_small.lr_source
    # AdamW (ViT): square-root scaling (Malladi et al. 2022; timm's default for adaptive optimizers): the peak rate
    # at batch 64 is 1e-3 x sqrt(64/4096), which the engine's alpha x 64/4096 gives for alpha = 1e-3 x 8.
    adam_big, adam_small = best("10k-core-hours", "vit", 4096), best("10k-core-hours", "vit", 64)
    assert adam_small.lr == pytest.approx(8 * adam_big.lr) and "square-root" in adam_small.lr_source
    assert adam_small.lr * 64 / 4096 == pytest.approx(adam_big.lr * math.sqrt(64 / 4096))


def test_prior_commands_carry_the_precision_of_the_planned_hardware(cli_registry: Registry, capsys) -> None:  # noqa: ANN001
    assert main(["plan", "--budget", "0.4k-core-hours", "--json"]) == 0
    commands = json.loads(capsys.readouterr().out)["recommendation"]["commands"]
    assert all("--precision bf16" in c for c in commands)
    assert main(["plan", "--budget", "2e7-cpu-hours", "--json"]) == 0  # on CPU bf16 is emulated: fp32
    commands = json.loads(capsys.readouterr().out)["recommendation"]["commands"]
    assert all("--precision fp32" in c for c in commands)


def test_fitted_lr_is_the_nearest_tuned_optimum_moved_by_the_fitted_trend() -> None:
    import types

    from convscale_cli.plan_fit import lr_from_cells

    cells = [
        types.SimpleNamespace(model="a", epochs=1.0, lr=0.8, size=100.0),
        types.SimpleNamespace(model="b", epochs=1.0, lr=0.4, size=400.0),
    ]
    trend = {"epochs_slope": -0.5, "size_slope": -0.25}
    assert lr_from_cells(cells, "a", 100.0, 1.0, trend)[0] == 0.8  # the cell itself: its own tuned optimum
    lr, source = lr_from_cells(cells, "c", 400.0, 4.0, trend)  # b, 4x the epochs: lr x 4^-0.5
    assert lr == pytest.approx(0.2) and "b" in source and "trend" in source
    lr, source = lr_from_cells(cells, "c", 400.0, 4.0, {"epochs_slope": math.nan, "size_slope": math.nan})
    assert lr == 0.4 and "no trend" in source  # two-trial cells cannot fit a trend: the nearest optimum as it is


def test_fitted_commands_carry_the_runs_settings(ladder: Registry, tmp_path, capsys) -> None:  # noqa: ANN001
    _write_runs(tmp_path)
    for run in tmp_path.iterdir():
        config = {"convscale_run": {"kind": "pretrain"}, "precision": "fp32", "batch_size": 64,
                  "data_options": {"clutter": 0.0}}  # fmt: skip
        (run / "config.json").write_text(json.dumps(config))
    args = ["plan", "--budget", "3e13-flops", "--family", "toy", "--dataset", "toyset", "--from", str(tmp_path)]
    assert main([*args, "--bootstrap", "0", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["batch_size"] == 64  # the runs' batch, so their tuned alphas apply as they are
    for command in doc["recommendation"]["commands"]:
        assert "--precision fp32" in command and "--batch-size 64" in command
        assert "--data-option clutter=0.0" in command
    assert doc["recommendation"]["lr_source"]
    assert main([*args, "--bootstrap", "0"]) == 0
    assert "lr: " in capsys.readouterr().out  # the table says where the lr comes from
