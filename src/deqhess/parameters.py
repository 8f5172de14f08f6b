"""The layout of θ: a single tensor or a ``dict[str, Tensor]`` and its flat vector.

Flattening follows ``torch.nn.utils.parameters_to_vector`` over the dict's insertion
order, each tensor row-major, so a flat index means the same thing everywhere in
deqhess and in user code.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping, Sequence
from typing import Union, cast

import torch
from torch import Tensor

from .errors import InputError
from .options import supported_dtype

__all__ = ["ParameterLayout", "Parameters"]

Parameters = Union[Tensor, Mapping[str, Tensor]]  # noqa: UP007 (a runtime alias on 3.10)


class ParameterLayout:
    """Names, shapes and flat offsets of θ.

    Args:
        theta: a floating tensor, or a non-empty mapping of names to floating tensors
            (0-dim allowed), all of one dtype and device.

    Raises:
        ValueError: θ is empty, holds a non-tensor or a tensor that is not float32 or
            float64, or mixes dtypes or devices.
    """

    def __init__(self, theta: Parameters) -> None:
        if isinstance(theta, Tensor):
            self.names: tuple[str, ...] | None = None
            tensors = [theta]
        elif isinstance(theta, Mapping):
            if len(theta) == 0:
                raise InputError("theta is an empty dict; pass at least one parameter tensor.")
            self.names = tuple(theta.keys())
            tensors = list(theta.values())
            for name, t in zip(self.names, tensors, strict=True):
                if isinstance(t, Mapping):
                    raise InputError(
                        f"theta[{name!r}] is a {type(t).__name__}: theta is one level deep, "
                        "a dict of tensors (or one tensor). Flatten the nested one "
                        f"({{'{name}.W': ..., '{name}.b': ...}}) and read it so in f."
                    )
                if not isinstance(t, Tensor):
                    raise InputError(
                        f"theta[{name!r}] is a {type(t).__name__}, not a torch.Tensor; "
                        "wrap it with torch.tensor(...)."
                    )
        else:
            raise InputError(
                f"theta must be a torch.Tensor or a dict[str, Tensor]; got {type(theta).__name__}."
            )
        labels = self.labels()
        for label, t in zip(labels, tensors, strict=True):
            if not t.is_floating_point():
                raise InputError(
                    f"{label} has dtype {t.dtype}; parameters must be floating point "
                    "(float32 or float64)."
                )
            supported_dtype(t.dtype, label)
        first = tensors[0]
        for label, t in zip(labels, tensors, strict=True):
            if t.dtype != first.dtype or t.device != first.device:
                raise InputError(
                    f"all of theta must share one dtype and device: {labels[0]} is "
                    f"{first.dtype} on {first.device} but {label} is {t.dtype} on {t.device}."
                )
        if sum(t.numel() for t in tensors) == 0:
            raise InputError(
                "theta has no entries (every tensor is empty); pass at least one parameter."
            )
        self.shapes = tuple(t.shape for t in tensors)
        self.numels = tuple(t.numel() for t in tensors)
        #: where each tensor starts in the flat ``[P]`` vector, and ``P`` last
        self.offsets = (0, *itertools.accumulate(self.numels))
        self.dtype = first.dtype
        self.device = first.device

    @property
    def size(self) -> int:
        """P, the number of scalar parameters."""
        return sum(self.numels)

    def select(self, names: Sequence[str]) -> ParameterLayout:
        """The layout of some of θ's named tensors, one after the other in ``names``' order.

        What a :class:`deqhess.curvature.ParameterBlock` of those names acts on.

        Args:
            names: names of θ's tensors, each once.

        Returns:
            A layout of the same dtype and device holding only those tensors.

        Raises:
            InputError: θ is not a dict, or a name is not one of θ's or is repeated.
        """
        if self.names is None:
            raise InputError("a selection of parameters needs a dict theta (named parameters).")
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise InputError(f"unknown parameter names {unknown}; choose from {list(self.names)}.")
        repeated = sorted({n for n in names if list(names).count(n) > 1})
        if repeated:
            raise InputError(f"parameter names {repeated} are given more than once.")
        where = {n: i for i, n in enumerate(self.names)}
        chosen = copy.copy(self)
        chosen.names = tuple(names)
        chosen.shapes = tuple(self.shapes[where[n]] for n in names)
        chosen.numels = tuple(self.numels[where[n]] for n in names)
        chosen.offsets = (0, *itertools.accumulate(chosen.numels))
        return chosen

    def labels(self) -> list[str]:
        """Human-readable names of the parameter tensors, for messages."""
        if self.names is None:
            return ["theta"]
        return [f"theta[{n!r}]" for n in self.names]

    def tensors(self, theta: Parameters) -> list[Tensor]:
        """The tensors of ``theta`` in flattening order."""
        if self.names is None:
            return [cast(Tensor, theta)]
        return [cast(Mapping[str, Tensor], theta)[n] for n in self.names]

    def flatten(self, theta: Parameters) -> Tensor:
        """θ-structured → flat ``[P]`` (differentiable; a new tensor)."""
        return torch.cat([t.reshape(-1) for t in self.tensors(theta)])

    def unflatten(self, flat: Tensor) -> Parameters:
        """Flat ``[..., P]`` → θ's structure, each leaf shaped ``[..., *shape]`` (views)."""
        lead = flat.shape[:-1]
        pieces = torch.split(flat, list(self.numels), dim=-1)
        leaves = [p.reshape((*lead, *s)) for p, s in zip(pieces, self.shapes, strict=True)]
        if self.names is None:
            return leaves[0]
        return dict(zip(self.names, leaves, strict=True))

    def matches(self, value: object) -> bool:
        """Whether ``value`` has θ's structure and shapes.

        Returns:
            True for a tensor of θ's shape (θ a tensor), or a mapping with θ's keys — in
            any order: :meth:`flatten` reads them by name — and shapes.
        """
        return self.mismatch(value) is None

    def mismatch(self, value: object) -> str | None:
        """What keeps ``value`` from having θ's structure and shapes, for messages.

        Returns:
            None when :meth:`matches` holds; else the first difference found: another
            type, missing or unknown keys, or the entry of another shape (its key and
            both shapes).
        """
        if self.names is None:
            if not isinstance(value, Tensor):
                return f"a {type(value).__name__}, not a tensor"
            if value.shape != self.shapes[0]:
                return f"shape {tuple(value.shape)}, not theta's {tuple(self.shapes[0])}"
            return None
        if not isinstance(value, Mapping):
            return f"a {type(value).__name__}, not a dict"
        missing = [n for n in self.names if n not in value]
        unknown = [k for k in value if k not in self.names]
        if missing or unknown:
            return "a dict " + " and ".join(
                ([f"without {missing}"] if missing else [])
                + ([f"with keys theta does not have: {unknown}"] if unknown else [])
            )
        for name, shape in zip(self.names, self.shapes, strict=True):
            entry = value[name]
            if not isinstance(entry, Tensor):
                return f"a dict whose entry {name!r} is a {type(entry).__name__}, not a tensor"
            if entry.shape != shape:
                return (
                    f"a dict whose entry {name!r} has shape {tuple(entry.shape)} but "
                    f"theta[{name!r}] has shape {tuple(shape)}"
                )
        return None

    def describe(self) -> str:
        """A short description of the expected structure, for messages."""
        if self.names is None:
            return f"a tensor of shape {tuple(self.shapes[0])}"
        pairs = zip(self.names, self.shapes, strict=True)
        inner = ", ".join(f"{n!r}: {tuple(s)}" for n, s in pairs)
        return "{" + inner + "}"
