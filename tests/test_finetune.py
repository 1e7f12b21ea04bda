"""Fine-tuning a tiny pre-trained CNN: every option, the summary, backbone loading, head replacement, bad input.

The tiny CNN and the in-memory ``colours`` dataset come from ``tests/_engine_helpers.py``; the pre-training run is
made once per module with the engine (fp32, 8 px) and fine-tuned in process.
"""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path
from typing import Any

import _engine_helpers as helpers
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from convscale_cli import plugins as plugin_loader
from convscale_cli.errors import CheckpointError, ConfigError, ExitCode, UsageError
from convscale_cli.finetune.backbone import head_paths, load_params, locate
from convscale_cli.finetune.config import FinetuneConfig
from convscale_cli.hookspecs import hookimpl
from convscale_cli.weights import MODEL_JSON

MIN_RESOLUTION = 4


def _plugin(**dataset: Any) -> helpers.TinyPlugin:
    """The engine's tiny CNN (with a minimum resolution, to test that check) and its ``colours`` dataset."""
    return helpers.TinyPlugin(model={"min_resolution": MIN_RESOLUTION}, dataset=dataset)


@pytest.fixture(scope="module")
def loaded() -> plugin_loader.Plugins:
    return plugin_loader.load_plugins(extra=[("finetune-test", _plugin())], entry_points=lambda: [])


def test_locate_accepts_the_run_its_checkpoints_and_one_checkpoint(pretrained: Path) -> None:
    run = locate(pretrained)
    assert (run.kind, run.step, run.architecture, run.num_classes) == ("run", 8, "tiny-cnn", helpers.CLASSES)
    assert run.core_hours is not None and run.core_hours > 0
    assert locate(pretrained / "checkpoints").step == 8
    assert locate(pretrained / "checkpoints" / "4").step == 4
    assert locate(pretrained / "checkpoints" / "4").params_dir == pretrained / "checkpoints" / "4" / "state"


def test_backbone_is_kept_and_the_head_is_new(pretrained: Path, loaded: plugin_loader.Plugins) -> None:
    spec = loaded.registry.architecture("tiny-cnn")
    assert head_paths(spec, 7, {}, 8) == ["head/bias", "head/kernel"]
    params = helpers.flat(
        load_params(locate(pretrained), spec, num_classes=7, options={}, resolution=8, rng=jax.random.PRNGKey(0))
    )
    saved = helpers.restore_tree(pretrained / "checkpoints" / "8")
    for path, value in saved.items():
        if not path.startswith("head/"):
            np.testing.assert_array_equal(params[path], value, err_msg=path)
    assert params["head/kernel"].shape == (helpers.WIDTH, 7)
    assert np.all(params["head/bias"] == 0.0)
    assert 0.003 < params["head/kernel"].std() < 0.02  # N(0, 0.01) over 56 draws


def test_mismatched_backbone_names_the_first_tensor(tmp_path: Path, pretrained: Path, loaded: Any) -> None:
    """An imported-weights directory whose 'conv' layer is narrower than the model's."""
    spec = loaded.registry.architecture("tiny-cnn")
    params = helpers.restore_tree(pretrained / "checkpoints" / "8")
    tree: dict[str, Any] = {}
    for path, value in params.items():
        layer, name = path.split("/")
        tree.setdefault(layer, {})[name] = value
    tree["conv"]["kernel"] = np.zeros((3, 3, helpers.WIDTH, helpers.WIDTH - 2), np.float32)
    weights = tmp_path / "weights"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(weights / "params", tree)
    meta = {
        "format": "convscale-weights",
        "version": 1,
        "architecture": "tiny-cnn",
        "family": "tiny",
        "num_classes": helpers.CLASSES,
        "options": {},
        "source": {"kind": "test"},
    }
    (weights / MODEL_JSON).write_text(json.dumps(meta))
    pre = locate(weights)
    assert pre.kind == "weights" and pre.core_hours is None
    needle = r"parameter 'conv/kernel' has shape \(3, 3, 8, 6\) in the checkpoint but tiny-cnn expects \(3, 3, 8, 8\)"
    with pytest.raises(CheckpointError, match=needle):
        load_params(pre, spec, num_classes=3, options={}, resolution=8, rng=jax.random.PRNGKey(0))


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"sam_rho": -0.1}, "sam_rho"),
        ({"sam_fraction": 0.0}, "sam_fraction"),
        ({"sam_fraction": 1.5}, "sam_fraction"),
        ({"repeat_aug": 0}, "repeat_aug"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"drop_rate": 1.0}, "drop_rate"),
        ({"eval_crop_fraction": 0.0}, "eval_crop_fraction"),
        ({"randaugment": (-1, 5.0)}, "randaugment"),
        ({"epochs": 1.0}, "give one duration, not epochs and steps"),
        ({"steps": None}, "no duration: give epochs, examples, steps or a FLOP/core-hour budget"),
        ({"recipe": {"weight_decy": 0.1}}, "did you mean 'recipe.weight_decay'"),
        ({"augment": {"min_areaa": 0.5}}, "augment.min_area"),
    ],
)
def test_config_validation(overrides: dict[str, Any], needle: str) -> None:
    base = {"pretrained": "x", "dataset": "colours", "out": "o", "steps": 4}
    with pytest.raises(ConfigError, match=needle):
        FinetuneConfig(**{**base, **overrides})


