"""Where fine-tuning starts: find the pre-trained parameters behind ``--from`` and put a new classifier on them.

``--from`` may name

* a pre-training run directory ``RUN`` (its newest complete checkpoint is used),
* ``RUN/checkpoints`` or one checkpoint ``RUN/checkpoints/<step>`` inside it,
* a weights checkpoint: written by ``convscale import-weights`` (``model.json`` + ``params/``) or by ``convscale export
  --format safetensors`` (``model.json`` beside a ``.safetensors`` file, which may be named instead of its directory).

:func:`restore_params` reads one collection of any of them (the parameters, or a fine-tuning run's EMA);
:func:`convscale_cli.loading.load` builds on it to load any of them for inference.

Only the ``params`` collection is read (Orbax partial restore: a pre-training checkpoint's optimiser state is never
loaded). The classifier is replaced, as in every transfer recipe the paper builds on (Smith et al. 2023 §3; NFNet 2021
A.5): the parameters whose shape depends on the number of classes are found by building the model abstractly with two
class counts, and are re-initialised N(0, 0.01) (weights) and 0 (biases); every other tensor must match the model
exactly, and the first one that does not is named in the error.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from convscale_cli.data import IMAGENET, Normalization
from convscale_cli.errors import CheckpointError, UsageError
from convscale_cli.registry import ArchitectureSpec

HEAD_INIT_STDDEV = 0.01  # the NFNet classifier initialisation (DM nfnet.py: normal(0.01)), zero bias
_WEIGHTS_JSON = "model.json"


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A located pre-trained checkpoint.

    Attributes:
        kind: ``run`` (a pre-training run's checkpoint) or ``weights`` (an imported-weights directory).
        path: the directory ``--from`` named, resolved.
        params_dir: the Orbax PyTree directory holding the parameters (for a safetensors checkpoint: its directory).
        params_key: keys leading from that tree's root to the ``params`` collection (``("params",)`` in a run's
            ``state`` item, ``("ema",)`` for its EMA, ``()`` in an imported-weights ``params/`` directory).
        architecture: registry name of the model the parameters belong to.
        num_classes: classifier size of the checkpoint.
        options: ``ArchitectureSpec.build`` options the parameters need (e.g. a ViT's position-embedding grid).
        run: the pre-training run directory, or None for imported weights.
        step: the checkpoint's step, or None.
        core_hours: TPU-v4 core-hours the pre-training had spent at that checkpoint, or None when unknown.
        source: provenance recorded in the fine-tuning summary.
        params_file: the ``.safetensors`` file holding the parameters (``/``-joined names), instead of Orbax.
        normalization: the input normalisation the parameters were trained with (``model.json``'s or the run
            config's ``normalization``; ImageNet's when a checkpoint predates the key).
    """

    kind: Literal["run", "weights"]
    path: Path
    params_dir: Path
    params_key: tuple[str, ...]
    architecture: str
    num_classes: int
    options: Mapping[str, Any]
    run: Path | None = None
    step: int | None = None
    core_hours: float | None = None
    source: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    params_file: Path | None = None
    normalization: Normalization = IMAGENET

    def describe(self, *, scratch: bool = False) -> dict[str, Any]:
        """The ``pretrain`` block of a fine-tuning summary (with ``scratch``: of its from-scratch baseline)."""
        if scratch:
            return {
                "kind": "scratch",
                "run": None,
                "path": str(self.path),
                "step": None,
                "model": self.architecture,
                "num_classes": None,
                "core_hours": 0.0,
                "source": {"kind": "scratch"},
            }
        return {
            "kind": self.kind,
            "run": str(self.run) if self.run is not None else None,
            "path": str(self.path),
            "step": self.step,
            "model": self.architecture,
            "num_classes": self.num_classes,
            "core_hours": self.core_hours,
            "source": dict(self.source),
        }


def _complete_steps(checkpoints: Path) -> list[int]:
    # Orbax writes a step into a temporary directory and renames it to the bare step number when complete, so
    # numeric names are exactly the complete checkpoints.
    if not checkpoints.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit() and (p / "state").is_dir())


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{what} {str(path)!r} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{what} {str(path)!r} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {str(path)!r} does not hold a JSON object")
    return data


def from_weights(path: Path) -> Pretrained:
    """The imported-weights directory ``path`` (``convscale import-weights``) as a backbone to fine-tune."""
    from convscale_cli.weights import PARAMS_DIR, params_file, read_model_json

    meta = read_model_json(path)
    return Pretrained(
        kind="weights",
        path=path,
        params_dir=path / PARAMS_DIR,
        params_file=params_file(path, meta),
        params_key=(),
        architecture=str(meta["architecture"]),
        num_classes=int(meta["num_classes"]),
        options=dict(meta.get("options") or {}),
        source=dict(meta.get("source") or {}),
        normalization=Normalization.from_json(meta.get("normalization"), str(path / _WEIGHTS_JSON)),
    )


