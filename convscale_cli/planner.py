"""``convscale plan``: which model, epoch budget and learning rate to pre-train for a compute budget.

Two modes share one candidate set (each model trained for the epochs the budget affords):

* **Prior** (no runs): the paper's rules of thumb (Smith et al. 2023; docs/paper-notes.md).
  Model size and epoch budget grow together with compute along a frontier anchored on the paper's three stated
  facts: the smallest budget (~0.4k TPU-v4 core-hours) trains F0 for 0.25 epochs, the optimal epoch budget crosses
  1 epoch at ~5k core-hours, and 110k core-hours trains F7+ for 8 epochs. Candidates are ranked by how close their
  per-example cost is to the frontier's (in log space). The learning-rate prior starts at the recipe's alpha (1.6 for
  NFNets) and halves as epochs and model size grow, never below a quarter of it (Fig. 3's 0.4-1.6 range).
* **Fitted** (``--from RUNS``): the parametric law ``L(N, D) = E + A/N^alpha + B/D^beta``
  (:func:`convscale_cli.report.fit.fit_parametric`) fitted to finished runs; candidates are ranked by predicted
  held-out loss, with a bootstrap interval (:mod:`convscale_cli.plan_fit`).

No jax, flax or numpy is imported here: the prior plan answers in well under a second.
"""

from __future__ import annotations

import bisect
import dataclasses
import decimal
import math
from collections.abc import Sequence

from convscale_cli.budget import (
    CALIBRATION_TRAIN_FLOPS,
    TRAIN_FLOPS_PER_MAC,
    Budget,
    Hardware,
    check_budget_flops,
    core_hours_to_flops,
    flops_to_core_hours,
    train_flops,
)
from convscale_cli.config import option_word
from convscale_cli.errors import UsageError
from convscale_cli.plan_data import (
    JFT4B_SIZE,
    PAPER_RESOLUTION,
    DatasetPlan,
    select_models,
)
from convscale_cli.registry import ArchitectureSpec, Registry

# The paper's pre-training batch (Smith et al. 2023, §2).
PAPER_BATCH_SIZE = 4096
# Fig. 3's epoch grid: 0.25 .. 8 in factors of 2. The smallest is the smallest run the paper trained.
MIN_EPOCHS = 0.25

# Frontier anchors (Smith et al. 2023, with the counts of docs/paper-notes.md): F0 (9.58 GMACs at 224 px, 30k head) for
# 0.25 epochs of JFT-4B; one epoch at ~5k core-hours; F7+ (100.86 GMACs) for 8 epochs at 110k core-hours (the budget
# calibration itself).
F0_MACS_224 = 9.58e9
F7PLUS_MACS_224 = 100.86e9
FRONTIER_ANCHORS: tuple[tuple[float, float], ...] = (
    (train_flops(F0_MACS_224) * MIN_EPOCHS * JFT4B_SIZE, MIN_EPOCHS * JFT4B_SIZE),
    (core_hours_to_flops(5e3), 1.0 * JFT4B_SIZE),
    (CALIBRATION_TRAIN_FLOPS, 8.0 * JFT4B_SIZE),
)
# Learning-rate prior (Smith et al. 2023 Fig. 3): alpha is the recipe's (1.6) up to half an epoch, then loses
# HALVINGS_PER_OCTAVE halvings per doubling of epochs, from 0.25 (F0) to 0.5 (F7+): "for large models the optimal
# learning rate falls more quickly". At most MAX_HALVINGS, so F7+ at 8 epochs gets 0.4 and every value stays in Fig. 3's
# [0.4, 1.6].
LR_FLAT_EPOCHS = 0.5
HALVINGS_PER_OCTAVE = (0.25, 0.5)
MAX_HALVINGS = 2


