"""Bad values on every path (plan, pretrain, finetune, tune-lr, sweep): exit 2 and one ``Error:`` line, never a
traceback; NaN, inf, out-of-range seeds and absurd budgets included. None of these tests trains anything."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from convscale_cli import planner as P
from convscale_cli.budget import MAX_BUDGET_FLOPS, parse_budget
from convscale_cli.cli import main
from convscale_cli.config import from_dict, load_config
from convscale_cli.engine.config import PretrainConfig
from convscale_cli.errors import ConfigError, UsageError
from convscale_cli.finetune.config import FinetuneConfig
from convscale_cli.sweep import StudyConfig, load_study


def _fails(argv: list[str], capsys: Any, *needles: str) -> str:
    """Run the CLI; it must exit 2 with one ``Error:`` line holding every needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


# --- 1. budgets: finite, at most MAX_BUDGET_FLOPS, and tiny ones get the smallest-feasible error ---------------------


@pytest.mark.parametrize("budget", ["1e308-flops", "1e300-core-hours", "1e305-h100-hours", "1e290-tpu-v3-core-hours",
                                    "1e300-cpu-hours", "1.1e30-flops"])  # fmt: skip
def test_plan_refuses_absurdly_large_budgets(budget: str, capsys: Any) -> None:
    _fails(["plan", "--budget", budget], capsys, f"budget {budget!r} is too large", "1e+30 model FLOPs")


@pytest.mark.parametrize("budget", ["1e-300-flops", "5e-324-flops", "1e-300-core-hours"])
def test_plan_says_a_vanishing_budget_is_below_the_smallest_feasible_one(budget: str, capsys: Any) -> None:
    _fails(["plan", "--budget", budget], capsys, "is too small", "the smallest feasible budget is")


def test_parse_budget_checks_the_flops_of_every_unit() -> None:
    assert parse_budget(f"{MAX_BUDGET_FLOPS:g}-flops").amount == MAX_BUDGET_FLOPS
    for text in ("1e31-flops", "1e300-core-hours", "1e300-a100-hours", "1e300-cpu-hours"):
        with pytest.raises(UsageError, match="too large"):
            parse_budget(text)


