"""Load-time checks of what a plugin registers (docs/plugins.md): counts, ``build``'s signature, dataset specs."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from convscale_cli import hookspecs
from convscale_cli import plugins as plugin_loader
from convscale_cli.cli import main
from convscale_cli.cli.registry_cmds import format_params
from convscale_cli.errors import PluginError, UsageError
from convscale_cli.plugins import ModelBuildError, ModelCountError, PluginWarning, load_plugins
from convscale_cli.recipe import Recipe
from convscale_cli.registry import ArchitectureSpec, DatasetInfo, DatasetSpec, ModelCount
from convscale_cli.spec_checks import architecture_problem, count_problem, dataset_problem


def _build(*, num_classes: int, dtype: str = "float32", drop_rate: float = 0.0, stochdepth_rate: float = 0.0) -> Any:
    return None


def _arch(name: str = "toy-a", **changes: Any) -> ArchitectureSpec:
    spec = ArchitectureSpec(
        name=name,
        family="toy",
        build=_build,
        count=lambda r, c: ModelCount(10, 100),
        train_resolution=8,
        eval_resolution=8,
    )
    return dataclasses.replace(spec, **changes)


INFO = DatasetInfo(num_classes=2, split_sizes={"train": 10, "eval": 5}, resolution=8)


def _data(name: str = "toyset", **changes: Any) -> DatasetSpec:
    spec = DatasetSpec(
        name=name,
        description="",
        open=lambda split, size=10: [],
        info=lambda size=10: INFO,
        options={"size": 10},
        static_info=INFO,
    )
    return dataclasses.replace(spec, **changes)


def _plugin(*specs: ArchitectureSpec | DatasetSpec) -> types.SimpleNamespace:
    @hookspecs.hookimpl
    def register_architectures(register):  # noqa: ANN001, ANN202
        for spec in specs:
            if isinstance(spec, ArchitectureSpec):
                register(spec)

    @hookspecs.hookimpl
    def register_datasets(register):  # noqa: ANN001, ANN202
        for spec in specs:
            if isinstance(spec, DatasetSpec):
                register(spec)

    return types.SimpleNamespace(register_architectures=register_architectures, register_datasets=register_datasets)


def _load(*specs: ArchitectureSpec | DatasetSpec, strict: bool = False) -> Any:
    return load_plugins(
        [("ok", _plugin(_arch("toy-ok"))), ("third", _plugin(*specs))], strict=strict, entry_points=lambda: []
    )


def _left_out(spec: ArchitectureSpec | DatasetSpec, expected: str) -> None:
    """``spec`` is left out with a warning naming the plugin, the spec and ``expected``; strict mode raises it."""
    kind = "model" if isinstance(spec, ArchitectureSpec) else "dataset"
    with pytest.warns(PluginWarning) as caught:
        loaded = _load(spec)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and messages[0].startswith(f"plugin 'third': {kind} {spec.name!r} left out (")
    assert expected in messages[0]
    table = loaded.registry.architectures if kind == "model" else loaded.registry.datasets
    assert spec.name not in table and "toy-ok" in loaded.registry.architectures  # the others keep working
    with pytest.raises(PluginError, match=rf"^plugin 'third' failed to load \({kind} '{spec.name}': ") as error:
        _load(spec, strict=True)
    assert expected in str(error.value)


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        (ModelCount(10, 0), "count(8, 1000) returned 0 MACs; counts must be positive and finite"),
        (ModelCount(10, -5), "count(8, 1000) returned -5 MACs; counts must be positive and finite"),
        (ModelCount(-10, 100), "count(8, 1000) returned -10 parameters; counts must be positive and finite"),
        (ModelCount(10, math.nan), "returned nan MACs"),
        (ModelCount(10, math.inf), "returned inf MACs"),
        (ModelCount(10, "100"), "returned MACs '100', not a number"),  # type: ignore[arg-type]
    ],
)
def test_a_count_that_is_not_positive_and_finite_is_left_out(count: ModelCount, expected: str) -> None:
    _left_out(_arch("toy-bad", count=lambda r, c: count), expected)


def test_a_count_that_is_zero_at_another_resolution_is_a_model_count_error_not_a_division_by_zero() -> None:
    loaded = _load(_arch("toy-small", count=lambda r, c: ModelCount(10, 100 if r <= 8 else 0)))
    count = loaded.registry.architecture("toy-small").count
    assert count(8, 10) == ModelCount(10, 100)
    with pytest.raises(ModelCountError, match=r"^plugin 'third': model 'toy-small' count\(64, 10\) returned 0 MACs"):
        count(64, 10)


def test_plan_leaves_out_a_model_whose_count_is_zero_at_the_planned_resolution(install_plugin) -> None:  # noqa: ANN001
    source = """
