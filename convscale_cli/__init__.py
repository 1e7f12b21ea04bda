"""convscale: plan, train and analyse vision pre-training at a compute budget (Smith et al. 2023).

Importing this package is cheap; jax is imported only by the functions that need it.
"""

from __future__ import annotations

__version__ = "0.1.0"
