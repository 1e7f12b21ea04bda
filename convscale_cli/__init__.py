"""convscale: plan, train and analyse vision pre-training at a compute budget (Smith et al. 2023).

Importing this package is cheap; jax is imported only by the functions that need it.
"""

from __future__ import annotations

__version__ = "0.1.0"


def load_model(path, ema=True, precision=None, *, normalize=False):  # noqa: ANN001, ANN201
    """Load a checkpoint for inference: ``(apply_fn, variables)``; see :func:`convscale_cli.weights.load_model`.

    ``path`` is a weights checkpoint (``import-weights``, ``export --format safetensors``), a pre-training or
    fine-tuning run directory (its newest checkpoint; a fine-tuning run's EMA parameters unless ``ema=False``) or one
    checkpoint ``RUN/checkpoints/<step>``. ``apply_fn(variables, images)`` returns logits for float32 NHWC images
    normalised with the checkpoint's mean/std (``model.json`` / ``config.json`` ``normalization``: ImageNet's unless
    the weights were trained otherwise, e.g. 0.5 for timm's ViTs), or, with ``normalize=True``, for pixels in
    [0, 255] that it normalises itself. jax is imported on the first call, not when ``convscale_cli`` is imported.
    """
    from convscale_cli.weights import load_model as _load_model

    return _load_model(path, ema=ema, precision=precision, normalize=normalize)
