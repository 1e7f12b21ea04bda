"""The training engine: one run engine for pre-training and fine-tuning, optimiser, checkpoints, compute ledger.

Nothing is imported here, so ``import convscale_cli.engine`` stays cheap; import the modules you need:

* :mod:`~convscale_cli.engine.api` -- ``pretrain(config, registry=None, *, pipeline=None) -> summary dict``.
* :mod:`~convscale_cli.engine.trainer` -- ``train_run(run, kind, ...)``: the run engine both ``pretrain`` and
  ``finetune`` drive; a ``RunKind`` says how a run starts, its step's extras and its summary's keys.
* :mod:`~convscale_cli.engine.sources` -- ``open_sources`` (train / held-out sources), ``eval_batch_size``.
* :mod:`~convscale_cli.engine.summary` -- ``versions``.
* :mod:`~convscale_cli.engine.config` -- ``PretrainConfig`` (frozen, validated) and ``MUTABLE_KEYS``.
* :mod:`~convscale_cli.engine.resolve` -- ``resolve(config, registry) -> ResolvedRun``, ``resolved_dict``.
* :mod:`~convscale_cli.engine.header` -- ``header`` / ``run_header``: what a run prints before anything compiles.
* :mod:`~convscale_cli.engine.steps` -- ``resolve_duration``: the one epochs/examples/steps/FLOPs -> steps conversion.
* :mod:`~convscale_cli.engine.optim` -- ``make_optimizer(recipe, schedule)``, ``learning_rate_schedule``,
  ``peak_learning_rate``, ``path_mask``.
* :mod:`~convscale_cli.engine.state` -- ``TrainState`` (step, params, opt_state, ema, rng), ``step_key``.
* :mod:`~convscale_cli.engine.step` -- pure ``train_step`` / ``eval_step``, ``per_example_loss``, ``topk_correct``.
* :mod:`~convscale_cli.engine.ledger` -- ``Ledger`` (FLOPs, device-seconds, MFU, TPU-v4 core-hours), ``xla_flops``.
* :mod:`~convscale_cli.engine.checkpoint` -- ``Checkpoints`` (Orbax: async, keep K, corrupt-checkpoint fallback).
* :mod:`~convscale_cli.engine.mesh` -- ``init_distributed``, ``make_mesh``, ``state_shardings`` (``fsdp``),
  ``batch_sharding``, ``check_batch``.
* :mod:`~convscale_cli.engine.rundir` -- ``RunDir`` (layout, same-config check), ``MetricsLog``.
* :mod:`~convscale_cli.engine.branch` -- ``branch_start``: a wsd run continuing a trunk's checkpoint (a cooldown
  branch, Hägele et al. 2024).
* :mod:`~convscale_cli.engine.loop`, :mod:`~convscale_cli.engine.progress`, :mod:`~convscale_cli.engine.hardware`.
"""
