"""Plugin loading: built-ins via entry points, broken plugins, duplicates, strict mode, allowlist."""

from __future__ import annotations

import dataclasses
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
        name=name,
        family="toy",
        build=lambda **kw: None,
        count=lambda r, c: ModelCount(1, 1),
        train_resolution=8,
        eval_resolution=8,
        recipe=Recipe(),
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


def test_a_duplicate_name_is_left_out_of_the_later_plugin_with_a_warning_naming_both() -> None:
    warning = r"plugin 'second': model 'toy-a' left out \(already registered by plugin 'first'\)"
    with pytest.warns(PluginWarning, match=warning):
        loaded = load_plugins(
            [("first", _plugin("toy-a")), ("second", _plugin("toy-a", "toy-b"))], entry_points=_no_entry_points
        )
    assert loaded.registry.architectures.owner("toy-a") == "first"
    assert loaded.registry.architectures.owner("toy-b") == "second"  # the later plugin keeps its other names
    record = {r.name: r for r in loaded.records}["second"]
    assert record.registered == {"architectures": ["toy-b"]}
    assert record.error == "model 'toy-a': already registered by plugin 'first'"


def test_strict_mode_turns_a_duplicate_name_into_an_error_naming_both_plugins() -> None:
    with pytest.raises(DuplicateRegistrationError, match=r"plugin 'second' failed to load \(model 'toy-a'.*'first'"):
        load_plugins(
            [("first", _plugin("toy-a")), ("second", _plugin("toy-a"))], strict=True, entry_points=_no_entry_points
        )


def test_a_plugin_that_raises_while_registering_is_skipped_whole() -> None:
    with pytest.warns(PluginWarning, match=r"'broken'.*RuntimeError: boom"):
        loaded = load_plugins(
            [("ok", _plugin("toy-ok")), ("broken", _plugin("toy-half", raises=RuntimeError("boom")))],
            entry_points=_no_entry_points,
        )
    assert loaded.registry.architectures.names() == ["toy-ok"]  # no partial registration from 'broken'
    record = {r.name: r for r in loaded.records}["broken"]
    assert "boom" in record.error


def test_strict_mode_turns_a_broken_plugin_into_an_error_saying_it_failed_to_load() -> None:
    with pytest.raises(PluginError, match=r"^plugin 'broken' failed to load \(register_architectures raised: "):
        load_plugins([("broken", _plugin(raises=ValueError("bad")))], strict=True, entry_points=_no_entry_points)


@pytest.mark.parametrize("bad", ["not a spec", None, DatasetInfo(num_classes=1, split_sizes={}, resolution=8)])
def test_registering_something_that_is_not_a_spec_is_a_failure_of_that_plugin(bad: object) -> None:
    @hookspecs.hookimpl
    def register_architectures(register):  # noqa: ANN001, ANN202
        register(_arch("toy-before"))
        register(bad)

    plugin = types.SimpleNamespace(register_architectures=register_architectures)
    with pytest.warns(
        PluginWarning,
        match=r"'bad' skipped \(register_architectures raised: TypeError: register\(\) "
        r"takes ArchitectureSpec objects, got ",
    ):
        loaded = load_plugins([("ok", _plugin("toy-ok")), ("bad", plugin)], entry_points=_no_entry_points)
    assert loaded.registry.architectures.names() == ["toy-ok"]
    with pytest.raises(PluginError, match="plugin 'bad' failed to load"):
        load_plugins([("ok", _plugin("toy-ok")), ("bad", plugin)], strict=True, entry_points=_no_entry_points)


def test_a_plugin_calling_sys_exit_in_a_hook_is_skipped_but_ctrl_c_is_not_swallowed() -> None:
    with pytest.warns(PluginWarning, match=r"'quits' skipped \(register_architectures raised: SystemExit: 0\)"):
        loaded = load_plugins(
            [("ok", _plugin("toy-ok")), ("quits", _plugin(raises=SystemExit(0)))], entry_points=_no_entry_points
        )
    assert loaded.registry.architectures.names() == ["toy-ok"]
    with pytest.raises(KeyboardInterrupt):
        load_plugins([("ctrl-c", _plugin(raises=KeyboardInterrupt()))], entry_points=_no_entry_points)


def _counting(name: str, count: object) -> types.SimpleNamespace:
    @hookspecs.hookimpl
    def register_architectures(register):  # noqa: ANN001, ANN202
        register(dataclasses.replace(_arch(name), count=count))

    return types.SimpleNamespace(register_architectures=register_architectures)


def _count_fails_above_8(resolution: int, num_classes: int) -> ModelCount:
    if resolution > 8:
        raise RuntimeError("too large")
    return ModelCount(1, 1)


