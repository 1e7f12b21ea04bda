"""Fine-tuning pre-trained NFNets and ViTs with the paper's transfer recipe (Smith et al. 2023 §3).

Public API (imported lazily, so ``import convscale_cli.finetune`` never pulls in jax)::

    FinetuneConfig                      # convscale_cli.finetune.config (jax-free)
    finetune(config, registry=None)     # convscale_cli.finetune.api -> summary dict
    locate(path) -> Pretrained          # convscale_cli.finetune.backbone: what ``--from`` names
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "FinetuneConfig": "config",
    "finetune": "api",
    "locate": "backbone",
    "Pretrained": "backbone",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