@dataclasses.dataclass(frozen=True)
class Frontier:
    """Compute-optimal examples seen as a piecewise power law of training FLOPs through anchor points.

    Between anchors ``log(examples)`` is linear in ``log(flops)``; beyond the ends the nearest segment's slope
    continues. The per-example cost (6 x MACs) takes the rest of the budget: ``macs = flops / (6 * examples)``.
    """

    anchors: tuple[tuple[float, float], ...] = FRONTIER_ANCHORS

    def __post_init__(self) -> None:
        xs = [a[0] for a in self.anchors]
        if len(xs) < 2 or xs != sorted(xs) or len(set(xs)) != len(xs):
            raise ValueError(f"frontier anchors must have >= 2 strictly increasing FLOP values, got {xs}")

    def examples(self, flops: float) -> float:
        """Compute-optimal number of training examples for ``flops`` model FLOPs."""
        logs = [(math.log(c), math.log(x)) for c, x in self.anchors]
        lc = math.log(flops)
        i = min(max(bisect.bisect_left([c for c, _ in logs], lc), 1), len(logs) - 1)
        (c0, x0), (c1, x1) = logs[i - 1], logs[i]
        return math.exp(x0 + (lc - c0) * (x1 - x0) / (c1 - c0))

    def macs(self, flops: float) -> float:
        """Compute-optimal forward MACs per example for ``flops`` model FLOPs."""
        return flops / (TRAIN_FLOPS_PER_MAC * self.examples(flops))

    def exponents(self) -> list[float]:
        """d log(examples) / d log(flops) on each segment (the model's cost per example takes ``1 - slope``)."""
        return [
            math.log(x1 / x0) / math.log(c1 / c0)
            for (c0, x0), (c1, x1) in zip(self.anchors, self.anchors[1:], strict=False)
        ]


def prior_lr(base_lr: float, macs_per_image: float, epochs: float) -> float:
    """The paper-shaped learning-rate prior on the factor-2 grid below ``base_lr`` (Smith et al. 2023 Fig. 3).

    Monotone: never rises with epochs or model size. The model-size effect is measured in the paper's own units
    (F0 -> F7+ MACs at 224 px), so the laptop ladder gets the small-model (slowest) decay.
    """
    if epochs <= LR_FLAT_EPOCHS:
        return base_lr
    size = math.log(max(macs_per_image, F0_MACS_224) / F0_MACS_224) / math.log(F7PLUS_MACS_224 / F0_MACS_224)
    rate = HALVINGS_PER_OCTAVE[0] + (HALVINGS_PER_OCTAVE[1] - HALVINGS_PER_OCTAVE[0]) * min(size, 1.0)
    halvings = min(MAX_HALVINGS, math.floor(rate * math.log2(epochs / LR_FLAT_EPOCHS) + 0.5 + 1e-9))
    return base_lr / 2**halvings


def batch_rule(optimizer: str) -> str:
    """How an optimizer's peak learning rate follows the batch size: ``"linear"`` or ``"sqrt"``.

    Linear for SGD (Goyal et al. 2017, "Accurate, Large Minibatch SGD", §2.1: the paper's alpha x batch / 4096);
    square-root for adaptive optimizers (Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient
    Algorithms"; timm's ``train.py`` picks ``sqrt`` for any optimizer named ``ada*``/``lamb`` and ``linear`` otherwise).
    """
    name = optimizer.lower()
    return "sqrt" if any(o in name for o in ("ada", "lamb")) else "linear"


def alpha_for_batch(alpha: float, optimizer: str, from_batch: int, to_batch: int) -> float:
    """The ``--lr`` alpha for ``to_batch`` that follows ``optimizer``'s batch rule from ``alpha`` at ``from_batch``.

    The engine always applies alpha linearly (peak lr = alpha x batch / base batch), so under the linear rule alpha is
    the same at every batch; under the square-root rule the peak lr scales as sqrt(batch), so alpha scales as
    sqrt(from_batch / to_batch).
    """
    if batch_rule(optimizer) == "linear" or from_batch == to_batch:
        return alpha
    return alpha * math.sqrt(from_batch / to_batch)


