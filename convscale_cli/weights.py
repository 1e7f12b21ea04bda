"""Weights checkpoints: a model's parameters plus what is needed to rebuild it, and ``load_model``.

A weights checkpoint is a directory::

    CKPT/model.json   {"format": "convscale-weights", "version": 1, "architecture": "vit-b/16", "family": "vit",
                       "num_classes": 1000, "options": {...build options...}, "numerics": "reference",
                       "params": 86567656, "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
                       "source": {"kind": "timm", "model": "vit_base_patch16_224", "file": "...", "note": "..."}}
    CKPT/params/      the ``params`` collection, an Orbax StandardCheckpointer directory (float32)

or, as ``convscale export --format safetensors`` writes it, ``model.json`` (with ``"params_file": "NAME.safetensors"``)
beside a safetensors file of the parameters named by their ``/``-joined paths (``stem/conv0/kernel``), readable
without Orbax or jax.

``options`` hold every build option the parameters need, the numerics included (``numerics`` names them: the paper's
``reference`` code, or a foreign library's, e.g. ``timm``), so every command that loads the weights computes the same
way. ``normalization`` is the input normalisation the parameters were trained with (the source's, e.g. timm's
``pretrained_cfg`` mean and std; a ``model.json`` without one predates the key and means ImageNet's), and every
command that trains or evaluates from the weights normalises with it. ``convscale import-weights`` writes a
checkpoint from a foreign one; :func:`load_model` turns any checkpoint (:mod:`convscale_cli.loading`) back into an
apply function. Nothing here imports jax at module level (the CLI imports this module to start).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convscale_cli.errors import CheckpointError, UnknownNameError, UsageError
from convscale_cli.registry import MAX_NUM_CLASSES
from convscale_cli.safetensors_io import load_safetensors

if TYPE_CHECKING:
    from convscale_cli.data import Normalization
    from convscale_cli.registry import ArchitectureSpec, Registry

FORMAT = "convscale-weights"
VERSION = 1
MODEL_JSON = "model.json"
PARAMS_DIR = "params"


@dataclasses.dataclass(frozen=True)
class ImportedWeights:
    """What an ``ArchitectureSpec.import_weights`` may return instead of a bare params tree.

    Attributes:
        params: the ``params`` collection (nested dicts of float32 arrays).
        num_classes: classifier size of ``params``.
        options: build options the params need (e.g. a ViT's ``resolution`` for its position-embedding grid).
        note: one line for the checkpoint's provenance (e.g. "new zero-initialised 10-way head").
    """

    params: Mapping[str, Any]
    num_classes: int
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    note: str = ""


@dataclasses.dataclass(frozen=True)
class ExportedWeights:
    """What an ``ArchitectureSpec.export_weights`` returns: a foreign state dict and how to build its model.

    Attributes:
        tensors: state-dict name -> float32 numpy array, in the foreign library's layout.
        model: the foreign model name (e.g. timm's ``dm_nfnet_f0``).
        kwargs: keyword arguments the foreign constructor needs besides the name (``num_classes``, ``img_size``).
        note: one line on anything the user must know (e.g. how the numerics differ).
    """

    tensors: Mapping[str, Any]
    model: str
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    note: str = ""


def _abstract_params(spec: ArchitectureSpec, num_classes: int, options: Mapping[str, Any]) -> tuple[Any, Any]:
    """(module, params as ShapeDtypeStructs) of ``spec`` built with these options, without computing anything."""
    import jax
    import jax.numpy as jnp

    module = spec.build(num_classes=num_classes, **options)
    resolution = int(options.get("resolution", spec.train_resolution))
    images = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: module.init({"params": jax.random.key(0)}, x, train=False), images)
    return module, variables["params"]


def _check_tree(name: str, params: Mapping[str, Any], abstract: Mapping[str, Any]) -> None:
    """Raise a CheckpointError naming the first parameter whose path or shape differs from the built model's."""
    from flax.traverse_util import flatten_dict

    got = {"/".join(k): tuple(v.shape) for k, v in flatten_dict(dict(params)).items()}
    want = {"/".join(k): tuple(v.shape) for k, v in flatten_dict(dict(abstract)).items()}
    for path, shape in want.items():
        if path not in got:
            raise CheckpointError(f"parameter {path!r} is missing from the weights given for {name}")
        if got[path] != shape:
            raise CheckpointError(f"parameter {path!r} has shape {got[path]}, {name} expects {shape}")
    for path in got:
        if path not in want:
            raise CheckpointError(f"parameter {path!r} is not part of {name}")


def _empty_out(out: Path) -> Path:
    out = out.expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"output {str(out)!r} already exists and is not an empty directory")
    return out


def save_weights(
    out: str | Path,
    *,
    spec: ArchitectureSpec,
    params: Mapping[str, Any],
    num_classes: int,
    options: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    numerics: str | None = None,
    normalization: Normalization | None = None,
) -> Path:
    """Write a weights checkpoint after checking ``params`` against the model ``spec`` builds.

    Args:
        out: a directory that does not exist yet or is empty.
        spec: the architecture the parameters belong to.
        params: the ``params`` collection.
        num_classes: classifier size.
        options: build options to record (JSON-serialisable).
        source: provenance to record (JSON-serialisable).
        numerics: the name recorded for the numerics ``options`` select (default: the first that matches).
        normalization: the input normalisation the parameters expect (default: the architecture's).

    Returns:
        The absolute checkpoint path.
    """
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    out = _empty_out(Path(out))
    options = dict(options or {})
    _, abstract = _abstract_params(spec, num_classes, options)
    _check_tree(spec.name, params, abstract)
    params = jax.tree.map(lambda x: np.asarray(x, dtype=np.float32), dict(params))
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out / PARAMS_DIR, params)
        checkpointer.wait_until_finished()
    meta = _meta(spec, params, num_classes, options, source, numerics, normalization)
    # Written last: a directory without model.json is an interrupted save, never a usable checkpoint.
    (out / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _meta(
    spec: ArchitectureSpec,
    params: Mapping[str, Any],
    num_classes: int,
    options: Mapping[str, Any],
    source: Mapping[str, Any] | None,
    numerics: str | None = None,
    normalization: Normalization | None = None,
) -> dict[str, Any]:
    from convscale_cli.engine.state import param_count

    if numerics is None or spec.numerics_diff(options, numerics):
        numerics = spec.numerics_name(options)

    return {
        "format": FORMAT,
        "version": VERSION,
        "architecture": spec.name,
        "family": spec.family,
        "num_classes": num_classes,
        "options": dict(options),
        "numerics": numerics,
        "params": param_count(dict(params)),
        "normalization": (normalization or spec.normalization).to_json(),
        "source": dict(source or {}),
    }


def save_safetensors_weights(
    file: str | Path,
    *,
    spec: ArchitectureSpec,
    params: Mapping[str, Any],
    num_classes: int,
    options: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    normalization: Normalization | None = None,
) -> Path:
    """Write the parameters as a ``.safetensors`` file with a ``model.json`` beside it (a portable checkpoint).

    Args:
        file: the ``.safetensors`` file to create; neither it nor a ``model.json`` in its directory may exist.
        spec, params, num_classes, options, source, normalization: as for :func:`save_weights`.

    Returns:
        The absolute path of the file.
    """
    import jax
    import numpy as np
    from flax.traverse_util import flatten_dict
    from safetensors.numpy import save_file

    file = Path(file).expanduser().resolve()
    if file.suffix != ".safetensors":
        raise UsageError(f"`file` {str(file)!r} must end in .safetensors")
    meta_file = file.parent / MODEL_JSON
    for path in (file, meta_file):
        if path.exists():
            raise CheckpointError(f"{str(path)!r} already exists; choose another file (one export per directory)")
    options = dict(options or {})
    _, abstract = _abstract_params(spec, num_classes, options)
    _check_tree(spec.name, params, abstract)
    params = jax.tree.map(lambda x: np.asarray(x, dtype=np.float32), dict(params))
    flat = {"/".join(k): np.ascontiguousarray(v) for k, v in flatten_dict(params).items()}
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(file), metadata={"format": FORMAT, "architecture": spec.name})
    meta = {**_meta(spec, params, num_classes, options, source, normalization=normalization), "params_file": file.name}
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")  # last, as in save_weights
    return file