from convscale_cli.hookspecs import hookimpl
from convscale_cli.registry import ArchitectureSpec, ModelCount

def build(*, num_classes, dtype="float32", drop_rate=0.0, stochdepth_rate=0.0):
    return None

@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(name="toy-zero", family="toy", build=build, train_resolution=8, eval_resolution=8,
                              count=lambda r, c: ModelCount(10, 100 if r == 8 else 0)))
"""
    env = install_plugin("fake-zero", {"fakezero": "fake_plugin_zero"}, {"fake_plugin_zero": source})
    args = [sys.executable, "-m", "convscale_cli", "plan", "--family", "toy", "--budget", "10k-core-hours"]
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        "Warning: plugin 'fakezero': model 'toy-zero' left out (count(224, 30000) returned 0 MACs; counts must be "
        "positive and finite)",
        "Error: no model can be planned: each was left out (warnings above)",
    ]


def _no_drop_rate(*, num_classes: int, dtype: str = "float32") -> None:
    return None


def _needs_width(
    *, num_classes: int, width: int, dtype: str = "float32", drop_rate: float = 0.0, stochdepth_rate: float = 0.0
) -> None:
    return None


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"build": _no_drop_rate},
            "build does not accept the documented keyword arguments (got an unexpected keyword "
            "argument 'drop_rate'); see docs/plugins.md",
        ),
        ({"build": lambda num_classes, dtype, drop_rate, stochdepth_rate: None}, "missing a required argument"),
        ({"build": _needs_width}, "missing a required argument: 'width'"),
        ({"build": _build, "options": {"width": 8}}, "unexpected keyword argument 'width'"),
        ({"count": lambda resolution: ModelCount(1, 1)}, "count does not accept (resolution, num_classes)"),
        ({"family": ""}, "family '' is not a non-empty string"),
        ({"train_resolution": 0}, "train_resolution 0 is not a positive integer"),
        ({"train_resolution": 30, "resolution_multiple": 16}, "train_resolution 30 breaks its own"),
        ({"tags": "paper"}, "tags 'paper' is not a tuple of strings"),
        ({"recipe": {"lr": 0.1}}, "recipe is a dict, not convscale_cli.recipe.Recipe"),
        ({"default_num_classes": 0}, "default_num_classes 0 is not a positive integer"),
        ({"recipe": Recipe(optimizer="adam")}, "recipe.optimizer 'adam' is not one of sgd, adamw, adafactor"),  # type: ignore[arg-type]
        ({"recipe": Recipe(no_decay=("bias(",))}, "recipe.no_decay pattern 'bias(' is not a regular expression"),
        ({"recipe": Recipe(agc_exclude="head")}, "recipe.agc_exclude 'head' is not a tuple of regular expressions"),  # type: ignore[arg-type]
    ],
)
def test_an_architecture_breaking_the_contract_is_left_out_naming_plugin_model_and_problem(
    changes: dict[str, Any], expected: str
) -> None:
    _left_out(_arch("toy-bad", **changes), expected)


def test_build_with_options_and_kwargs_is_accepted() -> None:
    assert architecture_problem(_arch(build=_needs_width, options={"width": 8})) is None
    assert architecture_problem(_arch(build=lambda **kw: None)) is None


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"open": lambda: []}, "open does not accept (split, **options)"),
        (
            {"open": lambda split: []},
            "open does not accept (split, **options) (got an unexpected keyword argument 'size')",
        ),
        ({"info": lambda: INFO}, "info does not accept (**options)"),
        ({"static_info": DatasetInfo(2, {"train": 10}, 8)}, "static_info.split_sizes['eval'] is None"),
        ({"static_info": DatasetInfo(0, {"train": 10, "eval": 1}, 8)}, "static_info.num_classes 0"),
        ({"static_info": {"num_classes": 2}}, "static_info is a dict, not DatasetInfo"),
        ({"augment": ["flip"]}, "augment ['flip'] is not a mapping"),
        ({"eval_crop": 1.5}, "eval_crop 1.5 is not a fraction in (0, 1]"),
        ({"open": None}, "open is not callable"),
    ],
)
def test_an_incomplete_dataset_spec_is_left_out_naming_plugin_dataset_and_problem(
    changes: dict[str, Any], expected: str
) -> None:
    _left_out(_data("toyset-bad", **changes), expected)


def test_every_builtin_spec_keeps_the_contract_and_counts_positively_at_its_defaults() -> None:
    loaded = load_plugins(strict=True)
    assert len(loaded.registry.architectures) > 10 and len(loaded.registry.datasets) >= 4
    for spec in loaded.registry.architectures:
        assert architecture_problem(spec) is None, spec.name
        count = spec.count(spec.eval_resolution, spec.default_num_classes)
        assert count_problem(count) is None, spec.name
    for data in loaded.registry.datasets:
        assert dataset_problem(data) is None, data.name


def test_an_unknown_name_in_the_allowlist_is_a_warning_and_a_strict_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVSCALE_PLUGINS", "convnxt")
    with pytest.warns(PluginWarning, match=r"plugin 'convnxt' skipped \(named in CONVSCALE_PLUGINS but not installed"):
        loaded = load_plugins()
    assert {r.name: r.source for r in loaded.records}["convnxt"] == "CONVSCALE_PLUGINS"
    with pytest.raises(PluginError, match="^plugin 'convnxt' failed to load"):
        load_plugins(strict=True)


def test_strict_models_with_a_misspelt_allowlist_exits_2_naming_it(install_plugin) -> None:  # noqa: ANN001
    source = "from convscale_cli.hookspecs import hookimpl\n"
    env = install_plugin("fake-convnext", {"convnext": "fake_plugin_convnext"}, {"fake_plugin_convnext": source})
    env["CONVSCALE_PLUGINS"] = "convnxt"
    result = subprocess.run(
        [sys.executable, "-m", "convscale_cli", "--strict", "models"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "Error: plugin 'convnxt' failed to load (named in CONVSCALE_PLUGINS but not installed; "
        "did you mean 'convnext'?)"
    )
    listing = subprocess.run(
        [sys.executable, "-m", "convscale_cli", "--strict", "plugins"], capture_output=True, text=True, env=env
    )
    # The diagnostic command shows the table and one error line, without a warning repeating a row.
    assert listing.returncode == 2 and "convnxt" in listing.stdout
    assert listing.stderr.strip().splitlines() == [
        "Error: plugin 'convnxt' failed to load (named in CONVSCALE_PLUGINS but not installed; did you mean "
        "'convnext'?)"
    ]


def test_models_json_shows_each_models_build_options(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVSCALE_PLUGINS", "")
    assert main(["models", "nfnet-f0", "--json"]) == 0
    row = {r["name"]: r for r in json.loads(capsys.readouterr().out)}["nfnet-f0"]
    assert row["options"]["activation"] == "gelu" and row["options"]["stochdepth_rate"] == 0.0


@pytest.mark.parametrize(
    ("params", "shown"), [(25_600_000, "25.6M"), (999_999, "1.0M"), (45_123, "45.1k"), (1_000, "1.0k"), (512, "512")]
)
def test_a_tiny_model_never_shows_zero_million_parameters(params: int, shown: str) -> None:
    assert format_params(params) == shown


def test_pretrain_with_a_build_missing_drop_rate_is_one_line_naming_plugin_and_model(
    install_plugin: Callable[..., dict[str, str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = """
