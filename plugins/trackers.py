"""Built-in experiment trackers: TensorBoard event files, and Weights & Biases and MLflow when they are installed.

Every run writes its own ``metrics.jsonl`` (the JSON-lines tracker, always on: resume and ``convscale report`` read
it); these trackers send the same records and the resolved config elsewhere, chosen per run with ``--tracker`` (the
``trackers`` config key). They register through the ``register_trackers`` hook exactly as a third-party tracker
would (simonw/llm's default plugins; timm and big_vision users reach the same three). Each imports its package only
when a run opens it.

* ``tensorboard``: ``RUN/tb/`` event files through tensorboardX (a dependency), scalars as ``train/loss``,
  ``eval/eval_loss``, ...; the config as a text summary.
* ``wandb``: a Weights & Biases run in ``RUN/wandb/`` named after the run directory; ``WANDB_MODE=offline`` keeps it
  on disk (``wandb sync`` uploads it later). Needs ``pip install wandb``.
* ``mlflow``: an MLflow run in the experiment ``convscale``; the tracking URI is ``MLFLOW_TRACKING_URI`` when set,
  else a local file store in ``RUN/mlruns``. The config is logged as flattened params. Needs ``pip install mlflow``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from convscale_cli.hookspecs import hookimpl
from convscale_cli.registry import TrackerSpec


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class TensorBoard:
    """Scalars and the config as TensorBoard events in ``RUN/tb``."""

    def __init__(self, run_dir: Path, name: str) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tb"))

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(dict(config), indent=2, default=str) + "\n```", 0)

    def log_metrics(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A Weights & Biases run kept in ``RUN/wandb`` (offline with ``WANDB_MODE=offline``)."""

    def __init__(self, run_dir: Path, name: str) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "convscale"),
            name=name,
            dir=str(run_dir),
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def log_metrics(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        self.run.log({f"{split}/{key}": value for key, value in metrics.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """An MLflow run: ``MLFLOW_TRACKING_URI`` when set, else a file store in ``RUN/mlruns``."""

    def __init__(self, run_dir: Path, name: str) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 keeps its file store (no server, no database: what a laptop run wants) behind an opt-in.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").absolute().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name("convscale")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("convscale")
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id

    def log_config(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in _flatten(config).items()]
        for start in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log_metrics(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, f"{split}/{key}", float(value), step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


@hookimpl
def register_trackers(register: Any) -> None:
    register(
        TrackerSpec(
            name="tensorboard",
            description="TensorBoard event files in RUN/tb",
            open=TensorBoard,
            requires="tensorboardX",
            install="pip install tensorboardX",
        )
    )
    register(
        TrackerSpec(
            name="wandb",
            description="Weights & Biases run in RUN/wandb (WANDB_MODE=offline keeps it local)",
            open=WandB,
            requires="wandb",
            install="pip install wandb",
        )
    )
    register(
        TrackerSpec(
            name="mlflow",
            description="MLflow run (MLFLOW_TRACKING_URI, else a file store in RUN/mlruns)",
            open=MLflow,
            requires="mlflow",
            install="pip install mlflow",
        )
    )