def params_file(path: Path, meta: Mapping[str, Any]) -> Path | None:
    """The safetensors file a ``model.json`` names (``params_file``), or None for an Orbax ``params/`` directory."""
    name = meta.get("params_file")
    if name is None:
        return None
    if not isinstance(name, str) or Path(name).name != name:
        raise CheckpointError(f"{str(path / MODEL_JSON)!r} names params_file {name!r}, expected a file name beside it")
    file = path / name
    if not file.is_file():
        raise CheckpointError(f"{str(file)!r}, the parameters {str(path / MODEL_JSON)!r} names, is missing")
    return file


def read_model_json(path: str | Path) -> dict[str, Any]:
    """The metadata of a weights checkpoint; a CheckpointError if ``path`` is not one."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a directory")
    file = path / MODEL_JSON
    if not file.is_file():
        raise CheckpointError(f"{str(path)!r} is not a convscale weights checkpoint (no {MODEL_JSON})")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{str(file)!r} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(file)!r} is not a {FORMAT} file")
    if meta.get("version") != VERSION:
        version = meta.get("version")
        raise CheckpointError(f"{str(file)!r} has format version {version!r}, this convscale reads {VERSION}")
    classes = meta.get("num_classes")
    checks = (
        ("architecture", isinstance(meta.get("architecture"), str), "a model name"),
        ("num_classes", isinstance(classes, int) and not isinstance(classes, bool) and 0 < classes <= MAX_NUM_CLASSES,
         f"an integer in [1, {MAX_NUM_CLASSES}]"),
        ("options", isinstance(meta.get("options", {}), dict), "a table"),
        ("source", isinstance(meta.get("source", {}), dict), "a table"),
    )  # fmt: skip
    for key, ok, expected in checks:
        if not ok:
            got = repr(meta[key]) if key in meta else "missing"
            raise CheckpointError(f"{str(file)!r}: {key} is {got}, expected {expected}")
    from convscale_cli.data import Normalization

    Normalization.from_json(meta.get("normalization"), str(file))
    # The parameters are an Orbax params/ directory, or (convscale export) the safetensors file model.json names.
    if meta.get("params_file") is not None:
        params_file(path, meta)
    elif not (path / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{str(path)!r} has a {MODEL_JSON} but no {PARAMS_DIR}/ directory: an incomplete copy")
    return meta


def load_weights(path: str | Path, registry: Registry | None = None) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Rebuild the module of a weights checkpoint and restore its parameters.

    Returns:
        ``(module, variables, meta)``: the Flax module, ``{"params": ...}`` and the parsed ``model.json``.
    """
    from convscale_cli.finetune.backbone import (
        check_backbone,
        checkpoint_shapes,
        flat_params,
        from_weights,
        restore_params,
    )
    from convscale_cli.plugins import get_registry

    path = Path(path).expanduser().resolve()
    meta = read_model_json(path)
    spec = (registry or get_registry()).architecture(meta["architecture"])
    module, abstract = _abstract_params(spec, int(meta["num_classes"]), meta.get("options", {}))
    pre = from_weights(path)
    wanted = flat_params(abstract)
    check_backbone(spec.name, checkpoint_shapes(pre), wanted, [])
    return module, {"params": restore_params(pre, wanted)}, meta


