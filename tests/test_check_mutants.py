"""``tools/check_mutants.py``: its mutants still apply to the code, and a mutated file is always put back."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("check_mutants", REPO / "tools" / "check_mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script's classes are made
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_every_mutant_still_applies_once_and_names_existing_tests(tool) -> None:
    for mutant in tool.MUTANTS:
        source = (REPO / mutant.path).read_text()
        assert source.count(mutant.old) == 1, f"{mutant.name}: {mutant.old!r} in {mutant.path}"
        assert mutant.old != mutant.new
        for test in mutant.tests:
            path, name = test.split("::")
            assert f"def {name}(" in (REPO / path).read_text(), test


@pytest.mark.parametrize(("outcome", "killed"), [(1, True), (0, False)])
def test_a_mutant_is_run_on_the_mutated_file_and_the_file_restored(
    tool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outcome: int, killed: bool
) -> None:
    (tmp_path / "m.py").write_bytes(b"x = 1\r\ny = 2\n")
    seen = []

    def fake_pytest(tests):
        seen.append(((tmp_path / "m.py").read_text(), tests))
        return outcome

    monkeypatch.setattr(tool, "REPO", tmp_path)
    monkeypatch.setattr(tool, "_pytest", fake_pytest)
    mutant = tool.Mutant(name="m", path="m.py", old="y = 2", new="y = 3", tests=("t",))
    assert tool.run_mutant(mutant) is killed
    assert seen == [("x = 1\ny = 3\n", ("t",))]
    assert (tmp_path / "m.py").read_bytes() == b"x = 1\r\ny = 2\n"  # byte for byte, line endings included


def test_an_interrupted_check_still_restores_the_file(tool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "m.py").write_text("y = 2\n")

    def interrupted(tests):
        raise KeyboardInterrupt

    monkeypatch.setattr(tool, "REPO", tmp_path)
    monkeypatch.setattr(tool, "_pytest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tool.run_mutant(tool.Mutant(name="m", path="m.py", old="y = 2", new="y = 3", tests=("t",)))
    assert (tmp_path / "m.py").read_text() == "y = 2\n"
