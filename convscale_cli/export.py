"""``export(path, format, out)``: the library behind ``convscale export``, the reverse of ``import-weights``.

``safetensors`` writes the parameters of any checkpoint :func:`convscale_cli.loading.load` accepts as a
``.safetensors`` file with a ``model.json`` beside it: a weights checkpoint that ``load_model``, ``eval`` and
``finetune --from`` read anywhere, without the run directory. A foreign format (``timm``) writes a state dict in that
library's layout for architectures whose plugin provides ``export_weights`` (NFNet F0-F6 -> ``dm_nfnet_fN``, ViTs ->
``vit_*``), as maxtext and levanter convert to and from Hugging Face.

Numerics are never changed silently: a model whose build options compute differently from the target library (an
NFNet with DeepMind's tanh GELU exported to timm, which uses erf GELU) is exported with a note naming each option
that differs, and the result says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from convscale_cli.errors import CheckpointError, UsageError
from convscale_cli.registry import Registry

SAFETENSORS = "safetensors"


def _formats(registry: Registry) -> list[str]:
    return [SAFETENSORS] + sorted(
        {s for spec in registry.architectures if spec.export_weights is not None for s in spec.weight_sources}
    )


def numerics_note(spec: Any, options: dict[str, Any], target: str, model: str) -> str:
    """One line saying how the model's numerics differ from ``target``'s, or "" when they agree."""
    diffs = spec.numerics_diff(options, target)
    if not diffs:
        return ""
    ours = ", ".join(f"{k}={a!r}" for k, a, _ in diffs)
    theirs = ", ".join(f"{k}={b!r}" for k, _, b in diffs)
    return (
        f"{spec.name} computes with {spec.numerics_name(options)} numerics ({ours}) where {target} {model} uses "
        f"{theirs}: {target}'s logits will differ slightly from convscale's for these weights (weights imported or "
        f"trained with --numerics {target} / those options match exactly)"
    )


def export(
    path: str | Path,
    format: str,
    out: str | Path,
    *,
    ema: bool = True,
    registry: Registry | None = None,
) -> dict[str, Any]:
    """Export a checkpoint's parameters.

    Args:
        path: a weights checkpoint, a run directory (newest checkpoint) or one checkpoint inside a run.
        format: ``safetensors`` or a foreign library an architecture exports to (``timm``).
        out: the ``.safetensors`` file to write (absent; for ``safetensors`` no ``model.json`` may sit beside it).
        ema: export a fine-tuning run's EMA parameters when it kept them.
        registry: where the architecture is looked up (default: the installed plugins).

    Returns:
        ``{"format", "path", "checkpoint": {...}, "model", "kwargs", "tensors", "numerics_note"}``; ``model`` and
        ``kwargs`` name the foreign constructor (e.g. ``timm.create_model(model, **kwargs)``).

    Raises:
        UsageError: an unknown format, an architecture without that export, an existing output.
        CheckpointError: ``path`` is not a checkpoint.
    """
    if registry is None:
        from convscale_cli.plugins import get_registry

        registry = get_registry()
    formats = _formats(registry)
    if format not in formats:
        from convscale_cli.errors import UnknownNameError

        raise UnknownNameError("export format", format, formats)
    out = Path(out).expanduser().resolve()
    if out.suffix != ".safetensors":
        raise UsageError(f"`out` {str(out)!r} must be a .safetensors file")
    if out.exists():
        raise CheckpointError(f"`out` {str(out)!r} already exists; choose another file")

    from convscale_cli.loading import load

    loaded = load(path, ema=ema, precision="fp32", registry=registry, what="checkpoint")
    spec, pre = loaded.spec, loaded.checkpoint
    described = loaded.describe()
    if format == SAFETENSORS:
        from convscale_cli.weights import save_safetensors_weights

        source = {"kind": "export", "from": str(pre.path), "step": pre.step, "parameters": loaded.collection}
        file = save_safetensors_weights(
            out,
            spec=spec,
            params=loaded.params,
            num_classes=loaded.num_classes,
            options=loaded.options,
            source=source,
            normalization=loaded.normalization,
        )
        return {
            "format": format,
            "path": str(file),
            "model_json": str(file.parent / "model.json"),
            "checkpoint": described,
            "model": spec.name,
            "kwargs": {},
            "numerics_note": "",
        }

    if spec.export_weights is None or format not in spec.weight_sources:
        able = sorted(s.name for s in registry.architectures if s.export_weights and format in s.weight_sources)
        shown = ", ".join(able[:8]) + (f" and {len(able) - 8} more" if len(able) > 8 else "")
        raise UsageError(f"{spec.name} has no {format} twin to export to; {format} export exists for {shown}")
    import jax
    import numpy as np
    from safetensors.numpy import save_file

    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), loaded.params)
    result = spec.export_weights(format, params, loaded.num_classes, dict(loaded.options))
    note = numerics_note(spec, dict(loaded.options), format, result.model)
    norm = loaded.normalization
    # What the foreign library feeds this model by default (timm's pretrained_cfg for the untagged name).
    foreign = spec.weights_normalization(format, result.model) if spec.weights_normalization else None
    foreign = foreign or spec.normalization
    if norm != foreign:
        note = " ".join(
            part
            for part in (
                note,
                f"these weights expect inputs normalised with mean {list(norm.mean)} and std {list(norm.std)}, not "
                f"{result.model}'s default {list(foreign.mean)} / {list(foreign.std)}.",
            )
            if part
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in result.tensors.items()}
    metadata = {"format": "pt", "model": result.model, "mean": json.dumps(norm.mean), "std": json.dumps(norm.std)}
    save_file(tensors, str(out), metadata=metadata)
    return {
        "format": format,
        "path": str(out),
        "checkpoint": described,
        "model": result.model,
        "kwargs": dict(result.kwargs),
        "tensors": len(tensors),
        "normalization": norm.to_json(),
        "numerics_note": " ".join(part for part in (note, result.note) if part),
    }


__all__ = ["SAFETENSORS", "export", "numerics_note"]