def test_a_model_whose_count_fails_is_left_out_with_a_warning_naming_model_and_plugin() -> None:
    def explode(resolution: int, num_classes: int) -> ModelCount:
        raise RuntimeError("count exploded")

    plugins = [("ok", _plugin("toy-ok")), ("bad", _counting("toy-broken", explode))]
    with pytest.warns(PluginWarning) as caught:
        loaded = load_plugins(plugins, entry_points=_no_entry_points)
    assert [str(w.message) for w in caught] == [
        "plugin 'bad': model 'toy-broken' left out (count(8, 1000) raised RuntimeError: count exploded)"
    ]
    assert loaded.registry.architectures.names() == ["toy-ok"]
    with pytest.raises(PluginError, match=r"plugin 'bad' failed to load \(model 'toy-broken': count\(8, 1000\)"):
        load_plugins(plugins, strict=True, entry_points=_no_entry_points)


def test_a_count_failing_at_another_resolution_raises_a_plugin_error_naming_model_and_plugin() -> None:
    loaded = load_plugins([("p", _counting("toy-small", _count_fails_above_8))], entry_points=_no_entry_points)
    count = loaded.registry.architecture("toy-small").count  # registered: its default resolution (8) counts
    assert count(8, 10) == ModelCount(1, 1)
    with pytest.raises(PluginError, match=r"^plugin 'p': model 'toy-small' count\(16, 10\) raised RuntimeError"):
        count(16, 10)


def test_unknown_model_suggests_close_matches() -> None:
    loaded = load_plugins([("a", _plugin("toy-alpha", "toy-beta"))], entry_points=_no_entry_points)
    with pytest.raises(UnknownNameError, match="did you mean 'toy-alpha'"):
        loaded.registry.architecture("toy-alpah")


def test_dataset_registration() -> None:
    info = DatasetInfo(num_classes=3, split_sizes={"train": 5, "eval": 2}, resolution=8)

    @hookspecs.hookimpl
    def register_datasets(register):  # noqa: ANN001, ANN202
        register(DatasetSpec(name="toyset", description="d", open=lambda split: [], info=lambda: info))

    loaded = load_plugins(
        [("d", types.SimpleNamespace(register_datasets=register_datasets))], entry_points=_no_entry_points
    )
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
    assert strict.returncode == 2
    assert strict.stderr.strip().splitlines()[-1] == (
        "Error: plugin 'fakebad' failed to load (import failed: ImportError: nope)"
    )


def test_allowlist_keeps_builtins_and_named_plugins_only(install_plugin) -> None:  # noqa: ANN001
    env = install_plugin(
        "fake-plugins", {"fakegood": "fake_plugin_good"}, {"fake_plugin_good": GOOD.format(name="toy-allow")}
    )
    names = lambda e: {row["name"] for row in json.loads(_cli(["plugins", "--json"], e).stdout)}  # noqa: E731
    assert "fakegood" not in names({**env, "CONVSCALE_PLUGINS": ""})
    assert "fakegood" in names({**env, "CONVSCALE_PLUGINS": "fakegood"})
    assert "nfnet" in names({**env, "CONVSCALE_PLUGINS": ""})


BAD_SPEC = """
from convscale_cli.hookspecs import hookimpl

@hookimpl
def register_architectures(register):
    register("not a spec")
"""

BROKEN_COUNT = """
from convscale_cli.hookspecs import hookimpl
from convscale_cli.registry import ArchitectureSpec, ModelCount

def count(resolution, num_classes):
    if resolution != 8:
        raise RuntimeError("count exploded")
    return ModelCount(10, 100)

@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(name="{name}", family="toy", build=lambda **kw: None, count=count,
                              train_resolution={res}, eval_resolution={res}))
"""


def test_a_plugin_registering_a_non_spec_leaves_every_command_working(install_plugin) -> None:  # noqa: ANN001
    env = install_plugin("fake-plugins", {"fakestr": "fake_plugin_str"}, {"fake_plugin_str": BAD_SPEC})
    for args in (["models", "--json"], ["plugins", "--json"], ["plan", "--budget", "10k-core-hours"]):
        result = _cli(args, env)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        if args[0] == "plugins":  # the diagnostic lists the failure in its rows, without a warning repeating it
            rows = {row["name"]: row for row in json.loads(result.stdout)}
            assert rows["fakestr"]["error"].startswith("register_architectures raised: TypeError: ")
            assert result.stderr == ""
        else:
            assert "Warning: plugin 'fakestr' skipped (register_architectures raised: TypeError: " in result.stderr
    strict = _cli(["--strict", "models"], env)
    assert strict.returncode == 2 and strict.stderr.strip().startswith("Error: plugin 'fakestr' failed to load")


