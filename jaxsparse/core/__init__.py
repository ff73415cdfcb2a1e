"""The core every method builds on: mask trees, exact-count selection, the optax wrapper that
keeps masks (:mod:`~jaxsparse.core.transform`), layer densities, schedules and shardings.

Imports run one way: masks and selection, then distributions and schedules, then the wrapper.
"""

from jaxsparse.core import masks, selection  # noqa: I001 (the import order is the layering)
from jaxsparse.core import distributions, schedules
from jaxsparse.core import transform
from jaxsparse.core import sharding
from jaxsparse.core.transform import (Health, MaskUpdate, MaskUpdateInputs, SparseState,
                                      get_masks, get_sparse_state, sparse_transform)