def _ledger_core_hours(step_dir: Path) -> float | None:
    """Core-hours in the ledger saved with a checkpoint (the engine's ``ledger`` JSON item), or None."""
    ledger_dir = step_dir / "ledger"
    if not ledger_dir.is_dir():
        return None
    import orbax.checkpoint as ocp

    from convscale_cli.engine.ledger import Ledger

    try:
        data = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(ledger_dir, args=ocp.args.JsonRestore())
    except Exception:  # an unreadable ledger only loses the cost annotation, never the fine-tuning
        return None
    return Ledger.from_dict(dict(data or {})).core_hours


def _from_run(run: Path, step: int | None, named: Path) -> Pretrained:
    config = _read_json(run / "config.json", "run config")
    steps = _complete_steps(run / "checkpoints")
    if not steps:
        raise CheckpointError(f"pre-training run {str(run)!r} has no complete checkpoint to fine-tune from")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"{str(named)!r} is not a complete checkpoint of {str(run)!r} (steps: {steps})")
    model = config.get("model")
    num_classes = config.get("num_classes")
    if not isinstance(model, str) or not isinstance(num_classes, int) or isinstance(num_classes, bool):
        raise CheckpointError(f"run config {str(run / 'config.json')!r} does not name its model and num_classes")
    if not isinstance(config.get("model_options") or {}, dict):
        raise CheckpointError(
            f"run config {str(run / 'config.json')!r}: model_options is {config['model_options']!r}, expected a table"
        )
    step_dir = run / "checkpoints" / str(step)
    from convscale_cli.engine.rundir import read_json

    summary = read_json(run / "summary.json")  # None while the run is unfinished
    kind = summary.get("kind", "pretrain") if isinstance(summary, dict) else "pretrain"
    return Pretrained(
        kind="run",
        path=named,
        params_dir=step_dir / "state",
        params_key=("params",),
        architecture=model,
        num_classes=num_classes,
        options=dict(config.get("model_options") or {}),
        run=run,
        step=step,
        core_hours=_ledger_core_hours(step_dir),
        source={"kind": kind, "dataset": config.get("dataset"), "seed": config.get("seed")},
        normalization=Normalization.from_json(config.get("normalization"), str(run / "config.json")),
    )


def locate(path: str | Path, what: str = "`pretrained`") -> Pretrained:
    """Find the checkpoint ``path`` names (``what`` names it in errors: the parameter that gave it, in backticks).

    Raises:
        CheckpointError: ``path`` does not exist, or is none of a run directory, a checkpoint inside one, or a
            weights checkpoint.
    """
    named = Path(path).expanduser()
    if not named.exists():
        raise CheckpointError(f"{what} {str(path)!r} does not exist")
    named = named.resolve()
    if named.is_file() and named.suffix == ".safetensors" and (named.parent / _WEIGHTS_JSON).is_file():
        pre = from_weights(named.parent)
        if pre.params_file != named:
            raise CheckpointError(f"{what} {str(path)!r} is not the parameters file its model.json names")
        return pre
    if not named.is_dir():
        raise CheckpointError(f"{what} {str(path)!r} is a file, expected a run, checkpoint or weights directory")
    if (named / _WEIGHTS_JSON).is_file():
        return from_weights(named)
    if (named / "config.json").is_file() and (named / "checkpoints").is_dir():
        return _from_run(named, None, named)
    if named.name == "checkpoints" and (named.parent / "config.json").is_file():
        return _from_run(named.parent, None, named)
    if named.name.isdigit() and named.parent.name == "checkpoints" and (named.parent.parent / "config.json").is_file():
        return _from_run(named.parent.parent, int(named.name), named)
    raise CheckpointError(
        f"{what} {str(path)!r} is not a pre-training or fine-tuning run, a checkpoint inside one, or a weights "
        "checkpoint (model.json)"
    )


