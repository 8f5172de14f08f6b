"""Torch's global random generators while a pass evaluates the model: not drawn from.

A pass runs the user's loader and the user's model or dynamics. The loader may draw
from torch's global generator (a shuffling sampler, random transforms) as it does on
every read — that is the user's own reading of the data, and any change it makes to
the samples is caught by their fingerprints. The model must not draw while it is
evaluated: a model that draws (dropout through
``torch.nn.functional.dropout(training=True)``, noise layers) is another function on
every pass. :class:`Draws` tells whether anything drew between two points and, if so,
puts the generators back before raising; deqhess's own computations use private
generators.

The loader's draws are not the user's doing, though: a ``DataLoader`` draws a base
seed on every ``iter()``, even with ``shuffle=False``. :class:`LoaderStream` keeps them
apart: every pass reads the data with the generators where the previous pass of the same
operator left them (the first, where the user's were), and gives the user's back at its
end. So torch's random state is the same bits after every analysis, while the loader
sees one continuing stream of draws, as it would in a training loop: a random transform,
or a loader that reads another subset each pass, is still caught on the next pass,
whether within one analysis or in the next.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from ..errors import ModelChangedError

__all__ = ["Draws", "LoaderStream"]


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


def _restore(states: list[Tensor]) -> None:
    """Put the generators back to ``states`` (as :func:`_states` gave them).

    A CUDA device initialised since then has no state in ``states``: it is left as is.
    """
    torch.random.set_rng_state(states[0])
    for device, state in enumerate(states[1:]):
        torch.cuda.set_rng_state(state, device)


class LoaderStream:
    """The data's own continuation of torch's global generators, apart from the user's.

    Draws a loader makes while one operator's passes read the data continue from pass
    to pass, while the user's generators are as they were after every pass.
    """

    def __init__(self) -> None:
        self._continued: list[Tensor] | None = None  # where the last pass left them

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """A pass: the generators continue the data's stream, the user's come back after.

        Yields:
            Nothing: the pass runs inside, with the data's stream (the user's generators
            on the first pass); at its end, also on an error, the user's are put back.
        """
        user = _states()
        if self._continued is not None:
            _restore(self._continued)
        try:
            yield
        finally:
            self._continued = _states()
            _restore(user)


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
            _restore(self._states)
            raise ModelChangedError(
                f"{what} drew random numbers from torch's generator while it was evaluated, "
                "so it is another function on every pass (and on every product): dropout "
                "called as torch.nn.functional.dropout(training=True), a noise layer, or "
                "random sampling in forward. Make it deterministic for the analysis (eval() "
                "mode, or training=False / no noise), or pass the noise in as an input. (If "
                "another thread of yours draws from torch's global generator while the "
                "analysis runs, that reads the same: give that thread a torch.Generator of "
                "its own.)"
            )
