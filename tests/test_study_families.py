"""A sweep over two model families (ConvNets and ViTs at equal compute, paper §3): a start alpha per family, and the
``examples/convnet-vs-vit.toml`` and ``examples/convnet-vs-vit-quick.toml`` studies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from convscale_cli import plugins as plugin_loader
from convscale_cli.errors import ConfigError
from convscale_cli.hookspecs import hookimpl
from convscale_cli.registry import ArchitectureSpec, DatasetInfo, DatasetSpec, ModelCount, Registry
from convscale_cli.sweep import load_study, plan_cells, run_sweep

REPO = Path(__file__).resolve().parents[1]
MODELS = {"conv-s": ("conv", 1_000), "conv-m": ("conv", 4_000), "attn-s": ("attn", 1_500)}


class _TwoFamilies:
    @hookimpl
    def register_architectures(self, register) -> None:  # noqa: ANN001
        for name, (family, params) in MODELS.items():
            register(
                ArchitectureSpec(
                    name=name, family=family, build=lambda **_: None,
                    count=lambda r, c, p=params: ModelCount(params=p, macs=10 * p),
                    train_resolution=32, eval_resolution=32,
                )
            )  # fmt: skip

    @hookimpl
    def register_datasets(self, register) -> None:  # noqa: ANN001
        info = DatasetInfo(num_classes=10, split_sizes={"train": 1_000, "eval": 100}, resolution=32)
        register(DatasetSpec(name="toyset", description="", open=lambda split: [], info=lambda: info, static_info=info))


@pytest.fixture
def registry() -> Registry:
    return plugin_loader.load_plugins(extra=[("two", _TwoFamilies())], entry_points=lambda: []).registry


def _trainer(calls: list[tuple[str, float, float]]):  # noqa: ANN202
    """Writes a finished summary; the loss is lowest at the family's largest alpha tried, so the rule keeps alpha."""

    def train(model: str, dataset: str, epochs: float, lr: float, out: Path, **options: Any) -> dict:
        calls.append((model, epochs, lr))
        family, params = MODELS[model]
        summary = {
            "kind": "pretrain", "status": "finished", "model": model, "family": family, "dataset": dataset,
            "epochs": epochs, "lr": lr, "batch_size": 64, "params": params, "macs_per_image": 10 * params,
            "train_resolution": 32, "num_classes": 10, "examples_seen": int(1_000 * epochs),
            "final": {"eval_loss": 5.0 - lr / 1_000}, "ledger": {"train_flops": 1.0, "core_hours": 1e-9},
        }  # fmt: skip
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "summary.json").write_text(json.dumps(summary))
        return summary

    return train


