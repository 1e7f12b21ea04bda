"""The plugin API: pluggy hook specifications of the ``convscale`` project.

A plugin is a module (or object) with functions decorated by :data:`hookimpl`, published under the entry-point
group ``convscale``::

    [project.entry-points.convscale]
    my_resnet = "my_package.convscale_plugin"

The built-in NFNet, ViT and dataset plugins use exactly this mechanism; the core never names them.

Each hook receives a ``register`` callback, so the hook signatures never change when a spec gains an optional field:
new capabilities (a default recipe, FLOP counting, weight import) are fields of the spec objects in
:mod:`convscale_cli.registry`, all with defaults. Hooks are called with keyword arguments, one plugin at a time, so a
plugin that raises (``SystemExit`` included) is reported and skipped without hiding the others.

Plugin modules must stay cheap to import: ``convscale --help``, ``models`` and ``plan`` load every plugin and must not
import jax. Import jax, flax or grain inside the ``build`` / ``source`` callables instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from convscale_cli.registry import ArchitectureSpec, DatasetSpec, TrackerSpec

PROJECT = "convscale"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_architectures(register: Callable[[ArchitectureSpec], None]) -> None:
    """Register model architectures.

    Args:
        register: call once per variant with an :class:`~convscale_cli.registry.ArchitectureSpec` (anything else
            makes the whole plugin fail to load). Names are global across plugins: a name another plugin registered
            first (built-ins load first) stays that plugin's, and this one is left out with a warning naming both
            (an error under ``--strict``).
    """


@hookspec
def register_datasets(register: Callable[[DatasetSpec], None]) -> None:
    """Register datasets.

    Args:
        register: call once per dataset with a :class:`~convscale_cli.registry.DatasetSpec`; names are global
            across plugins, as for architectures.
    """


@hookspec
def register_trackers(register: Callable[[TrackerSpec], None]) -> None:
    """Register experiment trackers (TensorBoard, Weights & Biases, MLflow, ...), chosen per run with ``--tracker``.

    Args:
        register: call once per tracker with a :class:`~convscale_cli.registry.TrackerSpec`; names are global
            across plugins, as for architectures.
    """