def round_lr(lr: float) -> float:
    """A learning rate to 3 significant digits, as printed in commands and directory names."""
    return float(f"{lr:.3g}")


def prior_lr_source(spec: ArchitectureSpec, batch_size: int) -> str:
    """Where a prior-mode learning rate comes from, in words."""
    recipe = spec.recipe
    base = f"the paper's prior (Smith et al. 2023 Fig. 3: the recipe's alpha {recipe.lr:g} at batch " + (
        f"{recipe.base_batch_size}, halved for long runs)"
    )
    if batch_rule(recipe.optimizer) == "linear":
        return f"{base}; {recipe.optimizer} scales it linearly with the batch (Goyal et al. 2017), which --lr does"
    return (
        f"{base}; {recipe.optimizer} scales it with the square-root rule (Malladi et al. 2022; timm's default "
        f"for adaptive optimizers): alpha x sqrt({recipe.base_batch_size}/{batch_size}), which --lr applies as "
        f"alpha x {batch_size}/{recipe.base_batch_size}"
    )


def hardware_precision(hardware: Hardware) -> str:
    """The precision a run on ``hardware`` uses by default: fp32 on CPU (bf16 is emulated there), else bf16."""
    return "fp32" if hardware.name == "cpu" else "bf16"


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    """Everything ``convscale plan`` was asked.

    Attributes:
        budget: the compute budget (its unit is the cost column's unit).
        hardware: the hardware that runs the plan (device-hours column); the budget's own for device-hour budgets.
        dataset: pre-training data (size, classes, resolution).
        family: architecture family whose models are candidates.
        batch_size: global batch size (steps = ceil(examples / batch)).
        models: glob patterns restricting candidates; empty = the family's ``paper`` models (all but ``tiny`` if none).
        top: how many ranked candidates to keep.
        min_epochs: the shortest run considered (the paper's grid starts at 0.25 epochs).
    """

    budget: Budget
    hardware: Hardware
    dataset: DatasetPlan
    family: str = "nfnet"
    batch_size: int = PAPER_BATCH_SIZE
    models: tuple[str, ...] = ()
    top: int = 5
    min_epochs: float = MIN_EPOCHS

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise UsageError(f"`batch_size` must be > 0, got {self.batch_size}")
        if self.top <= 0:
            raise UsageError(f"`top` must be > 0, got {self.top}")
        if self.dataset.size <= 0:
            raise UsageError(f"`dataset_size` must be > 0, got {self.dataset.size}")
        if self.dataset.num_classes <= 0:
            raise UsageError(f"`num_classes` must be > 0, got {self.dataset.num_classes}")
        if self.dataset.resolution <= 0:
            raise UsageError(f"`resolution` must be > 0, got {self.dataset.resolution}")
        # Again on the plan's hardware: a measured peak (CONVSCALE_CPU_PEAK_FLOPS) can push a budget past the limit.
        check_budget_flops(self.flops, self.budget.text or self.budget.format())

    @property
    def flops(self) -> float:
        """Model FLOPs the budget buys on its hardware at its utilisation."""
        return self.budget.flops_on(self.hardware)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One (model, epoch budget) the budget affords."""

    model: str
    family: str
    params: int
    macs_per_image: int  # at the planned resolution and class count
    epochs: float
    examples: int
    steps: int
    flops: float
    cost: float  # in the budget's unit
    cost_fraction: float
    core_hours: float  # TPU-v4 core-hours, the paper's axis
    device_hours: float  # hours of the planned hardware unit
    lr: float
    lr_trials: tuple[float, float]
    frontier_distance: float  # |log(macs / frontier macs)|, the prior's ranking key
    predicted_loss: float | None = None
    loss_interval: tuple[float, float] | None = None  # fitted mode: prediction interval for one run's loss
    law_interval: tuple[float, float] | None = None  # fitted mode: confidence interval of the law's mean loss
    extrapolated: bool = False  # fitted mode: model size or example count outside the fitted runs' range
    extrapolated_in: tuple[str, ...] = ()  # which of "model size", "example count" lie outside it
    lr_source: str = ""  # where ``lr`` comes from, in words

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (see README, ``plan --json``)."""
        out = dataclasses.asdict(self)
        out["lr_trials"] = list(self.lr_trials)
        out["loss_interval"] = list(self.loss_interval) if self.loss_interval else None
        out["law_interval"] = list(self.law_interval) if self.law_interval else None
        return out