def test_plan_rechecks_the_budget_on_a_measured_cpu_peak(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setenv("CONVSCALE_CPU_PEAK_FLOPS", "1e300")
    _fails(["plan", "--budget", "10-cpu-hours"], capsys, "too large")


def test_round_down_survives_subnormal_and_non_finite_values() -> None:
    assert P.round_down(1e-300) == 1e-300
    assert P.round_down(1.2345e-320) == pytest.approx(1.23e-320, rel=1e-2)
    assert P.round_down(math.nan) == 0.0 and P.round_down(math.inf) == math.inf
    assert P.round_down(0.30649) == 0.306 and P.round_down(8 * (1 - 1e-12)) == 8.0


# --- 2. plan --bootstrap is checked with or without --from ---------------------------------------------------------


def test_plan_bootstrap_must_be_non_negative_without_from(capsys: Any) -> None:
    _fails(["plan", "--budget", "10k-core-hours", "--bootstrap", "-1"], capsys, "--bootstrap must be >= 0, got -1")


# --- 3. seeds: 0 <= seed < 2**32 in every config ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [-1, 2**32, 99999999999999999999999])
def test_pretrain_seed_out_of_range(seed: int, tmp_path: Path, capsys: Any) -> None:
    argv = ["pretrain", "--model", "nfnet-tiny-l0", "--dataset", "shapes", "--steps", "3", "--seed", str(seed),
            "--out", str(tmp_path / "run")]  # fmt: skip
    _fails(argv, capsys, f"seed = {seed} must be an integer in [0, 2**32)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_finetune_and_study_seed_out_of_range(seed: int) -> None:
    with pytest.raises(ConfigError, match=r"seed = .* must be an integer in \[0, 2\*\*32\)"):
        FinetuneConfig(pretrained="p", dataset="d", out="o", steps=3, seed=seed)
    with pytest.raises(ConfigError, match=r"seed = .* must be an integer in \[0, 2\*\*32\)"):
        StudyConfig(out="o", dataset="d", models=("m",), epochs=(1.0,), seed=seed)
    assert PretrainConfig(model="m", dataset="d", out="o", steps=1, seed=2**32 - 1).seed == 2**32 - 1


def _study(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "study.toml"
    path.write_text(
        f'out = "{tmp_path / "runs"}"\ndataset = "shapes"\nmodels = ["nfnet-tiny-l0"]\nepochs = [0.01]\n'
        f"resolution = 32\nbatch_size = 8\n{extra}\n[data_options]\nsize = 64\neval_size = 16\n"
    )
    return path


def test_sweep_study_seed_out_of_range(tmp_path: Path, capsys: Any) -> None:
    _fails(["sweep", str(_study(tmp_path, "seed = -1"))], capsys, "seed = -1 must be an integer in [0, 2**32)")


# --- 4. NaN and inf in float fields -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize(
    "cls, base, key",
    [
        (PretrainConfig, {"model": "m", "dataset": "d", "out": "o", "steps": 3}, "checkpoint_minutes"),
        (PretrainConfig, {"model": "m", "dataset": "d", "out": "o", "steps": 3}, "lr"),
        (PretrainConfig, {"model": "m", "dataset": "d", "out": "o", "steps": 3}, "peak_flops"),
        (PretrainConfig, {"model": "m", "dataset": "d", "out": "o"}, "epochs"),
        (FinetuneConfig, {"pretrained": "p", "dataset": "d", "out": "o", "steps": 3}, "cutmix"),
        (FinetuneConfig, {"pretrained": "p", "dataset": "d", "out": "o", "steps": 3}, "mixup"),
        (FinetuneConfig, {"pretrained": "p", "dataset": "d", "out": "o", "steps": 3}, "weight_decay"),
        (FinetuneConfig, {"pretrained": "p", "dataset": "d", "out": "o", "steps": 3}, "checkpoint_minutes"),
        (FinetuneConfig, {"pretrained": "p", "dataset": "d", "out": "o", "steps": 3}, "sam_rho"),
    ],
)
def test_non_finite_floats_are_refused(cls: type, base: dict[str, Any], key: str, bad: float) -> None:
    with pytest.raises(ConfigError, match=f"{key} = {bad!r} must be"):
        from_dict(cls, {**base, key: bad})


def test_every_float_field_refuses_nan_and_inf() -> None:
    """The audit as a test: no float field of the three configs takes NaN or +-inf."""
    import dataclasses
    import typing

    bases: dict[type, dict[str, Any]] = {
        PretrainConfig: {"model": "m", "dataset": "d", "out": "o", "steps": 3},
        FinetuneConfig: {"pretrained": "p", "dataset": "d", "out": "o", "steps": 3},
        StudyConfig: {"out": "o", "dataset": "d", "models": ["m"], "epochs": [1.0]},
    }
    for cls, base in bases.items():
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if "float" not in str(hints[field.name]):
                continue
            for bad in (math.nan, math.inf, -math.inf):
                value: Any = bad
                if field.name in ("lr_grid",) or (cls is StudyConfig and field.name == "epochs"):
                    value = [bad]
                elif field.name == "randaugment":
                    value = [1, bad]
                data = {**base, field.name: value}
                if field.name == "epochs" and cls is not StudyConfig:
                    del data["steps"]  # one duration
                with pytest.raises(ConfigError):
                    from_dict(cls, data)


def test_finetune_cutmix_nan_on_the_command_line(tmp_path: Path, capsys: Any) -> None:
    argv = ["finetune", "--from", str(tmp_path / "run"), "--dataset", "digits", "--steps", "3", "--batch-size", "8",
            "--cutmix", "nan", "--out", str(tmp_path / "ft")]  # fmt: skip
    _fails(argv, capsys, "cutmix = nan must be a finite number >= 0")


def test_pretrain_checkpoint_minutes_nan_on_the_command_line(tmp_path: Path, capsys: Any) -> None:
    argv = ["pretrain", "--model", "nfnet-tiny-l0", "--dataset", "shapes", "--steps", "3",
            "--checkpoint-minutes", "nan", "--out", str(tmp_path / "run")]  # fmt: skip
    _fails(argv, capsys, "checkpoint_minutes = nan must be a finite number >= 0")


@pytest.mark.parametrize("grid", ["nan,inf", "0.4,-1", ","])
def test_tune_lr_grid_must_be_positive_finite(grid: str, tmp_path: Path, capsys: Any) -> None:
    argv = ["tune-lr", "--model", "nfnet-tiny-l0", "--epochs", "0.01", "--runs", str(tmp_path), "--dataset", "shapes",
            "--grid", f"--lr-grid={grid}"]  # fmt: skip
    _fails(argv, capsys, "is not a comma-separated list of positive numbers")


def test_study_lr_grid_must_be_finite() -> None:
    with pytest.raises(ConfigError, match="lr_grid must hold positive finite values"):
        StudyConfig(out="o", dataset="d", models=("m",), epochs=(1.0,), lr_grid=(math.inf,))


# --- 5. type mismatches speak plainly: Literal choices with a suggestion, no Optional[...] ----------------------------


def test_loss_outside_its_literal_suggests_the_close_match(tmp_path: Path, capsys: Any) -> None:
    argv = ["pretrain", "--model", "nfnet-tiny-l0", "--dataset", "shapes", "--steps", "3", "--loss", "softmx",
            "--out", str(tmp_path / "run")]  # fmt: skip
    err = _fails(argv, capsys, "loss = 'softmx' is not one of 'softmax', 'sigmoid'; did you mean 'softmax'?")
    assert "Optional" not in err and "Literal" not in err


@pytest.mark.parametrize(
    "data, message",
    [
        ({"start_lr": "a"}, "start_lr = 'a' has the wrong type: expected float or a table"),
        ({"models": "m"}, "models = 'm' has the wrong type: expected a list of str"),
        ({"resolution": "big"}, "resolution = 'big' has the wrong type: expected int, got str"),
        ({"rule": "too"}, "rule = 'too' is not one of 'two-trial', 'grid'"),
    ],
)
def test_study_type_errors_have_no_typing_syntax(data: dict[str, Any], message: str) -> None:
    base = {"out": "o", "dataset": "d", "models": ["m"], "epochs": [1.0]}
    with pytest.raises(ConfigError) as info:
        from_dict(StudyConfig, {**base, **data})
    text = str(info.value)
    assert message in text and not any(word in text for word in ("Optional", "Union", "Literal", "typing", "|"))


def test_finetune_randaugment_type_error_is_readable() -> None:
    with pytest.raises(ConfigError, match=r"expected a list of 2 items \(int, float\)"):
        from_dict(FinetuneConfig, {"pretrained": "p", "dataset": "d", "out": "o", "steps": 3, "randaugment": 3})


# --- 6. missing required keys are listed in words ---------------------------------------------------------------------


def test_empty_study_lists_the_missing_keys(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "study.toml"
    path.write_text("")
    _fails(["sweep", str(path)], capsys, f"{path}: missing keys out, dataset, models, epochs")


def test_one_missing_key_is_singular(tmp_path: Path) -> None:
    path = tmp_path / "study.toml"
    path.write_text('out = "o"\ndataset = "d"\nmodels = ["m"]\n')
    with pytest.raises(ConfigError, match=r"study\.toml: missing key epochs$"):
        load_study(path)
    with pytest.raises(ConfigError, match=r"^missing key epochs$"):
        load_config(StudyConfig, None, {"out": "o", "dataset": "d", "models": ["m"]})


# --- 7-9. did-you-mean everywhere a name is checked -----------------------------------------------------------------


def test_tune_lr_size_axis_suggests(tmp_path: Path, capsys: Any) -> None:
    argv = ["tune-lr", "--model", "nfnet-tiny-l0", "--epochs", "1", "--runs", str(tmp_path), "--dataset", "shapes",
            "--size-axis", "parms"]  # fmt: skip
    _fails(argv, capsys, "--size-axis 'parms' is not one of 'params', 'macs'; did you mean 'params'?")


def test_study_data_option_typo_suggests(tmp_path: Path, capsys: Any) -> None:
    argv = ["sweep", str(_study(tmp_path)), "--set", "data_options.sise=5"]
    _fails(argv, capsys, "unknown shapes data option 'sise': did you mean 'size'?")


def test_study_start_lr_family_typo_suggests(tmp_path: Path, capsys: Any) -> None:
    argv = ["sweep", str(_study(tmp_path, "start_lr = { nfent = 1.0 }"))]
    _fails(argv, capsys, "start_lr names family 'nfent'", "did you mean 'nfnet'?")


@pytest.mark.parametrize("key", ["grad_clip_norm", "agc_clip", "agc_eps", "weight_decay"])
def test_recipe_bounds_are_finite(key: str, tmp_path: Path, capsys: Any) -> None:
    # An infinite clipping bound is NaN in the update (inf / inf): None disables clipping, inf is refused.
    argv = ["pretrain", "--model", "nfnet-tiny-l0", "--dataset", "shapes", "--steps", "3",
            "--set", f"recipe.{key}=inf", "--out", str(tmp_path / "run")]  # fmt: skip
    _fails(argv, capsys, f"{key} must be a finite number")


def test_report_seed_out_of_range(tmp_path: Path, capsys: Any) -> None:
    _fails(["report", str(tmp_path), "--seed", "-1"], capsys, "--seed = -1 must be an integer in [0, 2**32)")


def test_data_convert_workers(tmp_path: Path, capsys: Any) -> None:
    _fails(["data", "convert", str(tmp_path), "--out", str(tmp_path / "o"), "--workers", "-1"], capsys,
           "--workers must be >= 0 (0 or unset: one per CPU, at most 16), got -1")  # fmt: skip


def test_a_toml_file_that_is_not_text(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00bad")
    _fails(["sweep", str(tmp_path / "binary.toml")], capsys, "malformed TOML in")
    _fails(["pretrain", "--config", str(tmp_path / "binary.toml")], capsys, "malformed TOML in")
