"""What a plugin's specs must satisfy before they enter the registry (the contract of docs/plugins.md).

Each check returns the first problem as a short phrase ("build does not accept drop_rate"), or None; the loader in
:mod:`convscale_cli.plugins` turns it into a warning (the spec is left out) or, under ``--strict``, an error naming the
plugin and the spec. The checks are pure Python and cheap (signatures, types, numbers): loading plugins must stay
fast and free of jax. What only running can tell (the module's shapes, the data's pixels, the augmentation values)
is checked when a run starts.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
import typing
from collections.abc import Callable, Mapping
from typing import Any

from convscale_cli.recipe import Loss, Optimizer, Recipe
from convscale_cli.registry import ArchitectureSpec, DatasetInfo, DatasetSpec, ModelCount

# The keyword arguments every ``build`` call may carry besides the spec's own ``options``: the engine passes all four
# when it trains; weight import and head detection pass ``num_classes`` (and the options) alone, so the other three
# need defaults.
BUILD_ARGUMENTS = {"num_classes": 10, "dtype": "float32", "drop_rate": 0.0, "stochdepth_rate": 0.0}
SPLITS = ("train", "eval")
OPTIMIZERS: tuple[str, ...] = typing.get_args(Optimizer)
LOSSES: tuple[str, ...] = typing.get_args(Loss)


def count_problem(count: object) -> str | None:
    """Why ``count`` (what a spec's ``count`` returned) is not a usable :class:`ModelCount`, or None."""
    if not isinstance(count, ModelCount):
        return f"returned {type(count).__name__}, not ModelCount"
    for field, unit in (("params", "parameters"), ("macs", "MACs")):
        value = getattr(count, field)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"returned {unit} {value!r}, not a number"
        # Written so that NaN fails too: zero MACs divide by zero in the planner, negative ones plan negative costs.
        if not 0 < value < math.inf:
            return f"returned {value:g} {unit}; counts must be positive and finite"
    return None


def _signature(function: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check before calling it
        return None


def _binds(signature: inspect.Signature | None, *args: Any, **kwargs: Any) -> str | None:
    """Why a call with ``*args, **kwargs`` would fail to bind ``signature``, or None (also when there is none)."""
    if signature is None:
        return None
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        return str(exc)
    return None


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_str_tuple(value: object) -> bool:
    return isinstance(value, tuple | list) and all(isinstance(v, str) for v in value)


def recipe_problem(recipe: Recipe) -> str | None:
    """What in ``recipe`` only training would otherwise reject (its ``__post_init__`` checks the numbers), or None."""
    if recipe.optimizer not in OPTIMIZERS:
        return f"recipe.optimizer {recipe.optimizer!r} is not one of {', '.join(OPTIMIZERS)}"
    if recipe.loss not in LOSSES:
        return f"recipe.loss {recipe.loss!r} is not one of {', '.join(LOSSES)}"
    for field in ("no_decay", "agc_exclude"):
        patterns = getattr(recipe, field)
        if not _is_str_tuple(patterns):
            return f"recipe.{field} {patterns!r} is not a tuple of regular expressions"
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                return f"recipe.{field} pattern {pattern!r} is not a regular expression ({exc})"
    return None


def architecture_problem(spec: ArchitectureSpec, *, signatures: bool = True) -> str | None:
    """The first way ``spec`` breaks the architecture contract (fields, ``build``'s signature), or None.

    ``signatures=False`` skips the signature checks (the built-ins: their tests check them, and loading stays fast).
    ``count`` is probed separately (:func:`count_problem`): it runs plugin code and may be slow.
    """
    if not isinstance(spec.family, str) or not spec.family:
        return f"family {spec.family!r} is not a non-empty string"
    for name in ("build", "count"):
        if not callable(getattr(spec, name)):
            return f"{name} is not callable"
    for name in ("train_resolution", "eval_resolution", "resolution_multiple", "min_resolution", "default_num_classes"):
        if not _positive_int(getattr(spec, name)):
            return f"{name} {getattr(spec, name)!r} is not a positive integer"
    for name in ("train_resolution", "eval_resolution"):
        resolution = getattr(spec, name)
        if resolution < spec.min_resolution or resolution % spec.resolution_multiple:
            return (
                f"{name} {resolution} breaks its own min_resolution {spec.min_resolution} / "
                f"resolution_multiple {spec.resolution_multiple}"
            )
    if not isinstance(spec.recipe, Recipe):
        return f"recipe is a {type(spec.recipe).__name__}, not convscale_cli.recipe.Recipe"
    problem = recipe_problem(spec.recipe)
    if problem:
        return problem
    if not _is_str_tuple(spec.tags):
        return f"tags {spec.tags!r} is not a tuple of strings"
    if not isinstance(spec.options, Mapping) or not all(isinstance(k, str) for k in spec.options):
        return f"options {spec.options!r} is not a mapping of option names to defaults"
    if not isinstance(spec.weight_sources, Mapping):
        return f"weight_sources {spec.weight_sources!r} is not a mapping"
    if spec.weight_sources and not callable(spec.import_weights):
        return "weight_sources are given but import_weights is not callable"
    if not signatures:
        return None
    # Each way convscale calls build: training (every argument), weight import and head detection (num_classes and
    # the options only).
    build = _signature(spec.build)
    problem = _binds(build, **{**BUILD_ARGUMENTS, **spec.options}) or _binds(
        build, **{**spec.options, "num_classes": BUILD_ARGUMENTS["num_classes"]}
    )
    if problem:
        return f"build does not accept the documented keyword arguments ({problem})"
    if _binds(_signature(spec.count), spec.eval_resolution, spec.default_num_classes):
        return "count does not accept (resolution, num_classes)"
    return None


def info_problem(info: object, what: str) -> str | None:
    """Why ``info`` (``static_info`` or what ``info()`` returned) is not a usable :class:`DatasetInfo`, or None."""
    if not isinstance(info, DatasetInfo):
        return f"{what} is a {type(info).__name__}, not DatasetInfo"
    if not _positive_int(info.num_classes):
        return f"{what}.num_classes {info.num_classes!r} is not a positive integer"
    if not _positive_int(info.resolution):
        return f"{what}.resolution {info.resolution!r} is not a positive integer"
    if not isinstance(info.split_sizes, Mapping):
        return f"{what}.split_sizes is not a mapping of split names to sizes"
    for split in SPLITS:
        if not _positive_int(info.split_sizes.get(split)):
            return f"{what}.split_sizes[{split!r}] is {info.split_sizes.get(split)!r}, not a positive integer"
    return None


def dataset_problem(spec: DatasetSpec, *, signatures: bool = True) -> str | None:
    """The first way ``spec`` breaks the dataset contract (fields, the signatures of ``open`` and ``info``), or None.

    ``signatures=False`` skips the signature checks, as for :func:`architecture_problem`.
    """
    if not isinstance(spec.description, str):
        return f"description {spec.description!r} is not a string"
    for name in ("open", "info"):
        if not callable(getattr(spec, name)):
            return f"{name} is not callable"
    if not isinstance(spec.options, Mapping) or not all(isinstance(k, str) for k in spec.options):
        return f"options {spec.options!r} is not a mapping of option names to defaults"
    if signatures:
        problem = _binds(_signature(spec.open), SPLITS[0], **spec.options)
        if problem:
            return f"open does not accept (split, **options) ({problem})"
        problem = _binds(_signature(spec.info), **spec.options)
        if problem:
            return f"info does not accept (**options) ({problem})"
    if spec.static_info is not None:
        problem = info_problem(spec.static_info, "static_info")
        if problem:
            return problem
    if not isinstance(spec.augment, Mapping) or not all(isinstance(k, str) for k in spec.augment):
        return f"augment {spec.augment!r} is not a mapping of AugmentConfig fields to values"
    if spec.eval_crop is not None and (
        isinstance(spec.eval_crop, bool) or not isinstance(spec.eval_crop, numbers.Real) or not 0 < spec.eval_crop <= 1
    ):
        return f"eval_crop {spec.eval_crop!r} is not a fraction in (0, 1]"
    return None