@dataclasses.dataclass(frozen=True)
class Plan:
    """A ranked plan: the candidates, the recommendation (the first) and how it was derived."""

    mode: str  # "prior" or "fitted"
    request: PlanRequest
    frontier_examples: float
    frontier_macs: float
    candidates: tuple[Candidate, ...]
    notes: tuple[str, ...] = ()
    fit: dict[str, object] | None = None
    precision: str | None = None  # the --precision the commands carry

    @property
    def recommendation(self) -> Candidate:
        """The best candidate."""
        return self.candidates[0]


def round_down(value: float, digits: int = 3) -> float:
    """``value`` rounded down to ``digits`` significant digits (0.30649 -> 0.306, 7.9999999999 -> 8.0).

    Down, so the rounded run still fits the budget; the relative tolerance absorbs float noise at exact fits.
    """
    if not value > 0:
        return 0.0
    if math.isinf(value):
        return value
    # Decimal: exact for any float, where 10**exponent underflows to 0 below ~1e-308 (a 1e-300-flops budget).
    exact = decimal.Decimal(value)
    exponent = exact.adjusted() - digits + 1
    units = (exact * decimal.Decimal("1.000000001")).scaleb(-exponent).to_integral_value(decimal.ROUND_FLOOR)
    return float(f"{units}e{exponent}")


def affordable(request: PlanRequest, spec: ArchitectureSpec, frontier_macs: float) -> Candidate | None:
    """The longest run of ``spec`` the budget affords (epochs rounded down), or None below ``min_epochs``."""
    count = spec.count(request.dataset.resolution, request.dataset.num_classes)
    per_example = count.train_flops
    epochs = round_down(request.flops / (per_example * request.dataset.size))
    if epochs < request.min_epochs:
        return None
    examples = int(round(epochs * request.dataset.size))
    flops = per_example * examples
    lr, lr_source = _start_lr(request, spec, count.macs * _paper_scale(request.dataset), epochs)
    return Candidate(
        model=spec.name,
        family=spec.family,
        params=count.params,
        macs_per_image=count.macs,
        epochs=epochs,
        examples=examples,
        steps=math.ceil(examples / request.batch_size),
        flops=flops,
        cost=request.budget.amount * flops / request.flops,
        cost_fraction=flops / request.flops,
        core_hours=flops_to_core_hours(flops),
        device_hours=flops / request.hardware.flops_per_hour(),
        lr=lr,
        lr_trials=(lr, lr / 2),
        frontier_distance=abs(math.log(count.macs / frontier_macs)),
        lr_source=lr_source,
    )