def test_a_model_whose_count_fails_is_left_out_of_models_and_plan(install_plugin) -> None:  # noqa: ANN001
    env = install_plugin(
        "fake-plugins",
        {"fakecount": "fake_plugin_count", "fakeres": "fake_plugin_res"},
        {
            "fake_plugin_count": BROKEN_COUNT.format(name="toy-broken", res=16),
            "fake_plugin_res": BROKEN_COUNT.format(name="toy-res", res=8),
        },
    )
    warning = "Warning: plugin 'fakecount': model 'toy-broken' left out (count(16, 1000) raised RuntimeError: "
    listing = _cli(["models", "--json", "--family", "toy"], env)
    assert listing.returncode == 0, listing.stderr
    assert [row["name"] for row in json.loads(listing.stdout)] == ["toy-res"]
    assert listing.stderr.startswith(warning)
    # toy-res counts at its own resolution only: a listing at another one leaves it out instead of failing.
    other = _cli(["models", "toy", "--resolution", "16", "--json"], env)
    assert other.returncode == 0 and json.loads(other.stdout) == []
    assert "Warning: plugin 'fakeres': model 'toy-res' left out (count(16, 1000) raised RuntimeError: " in other.stderr
    plan = _cli(["plan", "--family", "toy", "--models", "toy-broken*", "--budget", "10k-core-hours"], env)
    assert plan.returncode == 2 and plan.stderr.startswith(warning) and "Traceback" not in plan.stderr
    # toy-res at the plan's resolution (JFT's 224 px): left out with a warning, then the one-line error.
    plan = _cli(["plan", "--family", "toy", "--models", "toy-res", "--budget", "10k-core-hours"], env)
    assert plan.returncode == 2 and "Traceback" not in plan.stderr
    assert "Warning: plugin 'fakeres': model 'toy-res' left out (count(224, 30000) raised RuntimeError" in plan.stderr
    assert plan.stderr.strip().splitlines()[-1] == (
        "Error: no model can be planned: each was left out (warnings above)"
    )
    strict = _cli(["--strict", "models"], env)
    assert strict.returncode == 2
    assert strict.stderr.strip() == (
        "Error: plugin 'fakecount' failed to load (model 'toy-broken': count(16, 1000) raised RuntimeError: "
        "count exploded)"
    )


def test_a_plugin_calling_sys_exit_at_import_is_skipped(install_plugin) -> None:  # noqa: ANN001
    env = install_plugin("fake-plugins", {"fakeexit": "fake_plugin_exit"}, {"fake_plugin_exit": "raise SystemExit(0)"})
    result = _cli(["plan", "--budget", "10k-core-hours"], env)
    assert result.returncode == 0 and "convscale pretrain --model" in result.stdout
    assert result.stderr.splitlines()[0] == "Warning: plugin 'fakeexit' skipped (import failed: SystemExit: 0)"
    assert _cli(["--strict", "models"], env).returncode == 2


def test_a_plugin_re_registering_a_builtin_name_is_a_warning_and_plugins_shows_it(install_plugin) -> None:  # noqa: ANN001
    env = install_plugin(
        "fake-plugins",
        {"fakedup": "fake_plugin_dup"},
        {"fake_plugin_dup": GOOD.format(name="nfnet-f0")},
    )
    warning = "Warning: plugin 'fakedup': model 'nfnet-f0' left out (already registered by plugin 'nfnet')"
    result = _cli(["models", "nfnet-f0", "--json"], env)
    assert result.returncode == 0 and result.stderr.strip() == warning
    assert {row["plugin"] for row in json.loads(result.stdout)} == {"nfnet"}  # the built-in keeps its name
    for args in (["plugins", "--json"], ["--strict", "plugins", "--json"]):  # the diagnostic command always lists
        listing = _cli(args, env)
        rows = {row["name"]: row for row in json.loads(listing.stdout)}
        assert rows["fakedup"]["error"] == "model 'nfnet-f0': already registered by plugin 'nfnet'"
    assert listing.returncode == 2 and listing.stderr.strip().splitlines()[-1].startswith("Error: plugin 'fakedup'")
    strict = _cli(["--strict", "models"], env)
    assert strict.returncode == 2
    assert strict.stderr.strip() == (
        "Error: plugin 'fakedup' failed to load (model 'nfnet-f0': already registered by plugin 'nfnet')"
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["models", "nfnet-tny"], "Error: no model matches 'nfnet-tny': did you mean 'nfnet-tiny-l"),
        (["datasets", "shapez"], "Error: no dataset matches 'shapez': did you mean 'shapes'?"),
        (["models", "nfnet-x*"], "Error: no model matches 'nfnet-x*'; run `convscale models` to list all"),
    ],
)
def test_a_pattern_matching_nothing_suggests_close_names(
    args: list[str], expected: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from convscale_cli.cli import main

    monkeypatch.setenv("CONVSCALE_PLUGINS", "")  # the built-ins only
    assert main(args) == 2
    assert capsys.readouterr().err.strip().startswith(expected)