def flat_params(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A nested parameter tree as ``{"layer/sub/name": leaf}``."""
    from flax.traverse_util import flatten_dict

    return {"/".join(str(k) for k in key): value for key, value in flatten_dict(dict(tree)).items()}


def abstract_params(spec: ArchitectureSpec, num_classes: int, options: Mapping[str, Any], resolution: int) -> Any:
    """The model's ``params`` as ShapeDtypeStructs (nothing is computed)."""
    import jax
    import jax.numpy as jnp

    module = spec.build(num_classes=num_classes, **options)
    images = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
    return jax.eval_shape(lambda x: module.init({"params": jax.random.key(0)}, x, train=False), images)["params"]


def head_paths(spec: ArchitectureSpec, num_classes: int, options: Mapping[str, Any], resolution: int) -> list[str]:
    """Paths of the parameters whose shape depends on the number of classes: the classifier, in any family."""
    one = flat_params(abstract_params(spec, num_classes, options, resolution))
    two = flat_params(abstract_params(spec, num_classes + 1, options, resolution))
    head = [path for path, leaf in one.items() if two[path].shape != leaf.shape]
    if not head:
        raise UsageError(f"{spec.name} has no parameter whose shape depends on num_classes: no classifier to replace")
    return head


def checkpoint_shapes(pre: Pretrained) -> dict[str, tuple[int, ...]]:
    """``path -> shape`` of every parameter in the checkpoint, from Orbax or safetensors metadata (no array is read).

    Raises:
        CheckpointError: an unreadable checkpoint, or one without the collection ``pre.params_key`` names.
    """
    import orbax.checkpoint as ocp

    if pre.params_file is not None:
        from convscale_cli.safetensors_io import safetensors_shapes

        return safetensors_shapes(pre.params_file)
    try:
        meta = ocp.PyTreeCheckpointer().metadata(pre.params_dir)
    except Exception as exc:
        raise CheckpointError(f"cannot read the checkpoint in {str(pre.params_dir)!r} ({type(exc).__name__})") from None
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    for key in pre.params_key:
        if not isinstance(tree, Mapping) or not isinstance(tree.get(key), Mapping):  # a None EMA has no arrays
            raise CheckpointError(f"checkpoint {str(pre.params_dir)!r} holds no {key!r} collection")
        tree = tree[key]
    return {path: tuple(leaf.shape) for path, leaf in flat_params(tree).items()}


def check_backbone(name: str, saved: Mapping[str, tuple[int, ...]], wanted: Mapping[str, Any], head: list[str]) -> None:
    """Raise a CheckpointError naming the first tensor whose path or shape differs (the head may differ in shape)."""
    for path, leaf in wanted.items():
        if path not in saved:
            raise CheckpointError(f"the checkpoint has no parameter {path!r}, which {name} needs")
        if path not in head and tuple(saved[path]) != tuple(leaf.shape):
            raise CheckpointError(
                f"parameter {path!r} has shape {tuple(saved[path])} in the checkpoint but {name} expects "
                f"{tuple(leaf.shape)}"
            )
    for path in saved:
        if path not in wanted:
            raise CheckpointError(f"checkpoint parameter {path!r} is not part of {name}")


def restore_params(pre: Pretrained, wanted: Mapping[str, Any]) -> dict[str, Any]:
    """Read the parameters ``wanted`` names (``path -> ShapeDtypeStruct``) from the checkpoint, as float32 arrays.

    Only those arrays are read (Orbax partial restore: a run's optimiser state never is). Shapes must have been
    checked against :func:`checkpoint_shapes` by the caller.

    Returns:
        The nested ``params`` tree, on the first local device.

    Raises:
        CheckpointError: an unreadable checkpoint.
    """
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from flax.traverse_util import unflatten_dict

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if pre.params_file is not None:
        from convscale_cli.safetensors_io import load_safetensors

        tensors = load_safetensors(pre.params_file)
        flat = {tuple(p.split("/")): jax.device_put(jnp.asarray(tensors[p], jnp.float32), device) for p in wanted}
        return unflatten_dict(flat)
    item: Any = unflatten_dict({tuple(p.split("/")): v for p, v in wanted.items()})
    for key in reversed(pre.params_key):
        item = {key: item}
    # Restored onto one device; callers lay the arrays out over their mesh. An explicit sharding is needed because
    # imported weights are saved from host arrays, which record none.
    restore_args = jax.tree_util.tree_map(lambda a: ocp.ArrayRestoreArgs(dtype=a.dtype, sharding=device), item)
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            pre.params_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        )
    except Exception as exc:
        detail = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"cannot restore {str(pre.params_dir)!r}: {type(exc).__name__}: {detail}") from None
    for key in pre.params_key:
        restored = restored[key]
    return restored


def load_params(
    pre: Pretrained,
    spec: ArchitectureSpec,
    *,
    num_classes: int,
    options: Mapping[str, Any],
    resolution: int,
    rng: Any,
) -> Any:
    """The checkpoint's backbone with a new ``num_classes``-way classifier, as float32 ``params``.

    Args:
        pre: the located checkpoint.
        spec: the architecture (must be ``pre.architecture``'s).
        num_classes: classes of the target dataset.
        options: build options (the checkpoint's, plus the fine-tuning regularisers).
        resolution: any resolution the model accepts (only shapes are traced).
        rng: PRNG key of the new classifier's weights.

    Raises:
        CheckpointError: a tensor whose path or shape does not match the model (named), or an unreadable checkpoint.
    """
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import unflatten_dict

    wanted = flat_params(abstract_params(spec, num_classes, options, resolution))
    head = head_paths(spec, num_classes, options, resolution)
    check_backbone(spec.name, checkpoint_shapes(pre), wanted, head)

    body = {p: jax.ShapeDtypeStruct(v.shape, jnp.float32) for p, v in wanted.items() if p not in head}
    restored = restore_params(pre, body)

    flat = {tuple(p.split("/")): v for p, v in flat_params(restored).items()}
    keys = jax.random.split(rng, len(head))
    for key, path in zip(keys, head, strict=True):
        leaf = wanted[path]
        if len(leaf.shape) >= 2:
            value = HEAD_INIT_STDDEV * jax.random.normal(key, leaf.shape, jnp.float32)
        else:
            value = jnp.zeros(leaf.shape, jnp.float32)
        flat[tuple(path.split("/"))] = value
    return unflatten_dict(flat)


__all__ = [
    "HEAD_INIT_STDDEV",
    "Pretrained",
    "abstract_params",
    "check_backbone",
    "checkpoint_shapes",
    "head_paths",
    "load_params",
    "locate",
    "restore_params",
]