def _start_lr(request: PlanRequest, spec: ArchitectureSpec, paper_macs: float, epochs: float) -> tuple[float, str]:
    """The alpha a prior plan prints for ``spec`` and where it comes from: the model's measured optimum
    (:attr:`~convscale_cli.registry.ArchitectureSpec.measured_lr`) moved to ``epochs`` by the paper's epoch decay and
    to the planned batch by the optimizer's rule; else the paper's prior at the recipe's batch, moved alike."""
    recipe = spec.recipe
    measured = spec.measured_lr
    if measured is None:
        alpha = prior_lr(recipe.lr, paper_macs, epochs)
        lr = alpha_for_batch(alpha, recipe.optimizer, recipe.base_batch_size, request.batch_size)
        return round_lr(lr), prior_lr_source(spec, request.batch_size)
    alpha = measured.alpha * prior_lr(1.0, paper_macs, epochs) / prior_lr(1.0, paper_macs, measured.epochs)
    lr = alpha_for_batch(alpha, recipe.optimizer, measured.batch_size, request.batch_size)
    rule = "linear" if batch_rule(recipe.optimizer) == "linear" else "square-root"
    return round_lr(lr), (
        f"measured: alpha {measured.alpha:g} tuned at batch {measured.batch_size} for {measured.epochs:g} epochs "
        f"({measured.source}), moved to {epochs:g} epochs by the paper's decay (Smith et al. 2023 Fig. 3) and to "
        f"batch {request.batch_size} by {recipe.optimizer}'s {rule} batch rule"
    )


def _paper_scale(dataset: DatasetPlan) -> float:
    # The lr prior measures size in MACs at the paper's 224 px; rescale (MACs grow with pixel count) so a model keeps
    # its size class whatever resolution it is planned at.
    return (PAPER_RESOLUTION / dataset.resolution) ** 2


def smallest_run(request: PlanRequest, specs: Sequence[ArchitectureSpec]) -> tuple[str, float]:
    """(model, FLOPs) of the cheapest run considered: the smallest model for ``min_epochs``."""
    costs = [(s.count(request.dataset.resolution, request.dataset.num_classes).train_flops, s.name) for s in specs]
    per_example, name = min(costs)
    return name, per_example * request.min_epochs * request.dataset.size


def candidates(
    request: PlanRequest, specs: Sequence[ArchitectureSpec], frontier: Frontier
) -> tuple[list[Candidate], float]:
    """Every affordable candidate (unranked) and the frontier's MACs per example at the request's budget.

    Raises:
        UsageError: the budget cannot pay for the smallest model's shortest run; names the smallest feasible budget.
    """
    from convscale_cli.plugins import ModelCountError, warn_left_out

    runnable, errors = [], []
    for spec in specs:
        try:
            spec.check_resolution(request.dataset.resolution)
            spec.count(request.dataset.resolution, request.dataset.num_classes)
            runnable.append(spec)
        except ModelCountError as exc:  # a plugin's count that fails at this resolution: left out, with a warning
            warn_left_out(exc)
        except UsageError as exc:  # e.g. a /14 ViT at 32 px: not a candidate, unless no model fits
            errors.append(exc)
    if not runnable:
        raise errors[0] if errors else UsageError("no model can be planned: each was left out (warnings above)")
    specs = runnable
    frontier_macs = frontier.macs(request.flops)
    found = [c for c in (affordable(request, s, frontier_macs) for s in specs) if c is not None]
    if not found:
        name, flops = smallest_run(request, specs)
        need = request.budget.amount * flops / request.flops
        raise UsageError(
            f"budget {request.budget.text or request.budget} is too small: the smallest run, {name} for "
            f"{request.min_epochs:g} epochs, needs {request.budget.format(need)}; the smallest feasible budget is "
            f"{request.budget.format(need)}"
        )
    return found, frontier_macs