from convscale_cli.hookspecs import hookimpl
from convscale_cli.registry import ArchitectureSpec, ModelCount

def build(*, num_classes, dtype="float32"):
    raise AssertionError("never called")

@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(name="toy-nodrop", family="toy", build=build, train_resolution=8, eval_resolution=8,
                              count=lambda r, c: ModelCount(10, 100)))
"""
    install_plugin("fake-nodrop", {"fakenodrop": "fake_plugin_nodrop"}, {"fake_plugin_nodrop": source})
    out = tmp_path / "run"
    code = main(["pretrain", "--model", "toy-nodrop", "--dataset", "shapes", "--steps", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert err[0] == (
        "Warning: plugin 'fakenodrop': model 'toy-nodrop' left out (build does not accept the documented keyword "
        "arguments (got an unexpected keyword argument 'drop_rate'); see docs/plugins.md)"
    )
    assert err[-1].startswith("Error: unknown model 'toy-nodrop'")
    assert not out.exists()  # nothing was written for a model that cannot be built
    monkeypatch.setenv("CONVSCALE_STRICT_PLUGINS", "0")  # restored after the test; --strict sets it to 1
    plugin_loader.reset()
    args = ["--strict", "pretrain", "--model", "toy-nodrop", "--dataset", "shapes", "--steps", "1", "--out", str(out)]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (
        "Error: plugin 'fakenodrop' failed to load (model 'toy-nodrop': build does not accept the documented keyword "
        "arguments (got an unexpected keyword argument 'drop_rate'); see docs/plugins.md)"
    )


_FAILING_BUILD = """
from convscale_cli.errors import UsageError
from convscale_cli.hookspecs import hookimpl
from convscale_cli.registry import ArchitectureSpec, ModelCount

