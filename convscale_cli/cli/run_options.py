"""The options ``pretrain`` and ``finetune`` share, declared once: both drive the same run engine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigFile = Annotated[Path | None, typer.Option("--config", help="Run config TOML (flags override it).")]
Out = Annotated[str | None, typer.Option(help="Run directory (created; rerun to resume).")]
Steps = Annotated[int | None, typer.Option(help="Duration in optimiser steps.")]
Budget = Annotated[
    str | None,
    typer.Option(
        help="Stop cleanly once spent, in model FLOPs as plan converts it: 2-cpu-hours, 1e15-flops, "
        "0.01-core-hours (TPU-v4); alone, it sets the duration."
    ),
]
Precision = Annotated[
    str | None, typer.Option(help="bf16 activations (fp32 params) or fp32 (default: fp32 on CPU, bf16 on GPU/TPU).")
]
EvalEvery = Annotated[int | None, typer.Option(help="Evaluate every N steps (default 0: at the end only).")]
CheckpointEvery = Annotated[int | None, typer.Option(help="Checkpoint every N steps, 0: on exit only (default 1000).")]
LogEvery = Annotated[int | None, typer.Option(help="Log metrics every N steps (default 50).")]
DataOptions = Annotated[
    list[str] | None,
    typer.Option("--data-option", metavar="KEY=VALUE", help="Dataset option key=value, e.g. root=/data (repeat)."),
]
Sets = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE", help="Any config key=value, e.g. recipe.weight_decay=1e-5 (repeat)."),
]
Trackers = Annotated[
    list[str] | None,
    typer.Option(
        "--tracker",
        metavar="NAME",
        help="Experiment tracker besides metrics.jsonl: tensorboard (default), wandb, mlflow (repeat).",
    ),
]
Force = Annotated[bool, typer.Option("--force", help="Start over in an --out holding a different run.")]
Fsdp = Annotated[bool, typer.Option("--fsdp", help="Shard params and optimizer state over devices.")]
Workers = Annotated[int | None, typer.Option(help="Input-pipeline worker processes (default 0).")]
CoordinatorAddress = Annotated[
    str | None, typer.Option(help="Multi-host: host:port of process 0 (auto on TPU pods and SLURM).")
]
NumProcesses = Annotated[int | None, typer.Option(help="Multi-host: number of processes.")]
ProcessId = Annotated[int | None, typer.Option(help="Multi-host: this process's index.")]
