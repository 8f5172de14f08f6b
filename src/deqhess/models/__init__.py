"""Exact curvature of whole models containing DEQ layers, over a data set.

:class:`ModelCurvature` turns an ``nn.Module`` (encoder → :class:`deqhess.nn.DEQ` →
head, or any stack of them), a loss function, chosen parameters and a DataLoader into
operators — the Hessian, the output GGN, and the loss/dynamics split at a DEQ layer —
that every analysis in :mod:`deqhess.curvature` takes.
"""

from __future__ import annotations

from .curvature import MODEL_PARTS, ModelCurvature
from .graph import BatchGraph

__all__ = ["MODEL_PARTS", "BatchGraph", "ModelCurvature"]
