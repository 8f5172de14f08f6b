"""What the layer does when a solve misses its tolerance: per layer, or per call.

A layer's policy has two parts: the forward solve's :class:`deqhess.solvers.Convergence`
(raise, or keep each sample's best iterate and mark it), and what the linear solves of its
derivatives do (``"raise"`` a :class:`deqhess.ConvergenceError`, or ``"report"`` the miss
in ``LayerInfo.linear_solves`` and go on). The ``"training"`` preset carries on as
torchdeq does — best iterates, no warnings, linear misses reported — while marking every
sample and solve that missed, so a training loss can leave them out.

:func:`convergence` overrides every layer's policy for the calls inside a block and
records each call's per-sample outcome: the tool for sampling weights (a Laplace
posterior's samples, an ensemble), where a sampled cell that does not contract is a fact
to report and leave out, not an error that stops the loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..solvers import Convergence, SolveInfo

__all__ = ["ConvergenceRecord", "LayerCall", "LayerPolicy", "convergence"]

_LINEAR = ("raise", "report")


@dataclass(frozen=True)
class LayerPolicy:
    """The forward solve's policy and the linear solves' (``"raise"`` or ``"report"``)."""

    forward: Convergence
    linear: str = "raise"

    @classmethod
    def resolve(
        cls, policy: Convergence | str | None, require_convergence: bool = True
    ) -> LayerPolicy:
        """From a :class:`Convergence`, ``"raise"``, ``"best"``, ``"training"`` or None
        (then ``require_convergence`` decides: True raises, False keeps the best).

        Raises:
            ValueError: an unknown alias, or a contradiction with ``require_convergence``.
        """
        if policy == "training":
            if not isinstance(require_convergence, bool):
                raise ValueError(
                    f"require_convergence must be True or False; got {require_convergence!r}."
                )
            return cls(Convergence("best", warn=False), "report")
        if isinstance(policy, str) and policy not in ("raise", "best"):
            raise ValueError(
                f"unknown convergence {policy!r}; use 'raise', 'best', 'training' (carry on "
                "like torchdeq, marking what missed) or a deqhess.solvers.Convergence."
            )
        forward = Convergence.resolve(policy, require_convergence)
        return cls(forward, "raise")


@dataclass(frozen=True)
class LayerCall:
    """One layer call inside :func:`convergence`.

    Attributes:
        layer: the DEQ layer called.
        converged_mask: ``[S]`` True where the sample's forward solve met the tolerance.
        info: the forward solve's statistics.
    """

    layer: nn.Module
    converged_mask: Tensor
    info: SolveInfo


@dataclass
class ConvergenceRecord:
    """The calls made inside a :func:`convergence` block, in order."""

    calls: list[LayerCall] = field(default_factory=list)

    def converged_mask(self) -> Tensor:
        """``[calls, S]``: per call, which samples' solves met the tolerance — with one
        layer called once per sampled weight, row ``s`` is sample ``s``'s forward.

        Raises:
            ValueError: no call, or calls of different batch sizes (index ``calls``).
        """
        if not self.calls:
            raise ValueError("no DEQ layer was called inside the convergence() block.")
        sizes = {c.converged_mask.shape for c in self.calls}
        if len(sizes) != 1:
            raise ValueError(
                f"the calls have different numbers of samples {sorted(sizes)}: read "
                "record.calls one by one."
            )
        return torch.stack([c.converged_mask for c in self.calls])

    @property
    def unconverged(self) -> int:
        """Samples, over all calls, whose forward solve missed the tolerance."""
        return sum(int((~c.converged_mask).sum()) for c in self.calls)


@dataclass(frozen=True)
class _Override:
    policy: LayerPolicy
    record: ConvergenceRecord


_OVERRIDE: ContextVar[_Override | None] = ContextVar("deqhess_convergence", default=None)


@contextlib.contextmanager
def convergence(
    policy: Convergence | str = "best", *, warn: bool = False
) -> Iterator[ConvergenceRecord]:
    """Within the block every :class:`~deqhess.nn.DEQ` layer solves with ``policy`` instead
    of its own, and each call's per-sample outcome is recorded.

    Args:
        policy: ``"best"`` (default: keep each sample's best iterate and mark it),
            ``"raise"``, ``"training"``, or a :class:`deqhess.solvers.Convergence` (e.g.
            with fallback solvers).
        warn: with ``"best"``, also warn per call that missed (the record says it anyway).

    Yields:
        a :class:`ConvergenceRecord`: ``record.converged_mask()`` is ``[calls, S]``.

    Example — Laplace sampling with a DEQ (``pred_type="nn"``), leaving out the samples
    whose cell does not converge::

        with deqhess.nn.convergence("best") as record:
            samples = la.predictive_samples(x, pred_type="nn", n_samples=100)  # [S, B, C]
        kept = record.converged_mask()[..., None]                                # [S, B, 1]
        probs = (samples * kept).sum(0) / kept.sum(0)
    """
    layer_policy = LayerPolicy.resolve(policy)
    if policy == "best" and warn:
        layer_policy = LayerPolicy(Convergence("best"), layer_policy.linear)
    elif policy == "best":
        layer_policy = LayerPolicy(Convergence("best", warn=False), layer_policy.linear)
    record = ConvergenceRecord()
    token = _OVERRIDE.set(_Override(layer_policy, record))
    try:
        yield record
    finally:
        _OVERRIDE.reset(token)


def active_override() -> _Override | None:
    """The innermost :func:`convergence` block's policy and record, if any."""
    return _OVERRIDE.get()
