"""Typed TOML configs: unknown keys, wrong types and malformed files give one-line errors naming the key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Literal

import pytest

from convscale_cli.config import diff, from_dict, load_config, merge, parse_override, to_dict
from convscale_cli.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float = 1.6
    agc_clip: float | None = 0.01
    kind: Literal["sgd", "adamw"] = "sgd"


@dataclasses.dataclass(frozen=True)
class Run:
    model: str = "nfnet-f0"
    epochs: float = 1.0
    batch_size: int = 4096
    fsdp: bool = False
    depths: tuple[int, ...] = (1, 2, 6, 3)
    optim: Optim = dataclasses.field(default_factory=Optim)

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_toml_with_overrides_resolves_to_a_frozen_dataclass(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'model = "nfnet-f1"\nepochs = 2\ndepths = [1, 1]\n[optim]\nlr = 0.8\n')
    config = load_config(Run, path, {"optim.kind": "adamw", "batch_size": 256})
    assert config == Run(model="nfnet-f1", epochs=2.0, batch_size=256, depths=(1, 1), optim=Optim(lr=0.8, kind="adamw"))
    assert isinstance(config.epochs, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3  # type: ignore[misc]
    assert to_dict(config)["depths"] == [1, 1]


def test_unknown_key_is_named_with_close_matches() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'batchsize'; did you mean 'batch_size'\?"):
        from_dict(Run, {"batchsize": 8})
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'; did you mean 'optim.lr'\?"):
        from_dict(Run, {"optim": {"lrr": 1.0}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"batch_size": "big"}, "batch_size = 'big' has the wrong type: expected int, got str"),
        ({"batch_size": 1.5}, "batch_size = 1.5 has the wrong type: expected int"),
        ({"fsdp": 1}, "fsdp = 1 has the wrong type: expected bool"),
        ({"epochs": True}, "epochs = True has the wrong type: expected float"),
        ({"optim": {"kind": "sdg"}}, "optim.kind = 'sdg' is not one of 'sgd', 'adamw'; did you mean 'sgd'?"),
        ({"optim": {"agc_clip": "x"}}, "optim.agc_clip = 'x' has the wrong type"),
        ({"depths": [1, "two"]}, "depths[1] = 'two' has the wrong type"),
        ({"optim": 3}, "optim = 3 has the wrong type: expected a table"),
        ({"epochs": -1}, "invalid config: epochs must be > 0, got -1"),
    ],
)
def test_wrong_values_are_rejected(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(Run, data)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_malformed_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="malformed TOML in .*run.toml"):
        load_config(Run, _toml(tmp_path, "model = [unclosed\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Run, tmp_path / "nope.toml")


def test_overrides_parse_toml_values_and_bare_words() -> None:
    assert parse_override("epochs=0.25") == ("epochs", 0.25)
    assert parse_override("model = nfnet-f3") == ("model", "nfnet-f3")
    assert parse_override("depths=[1,2]") == ("depths", [1, 2])
    assert parse_override("fsdp=true") == ("fsdp", True)
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("epochs")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (".".join(["a"] * 100_000) + "=1", f"key '{'a.' * 20}...' has 100000 levels; at most 8"),
        ("." * 100_000 + "=1", "has 100001 levels; at most 8"),
        ("a" * 100_000 + "=1", f"key '{'a' * 40}...' is 100000 characters long; at most 200"),
        ("x=" + "[" * 100_000 + "]" * 100_000, "the value of x nests arrays or tables too deeply"),
    ],
)
def test_an_override_too_deep_or_too_long_is_refused_at_once(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)) as error:
        parse_override(text)
    assert len(str(error.value)) < 200  # the message quotes the key, not all of it


def test_a_deep_override_reaching_a_plugin_is_one_line_not_a_recursion_error(capsys: pytest.CaptureFixture) -> None:
    """shapes' own check quoted the 100k-level value with repr(), which raised RecursionError (exit 1)."""
    from convscale_cli.cli import main

    deep = ".".join(["a"] * 100_000)
    args = ["pretrain", "--model", "nfnet-test", "--dataset", "shapes", "--steps", "1", "--out", "unused"]
    assert main([*args, "--set", f"data_options.size.{deep}=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: override key 'data_options.size.a.a.a") and err.count("\n") == 1


def test_merge_and_diff_name_the_changed_keys() -> None:
    a = to_dict(Run())
    b = to_dict(from_dict(Run, merge(a, {"optim.lr": 0.4, "epochs": 2})))
    assert diff(a, b) == ["epochs", "optim.lr"]
    assert diff(a, a) == []


@pytest.mark.parametrize(
    "given, message",
    [
        ({"multi_label": "maybe"}, "shapes data option multi_label = 'maybe' has the wrong type: expected bool"),
        ({"multi_label": "ture"}, "multi_label = 'ture' has the wrong type: expected bool"),
        ({"clutter": "abc"}, "shapes data option clutter = 'abc' has the wrong type: expected float"),
        ({"size": 1.5}, "size = 1.5 has the wrong type: expected int"),
        ({"name": 3}, "name = 3 has the wrong type: expected str"),
        ({"sizee": 3}, "unknown shapes data option 'sizee': did you mean 'size'?"),
    ],
)
def test_options_are_typed_by_their_defaults(given: dict, message: str) -> None:
    from convscale_cli.config import check_options
    from convscale_cli.errors import UsageError

    defaults = {"size": 10, "clutter": 1.0, "multi_label": False, "name": "x", "root": None}
    with pytest.raises(UsageError) as info:
        check_options("shapes data option", given, defaults)
    assert message in str(info.value)


def test_options_of_the_right_type_pass() -> None:
    from convscale_cli.config import check_options

    defaults = {"size": 10, "clutter": 1.0, "multi_label": False, "root": None}
    check_options("shapes data option", {"size": 3, "clutter": 2, "multi_label": True, "root": "/d"}, defaults)
    check_options("shapes data option", {"root": 5}, defaults)  # a default of None takes anything
