"""Building a run on the devices: mesh, model, optimiser, state layout, and the compiled steps.

Each training and evaluation step is compiled ahead of time for the run's fixed batch shapes
(``jit(...).lower(...).compile()``): feeding the executable a batch of any other shape is an error, never a silent
recompile, and XLA's cost analysis of the very executable that runs gives the ledger its FLOPs. Compiled programs are
kept for the process (:func:`convscale_cli.engine.cache.program`), keyed by the model, the recipe without its learning
rate, the shapes and the shardings: the later runs of a sweep or a two-trial tuning reuse them without tracing.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from convscale_cli.data.device import Normalizer
from convscale_cli.engine.cache import program, tree_key
from convscale_cli.engine.ledger import Ledger
from convscale_cli.engine.mesh import batch_sharding, check_batch, make_mesh, replicated, state_shardings
from convscale_cli.engine.optim import INJECTED_SCHEDULES, make_optimizer, recipe_schedule
from convscale_cli.engine.resolve import RunSpec
from convscale_cli.engine.state import TrainState
from convscale_cli.engine.step import eval_step, train_step
from convscale_cli.errors import DataError, UsageError
from convscale_cli.recipe import Recipe


@dataclasses.dataclass(frozen=True)
class Built:
    """The device-side pieces of one run.

    Attributes:
        mesh: the 1-D data mesh over all devices.
        model: the flax module.
        schedule: the learning-rate schedule (peak scaled to the global batch).
        tx: the optimiser.
        init: ``init() -> TrainState`` at step 0, for shapes (:meth:`fresh_state` builds the real one).
        init_params: ``init_params() -> params``: the model initialiser alone, jitted by :meth:`fresh_state`.
        from_params: ``from_params(params) -> TrainState`` at step 0 (optimiser state, base key).
        init_key: the key of the initialiser (a fine-tuning run's new classifier draws from it too).
        abstract: the state's shapes and dtypes, with ``shardings`` attached (the restore target).
        shardings: the state's shardings (replicated, or FSDP-split).
        data_sharding: the batch sharding.
        init_signature: what ``init_params`` depends on besides the model (resolution, seed): its program's key.
    """

    mesh: Mesh
    model: Any
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    init: Callable[[], TrainState]
    init_params: Callable[[], Any]
    from_params: Callable[[Any], TrainState]
    init_key: jax.Array
    abstract: Any
    shardings: Any
    data_sharding: NamedSharding
    init_signature: tuple[Any, ...]

    def fresh_state(self) -> TrainState:
        """The step-0 state, laid out on the devices.

        Only the model initialiser is compiled: it depends on the model alone, so the persistent compilation cache
        serves it to every run of the same model. The optimiser state holds the run's own numbers (the injected
        schedule) and is built eagerly, so those numbers never enter a compiled program.
        """
        initialise = program(
            ("init", self.model, *self.init_signature, tree_key(self.shardings.params)),
            lambda: jax.jit(self.init_params, out_shardings=self.shardings.params).lower().compile(),
        )
        return self.with_params(initialise())

    def with_params(self, params: Any) -> TrainState:
        """The step-0 state holding ``params``, laid out on the devices; built eagerly, so the run's schedule numbers
        never enter a compiled program."""
        return jax.device_put(self.from_params(params), self.shardings)


def build(run: RunSpec, *, accum_steps: int = 1) -> Built:
    """Create the mesh, model, optimiser and state layout (nothing is compiled or allocated yet).

    Args:
        run: the resolved run (pre-training or fine-tuning).
        accum_steps: gradient-accumulation micro-batches per step (the batch must split into them on every device).

    Raises:
        UsageError: a global batch the devices or processes do not divide.
    """
    config = run.config
    mesh = make_mesh()
    check_batch(run.batch_size, mesh, jax.process_count())
    if run.batch_size % (accum_steps * mesh.size):
        raise UsageError(
            f"batch size {run.batch_size} does not split into {accum_steps} micro-batches over {mesh.size} devices: "
            f"use a batch size divisible by {accum_steps * mesh.size} (grad_accum_steps x devices)"
        )
    model = run.arch.build(
        num_classes=run.num_classes,
        dtype="bfloat16" if config.precision == "bf16" else "float32",
        **run.build_options,
    )
    schedule = recipe_schedule(run.recipe, run.peak_lr, run.duration.steps)
    tx = make_optimizer(run.recipe, schedule)

    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(config.seed))

    def init_params() -> Any:
        dummy = jnp.zeros((1, run.resolution, run.resolution, 3), jnp.float32)
        return model.init({"params": init_key}, dummy, train=False)["params"]

    def from_params(params: Any) -> TrainState:
        return TrainState.create(params, tx, dropout_key, ema=config.ema_decay > 0)

    def init() -> TrainState:
        return from_params(init_params())

    # Shapes alone (no numbers), so the key is the model, the resolution and the optimiser's recipe.
    shapes = program(("state shapes", model, run.resolution, program_recipe(run.recipe)), lambda: jax.eval_shape(init))
    shardings = state_shardings(shapes, mesh, fsdp=config.fsdp)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )
    signature = (run.resolution, config.seed)
    return Built(
        mesh,
        model,
        schedule,
        tx,
        init,
        init_params,
        from_params,
        init_key,
        abstract,
        shardings,
        batch_sharding(mesh),
        signature,
    )


def program_recipe(recipe: Recipe) -> Recipe:
    """The part of a recipe the compiled steps depend on: all of it but the learning rate.

    The schedule's numbers (peak learning rate, warm-up and total steps) live in the optimiser state
    (:class:`convscale_cli.engine.optim.WarmupCosine`), so the trials of a cell and the epoch budgets of a model run
    one program.
    """
    return dataclasses.replace(recipe, lr=Recipe.lr)


def abstract_batch(run: RunSpec, batch: int, resolution: int, sharding: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes of one global batch: uint8 images, int32 labels (float32 multi-hot), float32 mask."""
    if run.info.multi_label:
        label = jax.ShapeDtypeStruct((batch, run.num_classes), jnp.float32, sharding=sharding)
    else:
        label = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding)
    return {
        "image": jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.uint8, sharding=sharding),
        "label": label,
        "mask": jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=sharding),
    }


