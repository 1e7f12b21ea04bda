"""Test doubles for the engine: a tiny CNN and an in-memory dataset, registered in code like any plugin.

Also runnable as a script (``python tests/_engine_helpers.py OUT [key=value ...]``) so subprocess tests (SIGKILL
resume, 1 vs 4 devices, 2 processes) train the same tiny setup with whatever ``XLA_FLAGS`` they choose.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convscale_cli.hookspecs import hookimpl
from convscale_cli.recipe import Recipe
from convscale_cli.registry import ArchitectureSpec, DatasetInfo, DatasetSpec, ModelCount

TRAIN_SIZE, EVAL_SIZE, CLASSES, NATIVE = 96, 32, 4, 8
WIDTH = 8


def build_tiny(
    num_classes: int, dtype: str = "float32", stochdepth_rate: float = 0.0, drop_rate: float = 0.0, width: int = WIDTH
) -> Any:
    """A conv -> gelu -> conv -> mean-pool -> dropout -> dense classifier (two stages, like a miniature NFNet)."""
    import flax.linen as nn
    import jax.numpy as jnp

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x: Any, *, train: bool) -> Any:
            dt = jnp.dtype(dtype)
            x = nn.Conv(width, (3, 3), dtype=dt, name="stem")(x.astype(dt))
            x = nn.gelu(x)
            x = nn.Conv(width, (3, 3), strides=(2, 2), dtype=dt, name="conv")(x)
            x = nn.gelu(x).mean(axis=(1, 2))
            x = nn.Dropout(drop_rate, deterministic=not train)(x)
            return nn.Dense(num_classes, dtype=dt, name="head")(x).astype(jnp.float32)

    return Tiny()


def count_tiny(resolution: int, num_classes: int) -> ModelCount:
    """Analytic counts of :func:`build_tiny` (weights + biases; MACs of the convs and the head)."""
    half = -(-resolution // 2)
    params = (27 * WIDTH + WIDTH) + (9 * WIDTH * WIDTH + WIDTH) + (WIDTH * num_classes + num_classes)
    macs = resolution**2 * 27 * WIDTH + half**2 * 9 * WIDTH * WIDTH + WIDTH * num_classes
    return ModelCount(params=params, macs=macs)


class ColourSource:
    """Images whose class is the dominant colour channel plus brightness: learnable in a few steps."""

    def __init__(self, split: str, size: int, seed: int) -> None:
        rng = np.random.default_rng(seed + (0 if split == "train" else 1))
        self.labels = rng.integers(0, CLASSES, size)
        base = rng.integers(0, 80, (size, NATIVE, NATIVE, 3))
        for i, label in enumerate(self.labels):
            base[i, ..., label % 3] += 120 + 50 * (label // 3)
        self.images = np.clip(base, 0, 255).astype(np.uint8)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": int(self.labels[index]), "id": int(index)}


class TinyPlugin:
    """Registers ``tiny-cnn`` and ``colours`` through the ordinary hooks.

    ``model`` and ``dataset`` are field changes applied to the two specs (``model={"min_resolution": 4}``), for tests
    that need a variant of the tiny setup under the same or another name.
    """

    def __init__(self, *, model: Mapping[str, Any] | None = None, dataset: Mapping[str, Any] | None = None) -> None:
        self.model_changes = dict(model or {})
        self.dataset_changes = dict(dataset or {})

    @hookimpl
    def register_architectures(self, register: Any) -> None:
        spec = ArchitectureSpec(
            name="tiny-cnn",
            family="tiny",
            build=build_tiny,
            count=count_tiny,
            train_resolution=NATIVE,
            eval_resolution=NATIVE,
            recipe=Recipe(lr=0.4, base_batch_size=16, weight_decay=1e-5, agc_exclude=(r"^head/kernel$",)),
            tags=("tiny",),
            options={"width": WIDTH},
        )
        register(dataclasses.replace(spec, **self.model_changes))

    @hookimpl
    def register_datasets(self, register: Any) -> None:
        def info(**options: Any) -> DatasetInfo:
            return DatasetInfo(CLASSES, {"train": options.get("size", TRAIN_SIZE), "eval": EVAL_SIZE}, NATIVE)

        spec = DatasetSpec(
            name="colours",
            description="in-memory colour classes (engine tests)",
            open=lambda split, size=TRAIN_SIZE: ColourSource(split, size if split == "train" else EVAL_SIZE, 0),
            info=info,
            options={"size": TRAIN_SIZE},
        )
        register(dataclasses.replace(spec, **self.dataset_changes))


def registry() -> Any:
    """A registry holding the tiny test model and dataset, and the built-in trackers (TensorBoard by default)."""
    from convscale_plugins import trackers

    from convscale_cli.plugins import load_plugins

    return load_plugins(extra=[("engine-test", TinyPlugin()), ("trackers", trackers)], entry_points=lambda: []).registry


def config(out: str | Path, **overrides: Any) -> Any:
    """A small fp32 config of the tiny setup (batch 16, 8 px, plain progress lines)."""
    from convscale_cli.engine.config import PretrainConfig

    values: dict[str, Any] = dict(
        model="tiny-cnn",
        dataset="colours",
        out=str(out),
        steps=12,
        batch_size=16,
        precision="fp32",
        log_every=4,
        checkpoint_every=4,
        checkpoint_minutes=0.0,
        progress="none",
        tensorboard=False,
    )
    values.update(overrides)
    return PretrainConfig(**values)


def final_params(out: str | Path) -> dict[str, np.ndarray]:
    """The parameters of a run's newest checkpoint as flat ``path -> array``."""
    import jax
    import orbax.checkpoint as ocp

    ckpts = Path(out) / "checkpoints"
    step = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sharding info not provided": we want host numpy arrays
        tree = ocp.PyTreeCheckpointer().restore(ckpts / str(step) / "state")
    flat = jax.tree_util.tree_flatten_with_path(tree["params"])[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def flat(tree: Any) -> dict[str, np.ndarray]:
    """A pytree as flat ``"a/b/c" -> array`` (dict keys joined by slashes)."""
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): np.asarray(leaf) for path, leaf in leaves}


