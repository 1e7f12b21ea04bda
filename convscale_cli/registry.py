"""What plugins register: architecture, dataset and tracker specs, and the registry that holds them.

Specs are frozen dataclasses whose optional fields all have defaults, so adding a capability never breaks a
third-party plugin. Everything needed to *list* a spec (names, counts, sizes) is plain Python; everything that needs
jax, flax or grain sits behind a callable that imports it when called.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from convscale_cli.budget import train_flops
from convscale_cli.data import IMAGENET, Normalization
from convscale_cli.errors import DuplicateRegistrationError, UnknownNameError, UsageError
from convscale_cli.recipe import Recipe

# The largest classifier convscale builds: 3x JFT's ~30k labels (the paper's pre-training set). A classifier of 2**31
# classes asks for terabytes before anything fails.
MAX_NUM_CLASSES = 100_000
# The largest image side convscale trains or evaluates at: 4x the paper's largest (512 px fine-tuning, Table 4). One
# 522024 px image is 760 GiB of float32 activations in the stem alone.
MAX_RESOLUTION = 2048


@dataclasses.dataclass(frozen=True)
class ModelCount:
    """Analytic size of a model: parameters and forward multiply-accumulates for one image."""

    params: int
    macs: int

    @property
    def train_flops(self) -> float:
        """Training FLOPs per image (:func:`convscale_cli.budget.train_flops`)."""
        return train_flops(self.macs)


@dataclasses.dataclass(frozen=True)
class MeasuredLr:
    """A learning rate tuned for a model in a small study, which ``plan`` starts from instead of the paper's prior.

    The paper's prior (alpha at batch 4096 for JFT-scale models) does not carry down to laptop-scale models at small
    batches: their tuned optimum lies one to two orders of magnitude above it. ``plan`` moves ``alpha`` to the planned
    run by the paper's epoch decay and the optimizer's batch rule, and says where it comes from.

    Attributes:
        alpha: the tuned ``--lr`` (quoted at the recipe's ``base_batch_size``, as every alpha is).
        batch_size: the batch it was tuned at.
        epochs: the epoch budget it was tuned for.
        source: where it was measured, in words (a study file and its setting).
    """

    alpha: float
    batch_size: int
    epochs: float
    source: str

    def __post_init__(self) -> None:
        if not (0 < self.alpha < math.inf and self.batch_size > 0 and 0 < self.epochs < math.inf):
            raise ValueError(f"measured lr {self!r}: alpha, batch_size and epochs must be positive and finite")


def head_params(count: Callable[[int, int], ModelCount], resolution: int, num_classes: int) -> int:
    """Parameters of the classifier head: those that grow with the class count (weights and bias per class).

    Read off two analytic counts, so it holds for any plugin whose head is linear in the class count.
    """
    if num_classes < 2:
        return 0
    per_class = count(resolution, num_classes).params - count(resolution, num_classes - 1).params
    return max(0, int(per_class) * int(num_classes))


@dataclasses.dataclass(frozen=True)
class ArchitectureSpec:
    """One registered model variant (e.g. ``nfnet-f0``, ``vit-b/16``).

    Attributes:
        name: unique, lower-case registry name.
        family: family name shared by the variants (``nfnet``, ``vit``); used by ``plan --family``.
        build: ``build(num_classes=..., dtype=..., **overrides)`` returning a ``flax.linen.Module`` whose
            ``__call__(images, *, train)`` maps float NHWC images to logits. Imports flax lazily.
        count: ``count(resolution, num_classes)`` returning a :class:`ModelCount`; pure Python.
        train_resolution: default training resolution (pixels, square).
        eval_resolution: default evaluation resolution.
        recipe: default training recipe of the family.
        description: one line for ``convscale models``.
        tags: free-form labels (``paper``, ``ladder``, ``tiny``) used for filtering and by the planner.
        resolution_multiple: resolutions must be a multiple of this (ViT: the patch size).
        min_resolution: smallest resolution the model accepts.
        weight_sources: foreign checkpoints this variant can import, e.g. ``{"timm": "dm_nfnet_f0"}``.
        import_weights: ``import_weights(source, tensors, num_classes)`` converting a flat name->array mapping
            (a timm state dict) into this model's ``params`` tree; raises a UsageError naming the first mismatch.
        options: extra keyword overrides ``build`` accepts, with their defaults (shown by ``models --json``).
        numerics: named sets of build options that fix how the model computes, e.g. ``{"reference": {...},
            "timm": {"activation": "gelu_exact", ...}}``; ``import-weights --numerics NAME`` records one in the
            checkpoint. ``reference`` (the paper's reference code) is the default and may be left out when it is
            just the build defaults.
        export_weights: ``export_weights(target, params, num_classes, options)`` converting this model's ``params``
            into a foreign state dict (the reverse of ``import_weights``), returning an
            :class:`~convscale_cli.weights.ExportedWeights`; raises a UsageError for options the target cannot hold.
        normalization: the input normalisation the model trains with (ImageNet's mean and std unless the family's
            reference code uses another); recorded with every run and checkpoint.
        weights_normalization: ``weights_normalization(source, model)`` -> the :class:`Normalization` the foreign
            weights ``model`` of ``source`` (a tagged timm name such as ``vit_small_patch16_224.dino``) were trained
            with, or None for ``normalization``; ``import-weights`` records it in ``model.json``.
        measured_lr: a learning rate tuned for this model in a small study (:class:`MeasuredLr`), which ``plan``
            prints instead of the paper's prior; None where there is none.
    """

    name: str
    family: str
    build: Callable[..., Any]
    count: Callable[[int, int], ModelCount]
    train_resolution: int
    eval_resolution: int
    recipe: Recipe = dataclasses.field(default_factory=Recipe)
    description: str = ""
    tags: tuple[str, ...] = ()
    resolution_multiple: int = 1
    min_resolution: int = 1
    default_num_classes: int = 1000
    weight_sources: Mapping[str, str] = dataclasses.field(default_factory=dict)
    import_weights: Callable[..., Any] | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    numerics: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    export_weights: Callable[..., Any] | None = None
    normalization: Normalization = IMAGENET
    weights_normalization: Callable[[str, str], Normalization | None] | None = None
    measured_lr: MeasuredLr | None = None

    def numerics_options(self, name: str) -> dict[str, Any]:
        """The build options of the numerics called ``name``; an UnknownNameError naming the choices."""
        presets = {"reference": {}, **self.numerics}
        if name not in presets:
            raise UnknownNameError(f"{self.name} numerics", name, presets)
        return dict(presets[name])

    def numerics_diff(self, options: Mapping[str, Any], name: str) -> list[tuple[str, Any, Any]]:
        """``(option, value in options, value the numerics called name use)`` for every option that differs.

        ``options`` are a checkpoint's build options; unset ones take the spec's defaults.
        """
        effective = {**self.options, **options}
        return [(k, effective.get(k), v) for k, v in self.numerics_options(name).items() if effective.get(k) != v]

    def numerics_name(self, options: Mapping[str, Any]) -> str:
        """The name of the first numerics ``options`` (over the defaults) agree with, else ``custom``."""
        for name in {"reference": {}, **self.numerics}:
            if not self.numerics_diff(options, name):
                return name
        return "custom"

    def check_resolution(self, resolution: int) -> None:
        """Raise a UsageError if this model cannot run at ``resolution``."""
        if resolution > MAX_RESOLUTION:
            raise UsageError(f"resolution {resolution} is over the limit of {MAX_RESOLUTION} px")
        if resolution < self.min_resolution:
            raise UsageError(f"resolution {resolution} is too small for {self.name} (minimum {self.min_resolution})")
        if resolution % self.resolution_multiple:
            raise UsageError(
                f"resolution {resolution} is not divisible by {self.resolution_multiple} as {self.name} requires"
            )


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset (or about one opened with given options)."""

    num_classes: int
    split_sizes: Mapping[str, int]  # e.g. {"train": N, "eval": M}
    resolution: int  # native or default image size in pixels
    multi_label: bool = False


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One registered dataset.

    Attributes:
        name: unique registry name.
        description: one line for ``convscale datasets``.
        open: ``open(split, **options)`` returning a random-access source (``len`` and ``__getitem__`` giving
            ``{"image": uint8[H, W, 3] or a PIL image, "label": ..., "id": int}``; file sources hand over the decoded
            PIL image, which the transforms crop and resize without a numpy round trip); imports heavy modules lazily.
        info: ``info(**options)`` returning :class:`DatasetInfo`; may read the disk (imagefolder) but never jax.
        options: options ``open``/``info`` accept with their defaults (e.g. ``{"root": None}``).
        static_info: facts known without options, shown by ``convscale datasets``; None when they depend on options.
        augment: training-augmentation defaults that suit the data (``AugmentConfig`` fields, e.g. no flips for
            handwriting); a run's own ``augment`` settings override them key by key.
        eval_crop: central fraction of the image kept at evaluation (1.0 for data whose object fills the frame);
            None: the recipe's (0.875, the NFNet 224/256 crop).
    """

    name: str
    description: str
    open: Callable[..., Any]
    info: Callable[..., DatasetInfo]
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    static_info: DatasetInfo | None = None
    augment: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    eval_crop: float | None = None


class Tracker(Protocol):
    """One open experiment tracker of one run (what :attr:`TrackerSpec.open` returns)."""

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Record the run's resolved config (once, when the run starts or resumes)."""

    def log_metrics(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        """Record scalar ``metrics`` of ``split`` (``train`` or ``eval``) at ``step``."""

    def close(self) -> None:
        """Flush and release everything (the run ended, was interrupted or failed)."""


@dataclasses.dataclass(frozen=True)
class TrackerSpec:
    """An experiment tracker: where a run's metrics and config go besides its own ``metrics.jsonl``.

    Attributes:
        name: what ``--tracker`` and the ``trackers`` config key call it (``tensorboard``, ``wandb``).
        description: one line for ``convscale plugins`` and errors.
        open: ``open(run_dir, run_name)`` returning a :class:`Tracker`; imports its package only when called.
        requires: the importable module the tracker needs (``wandb``), checked before a run compiles anything;
            empty when it needs none.
        install: how to install that module, for the error that says it is missing.
    """

    name: str
    description: str
    open: Callable[[Path, str], Tracker]
    requires: str = ""
    install: str = ""


S = TypeVar("S", ArchitectureSpec, DatasetSpec, TrackerSpec)


class _Table(Generic[S]):
    """Name -> spec, remembering which plugin registered each name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._specs: dict[str, S] = {}
        self._owners: dict[str, str] = {}

    def add(self, spec: S, owner: str) -> None:
        if not isinstance(spec.name, str) or not spec.name:
            raise UsageError(f"plugin {owner!r} registered a {self.kind} without a name")
        if spec.name in self._specs:
            raise DuplicateRegistrationError(
                f"{self.kind} {spec.name!r} is registered by both plugin {self._owners[spec.name]!r} "
                f"and plugin {owner!r}; uninstall one or restrict CONVSCALE_PLUGINS"
            )
        self._specs[spec.name] = spec
        self._owners[spec.name] = owner

    def get(self, name: str) -> S:
        try:
            return self._specs[name]
        except KeyError:
            lowered = name.lower()
            if lowered in self._specs:
                return self._specs[lowered]
            raise UnknownNameError(self.kind, name, self._specs) from None

    def owner(self, name: str) -> str:
        return self._owners[self.get(name).name]

    def match(self, pattern: str | None = None) -> list[S]:
        """Specs whose name matches a glob (``nfnet-f*``) or contains ``pattern``; all when None."""
        specs = list(self._specs.values())
        if not pattern:
            return specs
        glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        return [s for s in specs if fnmatch.fnmatchcase(s.name, glob.lower())]

    def names(self) -> list[str]:
        return list(self._specs)

    def __iter__(self) -> Iterator[S]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs


class Registry:
    """All architectures, datasets and trackers registered by the loaded plugins."""

    def __init__(self) -> None:
        self.architectures: _Table[ArchitectureSpec] = _Table("model")
        self.datasets: _Table[DatasetSpec] = _Table("dataset")
        self.trackers: _Table[TrackerSpec] = _Table("tracker")

    def architecture(self, name: str) -> ArchitectureSpec:
        """The spec registered as ``name``; raises UnknownNameError with close matches."""
        return self.architectures.get(name)

    def dataset(self, name: str) -> DatasetSpec:
        """The spec registered as ``name``; raises UnknownNameError with close matches."""
        return self.datasets.get(name)
