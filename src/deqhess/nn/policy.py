"""What the layer does when a solve misses its tolerance.

A layer's policy has two parts: the forward solve's :class:`deqhess.solvers.Convergence`
(raise, or keep each sample's best iterate and mark it), and what the linear solves of its
derivatives do (``"raise"`` a :class:`deqhess.ConvergenceError`, or ``"report"`` the miss
in ``LayerInfo.linear_solves`` and go on). The ``"training"`` preset carries on as
torchdeq does — best iterates, no warnings, linear misses reported — while marking every
sample and solve that missed, so a training loss can leave them out.
:func:`deqhess.nn.convergence` replaces every layer's policy for the calls in a block.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ..errors import InputError
from ..solvers import Convergence

__all__ = ["LayerPolicy"]

_LINEAR = ("raise", "report")


@dataclass(frozen=True)
class LayerPolicy:
    """What a layer does when a solve misses its tolerance.

    Attributes:
        forward: the forward solve's policy (raise, or keep and mark the best iterates;
            fallback solvers).
        linear: what the derivatives' iterative linear solves do on a miss:
            ``"raise"`` a :class:`deqhess.ConvergenceError`, or ``"report"`` it in
            ``LayerInfo.linear_solves`` and go on.
    """

    forward: Convergence
    linear: str = "raise"

    @classmethod
    def resolve(
        cls, policy: Convergence | str | None, require_convergence: bool = True
    ) -> LayerPolicy:
        """The layer policy a user's ``convergence=`` argument names.

        Args:
            policy: a :class:`Convergence`, ``"raise"``, ``"best"``, ``"training"`` (best
                iterates without warnings, linear misses reported) or None (then
                ``require_convergence`` decides).
            require_convergence: with ``policy=None``, True raises and False keeps the
                best iterates.

        Returns:
            The policy; its linear part is ``"report"`` for ``"training"`` only.

        Raises:
            InputError: an unknown alias, or ``require_convergence`` not a bool (also
                :meth:`Convergence.resolve`'s refusals: an object that is no policy, or
                ``require_convergence=False`` with a policy that raises).
        """
        if policy == "training":
            if not isinstance(require_convergence, bool):
                raise InputError(
                    f"require_convergence must be True or False; got {require_convergence!r}."
                )
            return cls(Convergence("best", warn=False), "report")
        if isinstance(policy, str) and policy not in ("raise", "best"):
            raise InputError(
                f"unknown convergence {policy!r}; use 'raise', 'best', 'training' (carry on "
                "like torchdeq, marking what missed) or a deqhess.solvers.Convergence."
            )
        forward = Convergence.resolve(policy, require_convergence)
        return cls(forward, "raise")

    def keeping_best(self) -> LayerPolicy:
        """The same policy, but keeping each unconverged sample's best iterate silently.

        Returns:
            A copy whose forward policy keeps the best iterates without a warning
            (fallback solvers still run first); the linear part is unchanged.
        """
        forward = copy.copy(self.forward)
        forward.on_failure, forward.warn = "best", False
        return LayerPolicy(forward, self.linear)