def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, pretrained: Path, cli_registry: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("not a checkpoint")
    base = ["finetune", "--dataset", "colours", "--out", str(tmp_path / "ft"), "--steps", "2", "--batch-size", "8"]
    cases = [
        (["--from", str(tmp_path / "nowhere")], "does not exist"),
        (["--from", str(plain)], "is not a pre-training or fine-tuning run, a checkpoint inside one, or a weights"),
        (["--from", str(pretrained / "checkpoints" / "3")], "does not exist"),
        (["--from", str(pretrained), "--model", "tiny-cnx"], "did you mean 'tiny-cnn'"),
        (["--from", str(pretrained), "--sam-rho", "-0.5"], "sam_rho = -0.5 must be >= 0"),
        (["--from", str(pretrained), "--sam-fraction", "1.5"], "sam_fraction = 1.5 must be in (0, 1]"),
        (["--from", str(pretrained), "--repeat-aug", "0"], "repeat_aug = 0 must be >= 1"),
        (["--from", str(pretrained), "--randaugment", "4"], "must look like LAYERS,MAGNITUDE"),
        (["--from", str(pretrained), "--eval-resolution", "2"], "resolution 2 is too small for tiny-cnn (minimum 4)"),
        (["--from", str(pretrained), "--data-option", "colour=1"], "unknown colours data option 'colour'"),
    ]
    toml = tmp_path / "ft.toml"
    toml.write_text(f"[finetune]\npretrained = {json.dumps(str(pretrained))}\nrepeat_aug = 0\n")
    cases.append((["--config", str(toml)], "repeat_aug = 0 must be >= 1"))
    for extra, needle in cases:
        code, _, err = helpers.run_cli([*base, *extra], capsys)
        assert code == ExitCode.USAGE_ERROR, (extra, err)
        assert err.startswith("Error: ") and "\n" not in err and needle in err, (extra, err)


def test_model_check_refuses_another_architecture(tmp_path: Path, pretrained: Path, loaded: Any, capsys: Any) -> None:
    other = types.SimpleNamespace()

    @hookimpl
    def register_architectures(register: Any) -> None:
        specs: list[Any] = []
        helpers.TinyPlugin().register_architectures(specs.append)
        register(dataclasses.replace(specs[0], name="tiny-cnn-2"))

    other.register_architectures = register_architectures
    plugins = plugin_loader.load_plugins(extra=[("a", _plugin()), ("b", other)], entry_points=lambda: [])
    plugin_loader.use_plugins(plugins)
    argv = [
        "finetune",
        "--from",
        str(pretrained),
        "--model",
        "tiny-cnn-2",
        "--dataset",
        "colours",
        "--out",
        str(tmp_path / "ft"),
        "--steps",
        "2",
    ]
    code, _, err = helpers.run_cli(argv, capsys)
    assert code == ExitCode.USAGE_ERROR
    assert "holds a tiny-cnn checkpoint, not --model tiny-cnn-2" in err