def load_model(
    path: str | Path, ema: bool = True, precision: str | None = None, *, normalize: bool = False
) -> tuple[Callable[[Any, Any], Any], dict[str, Any]]:
    """Load any checkpoint for inference; see :func:`convscale_cli.loading.load` for what ``path`` may name.

    Args:
        path: a weights checkpoint, a pre-training or fine-tuning run directory (its newest checkpoint), or one
            checkpoint ``RUN/checkpoints/<step>``.
        ema: a fine-tuning run's EMA parameters when it kept them (False: the raw parameters).
        precision: ``fp32`` or ``bf16`` activations; None: the run's own precision (float32 for weights).
        normalize: ``apply_fn`` takes NHWC pixels in [0, 255] (uint8 or float) and normalises them as the checkpoint
            records (``loaded.normalization``: ImageNet's for NFNets, 0.5 for timm's ViTs), as training does.

    Returns:
        ``(apply_fn, variables)`` where ``apply_fn(variables, images)`` maps NHWC images to float32 logits in
        inference mode (jitted); the images are float32 already normalised with the checkpoint's mean and std
        (:func:`convscale_cli.loading.load` names them), or pixels with ``normalize``.
    """
    import functools

    import jax

    from convscale_cli.loading import load

    loaded = load(path, ema=ema, precision=precision)
    apply = functools.partial(loaded.module.apply, train=False)
    if normalize:
        from convscale_cli.data.device import Normalizer
        from convscale_cli.data.device import normalize as scale

        apply = functools.partial(_apply_pixels, apply, Normalizer(scale, loaded.normalization))
    return jax.jit(apply), {"params": loaded.params}