def _study(tmp_path: Path, start_lr: str, *lines: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(
        f"out = '{tmp_path / 'runs'}'\ndataset = 'toyset'\nmodels = ['conv-s', 'conv-m', 'attn-s']\n"
        f"epochs = [0.5, 1]\nstart_lr = {start_lr}\n" + "".join(f"{line}\n" for line in lines)
    )
    return path


def test_each_family_starts_at_its_own_alpha_and_tunes_only_from_its_own_cells(
    registry: Registry, tmp_path: Path
) -> None:
    calls: list[tuple[str, float, float]] = []
    study = load_study(_study(tmp_path, "{ conv = 51.2, attn = 1.6 }"))
    result = run_sweep(study, registry, trainer=_trainer(calls))
    first = {}
    for model, _, lr in calls:
        first.setdefault(MODELS[model][0], lr)
    assert first == {"conv": 51.2, "attn": 1.6}
    assert {lr for model, _, lr in calls if MODELS[model][0] == "attn"} == {1.6, 0.8}  # never an SGD alpha
    by_cell = {(r.model, r.epochs): r for r in result.results}
    assert by_cell[("attn-s", 1.0)].start_lr == 1.6 and "attn-s" in by_cell[("attn-s", 1.0)].source
    assert by_cell[("conv-m", 1.0)].start_lr == 51.2 and "conv-" in by_cell[("conv-m", 1.0)].source


def test_a_family_without_a_start_alpha_starts_at_its_recipe(registry: Registry, tmp_path: Path) -> None:
    calls: list[tuple[str, float, float]] = []
    run_sweep(load_study(_study(tmp_path, "{ conv = 51.2 }")), registry, trainer=_trainer(calls))
    assert [lr for model, _, lr in calls if model == "attn-s"][:2] == [1.6, 0.8]  # Recipe().lr


def test_one_start_alpha_still_applies_to_every_family(registry: Registry, tmp_path: Path) -> None:
    calls: list[tuple[str, float, float]] = []
    run_sweep(load_study(_study(tmp_path, "6.4")), registry, trainer=_trainer(calls))
    assert [lr for model, _, lr in calls if model == "attn-s"][:2] == [6.4, 3.2]


@pytest.mark.parametrize(
    ("start_lr", "needle"),
    [
        ("{ conv = -1.0 }", r"start_lr.conv must be a positive number, got -1.0"),
        ("{ conv = 'fast' }", r"start_lr.conv must be a positive number, got 'fast'"),
        ("-2.0", r"start_lr must be a positive number"),
    ],
)
def test_bad_start_alphas_are_config_errors(tmp_path: Path, start_lr: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_study(_study(tmp_path, start_lr))


def test_a_start_alpha_for_a_family_the_study_lacks_is_a_config_error(registry: Registry, tmp_path: Path) -> None:
    study = load_study(_study(tmp_path, "{ conv = 51.2, atn = 1.6 }"))
    with pytest.raises(ConfigError, match=r"start_lr names family 'atn', but the study's models are of families attn"):
        plan_cells(study, registry)


def test_a_grid_per_family_trains_each_family_on_its_own_grid(registry: Registry, tmp_path: Path) -> None:
    calls: list[tuple[str, float, float]] = []
    path = _study(tmp_path, "1.0", "rule = 'grid'", "lr_grid = { conv = [25.6, 51.2, 102.4], attn = [0.4, 0.8] }")
    result = run_sweep(load_study(path), registry, trainer=_trainer(calls))
    tried = {m: sorted({lr for model, _, lr in calls if model == m}) for m in MODELS}
    assert tried == {"conv-s": [25.6, 51.2, 102.4], "conv-m": [25.6, 51.2, 102.4], "attn-s": [0.4, 0.8]}
    assert result.grid_size is None and result.full_grid_runs == 4 * 3 + 2 * 2 == result.runs_used
    assert result.full_grid_text == "each family's full lr grid"  # the sweep's and the quickstart's closing lines
    by_cell = {(r.model, r.epochs): r.best_lr for r in result.results}
    assert by_cell[("conv-m", 1.0)] == 102.4 and by_cell[("attn-s", 1.0)] == 0.8


def test_a_family_the_grid_table_leaves_out_gets_its_recipe_grid(registry: Registry, tmp_path: Path) -> None:
    calls: list[tuple[str, float, float]] = []
    path = _study(tmp_path, "1.0", "rule = 'grid'", "lr_grid = { conv = [51.2] }")
    run_sweep(load_study(path), registry, trainer=_trainer(calls))
    assert sorted({lr for model, _, lr in calls if model == "attn-s"}) == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2]  # Recipe().lr
    assert {lr for model, _, lr in calls if model != "attn-s"} == {51.2}


def test_the_sweep_plan_counts_each_familys_trials(
    registry: Registry, tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import convscale_cli.plugins as plugins
    from convscale_cli.cli import main
    from convscale_cli.sweep_graph import plan_dict, study_graph

    grid = "lr_grid = { conv = [25.6, 51.2, 102.4], attn = [0.4] }"
    study = load_study(_study(tmp_path, "1.0", "rule = 'grid'", grid))
    graph = study_graph(study, registry)
    assert graph.trials == {"attn": 1, "conv": 3}
    trials = {(c["model"], c["epochs"]): c["trials"] for c in plan_dict(graph)["cells"]}
    assert trials[("conv-s", 0.5)] == 3 and trials[("attn-s", 1.0)] == 1
    monkeypatch.setattr(plugins, "get_registry", lambda: registry)
    assert main(["sweep", str(tmp_path / "study.toml"), "--plan"]) == 0
    assert "attn 1, conv 3 trials per cell (grid rule)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("grid", "needle"),
    [
        ("{ conv = [1.0, -2.0] }", r"lr_grid.conv must hold positive finite values, got \[1.0, -2.0\]"),
        ("{ conv = 'fast' }", r"lr_grid.conv = 'fast' has the wrong type: expected a list of numbers"),
        ("{ conv = [true] }", r"lr_grid.conv = \[True\] has the wrong type"),
        ("[0.0]", r"lr_grid must hold positive finite values"),
    ],
)
def test_bad_grids_are_config_errors(tmp_path: Path, grid: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_study(_study(tmp_path, "1.0", "rule = 'grid'", f"lr_grid = {grid}"))


def test_a_grid_for_a_family_the_study_lacks_is_a_config_error(registry: Registry, tmp_path: Path) -> None:
    study = load_study(_study(tmp_path, "1.0", "rule = 'grid'", "lr_grid = { conv = [1.0], atn = [0.4] }"))
    with pytest.raises(ConfigError, match=r"lr_grid names family 'atn', .* families attn, conv; did you mean 'attn'"):
        plan_cells(study, registry)


def test_the_convnet_vs_vit_example_is_a_valid_two_family_study() -> None:
    study = load_study(REPO / "examples" / "convnet-vs-vit.toml")
    registry = plugin_loader.get_registry()
    cells = plan_cells(study, registry)
    assert len(cells) == len(study.models) * len(study.epochs)
    families = {c.family for c in cells}
    assert families == {"nfnet", "vit"} and set(study.lr_grid) == families
    assert all("ladder" in registry.architecture(m).tags for m in study.models)
    assert study.dataset == "shapes" and study.rule == "grid" and study.branching
    # Its header promises the power-law study's design, so its NFNet cells are that study's runs, bit for bit.
    power = load_study(REPO / "examples" / "powerlaw.toml")
    same = ("engine", "data_options", "resolution", "batch_size", "epochs", "seed")
    assert {k: getattr(study, k) for k in same} == {k: getattr(power, k) for k in same}
    assert [m for m in study.models if m.startswith("nfnet")] == list(power.models)
    assert study.grid_for("nfnet") == power.lr_grid
    # The report compares the families where their compute ranges overlap: make sure they do, by a wide margin.
    span = {f: [min(c.flops for c in cells if c.family == f), max(c.flops for c in cells if c.family == f)]
            for f in families}  # fmt: skip
    low, high = max(s[0] for s in span.values()), min(s[1] for s in span.values())
    assert high > 4 * low


def test_the_quick_convnet_vs_vit_example_has_the_quickstarts_design() -> None:
    study = load_study(REPO / "examples" / "convnet-vs-vit-quick.toml")
    cells = plan_cells(study, plugin_loader.get_registry())
    assert {c.family for c in cells} == {"nfnet", "vit"} == set(study.start_lr) and study.rule == "two-trial"
    # Its header promises the quickstart's data and engine settings (so its NFNet cells repeat the quickstart's).
    quick = load_study(REPO / "examples" / "quickstart.toml")
    assert (study.engine, study.data_options, study.resolution) == (quick.engine, quick.data_options, quick.resolution)