def host_batch(batch: dict[str, Any], multi_label: bool, num_classes: int | None = None) -> dict[str, np.ndarray]:
    """A loader batch reduced to the keys and dtypes the compiled step takes.

    With ``num_classes``, single labels are checked to lie in ``[0, num_classes)``: ``one_hot`` of any other label is
    all zeros, and the example would train silently to loss 0 (a dataset plugin or a record with a bad label).

    Raises:
        DataError: a real (unmasked) example's label is outside the classifier.
    """
    out = {
        "image": np.asarray(batch["image"], np.uint8),
        "label": np.asarray(batch["label"], np.float32 if multi_label else np.int32),
        "mask": np.asarray(batch["mask"], np.float32),
    }
    if num_classes is not None and not multi_label:
        labels = out["label"][out["mask"] > 0]
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.size:
            raise DataError(
                f"label {int(bad[0])} is outside the classifier's {num_classes} classes (0..{num_classes - 1}): "
                "the dataset yields labels its info does not count"
            )
    return out


def compile_train_step(
    step: Callable[..., Any],
    *,
    model: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    recipe: Recipe,
    options: dict[str, Any],
    abstract: Any,
    batch: Any,
    out_shardings: Any,
) -> Any:
    """``step(state, batch, model=, tx=, schedule=, **options)`` compiled for ``(abstract, batch)``, state donated.

    ``tx`` must be ``make_optimizer(recipe, schedule)``: the program's key names the recipe (without its learning
    rate) instead of the optimiser, whose closures have no equality. With a :class:`WarmupCosine` the schedule's numbers
    are state, not program; any other schedule is part of the key. ``options`` must be hashable.
    """

    def compile() -> Any:
        bound = functools.partial(step, model=model, tx=tx, schedule=schedule, **options)
        return jax.jit(bound, donate_argnums=0, out_shardings=out_shardings).lower(abstract, batch).compile()

    # The recipe in the key names the schedule's kind and shape; its numbers are state.
    numbers = "injected" if isinstance(schedule, INJECTED_SCHEDULES) else schedule
    key = (step, model, program_recipe(recipe), numbers, tuple(sorted(options.items())))
    return program((*key, tree_key(abstract), tree_key(batch), tree_key(out_shardings)), compile)


