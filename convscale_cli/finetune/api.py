"""``finetune(config)``: the library entry point behind ``convscale finetune``.

It resolves the config, claims the run directory (a rerun of the same command resumes), loads the pre-trained
backbone with a new classifier (only when starting fresh: a resumed run restores its own checkpoint), and trains with
the engine's loop, checkpoints, ledger and progress display, using :func:`~convscale_cli.finetune.step.finetune_step`
(SAM + EMA + on-device mixing) as the compiled step. The summary records the fine-tuning cost in its own ledger and
the pre-training cost it builds on under ``pretrain``, both in TPU-v4 core-hours (paper-facts §1.6: F7+ costs ~110k
to pre-train and ~1.6k to fine-tune), and evaluates both the raw parameters (``final``) and the EMA (``final_ema``).
"""

from __future__ import annotations

import time
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convscale_cli import interrupts
from convscale_cli.engine import loop
from convscale_cli.engine.build import abstract_batch, compile_eval_step, compile_train_step, host_batch
from convscale_cli.engine.cache import enable_compilation_cache
from convscale_cli.engine.checkpoint import Checkpoints
from convscale_cli.engine.hardware import device_peak
from convscale_cli.engine.ledger import Ledger, lost_seconds, reset_host_peak_memory, xla_flops
from convscale_cli.engine.mesh import batch_sharding, check_batch, make_mesh, replicated, state_shardings
from convscale_cli.engine.optim import make_optimizer, recipe_schedule
from convscale_cli.engine.progress import Progress
from convscale_cli.engine.resolve import with_precision
from convscale_cli.engine.rundir import MetricsLog, RunDir
from convscale_cli.engine.sources import eval_batch_size, open_sources
from convscale_cli.engine.state import TrainState
from convscale_cli.engine.summary import versions
from convscale_cli.engine.tracking import choose_trackers, open_trackers
from convscale_cli.errors import RunInterrupted, UsageError
from convscale_cli.finetune.backbone import abstract_params, load_params
from convscale_cli.finetune.config import FinetuneConfig
from convscale_cli.finetune.resolve import FinetuneRun, resolve, resolved_dict
from convscale_cli.finetune.step import finetune_step
from convscale_cli.registry import Registry, TrackerSpec


