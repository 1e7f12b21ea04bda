"""Plugin loading: built-ins via entry points, broken plugins, duplicates, strict mode, allowlist."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

from convscale_cli import hookspecs
from convscale_cli.errors import DuplicateRegistrationError, PluginError, UnknownNameError
from convscale_cli.plugins import PluginWarning, load_plugins
from convscale_cli.recipe import Recipe
from convscale_cli.registry import ArchitectureSpec, DatasetInfo, DatasetSpec, ModelCount

GOOD = """
from convscale_cli.hookspecs import hookimpl
from convscale_cli.registry import ArchitectureSpec, ModelCount

@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(name="{name}", family="toy", build=lambda **kw: None,
                              count=lambda r, c: ModelCount(10, 100), train_resolution=8, eval_resolution=8))
"""


def _arch(name: str) -> ArchitectureSpec:
    return ArchitectureSpec(
        name=name, family="toy", build=lambda **kw: None, count=lambda r, c: ModelCount(1, 1),
        train_resolution=8, eval_resolution=8, recipe=Recipe(),
    )


def _plugin(*names: str, raises: Exception | None = None) -> types.SimpleNamespace:
    @hookspecs.hookimpl
    def register_architectures(register):  # noqa: ANN001, ANN202
        for name in names:
            register(_arch(name))
        if raises is not None:
            raise raises

    return types.SimpleNamespace(register_architectures=register_architectures)


def _no_entry_points() -> list:
    return []


def test_hookimpls_match_hookspecs() -> None:
    """A misspelled hook implementation in any installed plugin fails here (pluggy's check_pending)."""
    loaded = load_plugins()
    loaded.manager.check_pending()


def test_builtins_come_from_entry_points_of_this_distribution() -> None:
    records = {r.name: r for r in load_plugins().records}
    assert {"nfnet", "vit", "shapes", "digits", "imagefolder", "arrayrecord"} <= set(records)
    assert all(records[n].builtin for n in ("nfnet", "vit", "shapes", "digits"))


def test_plugins_registered_in_code_populate_the_registry() -> None:
    loaded = load_plugins([("a", _plugin("toy-a", "toy-b"))], entry_points=_no_entry_points)
    assert loaded.registry.architectures.names() == ["toy-a", "toy-b"]
    assert loaded.registry.architectures.owner("toy-b") == "a"


def test_duplicate_names_raise_naming_both_plugins() -> None:
    with pytest.raises(DuplicateRegistrationError, match=r"'toy-a'.*'first'.*'second'"):
        load_plugins([("first", _plugin("toy-a")), ("second", _plugin("toy-a"))], entry_points=_no_entry_points)


def test_a_plugin_that_raises_while_registering_is_skipped_whole() -> None:
    with pytest.warns(PluginWarning, match=r"'broken'.*RuntimeError: boom"):
        loaded = load_plugins(
            [("ok", _plugin("toy-ok")), ("broken", _plugin("toy-half", raises=RuntimeError("boom")))],
            entry_points=_no_entry_points,
        )
    assert loaded.registry.architectures.names() == ["toy-ok"]  # no partial registration from 'broken'
    record = {r.name: r for r in loaded.records}["broken"]
    assert "boom" in record.error


def test_strict_mode_turns_a_broken_plugin_into_an_error() -> None:
    with pytest.raises(PluginError, match="broken"):
        load_plugins([("broken", _plugin(raises=ValueError("bad")))], strict=True, entry_points=_no_entry_points)


def test_unknown_model_suggests_close_matches() -> None:
    loaded = load_plugins([("a", _plugin("toy-alpha", "toy-beta"))], entry_points=_no_entry_points)
    with pytest.raises(UnknownNameError, match="did you mean 'toy-alpha'"):
        loaded.registry.architecture("toy-alpah")


def test_dataset_registration() -> None:
    info = DatasetInfo(num_classes=3, split_sizes={"train": 5, "eval": 2}, resolution=8)

    @hookspecs.hookimpl
    def register_datasets(register):  # noqa: ANN001, ANN202
        register(DatasetSpec(name="toyset", description="d", open=lambda split: [], info=lambda: info))

    loaded = load_plugins([("d", types.SimpleNamespace(register_datasets=register_datasets))],
                          entry_points=_no_entry_points)
    assert loaded.registry.dataset("toyset").info() == info
    with pytest.raises(UnknownNameError, match="did you mean 'toyset'"):
        loaded.registry.dataset("toyst")


def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "convscale_cli", *args], capture_output=True, text=True, env=env)


def test_entry_point_plugin_that_fails_to_import_leaves_the_cli_working(install_plugin) -> None:  # noqa: ANN001
    env = install_plugin(
        "fake-plugins",
        {"fakegood": "fake_plugin_good", "fakebad": "fake_plugin_bad"},
        {"fake_plugin_good": GOOD.format(name="toy-from-entry-point"), "fake_plugin_bad": "raise ImportError('nope')"},
    )
    result = _cli(["models", "--json"], env)
    assert result.returncode == 0, result.stderr
    assert "toy-from-entry-point" in {row["name"] for row in json.loads(result.stdout)}
    warnings = [line for line in result.stderr.splitlines() if "fakebad" in line]
    assert warnings == ["Warning: plugin 'fakebad' skipped (import failed: ImportError: nope)"]

    listing = {row["name"]: row for row in json.loads(_cli(["plugins", "--json"], env).stdout)}
    assert listing["fakebad"]["error"] == "import failed: ImportError: nope"
    assert listing["fakegood"]["source"] == "entry point (fake-plugins)"
    assert listing["fakegood"]["version"] == "1.2.3"
    assert listing["fakegood"]["hooks"] == ["register_architectures"]

    strict = _cli(["--strict", "models"], env)
    assert strict.returncode == 2 and strict.stderr.strip().splitlines()[-1].startswith("Error: plugin 'fakebad'")


def test_allowlist_keeps_builtins_and_named_plugins_only(install_plugin) -> None:  # noqa: ANN001
    env = install_plugin("fake-plugins", {"fakegood": "fake_plugin_good"},
                         {"fake_plugin_good": GOOD.format(name="toy-allow")})
    names = lambda e: {row["name"] for row in json.loads(_cli(["plugins", "--json"], e).stdout)}  # noqa: E731
    assert "fakegood" not in names({**env, "CONVSCALE_PLUGINS": ""})
    assert "fakegood" in names({**env, "CONVSCALE_PLUGINS": "fakegood"})
    assert "nfnet" in names({**env, "CONVSCALE_PLUGINS": ""})


def test_duplicate_registration_from_entry_points_is_a_one_line_error(install_plugin) -> None:  # noqa: ANN001
    env = install_plugin(
        "fake-plugins",
        {"fakeone": "fake_plugin_one", "faketwo": "fake_plugin_two"},
        {"fake_plugin_one": GOOD.format(name="toy-dup"), "fake_plugin_two": GOOD.format(name="toy-dup")},
    )
    result = _cli(["models"], env)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "Error: model 'toy-dup' is registered by both plugin 'fakeone' and plugin 'faketwo'; "
        "uninstall one or restrict CONVSCALE_PLUGINS"
    )
