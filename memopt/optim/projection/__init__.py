"""Projectors: one interface, many ways to pick a subspace (see ``base.Projector``)."""

from __future__ import annotations

from typing import Any

from memopt._utils import Registry
from memopt.optim.projection.base import (
    PROJ_TYPES,
    Projector,
    as_matrix,
    mix_seed,
    resolve_side,
    writable_matrix,
)
from memopt.optim.projection.dense import (
    DenseProjector,
    GramProjector,
    RandomizedSVDProjector,
    SubspaceIterationProjector,
    SVDProjector,
)
from memopt.optim.projection.seeded import (
    ColumnProjector,
    CoordinateProjector,
    GaussianProjector,
    OrthogonalProjector,
)

PROJECTORS: Registry[type[Projector]] = Registry("projector")
for _cls in (
    SVDProjector,
    GramProjector,
    RandomizedSVDProjector,
    SubspaceIterationProjector,
    GaussianProjector,
    OrthogonalProjector,
    ColumnProjector,
    CoordinateProjector,
):
    PROJECTORS.register(_cls.name)(_cls)
PROJECTORS.register("randperm")(ColumnProjector)  # FRUGAL's name for column selection


def make_projector(name: str, **kwargs: Any) -> Projector:
    """Build a projector from its registered name (``svd``, ``rsvd``, ``random``, ...)."""
    return PROJECTORS.get(name)(**kwargs)


__all__ = [
    "PROJECTORS",
    "writable_matrix",
    "PROJ_TYPES",
    "ColumnProjector",
    "CoordinateProjector",
    "DenseProjector",
    "GramProjector",
    "GaussianProjector",
    "OrthogonalProjector",
    "Projector",
    "RandomizedSVDProjector",
    "SVDProjector",
    "SubspaceIterationProjector",
    "as_matrix",
    "make_projector",
    "mix_seed",
    "resolve_side",
]