def plan_prior(request: PlanRequest, registry: Registry, frontier: Frontier | None = None) -> Plan:
    """Rank the candidates by distance to the paper's compute-optimal frontier (Smith et al. 2023 §2)."""
    frontier = frontier or Frontier()
    specs = select_models(registry, request.family, request.models)
    found, frontier_macs = candidates(request, specs, frontier)
    # Ties (equal distance) go to the larger model: the fine-tuning regime favours "slightly larger models" (Smith et
    # al. 2023 §2).
    found.sort(key=lambda c: (round(c.frontier_distance, 9), -c.macs_per_image))
    examples = frontier.examples(request.flops)
    notes = [
        "prior mode: the paper's rules of thumb (Smith et al. 2023 §2), not a fit to your runs; "
        "pass --from RUNS_DIR for predicted losses",
        "tune the learning rate with the two trials (alpha, alpha/2): `convscale tune-lr`",
    ]
    if any(s.recipe.optimizer != "sgd" for s in specs):
        notes.append(
            "the lr prior's decay was measured for NFNets trained with SGD (Fig. 3); for other optimizers it is only "
            "a starting point for the two trials"
        )
    if request.batch_size < PAPER_BATCH_SIZE and any(s.measured_lr is None for s in specs):
        notes.append(
            "the lr prior is the paper's JFT-scale setting; small models at small batches often train best far above "
            "it (examples/quickstart.toml measured alpha 25.6-51.2 for the tiny NFNets at batch 64): tune it with "
            "`convscale tune-lr --grid`, or plan with --from RUNS once you have runs"
        )
    if request.dataset.size != JFT4B_SIZE:
        notes.append(
            "the frontier is defined in examples seen on JFT-4B; on a smaller dataset the same number of examples "
            "means more epochs and repeated images, which are worth less than fresh ones"
        )
    return Plan(
        mode="prior",
        request=request,
        frontier_examples=examples,
        frontier_macs=frontier_macs,
        candidates=tuple(found[: request.top]),
        notes=tuple(notes),
        precision=hardware_precision(request.hardware),
    )


def pretrain_command(
    request: PlanRequest, candidate: Candidate, lr: float, out_dir: str = "runs", precision: str | None = None
) -> str:
    """The exact ``convscale pretrain`` command of one candidate trial, every setting it needs spelled out."""
    dataset = request.dataset.name or "DATASET"
    parts = [
        "convscale pretrain",
        f"--model {candidate.model}",
        f"--dataset {dataset}",
        f"--epochs {candidate.epochs:g}",
        f"--lr {lr:g}",
        f"--batch-size {request.batch_size}",
        f"--resolution {request.dataset.resolution}",
        *([f"--precision {precision}"] if precision else []),
        *(f"--data-option {option_word(key, value)}" for key, value in request.dataset.options),
        f"--out {out_dir}/{run_name(candidate.model, candidate.epochs, lr)}",
    ]
    return " ".join(parts)


def run_name(model: str, epochs: float, lr: float) -> str:
    """Run-directory name of one trial: ``{model}-e{epochs}-lr{alpha}`` (shared by plan, tune-lr and sweep).

    A ``/`` in a model name (``vit-l/16``) becomes ``_``, so each trial is one directory, not a nested one.
    """
    return f"{model.replace('/', '_')}-e{epochs:g}-lr{lr:g}"


def plan_to_dict(plan: Plan) -> dict[str, object]:
    """The ``plan --json`` document (schema in README)."""
    request = plan.request
    best = plan.recommendation
    return {
        "mode": plan.mode,
        "budget": {
            "text": request.budget.text or str(request.budget),
            "amount": request.budget.amount,
            "unit": request.budget.unit_label,
            "flops": request.flops,
            "core_hours": flops_to_core_hours(request.flops),
        },
        "hardware": {
            "name": request.hardware.name,
            "peak_flops": request.hardware.peak_flops,
            "mfu": request.hardware.mfu,
        },
        "dataset": {**dataclasses.asdict(request.dataset), "options": dict(request.dataset.options)},
        "family": request.family,
        "batch_size": request.batch_size,
        "frontier": {
            "examples": plan.frontier_examples,
            "epochs": plan.frontier_examples / request.dataset.size,
            "macs_per_image": plan.frontier_macs,
        },
        "candidates": [c.to_dict() for c in plan.candidates],
        "recommendation": {
            **best.to_dict(),
            "commands": [pretrain_command(request, best, lr, precision=plan.precision) for lr in best.lr_trials],
        },
        "fit": plan.fit,
        "notes": list(plan.notes),
    }
