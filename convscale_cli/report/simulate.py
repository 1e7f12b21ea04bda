"""Simulated scaling studies with a known truth, run through the real sweep, report and plan code.

A :class:`Scenario` fixes the truth — the law ``L(N, D) = E + A/N^alpha + B/D^beta``, a learning-rate response with
a known optimum path, and log-normal run noise — and a design (model sizes, epoch budgets, the lr rule, seeds).
:func:`write_study` trains nothing: it drives the real :func:`convscale_cli.sweep.run_sweep` (two-trial rule or
full grid, cheapest cell first, decisions in ``tuning.jsonl``) with a trainer that writes each run's
``summary.json`` from the truth. The runs directory then goes through exactly the code a user's would:
:func:`convscale_cli.report.build.analyse` and :func:`convscale_cli.plan_fit.plan_fitted`.

``benchmarks/bench_calibration.py`` uses this to measure interval coverage, false-verdict rates and power;
``tests/test_calibration.py`` checks a smaller version of it in CI.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from convscale_cli.budget import train_flops
from convscale_cli.recipe import Recipe
from convscale_cli.registry import ArchitectureSpec, DatasetInfo, DatasetSpec, ModelCount, Registry
from convscale_cli.report.verdicts import VIT_FAMILY

DATASET = "simulated"
FAMILY = "simnet"
# MACs per image per non-head parameter of the simulated models (a convolutional net at 32 px, roughly).
MACS_PER_PARAM = 4.0
HEAD_PARAMS = 10_000


@dataclasses.dataclass(frozen=True)
class Scenario:
    """The truth and the design of one simulated study.

    Attributes:
        name: Short label.
        sizes: Non-head parameters of each model (N).
        epochs: Epoch budgets.
        examples_per_epoch: Training-set size.
        law: ``(E, A, alpha, B, beta)`` in raw units of N and D.
        sigma: Standard deviation of a run's log held-out loss.
        seeds: Seeds per (cell, lr).
        rule: "grid" (every lr of ``lr_octaves``) or "two-trial" (the paper's rule, from ``start_lr``).
        lr_ref: Optimal lr of the smallest model at the first epoch budget.
        lr_epochs_exp: The optimal lr moves as ``epochs^lr_epochs_exp`` (negative: it falls).
        lr_size_exp: ... and as ``N^lr_size_exp``.
        lr_curvature: Log-loss penalty per squared octave away from the optimal lr.
        lr_octaves: Octaves (relative to ``lr_ref``) of the grid rule's learning rates.
        vit_gap: With a number, the study also trains a second family, "vit", on the same ladder and rule, whose
            every loss is the law's divided by ``exp(vit_gap)``: the ConvNets' log loss ratio to it is ``vit_gap``
            (positive: the ViTs are ahead). None: one family.
        truth: Per finding, whether it holds (True), is false (False) or is not defined by this truth (None).
    """

    name: str
    sizes: tuple[float, ...]
    epochs: tuple[float, ...]
    examples_per_epoch: float
    law: tuple[float, float, float, float, float]
    sigma: float
    seeds: int = 1
    rule: Literal["grid", "two-trial"] = "grid"
    lr_ref: float = 1.6
    lr_epochs_exp: float = -0.35
    lr_size_exp: float = -0.1
    lr_curvature: float = 0.03
    lr_octaves: tuple[int, ...] = (-3, -2, -1, 0, 1)
    vit_gap: float | None = None
    truth: Mapping[str, bool | None] = dataclasses.field(default_factory=dict)

    @property
    def size_exponent(self) -> float:
        """True ``a`` in ``N_opt ~ C^a``: ``beta / (alpha + beta)`` (Hoffmann et al. eq. 4)."""
        _, a, alpha, b, beta = self.law
        if a == 0:
            return math.nan
        return beta / (alpha + beta)

    def model_name(self, i: int, family: str = FAMILY) -> str:
        """Registry name of model ``i`` of ``family``."""
        return f"sim-{i}" if family == FAMILY else f"sim{family}-{i}"

    @property
    def families(self) -> tuple[str, ...]:
        """The families the study trains."""
        return (FAMILY,) if self.vit_gap is None else (FAMILY, VIT_FAMILY)

    def models(self) -> dict[str, tuple[str, float]]:
        """Registry name -> (family, non-head parameters), every family's ladder."""
        return {self.model_name(i, f): (f, size) for f in self.families for i, size in enumerate(self.sizes)}

    def optimal_lr(self, size: float, epochs: float) -> float:
        """The true optimal lr of a cell."""
        return (
            self.lr_ref * (epochs / self.epochs[0]) ** self.lr_epochs_exp * (size / self.sizes[0]) ** self.lr_size_exp
        )

    def loss(self, size: float, epochs: float, lr: float, noise: float, family: str = FAMILY) -> float:
        """Held-out loss of one run: the law, the lr penalty and the noise draw ``noise`` ~ N(0, 1)."""
        e, a, alpha, b, beta = self.law
        examples = epochs * self.examples_per_epoch
        mean = e + a * size**-alpha + b * examples**-beta
        if family == VIT_FAMILY:
            mean /= math.exp(self.vit_gap or 0.0)
        off = math.log2(lr / self.optimal_lr(size, epochs))
        return mean * math.exp(self.lr_curvature * off * off + self.sigma * noise)

    def registry(self) -> Registry:
        """A registry holding the simulated models and dataset (no jax, no plugins)."""
        registry = Registry()
        for name, (family, size) in self.models().items():
            params, macs = int(size) + HEAD_PARAMS, int(size * MACS_PER_PARAM)

            def count(resolution: int, num_classes: int, params: int = params, macs: int = macs) -> ModelCount:
                return ModelCount(params=params - HEAD_PARAMS + num_classes * 100, macs=macs)

            registry.architectures.add(
                ArchitectureSpec(
                    name=name,
                    family=family,
                    build=_no_build,
                    count=count,
                    train_resolution=32,
                    eval_resolution=32,
                    recipe=Recipe(lr=self.lr_ref),
                ),
                "simulation",
            )
        info = DatasetInfo(
            num_classes=100, split_sizes={"train": int(self.examples_per_epoch), "eval": 1000}, resolution=32
        )
        registry.datasets.add(
            DatasetSpec(name=DATASET, description="simulated", open=_no_open, info=lambda **_: info, static_info=info),
            "simulation",
        )
        return registry


def _no_build(**_: Any) -> Any:
    raise RuntimeError("simulated models are never built")


def _no_open(*_: Any, **__: Any) -> Any:
    raise RuntimeError("simulated datasets are never opened")


class SimulatedTrainer:
    """A trainer for :func:`convscale_cli.sweep.run_sweep` that writes a run directory from the truth.

    The noise of a run is a pure function of ``(study seed, model, epochs, lr, training seed)``, so a resumed or
    re-tuned trial gets the same loss, as a deterministic real run would.
    """

    def __init__(self, scenario: Scenario, study_seed: int) -> None:
        self.scenario = scenario
        self.study_seed = study_seed
        self.models = scenario.models()

    def __call__(self, model: str, dataset: str, epochs: float, lr: float, out: str | Path, **options: Any) -> dict:
        scenario = self.scenario
        seed = int(options.get("seed", 0))
        key = f"{self.study_seed}/{model}/{epochs:.9g}/{lr:.9g}/{seed}"
        noise = float(np.random.default_rng(zlib.crc32(key.encode())).standard_normal())
        family, size = self.models[model]
        loss = scenario.loss(size, epochs, lr, noise, family)
        examples = int(round(epochs * scenario.examples_per_epoch))
        flops = train_flops(size * MACS_PER_PARAM) * examples
        from convscale_cli.budget import flops_to_core_hours

        summary = {
            "kind": "pretrain",
            "status": "finished",
            "run": str(out),
            "model": model,
            "family": family,
            "dataset": dataset,
            "epochs": epochs,
            "lr": lr,
            "batch_size": 64,
            "seed": seed,
            "params": int(size) + HEAD_PARAMS,
            "params_body": int(size),
            "macs_per_image": int(size * MACS_PER_PARAM),
            "train_resolution": 32,
            "num_classes": 100,
            "examples_seen": examples,
            "final": {"eval_loss": loss, "eval_top1": 0.5},
            "ledger": {"train_flops": flops, "core_hours": float(flops_to_core_hours(flops))},
            "config": {"data_options": {}, **{k: v for k, v in options.items() if k != "data_options"}},
        }
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        config = {"model": model, "dataset": dataset, "epochs": epochs, "lr": lr, **options}
        (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
        (path / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
        return summary


def write_study(scenario: Scenario, out: str | Path, study_seed: int) -> Registry:
    """Run the scenario's study into ``out`` through the real sweep (one runs directory per seed).

    Returns:
        The registry holding the simulated models (``plan --from`` needs it to count candidates).
    """
    from convscale_cli.sweep import StudyConfig, run_sweep

    registry = scenario.registry()
    trainer = SimulatedTrainer(scenario, study_seed)
    grid = tuple(float(f"{scenario.lr_ref * 2.0**k:.6g}") for k in scenario.lr_octaves)
    for seed in range(scenario.seeds):
        study = StudyConfig(
            out=str(Path(out) / f"seed{seed}") if scenario.seeds > 1 else str(out),
            dataset=DATASET,
            models=tuple(scenario.models()),
            epochs=tuple(scenario.epochs),
            seed=seed,
            rule=scenario.rule,
            start_lr=float(f"{scenario.lr_ref * 2:.6g}"),
            lr_grid=grid if scenario.rule == "grid" else (),
        )
        run_sweep(study, registry, trainer=trainer)
    return registry


def balanced_law(
    E: float,  # noqa: N803  (the paper's names)
    alpha: float,
    beta: float,
    sizes: tuple[float, ...],
    epochs: tuple[float, ...],
    examples_per_epoch: float,
    reducible: float = 2.0,
) -> tuple[float, float, float, float, float]:
    """A law whose compute-optimal point is the design's middle (geometric-mean size and examples).

    At a compute-optimal ``(N, D)`` the two terms satisfy ``alpha A/N^alpha = beta B/D^beta`` (Hoffmann et al. eq.
    4); ``A`` and ``B`` are set so that this holds at the middle of the design with the two terms adding up to
    ``reducible``. Then the optimum moves through the ladder as compute grows, which a study must see to judge (b).
    """
    n_mid = float(np.exp(np.mean(np.log(sizes))))
    d_mid = float(np.exp(np.mean(np.log(np.asarray(epochs) * examples_per_epoch))))
    term_a, term_b = reducible * beta / (alpha + beta), reducible * alpha / (alpha + beta)
    return (E, term_a * n_mid**alpha, alpha, term_b * d_mid**beta, beta)


_SIZES = tuple(1e5 * 2.0**i for i in range(5))
_EPOCHS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
_PER_EPOCH = 2e5
_SMALL_SIZES = (1.2e5, 2.5e5, 5.4e5)
_SMALL_EPOCHS = (0.25, 0.5, 1.0)
# The main job's design (convscale_cli/studies/powerlaw.toml): nfnet-w64 / w32 / w16 non-head parameters, five epoch
# budgets over 16,384 images, alpha 25.6 and 51.2 (one octave apart) in every cell.
_JOB_SIZES = (8.5e3, 3.1e4, 1.18e5)
_JOB_EPOCHS = (0.5, 1.0, 2.0, 4.0, 8.0)
_JOB_PER_EPOCH = 16384.0


def scenarios() -> dict[str, Scenario]:
    """The calibration scenarios: the shapes real studies have, with the truth of each finding.

    ``sigma`` 0.015 is the run noise a study in the power-law regime reaches (two seeds within ~0.03 nats at a loss
    of ~2-3); 0.06 is what the old laptop study, in its early transient, measured (seed sd 0.24-0.36 nats at ~4.5).

    ``main-job`` and ``main-job-3-seeds`` are the main job's design with a truth in which the paper's findings hold,
    matched to what its runs measured: losses ~1.2-3.4 (the runs: 1.26-3.3), frontier exponent b = 0.2 and
    allocation exponent a = 0.5 (the three seeds pooled: ~0.2 and 0.51-0.58), run noise 0.055 in log loss (the
    spread between its seeds), and the optimal lr constant at the lower of the two rates (the runs' optimum did not
    fall with the budget; a constant optimum on the grid also keeps the frontier the optimal-lr one). They measure
    how often one job, or three seeds pooled, says "supported" for (a) and (b) when they are true: the design's
    power, which no bound requires (they are not in :data:`POWERED`).
    """
    design = dict(sizes=_SIZES, epochs=_EPOCHS, examples_per_epoch=_PER_EPOCH)
    holds = balanced_law(0.0, 0.3, 0.3, _SIZES, _EPOCHS, _PER_EPOCH)
    saturating = balanced_law(1.0, 0.6, 0.6, _SIZES, _EPOCHS, _PER_EPOCH, reducible=3.0)
    no_size = (0.0, 0.0, 0.3, holds[3], 0.3)
    small = balanced_law(0.0, 0.3, 0.3, _SMALL_SIZES, _SMALL_EPOCHS, _PER_EPOCH / 12)
    truth_all = {"log_log_law": True, "scale_together": True, "lr_falls": True}
    job = dict(
        sizes=_JOB_SIZES,
        epochs=_JOB_EPOCHS,
        examples_per_epoch=_JOB_PER_EPOCH,
        law=balanced_law(0.0, 0.4, 0.4, _JOB_SIZES, _JOB_EPOCHS, _JOB_PER_EPOCH),
        sigma=0.055,
        lr_epochs_exp=0.0,
        lr_size_exp=0.0,
        lr_octaves=(0, 1),
        truth={"log_log_law": True, "scale_together": True, "lr_falls": False},
    )
    return {
        s.name: s
        for s in (
            Scenario("law-holds", law=holds, sigma=0.015, truth=truth_all, **design),
            Scenario(
                "saturating",
                law=saturating,
                sigma=0.015,
                truth={"log_log_law": False, "scale_together": True, "lr_falls": True},
                **design,
            ),
            Scenario(
                "size-and-lr-null",
                law=no_size,
                sigma=0.015,
                lr_epochs_exp=0.0,
                lr_size_exp=0.0,
                truth={"log_log_law": None, "scale_together": False, "lr_falls": False},
                **design,
            ),
            Scenario("two-seeds", law=holds, sigma=0.015, seeds=2, truth=truth_all, **design),
            Scenario("two-trial", law=holds, sigma=0.015, rule="two-trial", truth=truth_all, **design),
            # Verdict (d): the same law for both families, and ViTs 12% ahead (ConvNets outside the 5% tolerance).
            Scenario(
                "families-match",
                law=holds,
                sigma=0.015,
                vit_gap=0.0,
                truth={**truth_all, "families_match": True},
                **design,
            ),
            Scenario(
                "vit-ahead",
                law=holds,
                sigma=0.015,
                vit_gap=math.log(1.12),
                truth={**truth_all, "families_match": False},
                **design,
            ),
            Scenario(
                "small-noisy",
                sizes=_SMALL_SIZES,
                epochs=_SMALL_EPOCHS,
                examples_per_epoch=_PER_EPOCH / 12,
                law=small,
                sigma=0.06,
                rule="two-trial",
                truth=truth_all,
            ),
            Scenario("main-job", **job),
            Scenario("main-job-3-seeds", seeds=3, **job),
        )
    }


# Findings each scenario's design is meant to decide: power (>= 80% "supported") is required only for these.
POWERED = {
    "law-holds": ("log_log_law", "scale_together", "lr_falls"),
    "saturating": ("scale_together", "lr_falls"),
    "two-seeds": ("log_log_law", "scale_together", "lr_falls"),
    "two-trial": ("log_log_law", "scale_together"),
    "families-match": ("log_log_law", "scale_together", "lr_falls", "families_match"),
}


def truth_values(scenario: Scenario) -> dict[str, float]:
    """True values of the quantities whose intervals are checked.

    ``alpha``, ``beta``, ``E`` and ``a = beta / (alpha + beta)`` are the law's (``alpha`` and ``a`` only when
    ``A > 0``, ``E`` only when ``E > 0``: a truth on the boundary of the parameter space is covered by any interval
    that reaches the boundary, which says nothing about calibration). The frontier exponent ``b`` is a
    property of the design as well as of the law (which cells exist to form the envelope): its truth is the
    noise-free analysis of the same design.
    """
    from convscale_cli.report.estimates import RunPoint, StudyDesign, estimate
    from convscale_cli.report.verdicts import families_of

    e, a, alpha, b, beta = scenario.law
    points = []
    for name, (family, size) in scenario.models().items():
        for epochs in scenario.epochs:
            lr = scenario.optimal_lr(size, epochs)
            examples = epochs * scenario.examples_per_epoch
            flops = train_flops(size * MACS_PER_PARAM) * examples
            loss = scenario.loss(size, epochs, lr, 0.0, family)
            points.append(RunPoint(name, family, epochs, lr, size, examples, flops, loss))
    design = StudyDesign.from_points([p for p in points if p.family == FAMILY])
    noise_free = estimate(design, design.loss, parametric=False)
    out = {"b": noise_free.b, "beta": beta}
    if scenario.vit_gap is not None:  # the gap along the two envelopes of this design's ladders
        both = StudyDesign.from_points(points)
        out["family_gap"] = estimate(both, both.loss, parametric=False, families=families_of(both)).family_gap
    if e > 0:  # E = 0 lies on the boundary of E >= 0, where an interval [0, x] holds it by construction
        out["E"] = e
    if a > 0:  # with A = 0 model size does not matter: alpha and the allocation have no true value
        out.update(alpha=alpha, a=scenario.size_exponent)
    return out


def run_once(
    scenario: Scenario, study_seed: int, workdir: str | Path, replicates: int, plan_at: float = 1.0
) -> dict[str, Any]:
    """One simulated study through the real sweep, analysis and plan: intervals, truths and verdicts.

    ``plan_at`` is the plan's budget as a multiple of the largest cell's compute (above 1 the plan extrapolates).
    """
    import shutil

    from convscale_cli.budget import get_hardware, parse_budget
    from convscale_cli.plan_fit import plan_fitted
    from convscale_cli.planner import DatasetPlan, PlanRequest
    from convscale_cli.report.build import analyse

    out = Path(workdir) / f"{scenario.name}-{study_seed}"
    shutil.rmtree(out, ignore_errors=True)
    registry = write_study(scenario, out, study_seed)
    result = analyse(out, replicates=replicates, seed=study_seed)
    est, boot = result.estimates, result.boot
    observed = {"b": est.b, "a": est.size_exponent}
    if est.parametric is not None:
        observed.update(alpha=est.parametric.alpha, beta=est.parametric.beta, E=est.parametric.E)
    intervals = {name: boot.interval(name, value) for name, value in observed.items()}
    families = next((v for v in result.verdicts if v.finding == "families_match"), None)
    if families is not None and families.numbers.get("gap_interval"):
        intervals["family_gap"] = tuple(families.numbers["gap_interval"])
    row: dict[str, Any] = {
        "seed": study_seed,
        "verdicts": {v.finding: v.status for v in result.verdicts},
        "intervals": intervals,
        "noise": result.noise.sigma,
    }
    # plan --from at (a multiple of) the largest cell's compute: does the recommendation's interval hold the truth?
    if result.parametric is not None:
        largest = plan_at * max(c.core_hours for c in result.cells)
        from convscale_cli.budget import core_hours_to_flops

        request = PlanRequest(
            budget=parse_budget(f"{core_hours_to_flops(largest):.6g}-flops"),
            hardware=get_hardware("tpu-v4"),
            dataset=DatasetPlan(DATASET, int(scenario.examples_per_epoch), 100, 32),
            family=FAMILY,
            batch_size=64,
            top=1,
        )
        plan = plan_fitted(request, registry, out, analysis=result)
        best = plan.recommendation
        size = scenario.models()[best.model][1]
        epochs = best.examples / scenario.examples_per_epoch
        # The plan predicts the loss a user will measure following it with one seed, tuning the way the study tuned
        # its runs: the best of the study's lr grid, or for the two-trial rule the better of the two trials the
        # plan suggests, each a new run with its own noise.
        grid = [scenario.lr_ref * 2.0**k for k in scenario.lr_octaves] if scenario.rule == "grid" else best.lr_trials
        draws = np.random.default_rng([study_seed, len(grid)]).standard_normal(len(grid))
        truth = min(scenario.loss(size, epochs, lr, z) for lr, z in zip(grid, draws, strict=True))
        row["plan"] = {"interval": best.loss_interval, "truth": truth}
    shutil.rmtree(out, ignore_errors=True)
    return row


def tally(scenario: Scenario, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Coverage of each interval and the share of each verdict over a scenario's simulations."""
    truth = truth_values(scenario)
    coverage: dict[str, dict[str, float]] = {}
    for name, value in truth.items():
        hits = [lo <= value <= hi for row in rows if (ci := row["intervals"].get(name)) for lo, hi in [ci]]
        if hits:
            coverage[name] = {"coverage": float(np.mean(hits)), "n": len(hits), "truth": value}
    plans = [row["plan"] for row in rows if row.get("plan") and row["plan"]["interval"]]
    if plans:
        hits = [p["interval"][0] <= p["truth"] <= p["interval"][1] for p in plans]
        coverage["plan_loss"] = {"coverage": float(np.mean(hits)), "n": len(hits), "truth": math.nan}
    verdicts: dict[str, dict[str, float]] = {}
    for finding in ("log_log_law", "scale_together", "lr_falls", "families_match"):
        if finding == "families_match" and scenario.vit_gap is None:
            continue
        statuses = [row["verdicts"].get(finding) for row in rows]
        verdicts[finding] = {
            status: statuses.count(status) / len(statuses) for status in ("supported", "not supported", "inconclusive")
        }
    return {
        "scenario": scenario.name,
        "sims": len(rows),
        "coverage": coverage,
        "verdicts": verdicts,
        "noise": float(np.median([row["noise"] for row in rows])),
    }


# The bounds a calibration must meet (the coverage of a nominal 90% interval, false-verdict rates, power).
COVERAGE_BOUNDS = (0.80, 0.97)
MAX_FALSE = 0.10
MIN_POWER = 0.80


def check(scenario: Scenario, summary: dict[str, Any], slack: float = 0.0) -> list[str]:
    """Every bound the scenario's tally misses, as readable lines (empty: calibrated).

    ``slack`` widens the coverage bounds by that much on each side: a smaller calibration (the CI test's 50 studies)
    allows for its own sampling error, about two binomial standard errors; the benchmark uses none.
    """
    failures = []
    for name, entry in summary["coverage"].items():
        if not COVERAGE_BOUNDS[0] - slack <= entry["coverage"] <= COVERAGE_BOUNDS[1] + slack:
            failures.append(f"{scenario.name}: coverage of {name} {entry['coverage']:.2f} outside {COVERAGE_BOUNDS}")
    for finding, shares in summary["verdicts"].items():
        truth = scenario.truth.get(finding)
        if truth is True and shares["not supported"] > MAX_FALSE:
            failures.append(f"{scenario.name}: {finding} 'not supported' {shares['not supported']:.0%} when true")
        if truth is False and shares["supported"] > MAX_FALSE:
            failures.append(f"{scenario.name}: {finding} 'supported' {shares['supported']:.0%} when false")
        if truth is True and finding in POWERED.get(scenario.name, ()) and shares["supported"] < MIN_POWER:
            failures.append(f"{scenario.name}: {finding} 'supported' only {shares['supported']:.0%} (power)")
    if scenario.rule == "two-trial" and summary["verdicts"]["lr_falls"]["supported"] > 0:
        failures.append(f"{scenario.name}: a two-trial study was 'supported' on lr_falls")
    return failures