def _apply_pixels(apply: Callable[..., Any], norm: Callable[[Any], Any], variables: Any, images: Any) -> Any:
    return apply(variables, norm(images))


def find_by_source(registry: Registry, source: str, model: str) -> ArchitectureSpec:
    """The registered architecture whose ``weight_sources[source]`` is ``model``."""
    by_model = {spec.weight_sources[source]: spec for spec in registry.architectures if source in spec.weight_sources}
    if not by_model:
        sources = sorted({s for spec in registry.architectures for s in spec.weight_sources})
        raise UnknownNameError("weight source", source, sources)
    # timm names one set of weights ``architecture.tag`` (vit_base_patch16_224.augreg_in21k): the tag picks the
    # weights, the part before it the architecture.
    base = model if model in by_model else model.split(".", 1)[0]
    if base not in by_model:
        raise UnknownNameError(f"{source} model", model, by_model, hint="no registered architecture imports it")
    return by_model[base]


def import_weights(
    source: str,
    model: str,
    file: str | Path,
    out: str | Path,
    num_classes: int | None = None,
    numerics: str = "reference",
) -> tuple[Path, dict[str, Any]]:
    """Convert a foreign checkpoint into a convscale weights checkpoint.

    Args:
        source: the foreign library ("timm").
        model: its model name, which selects the convscale architecture; a timm name may carry the tag of one set of
            weights (``vit_base_patch16_224.augreg_in21k``), which the checkpoint records with the normalisation
            those weights expect.
        file: a ``.safetensors`` state dict.
        out: the checkpoint directory to create (absent or empty).
        num_classes: classifier size; None keeps the file's.
        numerics: how the model computes (``ArchitectureSpec.numerics``): ``reference`` (the paper's reference
            code, e.g. DeepMind's tanh GELU for NFNets) or the source library's (``timm``: its logits exactly).

    Returns:
        ``(checkpoint path, model.json contents)``.
    """
    from convscale_cli.plugins import get_registry

    if num_classes is not None and not 0 < num_classes <= MAX_NUM_CLASSES:
        raise UsageError(f"`num_classes` must be in [1, {MAX_NUM_CLASSES}], got {num_classes}")
    spec = find_by_source(get_registry(), source, model)
    if spec.import_weights is None:
        raise UsageError(f"{spec.name} lists {source} weights but its plugin has no import_weights")
    numerics_options = spec.numerics_options(numerics)
    _empty_out(Path(out))  # fail before the (slow) conversion
    tensors = load_safetensors(file)
    try:
        result = spec.import_weights(source, tensors, num_classes)
    except (KeyError, IndexError, ValueError, TypeError) as exc:  # a tensor missing, a scalar where a matrix goes
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CheckpointError(
            f"{str(file)!r} does not hold a {source} {model} state dict ({type(exc).__name__}: {detail})"
        ) from None
    if isinstance(result, ImportedWeights):
        params, classes, options, note = result.params, result.num_classes, dict(result.options), result.note
    else:
        params, options, note = result, {}, ""
        classes = num_classes if num_classes is not None else spec.default_num_classes
    options.update(numerics_options)
    normalization = spec.weights_normalization(source, model) if spec.weights_normalization else None
    provenance = {"kind": source, "model": model, "file": str(Path(file).expanduser().resolve())}
    if note:
        provenance["note"] = note
    path = save_weights(
        out,
        spec=spec,
        params=params,
        num_classes=classes,
        options=options,
        source=provenance,
        numerics=numerics,
        normalization=normalization,
    )
    return path, read_model_json(path)


__all__ = [
    "ExportedWeights",
    "ImportedWeights",
    "find_by_source",
    "import_weights",
    "load_model",
    "load_weights",
    "params_file",
    "read_model_json",
    "save_safetensors_weights",
    "save_weights",
]