@pytest.mark.parametrize(
    "scale_out",
    [
        ["--fsdp", "--coordinator-address", "10.0.0.1:1234", "--num-processes", "2", "--process-id", "1"],
        ["--set", "fsdp=true", "--set", "coordinator_address=10.0.0.1:1234", "--set", "num_processes=2",
         "--set", "process_id=1"],
    ],
)  # fmt: skip
def test_scale_out_and_budget_options_reach_the_finetuning_config(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], scale_out: list[str]
) -> None:
    """FSDP, the multi-host settings and a budget, as flags or ``--set`` keys, are the run config's (as pretrain's)."""
    from convscale_cli.finetune import api

    seen: list[FinetuneConfig] = []
    monkeypatch.setattr(api, "finetune", lambda config: seen.append(config) or {})
    argv = ["finetune", "--from", "x", "--dataset", "colours", "--out", "o", "--budget", "2-cpu-hours", *scale_out]
    code, _, err = helpers.run_cli(argv, capsys)
    assert code == ExitCode.OK, err
    (config,) = seen
    assert (config.fsdp, config.coordinator_address, config.num_processes, config.process_id, config.budget) == (
        True,
        "10.0.0.1:1234",
        2,
        1,
        "2-cpu-hours",
    )


def test_an_unreadable_budget_is_refused_with_the_config() -> None:
    with pytest.raises(UsageError, match="unknown budget unit 'parsecs' in '2-parsecs'"):
        FinetuneConfig(pretrained="x", dataset="colours", out="o", budget="2-parsecs")


def _budget_argv(pretrained: Path, out: Path, *extra: str) -> list[str]:
    return [
        "finetune", "--from", str(pretrained), "--dataset", "colours", "--out", str(out), "--batch-size", "8",
        "--resolution", "8", "--eval-resolution", "8", "--sam-rho", "0.1", "--sam-fraction", "0.25",
        "--precision", "fp32", "--set", "progress=none", "--set", "tensorboard=false", "--json", *extra,
    ]  # fmt: skip