def finetune(
    config: FinetuneConfig, registry: Registry | None = None, *, pipeline: ModuleType | None = None
) -> dict[str, Any]:
    """Fine-tune (or resume fine-tuning) a pre-trained model and return its ``summary.json`` contents.

    Args:
        config: the run config.
        registry: where models and datasets are looked up (default: the installed plugins).
        pipeline: the input pipeline module (default :mod:`convscale_cli.data`).

    Raises:
        CheckpointError: ``--from`` is not a usable checkpoint, or a tensor does not match the model (named).
        UsageError: bad config, ``--model`` mismatch, a resolution the model refuses, a run directory holding
            another run, an indivisible batch.
        TrainingError: a non-finite loss (exit code 3).
        RunInterrupted: SIGTERM/SIGINT, after saving a checkpoint (exit code 130).
    """
    if registry is None:
        from convscale_cli.plugins import get_registry

        registry = get_registry()
    if pipeline is None:
        import convscale_cli.data as pipeline
    if jax.process_count() > 1:
        raise UsageError("fine-tuning runs in a single process; multi-host is supported by pretrain only")
    rundir = RunDir(config.out, kind="finetune")
    config, precision_why = with_precision(config, jax.default_backend(), rundir.saved_config())
    run = resolve(config, registry)
    trackers = choose_trackers(registry, config.trackers, tensorboard=config.tensorboard)  # before compiling
    resolved = resolved_dict(run)
    resuming = rundir.prepare(resolved, force=config.force)
    progress = Progress(run.duration.steps, mode=config.progress)
    previous = rundir.summary() if resuming else None
    if previous and previous.get("status") == "finished":
        progress.message(f"{config.out}: fine-tuning already finished at step {previous.get('steps')}; nothing to do")
        return previous
    rundir.remove_summary()
    reset_host_peak_memory()
    if precision_why != "given":
        progress.message(f"precision {config.precision} ({precision_why})")

    enable_compilation_cache()  # a rerun, or the same model fine-tuned again, loads its compiled steps from disk
    mesh = make_mesh()
    check_batch(run.batch_size, mesh, 1)
    model = run.arch.build(
        num_classes=run.num_classes,
        dtype="bfloat16" if config.precision == "bf16" else "float32",
        **run.build_options,
    )
    schedule = recipe_schedule(run.recipe, run.peak_lr, run.duration.steps)
    tx = make_optimizer(run.recipe, schedule)
    head_key, dropout_key = jax.random.split(jax.random.PRNGKey(config.seed))
    use_ema = config.ema_decay > 0

    def init(params: Any) -> TrainState:
        return TrainState.create(params, tx, dropout_key, ema=use_ema)

    abstract = jax.eval_shape(init, abstract_params(run.arch, run.num_classes, run.build_options, run.resolution))
    shardings = state_shardings(abstract, mesh, fsdp=False)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    hardware, peak = device_peak(config.hardware, config.peak_flops)
    ledger = Ledger(flops_per_example=run.flops_per_example, num_devices=mesh.size, hardware=hardware, peak_flops=peak)
    checkpoints = Checkpoints(rundir.checkpoints, keep=config.keep)
    try:
        restored = checkpoints.restore(abstract)
        if restored is None:
            with ledger.timed("compile"):
                if config.scratch:
                    images = jnp.zeros((1, run.resolution, run.resolution, 3), jnp.float32)
                    params = jax.jit(
                        lambda key: model.init({"params": key}, images, train=False)["params"],
                        out_shardings=shardings.params,
                    )(head_key)
                else:
                    params = load_params(
                        run.pretrained,
                        run.arch,
                        num_classes=run.num_classes,
                        options=run.build_options,
                        resolution=run.resolution,
                        rng=head_key,
                    )
                    # The loaded tensors sit on one device; lay them out like the state before the jitted init.
                    params = jax.device_put(params, shardings.params)
                state = jax.jit(init, out_shardings=shardings)(params)
                jax.block_until_ready(state)
            if config.scratch:
                progress.message(
                    f"training {run.arch.name} from a random initialisation (the --scratch baseline "
                    f"of {run.pretrained.path})"
                )
            else:
                progress.message(
                    f"fine-tuning {run.arch.name} from {run.pretrained.path} with a new "
                    f"{run.num_classes}-way classifier"
                )
            start = (0, state, None, ledger)
        else:
            step, state, data_state, saved = restored
            lost = lost_seconds(rundir.live_ledger(), saved)
            ledger = Ledger.from_dict(
                {
                    **saved,
                    "num_devices": ledger.num_devices,
                    "hardware": ledger.hardware,
                    "peak_flops": ledger.peak_flops,
                }
            )
            ledger.device_seconds["lost"] += lost
            progress.message(f"resuming {config.out} from step {step} ({lost:.1f} device-seconds lost)")
            start = (step, state, data_state, ledger)
        return _train(
            run,
            rundir,
            resolved,
            progress,
            pipeline,
            mesh,
            model,
            schedule,
            tx,
            abstract,
            shardings,
            checkpoints,
            start,
            trackers,
        )
    finally:
        with interrupts.deferred():  # pending saves complete even when a signal arrives now
            checkpoints.close()


