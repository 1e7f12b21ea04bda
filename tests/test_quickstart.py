"""The main job's pieces that can be checked in seconds (the job itself is the README's first command)."""

from __future__ import annotations

import json
from pathlib import Path

from convscale_cli import quickstart
from convscale_cli.sweep import load_study

REPO = Path(__file__).resolve().parents[1]


def test_the_packaged_study_is_the_documented_example() -> None:
    assert quickstart.default_study().read_text() == (REPO / "examples" / "quickstart.toml").read_text()


def test_the_study_exempts_exactly_the_skip_gains_and_the_classifier_from_agc() -> None:
    """The study's one recipe departure: AGC clips all the reference clips but the zero-initialised skip gains."""
    import jax
    import jax.numpy as jnp
    from convscale_plugins.nfnet import RECIPE

    from convscale_cli.engine.optim import param_path, path_mask
    from convscale_cli.plugins import get_registry

    study = load_study(quickstart.default_study())
    exempt = study.engine["recipe"]["agc_exclude"]
    assert set(RECIPE.agc_exclude) <= set(exempt)
    model = get_registry().architecture(study.models[-1]).build(num_classes=10)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    mask = path_mask(exempt, match=True)(shapes["params"])
    hits = [param_path(path) for path, hit in jax.tree_util.tree_flatten_with_path(mask)[0] if hit]
    gains = [h for h in hits if h.endswith("skip_gain")]
    assert len(gains) >= 6 and sorted(set(hits) - set(gains)) == ["fc/kernel"]


def test_the_packaged_study_is_a_valid_ladder_study() -> None:
    study = load_study(quickstart.default_study())
    assert study.dataset == "shapes" and study.rule == "two-trial"
    assert len(study.models) >= 3 and len(study.epochs) >= 3


def _summary(root: Path, name: str, kind: str, loss: float, flops: float, status: str = "finished") -> None:
    run = root / name
    run.mkdir(parents=True)
    doc = {
        "kind": kind, "status": status, "model": "nfnet-tiny-l0", "family": "nfnet", "dataset": "shapes",
        "epochs": 1.0, "lr": 1.6, "batch_size": 64, "params": 1, "macs_per_image": 1, "train_resolution": 32,
        "num_classes": 420, "examples_seen": 1, "final": {"eval_loss": loss}, "ledger": {"train_flops": flops},
    }  # fmt: skip
    (run / "summary.json").write_text(json.dumps(doc))


def test_best_run_and_largest_compute_are_read_from_the_summaries(tmp_path: Path) -> None:
    _summary(tmp_path, "a", "pretrain", 5.0, 1e9)
    _summary(tmp_path, "b", "pretrain", 4.0, 3e9)
    _summary(tmp_path, "c", "pretrain", 3.0, 5e9, status="budget")  # not finished: neither source nor budget base
    _summary(tmp_path, "d", "finetune", 0.1, 9e9)
    best = quickstart.best_pretrain_run(tmp_path)
    assert best.path.name == "b" and best.eval_loss == 4.0
    assert quickstart.largest_flops(tmp_path) == 3e9  # finished pre-training runs only


def test_the_job_fine_tunes_the_best_run_and_its_scratch_baseline(tmp_path: Path) -> None:
    """The four steps in order, wired by the files each writes (the commands are stood in for; they have own tests)."""
    calls: list[list[str]] = []

    def fake(argv: list[str]) -> int:
        calls.append(list(argv))
        runs = tmp_path / "job" / "runs"
        if argv[0] == "sweep":
            _summary(runs, "l0", "pretrain", 5.0, 1e9)
            _summary(runs, "l1", "pretrain", 4.0, 3e9)
            cells = [{"trials": [{"run": "l0"}, {"run": "l1"}]}]
            (runs / "tuning.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cells))
        elif argv[0] == "finetune":
            out = Path(argv[argv.index("--out") + 1])
            out.mkdir(parents=True)
            top1 = 0.9 if "--scratch" in argv else 0.99
            doc = {"final": {"eval_top1": top1}, "final_ema": {"eval_top1": top1 - 0.01}}
            (out / "summary.json").write_text(json.dumps(doc))
        elif argv[0] == "report":
            out = Path(argv[argv.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "fit.json").write_text(json.dumps({"verdicts": [{"claim": "log-log law", "text": "supported"}]}))
        return 0

    lines: list[str] = []
    summary = quickstart.run(tmp_path / "job", fake, echo=lines.append)
    assert [c[0] for c in calls] == ["sweep", "finetune", "finetune", "report", "plan"]
    tuned, scratch = calls[1], calls[2]
    assert tuned[tuned.index("--from") + 1].endswith("l1")  # the lowest held-out loss
    assert "--scratch" not in tuned and scratch == [*tuned[:-2], "--scratch", *scratch[-2:]]
    assert summary["finetune"]["top1"] == 0.99 and summary["finetune"]["scratch"]["top1"] == 0.9
    assert summary["runs_used"] == 2 and summary["best_pretrain_run"] == "l1"
    assert any("99.0% (EMA 98.0%) fine-tuned from l1, 90.0% (EMA 89.0%) from scratch" in line for line in lines)