def restore_tree(step_dir: str | Path, name: str = "params") -> dict[str, np.ndarray]:
    """One collection (``params``, ``ema``, ``opt_state``) of a checkpoint step, as :func:`flat` host arrays."""
    import orbax.checkpoint as ocp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sharding info not provided": we want host numpy arrays
        tree = ocp.PyTreeCheckpointer().restore(Path(step_dir) / "state")
    return flat(tree[name])


def run_cli(argv: list[str], capsys: Any) -> tuple[int, str, str]:
    """``convscale ARGV`` in process: ``(exit code, stdout, stripped stderr)``."""
    from convscale_cli.cli import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err.strip()


def slow_pipeline(seconds: float) -> Any:
    """The real input pipeline with a pause before each training batch (so a test can kill a run mid-way)."""
    import types

    import convscale_cli.data as data

    def train_loader(*args: Any, **kwargs: Any) -> Any:
        loader = data.train_loader(*args, **kwargs)
        batches = type(loader).__iter__

        class Slow(type(loader)):  # type: ignore[misc]
            def __iter__(self) -> Any:
                for batch in batches(self):
                    time.sleep(seconds)
                    yield batch

        loader.__class__ = Slow
        return loader

    return types.SimpleNamespace(
        train_loader=train_loader, eval_loader=data.eval_loader, normalize=data.normalize, to_global=data.to_global
    )


def run_child(train: Any) -> int:
    """Body of a test child process: ``train(registry, pipeline)`` returns a summary; print its status line.

    ``CONVSCALE_TEST_STEP_DELAY`` (seconds) slows every training step down, so a parent can kill the child mid-run.
    A ConvscaleError prints one ``Error:`` line and returns its exit code, as the CLI would.
    """
    from convscale_cli.errors import ConvscaleError

    delay = float(os.environ.get("CONVSCALE_TEST_STEP_DELAY", "0") or 0)
    pipeline = slow_pipeline(delay) if delay else None
    try:
        summary = train(registry(), pipeline)
    except ConvscaleError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    print(json.dumps({"status": summary["status"], "steps": summary["steps"]}))
    return 0


def main(argv: list[str]) -> int:
    """Script entry: train the tiny setup into ``argv[0]`` with ``key=value`` (JSON values) overrides."""
    from convscale_cli.engine.api import pretrain

    overrides = {k: json.loads(v) for k, v in (a.split("=", 1) for a in argv[1:])}
    return run_child(lambda reg, pipeline: pretrain(config(argv[0], **overrides), reg, pipeline=pipeline))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