def compile_eval_step(model: Any, options: dict[str, Any], params: Any, batch: Any, out_shardings: Any) -> Any:
    """:func:`eval_step` with ``model`` and ``options`` bound, compiled for ``(params, batch)``."""

    def compile() -> Any:
        bound = functools.partial(eval_step, model=model, **options)
        return jax.jit(bound, out_shardings=out_shardings).lower(params, batch).compile()

    key = (eval_step, model, tuple(sorted(options.items())), tree_key(params), tree_key(batch))
    return program((*key, tree_key(out_shardings)), compile)


def compile_steps(
    built: Built,
    run: RunSpec,
    pipeline: Any,
    eval_batch: int,
    *,
    options: Mapping[str, Any] | None = None,
) -> tuple[Any, Any]:
    """Compile ``(train_fn, eval_fn)`` for the run's batch shapes; the state argument of ``train_fn`` is donated.

    Args:
        built: the run's device-side pieces.
        run: the resolved run.
        pipeline: the input pipeline module (its ``normalize``, with the run's statistics, is traced into both steps).
        eval_batch: the held-out batch size.
        options: static options of :func:`~convscale_cli.engine.step.train_step` besides the model, optimiser,
            schedule, normalisation, loss and class count (label smoothing, EMA, accumulation, SAM, mixing).
    """
    normalize = Normalizer(pipeline.normalize, run.normalization)
    common = {"normalize": normalize, "loss": run.recipe.loss, "num_classes": run.num_classes}
    train_fn = compile_train_step(
        train_step,
        model=built.model,
        tx=built.tx,
        schedule=built.schedule,
        recipe=run.recipe,
        options=common | dict(options or {}),
        abstract=built.abstract,
        batch=abstract_batch(run, run.batch_size, run.resolution, built.data_sharding),
        out_shardings=(built.shardings, replicated(built.mesh)),
    )
    held_out = abstract_batch(run, eval_batch, run.eval_resolution, built.data_sharding)
    eval_fn = compile_eval_step(built.model, common, built.abstract.params, held_out, replicated(built.mesh))
    return train_fn, eval_fn


# Held-out sets up to this many bytes of decoded batches per process are read once and kept: every later evaluation
# reuses them instead of decoding again (the held-out set never changes).
EVAL_CACHE_BYTES = 256 << 20


