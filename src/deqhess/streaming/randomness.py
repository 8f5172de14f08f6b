"""Torch's global random generators while a pass evaluates the model: not drawn from.

A pass runs the user's loader and the user's model or dynamics. The loader may draw
from torch's global generator (a shuffling sampler, random transforms) as it does on
every read — that is the user's own reading of the data, and any change it makes to
the samples is caught by their fingerprints. The model must not draw while it is
evaluated: a model that draws (dropout through
``torch.nn.functional.dropout(training=True)``, noise layers) is another function on
every pass. :class:`Draws` tells whether anything drew between two points and, if so,
puts the generators back before raising; deqhess's own computations use private
generators, so an analysis leaves the global ones as the loader left them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ModelChangedError

__all__ = ["Draws"]


def _cuda_devices() -> list[int]:
    """The CUDA devices whose generators exist (none before CUDA is initialised)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    return list(range(torch.cuda.device_count()))


def _states() -> list[Tensor]:
    """The CPU generator's state, then each initialised CUDA device's."""
    states = [torch.random.get_rng_state()]
    states += [torch.cuda.get_rng_state(d) for d in _cuda_devices()]
    return states


class Draws:
    """Whether torch's global generators were drawn from since :meth:`mark`."""

    def __init__(self) -> None:
        self._states = _states()

    def mark(self) -> None:
        """Take the generators' states now, as the point :meth:`check` compares with."""
        self._states = _states()

    def check(self, what: str) -> None:
        """Refuse a computation that drew random numbers since :meth:`mark`.

        Args:
            what: what ran since the mark, for the message (e.g. ``"the model"``).

        Raises:
            ModelChangedError: a global generator's state changed; the generators are
                put back to their marked states first.
        """
        now = _states()
        if len(now) != len(self._states) or any(
            not torch.equal(a, b) for a, b in zip(now, self._states, strict=False)
        ):
            torch.random.set_rng_state(self._states[0])
            for device, state in enumerate(self._states[1:]):
                torch.cuda.set_rng_state(state, device)
            raise ModelChangedError(
                f"{what} drew random numbers from torch's generator while it was evaluated, "
                "so it is another function on every pass (and on every product): dropout "
                "called as torch.nn.functional.dropout(training=True), a noise layer, or "
                "random sampling in forward. Make it deterministic for the analysis (eval() "
                "mode, or training=False / no noise), or pass the noise in as an input."
            )
