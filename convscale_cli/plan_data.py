"""What a plan is over: the pre-training data and the candidate models.

The data is a registered dataset (its size, class count and resolution, unless given) or, without one, JFT-4B's
sizes, the paper's pre-training set (Smith et al. 2023 §2: ~4e9 images in ~30k classes, trained at 224 px). The
candidates are one family's models, chosen by name patterns or tags (:mod:`convscale_cli.planner` ranks them).

No jax, flax or numpy is imported here.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping, Sequence

from convscale_cli.errors import UnknownNameError, UsageError
from convscale_cli.registry import ArchitectureSpec, Registry

# Paper defaults (§1.1, §1.3): JFT-4B has ~4e9 images in ~30k classes; pre-training is at 224 px.
JFT4B_SIZE = 4_000_000_000
JFT4B_CLASSES = 30_000
PAPER_RESOLUTION = 224


@dataclasses.dataclass(frozen=True)
class DatasetPlan:
    """The pre-training data the plan is for."""

    name: str | None  # registry name, None for a bare --dataset-size (JFT-4B by default)
    size: int  # training examples per epoch
    num_classes: int
    resolution: int
    options: tuple[tuple[str, object], ...] = ()  # dataset options the pretrain command must pass (e.g. size)


def dataset_plan(
    registry: Registry,
    dataset: str | None,
    *,
    size: int | None = None,
    resolution: int | None = None,
    num_classes: int | None = None,
    options: Mapping[str, object] | None = None,
) -> DatasetPlan:
    """The data a plan is for: a registered dataset (its size, classes and resolution unless given), or, without
    ``dataset``, JFT-4B's sizes (Smith et al. 2023 §2) with whatever is given.

    A dataset that takes a ``size`` option (a procedural one like ``shapes``) is told the planned ``size`` in the
    commands the plan prints.

    Raises:
        UsageError: ``options`` without ``dataset``; options the dataset does not take; a dataset that needs options
            to report its size when they were not given (and ``size`` and ``num_classes`` were not either).
    """
    from convscale_cli.config import check_options
    from convscale_cli.registry import DatasetInfo

    if dataset is None:
        if options:
            raise UsageError("data options need a dataset (the options belong to a registered dataset)")
        return DatasetPlan(
            name=None,
            size=JFT4B_SIZE if size is None else size,
            num_classes=JFT4B_CLASSES if num_classes is None else num_classes,
            resolution=PAPER_RESOLUTION if resolution is None else resolution,
        )
    spec = registry.dataset(dataset)
    given = dict(options or {})
    check_options(f"{spec.name} data option", given, spec.options)
    info = spec.static_info if not given else None
    if size is not None and num_classes is not None and resolution is not None:
        info = DatasetInfo(num_classes, {"train": size}, resolution)  # nothing to ask the dataset
    if info is None:
        try:
            info = spec.info(**given)
        except UsageError as exc:
            raise DatasetInfoError(spec.name, str(exc)) from None
    if size is not None and "size" in spec.options:
        given["size"] = size
    return DatasetPlan(
        name=spec.name,
        size=size if size is not None else int(info.split_sizes.get("train", 0)),
        num_classes=num_classes if num_classes is not None else info.num_classes,
        resolution=resolution if resolution is not None else info.resolution,
        options=tuple(given.items()),
    )


class DatasetInfoError(UsageError):
    """A dataset could not report its size without options that were not given."""

    def __init__(self, dataset: str, reason: str) -> None:
        super().__init__(
            f"dataset {dataset!r} needs options to report its size ({reason}); pass its options, or give its size "
            "and class count"
        )
        self.dataset = dataset
        self.reason = reason


def family_of(registry: Registry, patterns: Sequence[str], default: str = "nfnet") -> str:
    """The family of the models ``patterns`` match (``default`` without patterns or matches).

    Raises:
        UsageError: the patterns match models of several families.
    """
    matched = {
        s.family
        for s in registry.architectures
        if any(fnmatch.fnmatchcase(s.name, p.strip().lower()) for p in patterns)
    }
    if len(matched) > 1:
        raise UsageError(
            f"`models` {','.join(patterns)} matches models of the families {', '.join(sorted(matched))}; a plan "
            "compares one family: add `family`"
        )
    return matched.pop() if matched else default


def select_models(
    registry: Registry, family: str, patterns: Sequence[str] = (), *, tags: Sequence[str] = ()
) -> list[ArchitectureSpec]:
    """The candidate models of ``family``.

    Those matching ``patterns``; else those tagged with one of ``tags`` (default ``paper``); else those not tagged
    ``tiny``; else all of them (a family of tiny models only, such as a test plugin's).

    Raises:
        UnknownNameError: no registered model belongs to ``family``.
        UsageError: no model of the family matches ``patterns``.
    """
    specs = [s for s in registry.architectures if s.family == family]
    if not specs:
        raise UnknownNameError("family", family, sorted({s.family for s in registry.architectures}))
    if patterns:
        chosen = [s for s in specs if any(fnmatch.fnmatchcase(s.name, p.strip().lower()) for p in patterns)]
        if not chosen:
            raise UsageError(
                f"no {family} model matches {', '.join(patterns)}; choose from {', '.join(s.name for s in specs)}"
            )
        return chosen
    wanted = tuple(tags) or ("paper",)
    chosen = [s for s in specs if set(wanted) & set(s.tags)]
    return chosen or [s for s in specs if "tiny" not in s.tags] or specs