class HeldOut:
    """The held-out batches of every evaluation of one run, read by one loader that lives as long as the run.

    A set small enough (:data:`EVAL_CACHE_BYTES`) is decoded once and kept, and its loader closed. A larger one is
    read by one live iteration over endless passes (``Loader.passes``), so ``--workers`` processes start once, not
    at every evaluation. The time until a fresh iteration's first batch (worker start-up and the first decode) is
    charged to the ledger as ``loader_startup``, never as evaluation.

    Args:
        make_loader: ``() -> loader`` of one padded pass over the held-out source (called once).
        ledger: where the start-up time is charged, or None.
    """

    def __init__(self, make_loader: Callable[[], Any], ledger: Ledger | None) -> None:
        self._make_loader = make_loader
        self._ledger = ledger
        self._loader: Any = None
        self._live: Iterator[dict[str, Any]] | None = None
        self._kept: list[dict[str, Any]] | None = None
        self.startup_seconds = 0.0  # of the pass now being read

    def _fresh(self, iterator: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        start = time.perf_counter()
        first = next(iterator, None)
        self.startup_seconds = time.perf_counter() - start
        if first is None:
            return iter(())
        return itertools.chain([first], iterator)

    def batches(self) -> Iterator[dict[str, Any]]:
        """One pass over the held-out set."""
        self.startup_seconds = 0.0
        if self._kept is not None:
            yield from self._kept
            return
        if self._loader is None:
            self._loader = self._make_loader()
        if hasattr(self._loader, "passes"):
            if self._live is None:
                self._live = self._fresh(self._loader.passes())
            source = itertools.islice(self._live, len(self._loader))
        else:  # a pipeline whose loaders only iterate once: a fresh one for each pass
            loader, self._loader = self._loader, None
            source = self._fresh(iter(loader))
        held: list[dict[str, Any]] | None = []
        size, done = 0, False
        try:
            for batch in source:
                if held is not None:
                    size += sum(getattr(v, "nbytes", 0) for v in batch.values())
                    held = held + [batch] if size <= EVAL_CACHE_BYTES else None
                yield batch
            done = True
        finally:
            if not done:  # a pass cut short leaves the live iteration mid-pass: the next one starts afresh
                self.close()
        if held is not None:
            self._kept = held
            self.close()

    def close(self) -> None:
        """Stop the loader's worker processes (a later pass starts them again)."""
        live, self._live = self._live, None
        if self._loader is not None and hasattr(self._loader, "close"):
            self._loader.close()
        if live is not None and hasattr(live, "close"):
            live.close()


class Evaluate:
    """``evaluate(params)``: one padded pass over the held-out source; masked sums, so padding never counts.

    The one held-out evaluation of convscale: training's periodic and final evaluations and ``convscale eval`` use
    it. Each process reads its share of every batch (``pipeline.eval_loader``, through one :class:`HeldOut` for all
    evaluations); ``eval_fn`` is the compiled :func:`~convscale_cli.engine.step.eval_step` for ``batch_size`` images
    of ``resolution`` pixels. Calling it returns ``{"eval_loss", "eval_top1", "eval_top5"}``, charging the time to
    ``ledger`` (when given) as ``eval`` and the loader's start-up as ``loader_startup``; :meth:`close` stops the
    loader's workers.
    """

    def __init__(
        self,
        eval_fn: Any,
        eval_source: Any,
        *,
        pipeline: Any,
        batch_size: int,
        resolution: int,
        crop_fraction: float,
        worker_count: int,
        to_device: Callable[[dict[str, Any]], Any],
        ledger: Ledger | None = None,
    ) -> None:
        self._eval_fn, self._to_device, self._ledger = eval_fn, to_device, ledger
        self.held_out = HeldOut(
            functools.partial(
                pipeline.eval_loader,
                eval_source,
                global_batch_size=batch_size,
                resolution=resolution,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
                worker_count=worker_count,
                crop_fraction=crop_fraction,
            ),
            ledger,
        )

    def __call__(self, params: Any) -> dict[str, float]:
        start = time.perf_counter()
        sums = None
        for batch in self.held_out.batches():
            out = self._eval_fn(params, self._to_device(batch))
            sums = out if sums is None else jax.tree_util.tree_map(jnp.add, sums, out)
        host = {k: float(v) for k, v in jax.device_get(sums).items()}
        if self._ledger is not None:
            startup = self.held_out.startup_seconds
            self._ledger.charge("loader_startup", startup)
            self._ledger.charge("eval", time.perf_counter() - start - startup)
        count = max(host["count"], 1.0)
        return {
            "eval_loss": host["loss_sum"] / count,
            "eval_top1": host["top1_sum"] / count,
            "eval_top5": host["top5_sum"] / count,
        }

    def close(self) -> None:
        """Stop the held-out loader's worker processes."""
        self.held_out.close()