def _train(
    run: FinetuneRun,
    rundir: RunDir,
    resolved: dict[str, Any],
    progress: Progress,
    pipeline: ModuleType,
    mesh: Any,
    model: Any,
    schedule: Any,
    tx: Any,
    abstract: Any,
    shardings: Any,
    checkpoints: Checkpoints,
    start: tuple[int, Any, dict[str, Any] | None, Ledger],
    trackers: list[TrackerSpec],
) -> dict[str, Any]:
    config = run.config
    start_step, state, data_state, ledger = start
    rundir.truncate_metrics(start_step)
    data_sharding = batch_sharding(mesh)
    common = {"normalize": pipeline.normalize, "loss": run.recipe.loss, "num_classes": run.num_classes}
    train_source, eval_source = open_sources(run.data, config.data_options, eval_examples=config.eval_examples)
    eval_batch = eval_batch_size(run.batch_size, len(eval_source), mesh.size, jax.process_count())
    with ledger.timed("compile"):  # once per process for each distinct program (engine/cache.py)
        train_fn = compile_train_step(
            finetune_step,
            model=model,
            tx=tx,
            schedule=schedule,
            recipe=run.recipe,
            options=common
            | {
                "sam_rho": config.sam_rho,
                "sam_fraction": config.sam_fraction,
                "num_shards": mesh.size,
                "ema_decay": config.ema_decay,
                "mixup_alpha": config.mixup,
                "cutmix_alpha": config.cutmix,
                "label_smoothing": config.label_smoothing,
            },
            abstract=abstract,
            batch=abstract_batch(run, run.batch_size, run.resolution, data_sharding),
            out_shardings=(shardings, replicated(mesh)),
        )
        held_out = abstract_batch(run, eval_batch, run.eval_resolution, data_sharding)
        eval_fn = compile_eval_step(model, common, abstract.params, held_out, replicated(mesh))
    ledger.xla_flops_per_step = xla_flops(train_fn) * mesh.size

    def to_device(batch: dict[str, Any]) -> Any:
        return pipeline.to_global(host_batch(batch, run.info.multi_label, run.num_classes), data_sharding)

    def evaluate(params: Any) -> dict[str, float]:
        with ledger.timed("eval"):
            sums = None
            for batch in pipeline.eval_loader(
                eval_source,
                global_batch_size=eval_batch,
                resolution=run.eval_resolution,
                worker_count=config.worker_count,
                crop_fraction=run.eval_crop,
            ):
                out = eval_fn(params, to_device(batch))
                sums = out if sums is None else jax.tree_util.tree_map(jnp.add, sums, out)
            host = {k: float(v) for k, v in jax.device_get(sums).items()}
        count = max(host["count"], 1.0)
        return {
            "eval_loss": host["loss_sum"] / count,
            "eval_top1": host["top1_sum"] / count,
            "eval_top5": host["top5_sum"] / count,
        }

    loader = pipeline.train_loader(
        train_source,
        global_batch_size=run.batch_size,
        resolution=run.resolution,
        seed=config.seed,
        num_examples=run.duration.examples,
        worker_count=config.worker_count,
        augment=run.augment,
    )
    if data_state:
        loader.set_state(data_state)
    log = MetricsLog(rundir, trackers=open_trackers(trackers, rundir.path, resolved))
    ctx = loop.LoopContext(
        run=run,
        rundir=rundir,
        log=log,
        checkpoints=checkpoints,
        ledger=ledger,  # type: ignore[arg-type]
        train_fn=train_fn,
        evaluate=evaluate,
        to_device=to_device,
        progress=progress,
    )
    try:
        with progress:
            state, status, step = loop.train(ctx, state, loader, start_step)
            with interrupts.deferred():  # a signal now is honoured once the final checkpoint is on disk
                if step != start_step or start_step == 0:
                    loop.save(ctx, state, loader, step)
                checkpoints.wait()
            if interrupts.received():
                status = "interrupted"
            if status == "interrupted":
                rundir.write_live_ledger(ledger.to_dict())
                raise RunInterrupted(
                    f"interrupted at step {step}; checkpoint saved in {config.out}, rerun the same command to resume"
                )
            final = loop.evaluate_and_log(ctx, state.params, step)
            loop.check_final(ctx, final, step)
            final_ema = None
            if state.ema is not None:
                final_ema = evaluate(state.ema)
                log.write({"step": step, "split": "eval_ema", **final_ema, "time": time.time()})
                progress.message(
                    f"EMA eval @ step {step}: loss {final_ema['eval_loss']:.4f}  top-1 {final_ema['eval_top1']:.4f}"
                )
            rundir.write_live_ledger(ledger.to_dict())
    finally:
        log.close()
    summary = _summary(run, resolved, status, step, final, final_ema, ledger, state.params)
    rundir.write_summary(summary)
    progress.message(
        f"{status}: step {step}, top-1 {final['eval_top1']:.4f}"
        + (f" (EMA {final_ema['eval_top1']:.4f})" if final_ema else "")
        + f", fine-tuning {ledger.core_hours:.3g} TPU-v4 core-hours"
    )
    return summary


def _summary(
    run: FinetuneRun,
    resolved: dict[str, Any],
    status: str,
    step: int,
    final: dict[str, float],
    final_ema: dict[str, float] | None,
    ledger: Ledger,
    params: Any,
) -> dict[str, Any]:
    config = run.config
    train_size = max(int(run.info.split_sizes.get("train", 0)), 1)
    return {
        "kind": "finetune",
        "status": status,
        "run": str(config.out),
        "model": run.arch.name,
        "family": run.arch.family,
        "dataset": run.data.name,
        # Augmented samples per training example (what the compute scales with), and distinct passes over the data.
        "epochs": run.duration.epochs,
        "passes": run.duration.epochs / config.repeat_aug,
        "lr": run.recipe.lr,
        "peak_lr": run.peak_lr,
        "batch_size": run.batch_size,
        "seed": config.seed,
        "params": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params))),
        "macs_per_image": run.macs_per_image,
        "train_resolution": run.resolution,
        "eval_resolution": run.eval_resolution,
        "num_classes": run.num_classes,
        "examples_seen": ledger.examples,
        "epochs_seen": ledger.examples / train_size,
        "steps": step,
        "total_steps": run.duration.steps,
        "sam": {"rho": config.sam_rho, "fraction": config.sam_fraction},
        "ema_decay": config.ema_decay,
        "repeat_aug": config.repeat_aug,
        "final": final,
        "final_ema": final_ema,
        "init": "scratch" if config.scratch else "pretrained",
        "pretrain": run.pretrained.describe(scratch=config.scratch),
        "ledger": ledger.summary(),
        "config": resolved,
        "versions": versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


__all__ = ["FinetuneConfig", "finetune"]
