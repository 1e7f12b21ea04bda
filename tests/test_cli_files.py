"""Paths and files the CLI is pointed at: a file where a directory goes, names too long, undecodable or foreign files.

Each is one ``Error: ...`` line and exit code 2, never a traceback; commands that need no training only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from convscale_cli.cli import MESSAGE_CHARS, main


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_a_file_where_a_directory_goes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("x")
    args = ["pretrain", "--model", "nfnet-tiny-l0", "--dataset", "shapes", "--steps", "1"]
    assert main([*args, "--out", str(tmp_path / "afile" / "run")]) == 2
    assert error_line(capsys) == f"Error: Not a directory: '{tmp_path / 'afile' / 'run'}'"
    assert main([*args, "--out", str(tmp_path / ("y" * 300))]) == 2
    assert error_line(capsys).startswith("Error: File name too long: ")


def test_a_long_value_is_shortened_in_the_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--budget", "x" * 20_000]) == 2
    line = error_line(capsys)
    assert len(line) <= MESSAGE_CHARS + 30 and "characters]" in line


def test_weights_and_checkpoints_that_are_not_what_they_claim(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "weights").mkdir()
    assert main(["import-weights", "timm", "dm_nfnet_f0", str(tmp_path / "weights"), "--out", str(tmp_path / "o")]) == 2
    assert "is a directory, expected a .safetensors file" in error_line(capsys)
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "model.json").write_bytes(b"\xff\xfe")
    args = ["finetune", "--from", str(fake), "--dataset", "digits", "--steps", "1", "--out", str(tmp_path / "ft")]
    assert main(args) == 2
    assert "is not valid JSON" in error_line(capsys)


def test_foreign_files_in_a_runs_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    (runs / "a").mkdir(parents=True)
    (runs / "a" / "summary.json").mkdir()  # a directory where a summary goes: skipped, not a crash
    (runs / "tuning.jsonl").write_bytes(b"\xff\xfe\x00" + json.dumps({"model": 1}).encode())
    assert main(["report", str(runs)]) == 2
    assert error_line(capsys).endswith("(1 skipped: a: summary.json is not a file)")
    (runs / "tuning.jsonl").unlink()
    (runs / "tuning.jsonl").mkdir()
    args = ["tune-lr", "--model", "nfnet-tiny-l0", "--dataset", "shapes", "--epochs", "1", "--runs", str(runs)]
    assert main(args) == 2  # refused before any training: the decision could not be recorded
    assert "tuning.jsonl' is not a file" in error_line(capsys)
    assert sorted(p.name for p in runs.iterdir()) == ["a", "tuning.jsonl"]


def test_data_convert_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "src" / "train" / "a").mkdir(parents=True)
    assert main(["data", "convert", str(tmp_path / "src"), "--out", str(tmp_path / "o")]) == 2
    assert error_line(capsys).startswith("Error: ")


def test_tune_lr_names_the_first_real_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("x")
    base = ["tune-lr", "--runs", str(tmp_path / "afile")]  # no --dataset: inferring it would fail first
    assert main([*base, "--model", "nfnet-tny-l0", "--epochs", "0"]) == 2
    assert "unknown model 'nfnet-tny-l0': did you mean 'nfnet-tiny-l0'" in error_line(capsys)
    assert main([*base, "--model", "nfnet-tiny-l0", "--epochs", "0"]) == 2
    assert error_line(capsys) == "Error: --epochs must be a positive number, got 0.0"
    assert main([*base, "--model", "nfnet-tiny-l0", "--epochs", "1"]) == 2
    assert error_line(capsys) == f"Error: --runs '{tmp_path / 'afile'}' is a file, expected a runs directory"
