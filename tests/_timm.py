"""Import timm (and torchvision) for the parity tests, working around the CUDA torchvision wheel.

The torchvision wheel on the CI machines is a CUDA build whose import registers fake kernels through
``torch.library.register_fake`` for operators the CPU torch does not have, which raises. Those kernels are never used
by the parity tests, so ``register_fake`` is replaced by a no-op decorator factory while torchvision and timm import.
Tests skip (``pytest.importorskip``) only when torch itself is not installed.
"""

from __future__ import annotations

import functools
from types import ModuleType

import pytest


@functools.cache
def import_timm() -> ModuleType:
    """The ``timm`` module, or skip the calling test when torch is absent."""
    torch = pytest.importorskip("torch")
    library = torch.library
    original = library.register_fake

    def register_fake(*args: object, **kwargs: object):  # noqa: ANN202
        return lambda fn: fn

    library.register_fake = register_fake
    try:
        import timm
        import torchvision  # noqa: F401
    finally:
        library.register_fake = original
    return timm