def build(*, num_classes, dtype="float32", drop_rate=0.0, stochdepth_rate=0.0, width=1):
    if width == 0:
        raise UsageError("width must be positive, got 0")
    {raise_}

@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(name="toy-broken", family="toy", build=build, train_resolution=8, eval_resolution=8,
                              count=lambda r, c: ModelCount(10, 100), options={{"width": 1}}))
"""


@pytest.mark.parametrize(
    ("raise_", "reason"),
    [("return 1 / 0", "ZeroDivisionError: division by zero"), ("return {}['depth']", "KeyError: 'depth'")],
)
def test_a_build_that_raises_is_one_line_naming_plugin_and_model(
    install_plugin: Callable[..., dict[str, str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    raise_: str,
    reason: str,
) -> None:
    source = _FAILING_BUILD.format(raise_=raise_)
    install_plugin("fake-broken", {"fakebroken": "fake_plugin_broken"}, {"fake_plugin_broken": source})
    build = plugin_loader.get_registry().architecture("toy-broken").build
    with pytest.raises(ModelBuildError, match=r"^plugin 'fakebroken': model 'toy-broken' failed to build: "):
        build(num_classes=10)
    with pytest.raises(UsageError, match="^width must be positive"):  # the plugin's own one-line errors pass through
        build(num_classes=10, width=0)
    args = ["pretrain", "--model", "toy-broken", "--dataset", "shapes", "--steps", "1", "--batch-size", "8"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"Error: plugin 'fakebroken': model 'toy-broken' failed to build: {reason}"


def test_a_builtin_build_keeps_its_own_exceptions() -> None:
    """A built-in model's exception is convscale's bug: it keeps its traceback instead of blaming a plugin."""
    build = plugin_loader.get_registry().architecture("nfnet-test").build
    with pytest.raises(ValueError, match="invalid literal for int") as raised:
        build(num_classes="ten")
    assert not isinstance(raised.value, ModelBuildError)  # what a third-party plugin's build would raise instead


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("drop_rate=0.1", "model option 'drop_rate' is set by the run, not as a model option: use --set drop_rate=P"),
        ("stochdepth_rate=0.1", "use --set stochdepth_rate=P instead of model_options.stochdepth_rate"),
        ("dtype=float32", "use --precision bf16|fp32 instead of model_options.dtype"),
        ("num_classes=3", "use --set num_classes=N instead of model_options.num_classes"),
        ("actvation=relu", "unknown nfnet-test model option 'actvation': did you mean 'activation'"),
    ],
)
def test_model_options_are_checked_against_the_declared_options_before_the_run_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, expected: str
) -> None:
    """nfnet-test declares drop_rate among its options; passing it again used to crash with 'multiple values'."""
    out = tmp_path / "run"
    args = ["pretrain", "--model", "nfnet-test", "--dataset", "shapes", "--steps", "1", "--batch-size", "8"]
    assert main([*args, "--set", f"model_options.{option}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: ") and expected in err and "\n" not in err
    assert not out.exists()  # refused before the run directory is claimed
