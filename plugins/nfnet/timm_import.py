"""Convert between a timm ``dm_nfnet_fN`` state dict and this plugin's NFNet ``params`` tree (numpy only).

timm's ``dm_nfnet_*`` (timm/models/nfnet.py, ``_dm_nfnet_cfg``) are DeepMind's NFNets with DM's weights:
``gamma_in_act=True``, ``same_padding=True`` (ScaledStdConv2dSame, TF-style SAME), ``skipinit=True``. Module names
map one to one (timm ``nfnet.py``, DM ``nfnet.py``)::

    stem.conv{1..4}                    -> stem/conv{0..3}
    stages.S.B.conv1/conv2/conv2b/conv3 -> stageS/blockB/conv0/conv1/conv1b/conv2
    stages.S.B.downsample.conv         -> stageS/blockB/conv_shortcut
    stages.S.B.attn_last.fc1/fc2       -> stageS/blockB/se/fc0/fc1   (1x1 convs -> dense)
    stages.S.B.skipinit_gain           -> stageS/blockB/skip_gain
    final_conv, head.fc                -> final_conv, fc

Conv weights go OIHW -> HWIO, WS gains (O, 1, 1, 1) -> (O,), linear weights (out, in) -> (in, out).
timm standardises with ``eps=1e-5`` added to the variance (``ws_eps_style="timm"``) and uses erf GELU where DeepMind's
``jax.nn.gelu`` is the tanh form; the imported weights work with either (``import-weights --numerics``), as trained
kernels have var * fan_in far above either eps, but only timm's numerics reproduce timm's logits exactly.
:func:`export_timm` is the exact reverse of :func:`import_timm`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from convscale_plugins.nfnet.variants import Variant, block_plan, param_shapes

from convscale_cli.errors import UsageError
from convscale_cli.weights import ExportedWeights, ImportedWeights

_BLOCK_CONVS = {
    "conv0": "conv1",
    "conv1": "conv2",
    "conv1b": "conv2b",
    "conv2": "conv3",
    "conv_shortcut": "downsample.conv",
}


def timm_name(path: str) -> tuple[str, str]:
    """(timm tensor name, conversion kind) of one of our parameter paths."""
    parts = path.split("/")
    leaf = parts[-1]
    if parts[0] == "stem":
        module = f"stem.conv{int(parts[1][4:]) + 1}"
    elif parts[0] == "final_conv":
        module = "final_conv"
    elif parts[0] == "fc":
        return f"head.fc.{'weight' if leaf == 'kernel' else 'bias'}", "linear" if leaf == "kernel" else "copy"
    else:
        stage, block = int(parts[0][5:]), int(parts[1][5:])
        prefix = f"stages.{stage}.{block}"
        if leaf == "skip_gain":
            return f"{prefix}.skipinit_gain", "copy"
        if parts[2] == "se":
            fc = {"fc0": "fc1", "fc1": "fc2"}[parts[3]]
            return f"{prefix}.attn_last.{fc}.{'weight' if leaf == 'kernel' else 'bias'}", (
                "conv1x1_linear" if leaf == "kernel" else "copy"
            )
        module = f"{prefix}.{_BLOCK_CONVS[parts[2]]}"
    return {
        "kernel": (f"{module}.weight", "conv"),
        "gain": (f"{module}.gain", "gain"),
        "bias": (f"{module}.bias", "copy"),
    }[leaf]


def timm_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    """The shape timm stores for our parameter of ``shape``, given its conversion ``kind`` from :func:`timm_name`.

    timm keeps PyTorch layouts: convolutions ``(out, in, h, w)`` where flax has ``(h, w, in, out)``, linear weights
    transposed, and gains as ``(out, 1, 1, 1)``.
    """
    if kind == "conv":
        h, w, i, o = shape
        return (o, i, h, w)
    if kind == "gain":
        return (shape[0], 1, 1, 1)
    if kind == "linear":
        return (shape[1], shape[0])
    if kind == "conv1x1_linear":
        return (shape[1], shape[0], 1, 1)
    return shape


def _convert(array: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return array.transpose(2, 3, 1, 0)
    if kind == "gain":
        return array.reshape(-1)
    if kind == "linear":
        return array.T
    if kind == "conv1x1_linear":
        return array[:, :, 0, 0].T
    return array


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor passed straight from model.state_dict()
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def import_timm(variant: Variant, tensors: Mapping[str, Any], num_classes: int | None) -> ImportedWeights:
    """Map a timm state dict (name -> array) to a nested ``params`` dict of float32 numpy arrays.

    Args:
        variant: the registered variant the weights are for.
        tensors: state-dict name -> array (numpy, or torch tensors straight from ``state_dict()``).
        num_classes: classifier size of the result; None keeps the file's head. Another size starts a new
            zero-initialised head (the fine-tuning convention the ViT plugin follows too).

    Raises:
        UsageError: naming the first tensor (in forward order) that is missing or has the wrong shape, or the
            first tensor of the state dict this variant has no place for.
    """
    source = variant.timm_name or "timm"
    if num_classes is not None and num_classes <= 0:
        raise UsageError(f"num_classes must be > 0, got {num_classes}")
    head = tensors.get("head.fc.weight")
    if head is None:
        raise UsageError(f"{source} state dict has no tensor 'head.fc.weight' (needed for {variant.name} fc/kernel)")
    file_classes = int(np.shape(head)[0])
    shapes = param_shapes(variant.config, file_classes)
    params: dict[str, Any] = {}
    used: set[str] = set()
    for path, shape in shapes.items():
        name, kind = timm_name(path)
        expected = timm_shape(shape, kind)
        if name not in tensors:
            raise UsageError(f"{source} state dict has no tensor {name!r} (needed for {variant.name} {path})")
        array = _as_numpy(tensors[name])
        if tuple(array.shape) != expected:
            raise UsageError(
                f"{source} tensor {name!r} has shape {tuple(array.shape)}, {variant.name} expects {expected}"
            )
        used.add(name)
        node = params
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = np.array(_convert(array, kind), dtype=np.float32, order="C")  # a copy; 0-d stays 0-d
    extra = [name for name in tensors if name not in used]
    if extra:
        raise UsageError(
            f"{source} state dict has tensor {extra[0]!r} that {variant.name} has no place for "
            f"({len(extra)} unexpected; is it a {source} model with {len(block_plan(variant.config))} blocks?)"
        )
    classes = file_classes if num_classes is None else num_classes
    note = "head from the file"
    if classes != file_classes:
        features = variant.config.num_features
        params["fc"] = {"kernel": np.zeros((features, classes), np.float32), "bias": np.zeros((classes,), np.float32)}
        note = f"new zero-initialised {classes}-way head"
    return ImportedWeights(params=params, num_classes=classes, note=note)


def _unconvert(array: np.ndarray, kind: str) -> np.ndarray:
    """The reverse of :func:`_convert`: one of our parameters in timm's layout."""
    if kind == "conv":
        return array.transpose(3, 2, 0, 1)
    if kind == "gain":
        return array.reshape(-1, 1, 1, 1)
    if kind == "linear":
        return array.T
    if kind == "conv1x1_linear":
        return array.T[:, :, None, None]
    return array


