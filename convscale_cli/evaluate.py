"""``evaluate(path, dataset)``: the library behind ``convscale eval``.

Any checkpoint :func:`convscale_cli.loading.load` accepts is evaluated on one split of any registered dataset, at any
resolution the model accepts (the paper fine-tunes at 384 px and evaluates at 480: Smith et al. 2023 §3; timm's
``validate.py`` does the same job for timm models). The pass is the engine's own held-out evaluation
(:class:`convscale_cli.engine.build.Evaluate` with the compiled :func:`~convscale_cli.engine.step.eval_step`),
sharded over the local devices like training's, so a run evaluated at its own resolution reproduces the numbers its
``summary.json`` records.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from convscale_cli.config import check_options
from convscale_cli.errors import UnknownNameError, UsageError
from convscale_cli.registry import Registry

DEFAULT_BATCH_SIZE = 256


def _batch_size(given: int | None, examples: int, devices: int, cap: int) -> int:
    if given is not None:
        if given <= 0:
            raise UsageError(f"`batch_size` must be > 0, got {given}")
        if given % devices:
            raise UsageError(
                f"batch size {given} is not divisible by {devices} devices; use a multiple of {devices} such as "
                f"{max(devices, given - given % devices)}"
            )
        return given
    # As in training (engine.sources.eval_batch_size): never pad a small split up to a large batch, and never exceed
    # the run's own batch, so a run is evaluated in the batches its summary was.
    return min(-(-cap // devices) * devices, max(devices, -(-examples // devices) * devices))


def evaluate(
    path: str | Path,
    dataset: str,
    *,
    split: str = "eval",
    resolution: int | None = None,
    crop_fraction: float | None = None,
    batch_size: int | None = None,
    ema: bool = True,
    precision: str | None = None,
    data_options: dict[str, Any] | None = None,
    worker_count: int = 0,
    registry: Registry | None = None,
    pipeline: Any = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint on a dataset split: held-out loss, top-1, top-5 and throughput.

    Args:
        path: a weights checkpoint, a run directory, or one checkpoint inside a run.
        dataset: a registered dataset.
        split: the split to evaluate (``eval``: the held-out split training evaluates on).
        resolution: image side in pixels; None: the run's evaluation resolution, else the architecture's.
        crop_fraction: central fraction kept after resizing; None: the run's, else the dataset's, else 0.875.
        batch_size: global batch (a multiple of the device count); None: up to the run's batch size, else 256.
        ema: evaluate a fine-tuning run's EMA parameters when it kept them.
        precision: ``fp32`` or ``bf16`` activations; None: the run's own.
        data_options: the dataset's options (e.g. ``{"root": "/data/imagenet"}``).
        worker_count: input-pipeline worker processes (0: threads in this process).
        registry: where models and datasets are looked up (default: the installed plugins).
        pipeline: the input pipeline module (default :mod:`convscale_cli.data`).

    Returns:
        ``{"checkpoint": {...}, "dataset", "split", "examples", "resolution", "crop_fraction", "batch_size",
        "devices", "eval_loss", "eval_top1", "eval_top5", "seconds", "images_per_sec"}``.

    Raises:
        UsageError: an unknown dataset, split or option, a resolution the model refuses, an indivisible batch, or a
            dataset whose class count differs from the model's classifier (both counts named).
        CheckpointError: ``path`` is not a checkpoint.
    """
    if resolution is not None and resolution <= 0:
        raise UsageError(f"`resolution` must be > 0, got {resolution}")
    if crop_fraction is not None and not 0.0 < crop_fraction <= 1.0:
        raise UsageError(f"`crop_fraction` must be in (0, 1], got {crop_fraction}")
    if registry is None:
        from convscale_cli.plugins import get_registry

        registry = get_registry()
    data = registry.dataset(dataset)
    data_options = dict(data_options or {})
    check_options(f"{data.name} data option", data_options, data.options)
    info = data.info(**data_options)
    if not info.split_sizes.get(split):
        raise UnknownNameError(f"{data.name} split", split, [s for s, n in info.split_sizes.items() if n])

    import jax

    from convscale_cli.data.device import Normalizer
    from convscale_cli.engine.build import Evaluate, abstract_batch, compile_eval_step, host_batch
    from convscale_cli.engine.cache import enable_compilation_cache
    from convscale_cli.engine.mesh import batch_sharding, make_mesh, replicated
    from convscale_cli.loading import default_eval_crop, load

    loaded = load(path, ema=ema, precision=precision, registry=registry, what="checkpoint")
    if loaded.num_classes != info.num_classes:
        raise UsageError(
            f"{str(path)!r} holds a {loaded.num_classes}-way classifier but dataset {data.name!r} has "
            f"{info.num_classes} classes; fine-tune it first (convscale finetune --from {path} --dataset {data.name})"
        )
    resolution = resolution or loaded.eval_resolution
    loaded.spec.check_resolution(resolution)
    crop_fraction = crop_fraction or default_eval_crop(loaded, data.eval_crop)
    if pipeline is None:
        import convscale_cli.data as pipeline

    source = data.open(split, **data_options)
    mesh = make_mesh()
    batch = _batch_size(batch_size, len(source), mesh.size, loaded.batch_size or DEFAULT_BATCH_SIZE)
    enable_compilation_cache()
    params = jax.device_put(loaded.params, replicated(mesh))
    shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated(mesh)), params)
    held_out = _Shapes(info=info, num_classes=loaded.num_classes)
    normalize = Normalizer(pipeline.normalize, loaded.normalization)  # what the parameters were trained with
    common = {"normalize": normalize, "loss": loaded.loss, "num_classes": loaded.num_classes}
    data_sharding = batch_sharding(mesh)
    eval_fn = compile_eval_step(
        loaded.module, common, shapes, abstract_batch(held_out, batch, resolution, data_sharding), replicated(mesh)
    )

    def to_device(host: dict[str, Any]) -> Any:
        return pipeline.to_global(host_batch(host, info.multi_label), data_sharding)

    run_eval = Evaluate(
        eval_fn,
        source,
        pipeline=pipeline,
        batch_size=batch,
        resolution=resolution,
        crop_fraction=crop_fraction,
        worker_count=worker_count,
        to_device=to_device,
    )
    start = time.perf_counter()
    try:
        metrics = run_eval(params)
    finally:
        run_eval.close()
    seconds = time.perf_counter() - start
    return {
        "checkpoint": loaded.describe(),
        "dataset": data.name,
        "split": split,
        "examples": len(source),
        "resolution": resolution,
        "crop_fraction": crop_fraction,
        "batch_size": batch,
        "devices": mesh.size,
        "loss": loaded.loss,
        **metrics,
        "seconds": seconds,
        "images_per_sec": len(source) / seconds if seconds > 0 else None,
    }


class _Shapes:
    """What :func:`~convscale_cli.engine.build.abstract_batch` reads of a run: the label layout."""

    def __init__(self, info: Any, num_classes: int) -> None:
        self.info, self.num_classes = info, num_classes


__all__ = ["DEFAULT_BATCH_SIZE", "evaluate"]