def test_a_flop_budget_stops_finetuning_cleanly_and_lifting_it_resumes(
    tmp_path: Path, pretrained: Path, cli_registry: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ft"
    # One step: 8 examples of 6 x MACs, plus the SAM ascent pass over a quarter of the batch.
    per_step = 8 * 6 * helpers.count_tiny(8, helpers.CLASSES).macs * 1.25
    budget = f"{2.5 * per_step!r}-flops"
    code, stdout, err = helpers.run_cli(_budget_argv(pretrained, out, "--steps", "5", "--budget", budget), capsys)
    assert code == ExitCode.OK, err
    summary = json.loads(stdout)
    assert (summary["status"], summary["steps"], summary["total_steps"]) == ("budget", 3, 5)
    assert summary["budget"] == budget and summary["budget_spent"] >= 2.5 * per_step
    assert summary["ledger"]["train_flops"] == pytest.approx(3 * per_step)
    # The same budget again has nothing to do; without it the run resumes to its 5 steps.
    code, stdout, err = helpers.run_cli(_budget_argv(pretrained, out, "--steps", "5", "--budget", budget), capsys)
    assert code == ExitCode.OK and json.loads(stdout)["steps"] == 3, err
    code, stdout, err = helpers.run_cli(_budget_argv(pretrained, out, "--steps", "5"), capsys)
    assert code == ExitCode.OK, err
    assert (json.loads(stdout)["status"], json.loads(stdout)["steps"]) == ("finished", 5)


def test_a_flop_budget_alone_sets_the_finetuning_duration(
    tmp_path: Path, pretrained: Path, cli_registry: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    per_step = 8 * 6 * helpers.count_tiny(8, helpers.CLASSES).macs * 1.25
    argv = _budget_argv(pretrained, tmp_path / "ft", "--budget", f"{4 * per_step!r}-flops")
    code, stdout, err = helpers.run_cli(argv, capsys)
    assert code == ExitCode.OK, err
    summary = json.loads(stdout)
    assert (summary["total_steps"], summary["steps"]) == (4, 4)
    assert summary["ledger"]["train_flops"] == pytest.approx(4 * per_step)
    from convscale_cli.finetune.resolve import header, resolve

    config = FinetuneConfig(
        pretrained=str(pretrained), dataset="colours", out="o", budget="1e15-flops", batch_size=8, resolution=8
    )
    assert "; stops at budget 1e15-flops" in header(resolve(config, cli_registry), "given", None, None)
    code, _, err = helpers.run_cli(
        _budget_argv(pretrained, tmp_path / "tiny", "--budget", f"{per_step / 2!r}-flops"), capsys
    )
    assert code == ExitCode.USAGE_ERROR and "less than one step of batch 8" in err and "\n" not in err


def test_every_option_end_to_end_then_rerun_is_a_no_op(
    tmp_path: Path, pretrained: Path, cli_registry: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ft"
    argv = [
        "finetune", "--from", str(pretrained / "checkpoints" / "4"), "--model", "tiny-cnn", "--dataset", "colours",
        "--out", str(out), "--steps", "6", "--batch-size", "8", "--lr", "0.2", "--resolution", "8",
        "--eval-resolution", "12", "--eval-crop", "1.0", "--sam-rho", "0.1", "--sam-fraction", "0.25",
        "--stochdepth-rate", "0.1", "--drop-rate", "0.2", "--weight-decay", "1e-4", "--ema-decay", "0.9",
        "--repeat-aug", "2", "--randaugment", "2,5", "--mixup", "0.2", "--cutmix", "1.0", "--label-smoothing", "0.1",
        "--seed", "3", "--precision", "fp32", "--log-every", "2", "--checkpoint-every", "3", "--data-option", "size=40",
        "--set", "augment.crop=resize", "--set", "progress=none", "--set", "tensorboard=false",
        "--set", "checkpoint_minutes=0", "--set", "recipe.warmup_fraction=0.2", "--json",
    ]  # fmt: skip
    code, stdout, err = helpers.run_cli(argv, capsys)
    assert code == ExitCode.OK, err
    summary = json.loads(stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    assert (summary["kind"], summary["status"], summary["model"], summary["steps"]) == (
        "finetune",
        "finished",
        "tiny-cnn",
        6,
    )
    assert summary["pretrain"]["run"] == str(pretrained) and summary["pretrain"]["step"] == 4
    assert summary["pretrain"]["core_hours"] == pytest.approx(locate(pretrained / "checkpoints" / "4").core_hours)
    for key in ("final", "final_ema"):
        assert set(summary[key]) == {"eval_loss", "eval_top1", "eval_top5"}
    assert summary["final"] != summary["final_ema"]
    assert (summary["train_resolution"], summary["eval_resolution"]) == (8, 12)
    assert summary["repeat_aug"] == 2 and summary["epochs"] == pytest.approx(48 / 40)
    assert summary["passes"] == pytest.approx(summary["epochs"] / 2)
    ledger = summary["ledger"]
    # The fine-tuning ledger starts at zero and counts the SAM ascent pass over 25% of each batch.
    assert ledger["examples"] == 48 and ledger["steps"] == 6
    assert ledger["train_flops"] == pytest.approx(48 * 6 * summary["macs_per_image"] * 1.25)
    config = summary["config"]
    assert config["augment"]["repeats"] == 2 and config["augment"]["randaugment_layers"] == 2
    assert config["recipe"]["weight_decay"] == 1e-4 and config["recipe"]["warmup_fraction"] == 0.2
    assert config["model_options"] == {"stochdepth_rate": 0.1, "drop_rate": 0.2}
    assert config["eval_crop_fraction"] == 1.0
    state = ocp.PyTreeCheckpointer().restore(out / "checkpoints" / "6" / "state")
    assert set(state) >= {"params", "ema", "opt_state"} and state["ema"] is not None
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in records][-2:] == ["eval", "eval_ema"]

    code, stdout, err = helpers.run_cli(argv, capsys)  # the same command again: finished, nothing is trained
    assert code == ExitCode.OK and json.loads(stdout)["finished_at"] == summary["finished_at"]
    changed = list(argv)  # another SAM rho in the same --out
    changed[changed.index("--sam-rho") + 1] = "0.2"
    code, _, err = helpers.run_cli(changed, capsys)
    assert code == ExitCode.USAGE_ERROR and "different config (sam_rho differs)" in err and "--force" in err


def test_dataset_defaults_choose_the_augmentation_and_eval_crop(pretrained: Path, loaded: Any) -> None:
    """A dataset's ``augment``/``eval_crop`` defaults apply unless the run sets its own, key by key."""
    from convscale_cli.engine.resolve import resolve as resolve_pretrain
    from convscale_cli.finetune.resolve import resolve
    from convscale_cli.plugins import get_registry

    # The same data, declared like digits: never flipped or cropped, judged whole.
    handwriting = _plugin(augment={"crop": "resize", "flip": False}, eval_crop=1.0)
    registry = plugin_loader.load_plugins(extra=[("hw", handwriting)], entry_points=lambda: []).registry
    base = {"pretrained": str(pretrained), "dataset": "colours", "out": "o", "steps": 4}
    run = resolve(FinetuneConfig(**base), registry)
    assert (run.augment.crop, run.augment.flip, run.eval_crop) == ("resize", False, 1.0)
    run = resolve(FinetuneConfig(**base, augment={"flip": True}, eval_crop_fraction=0.5), registry)
    assert (run.augment.crop, run.augment.flip, run.eval_crop) == ("resize", True, 0.5)
    pre = resolve_pretrain(helpers.config("o", steps=4, augment={"min_area": 0.5}), registry)
    assert (pre.augment, pre.eval_crop) == ({"crop": "resize", "flip": False, "min_area": 0.5}, 1.0)
    plain = resolve(FinetuneConfig(**base), loaded.registry)  # no dataset defaults: the recipe's
    assert (plain.augment.crop, plain.augment.flip, plain.eval_crop) == ("inception", True, 0.875)

    builtin = get_registry()  # the shipped choices: digits are never flipped or cropped; shapes keep their object
    assert builtin.dataset("digits").augment == {"crop": "resize", "flip": False}
    assert builtin.dataset("digits").eval_crop == 1.0
    assert builtin.dataset("shapes").augment == {"min_area": 0.35}


def test_scratch_baseline_starts_from_a_random_initialisation(
    tmp_path: Path, pretrained: Path, cli_registry: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--scratch`` trains the checkpoint's architecture from random weights: nothing but its shape is read."""
    from convscale_cli.report.analysis import finetune_points
    from convscale_cli.report.runs import load_runs

    base = ["finetune", "--from", str(pretrained), "--dataset", "colours", "--steps", "1", "--batch-size", "8",
            "--lr", "1e-9", "--precision", "fp32", "--sam-rho", "0", "--ema-decay", "0", "--set", "progress=none",
            "--set", "tensorboard=false", "--json"]  # fmt: skip
    code, stdout, err = helpers.run_cli([*base, "--out", str(tmp_path / "ft")], capsys)
    assert code == ExitCode.OK, err
    assert json.loads(stdout)["init"] == "pretrained"
    code, stdout, err = helpers.run_cli([*base, "--scratch", "--out", str(tmp_path / "scratch")], capsys)
    assert code == ExitCode.OK, err
    summary = json.loads(stdout)
    assert summary["init"] == "scratch" and summary["config"]["scratch"] is True
    assert summary["pretrain"]["kind"] == "scratch" and summary["pretrain"]["core_hours"] == 0.0
    assert summary["ledger"]["steps"] == 1 and summary["model"] == "tiny-cnn"

    saved = helpers.restore_tree(pretrained / "checkpoints" / "8")["conv/kernel"]
    tuned = helpers.restore_tree(tmp_path / "ft" / "checkpoints" / "1")["conv/kernel"]
    scratch = helpers.restore_tree(tmp_path / "scratch" / "checkpoints" / "1")["conv/kernel"]
    np.testing.assert_allclose(tuned, saved, atol=1e-6)  # lr 1e-9: one step leaves the loaded weights in place
    assert not np.allclose(scratch, saved, atol=1e-3) and np.isfinite(scratch).all()

    points = finetune_points(load_runs(tmp_path)[0])
    assert sorted((p["run"], p["scratch"]) for p in points) == [("ft", False), ("scratch", True)]