def export_timm(
    variant: Variant, params: Mapping[str, Any], num_classes: int, options: Mapping[str, Any]
) -> ExportedWeights:
    """Our ``params`` as the state dict of timm's ``dm_nfnet_fN`` with ``num_classes`` classes.

    The build options do not change the layout of F0-F6 (the numerics are the caller's to compare).

    Raises:
        UsageError: the variant has no timm twin, or ``params`` are not this variant's.
    """
    if not variant.timm_name:
        raise UsageError(f"{variant.name} has no timm twin (timm has dm_nfnet_f0 .. dm_nfnet_f6)")
    flat: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}/{key}" if prefix else key
            if isinstance(value, Mapping):
                walk(value, path)
            else:
                flat[path] = value

    walk(params, "")
    shapes = param_shapes(variant.config, num_classes)
    if set(flat) != set(shapes):
        odd = sorted(set(flat) ^ set(shapes))[0]
        raise UsageError(f"parameter {odd!r} does not belong to {variant.name}: not its parameters")
    tensors = {}
    for path, shape in shapes.items():
        name, kind = timm_name(path)
        array = _as_numpy(flat[path]).astype(np.float32)
        if tuple(array.shape) != shape:
            raise UsageError(f"parameter {path!r} has shape {tuple(array.shape)}, {variant.name} has {shape}")
        tensors[name] = np.ascontiguousarray(_unconvert(array, kind))
    return ExportedWeights(tensors=tensors, model=variant.timm_name, kwargs={"num_classes": num_classes})
