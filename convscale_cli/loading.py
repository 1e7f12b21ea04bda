"""Load any checkpoint convscale writes, for inference, evaluation or export.

:func:`load` accepts what ``convscale finetune --from`` accepts (:func:`convscale_cli.finetune.backbone.locate`):

* a weights checkpoint (``model.json`` + ``params/`` from ``import-weights``, or ``model.json`` beside a
  ``.safetensors`` file from ``export --format safetensors``; the file itself may be named);
* a pre-training or fine-tuning run directory: its newest complete checkpoint;
* ``RUN/checkpoints`` or one checkpoint ``RUN/checkpoints/<step>``.

From a run it reads only the parameters (the EMA when the run kept one, as fine-tuning does: NFNet 2021 A.5 evaluates
the EMA) with the same Orbax partial restore fine-tuning uses, and rebuilds the model with the run's build options,
numerics and activation precision, so evaluating the result reproduces the run's own evaluation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convscale_cli.data import IMAGENET, Normalization
from convscale_cli.data.augment import DEFAULT_EVAL_CROP_FRACTION
from convscale_cli.engine.rundir import read_json
from convscale_cli.errors import CheckpointError, UnknownNameError

if TYPE_CHECKING:
    from convscale_cli.finetune.backbone import Pretrained
    from convscale_cli.registry import ArchitectureSpec, Registry

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A checkpoint's model with its parameters, and what its training run knew about evaluating it.

    Attributes:
        spec: the architecture.
        module: the Flax module, built with the checkpoint's options in ``precision``.
        params: the ``params`` collection (float32, on the first local device).
        num_classes: classifier size.
        options: the build options (numerics included) the parameters were trained or imported with.
        precision: ``fp32`` or ``bf16`` activations.
        collection: ``params`` or ``ema``: which parameters of a run were loaded.
        checkpoint: the located checkpoint (path, kind, run, step).
        loss: the loss the model was trained with (``softmax`` or ``sigmoid``), for a held-out loss.
        eval_resolution: the run's held-out resolution, else the architecture's.
        eval_crop: the run's held-out centre-crop fraction, or None when the checkpoint does not record one.
        batch_size: the run's global batch (training's held-out batches are at most this), or None.
        normalization: the input normalisation the parameters were trained with (``apply`` takes images normalised
            with it).
    """

    spec: ArchitectureSpec
    module: Any
    params: Any
    num_classes: int
    options: Mapping[str, Any]
    precision: str
    collection: str
    checkpoint: Pretrained
    loss: str
    eval_resolution: int
    eval_crop: float | None
    batch_size: int | None = None
    normalization: Normalization = IMAGENET

    @property
    def numerics(self) -> str:
        """The name of the numerics the options select (``reference``, ``timm``, or ``custom``)."""
        return self.spec.numerics_name(self.options)

    def describe(self) -> dict[str, Any]:
        """What was loaded, as plain JSON (for ``--json`` output and summaries)."""
        pre = self.checkpoint
        return {
            "path": str(pre.path),
            "kind": pre.kind if pre.kind == "weights" else pre.source.get("kind", "run"),
            "model": self.spec.name,
            "step": pre.step,
            "parameters": self.collection,
            "num_classes": self.num_classes,
            "numerics": self.numerics,
            "precision": self.precision,
            "normalization": self.normalization.to_json(),
        }


def _run_config(pre: Pretrained) -> dict[str, Any]:
    if pre.run is None:
        return {}
    return read_json(pre.run / "config.json") or {}


def load(
    path: str | Path,
    *,
    ema: bool = True,
    precision: str | None = None,
    registry: Registry | None = None,
    what: str = "checkpoint",
) -> LoadedModel:
    """Locate the checkpoint ``path`` names, check its parameters against the model, and read them.

    Args:
        path: a weights checkpoint, a run directory, its ``checkpoints/`` or one ``checkpoints/<step>``.
        ema: load a run's EMA parameters when the checkpoint holds them (False: always the raw parameters).
        precision: ``fp32`` or ``bf16`` activations; None: the run's own precision (``fp32`` for weights).
        registry: where the architecture is looked up (default: the installed plugins).
        what: how ``path`` is named in errors (a flag or argument).

    Raises:
        CheckpointError: ``path`` is not a checkpoint, or a tensor does not match the model (named).
        UnknownNameError: an unknown precision, or an architecture no installed plugin registers.
    """
    import jax
    import jax.numpy as jnp

    from convscale_cli.finetune.backbone import (
        abstract_params,
        check_backbone,
        checkpoint_shapes,
        flat_params,
        locate,
        restore_params,
    )

    if precision is not None and precision not in PRECISIONS:
        raise UnknownNameError("precision", precision, PRECISIONS)
    if registry is None:
        from convscale_cli.plugins import get_registry

        registry = get_registry()
    pre = locate(path, what=what)
    spec = registry.architecture(pre.architecture)
    config = _run_config(pre)
    collection = "params"
    if pre.kind == "run" and ema:
        with_ema = dataclasses.replace(pre, params_key=("ema",))
        try:
            checkpoint_shapes(with_ema)
        except CheckpointError:
            pass  # pre-training keeps no EMA (NFNet 2021 A.5), nor does a fine-tuning run with ema_decay 0
        else:
            pre, collection = with_ema, "ema"
    options = dict(pre.options)
    resolution = int(options.get("resolution", spec.train_resolution))
    wanted = flat_params(abstract_params(spec, pre.num_classes, options, resolution))
    check_backbone(spec.name, checkpoint_shapes(pre), wanted, [])
    params = restore_params(pre, {p: jax.ShapeDtypeStruct(v.shape, jnp.float32) for p, v in wanted.items()})
    precision = precision or str(config.get("precision") or "fp32")
    if precision not in PRECISIONS:
        raise CheckpointError(f"run config of {str(pre.path)!r} names an unknown precision {precision!r}")
    module = spec.build(num_classes=pre.num_classes, dtype=PRECISIONS[precision], **options)
    crop = config.get("eval_crop", config.get("eval_crop_fraction"))
    return LoadedModel(
        spec=spec,
        module=module,
        params=params,
        num_classes=pre.num_classes,
        options=options,
        precision=precision,
        collection=collection,
        checkpoint=pre,
        loss=str(config.get("loss") or spec.recipe.loss),
        eval_resolution=int(config.get("eval_resolution") or spec.eval_resolution),
        eval_crop=float(crop) if crop is not None else None,
        batch_size=int(config["batch_size"]) if isinstance(config.get("batch_size"), int) else None,
        normalization=pre.normalization,
    )


def default_eval_crop(loaded: LoadedModel, dataset_crop: float | None) -> float:
    """The run's held-out crop, else the dataset's, else the recipe's 0.875 (NFNet 2021 A.3)."""
    return loaded.eval_crop or dataset_crop or DEFAULT_EVAL_CROP_FRACTION


__all__ = ["PRECISIONS", "LoadedModel", "default_eval_crop", "load"]
