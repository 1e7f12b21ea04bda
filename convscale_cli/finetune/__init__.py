"""Fine-tuning pre-trained NFNets and ViTs with the paper's transfer recipe (Smith et al. 2023 §3).

Public API (imported lazily, so ``import convscale_cli.finetune`` never pulls in jax)::

    FinetuneConfig                      # convscale_cli.finetune.config (jax-free)
    finetune(config, registry=None)     # convscale_cli.finetune.api -> summary dict
    locate(path) -> Pretrained          # convscale_cli.finetune.backbone: what ``--from`` names
"""

from __future__ import annotations

from convscale_cli.lazy import attach

_LAZY = {
    "FinetuneConfig": "config",
    "finetune": "api",
    "locate": "backbone",
    "Pretrained": "backbone",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = attach(__name__, _LAZY, __all__)
