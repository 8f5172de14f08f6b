"""The bound problem: ``f(x, h, θ)`` and the loss as pure functions of ``(θ_flat, h_rows)``.

Every derivative in :mod:`deqhess.implicit` is taken of these two functions with
``torch.func``: θ as a flat ``[P]`` vector (see :mod:`deqhess.parameters`) and the
state as rows ``[S, d]`` (see :mod:`deqhess.state`). The residual whose zero is the
equilibrium is :class:`deqhess.solvers.Residual` of :meth:`Problem.dynamics`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree

from ..errors import InputError, StaleEquilibriumError, add_note
from ..finiteness import all_finite
from ..parameters import ParameterLayout, Parameters
from ..state import StateLayout, check_state_map
from .loss import Captured, Loss, digests, tensor_version

__all__ = ["FixedPointMap", "Problem", "check_first_call"]

#: ``f(x, h, θ)``, the DEQ map. θ reaches it in the structure the user gave (a tensor or
#: a dict of tensors), so ``f`` may annotate it either way.
FixedPointMap = Callable[[Any, Tensor, Any], Tensor]

#: what torch raises for operands of mismatched shapes or dtypes (a matmul, a cat)
_OPERAND_ERRORS = (RuntimeError, ValueError, IndexError)


class Problem:
    """``f`` bound to ``x``, with θ and ``h`` in their flat/row layouts.

    Args:
        f: the dynamics ``f(x, h, theta)`` returning a tensor shaped like ``h``.
        theta: θ (tensor or dict of tensors); only its layout and versions are kept.
        x: the input passed to ``f`` (any object); its tensors — ``x`` itself, or the
            leaves of tuples, lists and dicts of tensors — are checked for NaN/inf,
            detached and watched for changes (their versions and their bytes).
        h0: initial state, fixing the state's shape and dtype.
        batch_dim: dimension of ``h`` whose slices are independent samples, or None.
        state_advice: where ``h0`` is a default the caller chose (zeros like x), what it
            is and what to pass instead, for the message when ``f`` fails on it.

    Raises:
        InputError: non-finite θ, tensors of x or h0; θ and h0 of different dtype or device;
            a tensor of θ or x made under ``torch.inference_mode`` used outside it;
            ``f`` returning a non-tensor or a tensor of another shape or dtype; ``f``
            failing on a default ``h0`` or on a tensor of x of another dtype than θ's (see
            :func:`check_first_call`).
    """

    def __init__(
        self,
        f: FixedPointMap,
        theta: Parameters,
        x: Any,
        h0: Tensor,
        batch_dim: int | None = None,
        *,
        state_advice: str | None = None,
    ) -> None:
        if not callable(f):
            raise InputError(f"f must be callable as f(x, h, theta); got {type(f).__name__}.")
        self.f = f
        self.params = ParameterLayout(theta)
        self.state = StateLayout(h0, batch_dim)
        watched = list(zip(self.params.labels(), self.params.tensors(theta), strict=True))
        watched += _tensor_leaves(x, "x")
        for label, t in watched:
            _check_finite(t, label)
        _check_finite(h0, "h0")
        if h0.dtype != self.params.dtype or h0.device != self.params.device:
            fix = (
                "h0 was not given, so it is zeros like x: convert x to theta's dtype and "
                "device, e.g. x.to(theta_tensor), or pass h0"
                if state_advice is not None
                else "make them match, e.g. h0.to(theta_tensor)"
            )
            raise InputError(
                f"h0 is {h0.dtype} on {h0.device} but theta is {self.params.dtype} on "
                f"{self.params.device}; {fix}."
            )
        self.x = _pytree.tree_map(lambda v: v.detach() if isinstance(v, Tensor) else v, x)
        made_in_inference = [label for label, t in watched if t.is_inference()]
        if made_in_inference and not torch.is_inference_mode_enabled():
            raise InputError(
                f"{', '.join(made_in_inference[:4])} "
                f"{'was' if len(made_in_inference) == 1 else 'were'} made under "
                "torch.inference_mode() and used outside it: such a tensor keeps no version "
                "and cannot be saved for a backward, so no derivative can be taken with it. "
                "Pass a copy made outside inference mode (x.clone()), or call deqhess inside "
                "the same inference_mode block."
            )
        self._watched = [(label, t, tensor_version(t)) for label, t in watched]
        # a write through .data or a NumPy view leaves no version: the bytes are watched
        self._digests = digests([t for _, t in watched])
        self._captured = Captured(f)  # what f reads besides its arguments
        self._checking = False  # inside checked(): contents compared once already
        check_first_call(f, self.x, h0.detach(), _detached(theta), state_advice)

    def check_fresh(self) -> None:
        """Refuse to go on from an equilibrium whose inputs changed since it was solved.

        Versions are compared at every call; the tensors' bytes (one pass over them, a
        write through ``.data`` or a NumPy view leaves no version) once per
        :meth:`checked` block, or at every call outside one.

        Raises:
            StaleEquilibriumError: θ, a tensor of x, or state ``f`` closes over (as far as
                Python shows it: see :class:`deqhess.implicit.loss.Captured`) changed.
        """
        contents = not self._checking
        if self._captured.changed(contents):
            raise StaleEquilibriumError(
                "f reads state that changed after the Equilibrium was built (a tensor it closes "
                "over or whose module it calls was modified in place — also through .data or "
                "a NumPy view — or a name it uses was rebound), so its fixed point and caches "
                "are stale. Build a new Equilibrium after changing it, or pass such tensors "
                "in theta or x."
            )
        for i, (label, t, version) in enumerate(self._watched):
            if tensor_version(t) == version:  # (an inference tensor's: by its bytes, below)
                continue
            # a view shares its base's version: a write to another part of the base moves
            # it, while its own numbers stay — compared by its bytes before refusing
            if digests([t])[0] == self._digests[i]:
                self._watched[i] = (label, t, tensor_version(t))
                continue
            raise StaleEquilibriumError(
                f"{label} was modified in place after the Equilibrium was built (tensor "
                f"version {version} → {t._version}), so its fixed point and caches are "
                "stale. Build a new Equilibrium after changing theta or x (or pass "
                "copies: theta.clone())."
            )
        if not contents:
            return
        now = digests([t for _, t, _ in self._watched])
        for (label, _, _), before, after in zip(self._watched, self._digests, now, strict=True):
            if before != after:
                raise StaleEquilibriumError(
                    f"{label} was modified after the Equilibrium was built: its values changed "
                    "with its version unchanged (a write through .data, .numpy() or another "
                    "view of its memory), so its fixed point and caches are stale. Build a "
                    "new Equilibrium after changing theta or x (or pass copies: x.clone())."
                )

    @contextlib.contextmanager
    def checked(self) -> Iterator[None]:
        """One derivative call: :meth:`check_fresh` in full on entry, versions within.

        Nested blocks check nothing more on entry. Run it holding the engine lock (the
        flag it sets is the lock holder's). On entry it raises what :meth:`check_fresh`
        raises (:class:`deqhess.StaleEquilibriumError`).

        Yields:
            Nothing: the call runs inside.
        """
        if self._checking:
            yield
            return
        self.check_fresh()
        self._checking = True
        try:
            yield
        finally:
            self._checking = False

    def dynamics(self, theta: Tensor, h: Tensor) -> Tensor:
        """``f(x, h, θ)`` as rows ``[S, d]``, for flat ``θ`` ``[P]`` and rows ``h``."""
        out = self.f(self.x, self.state.from_rows(h), self.params.unflatten(theta))
        return self.state.to_rows(out)

    def objective(self, loss: Loss, theta: Tensor, h: Tensor) -> Tensor:
        """``L(h, θ)`` for flat ``θ`` and rows ``h``."""
        return loss(self.state.from_rows(h), self.params.unflatten(theta))

    def lagrangian(
        self, loss: Loss | None, adjoint: Tensor | None
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """``Φ(θ, h) = L(h, θ) + ⟨λ, f(x, h, θ)⟩`` with λ held fixed (either term optional).

        Its Hessian projected by ``[I; Z]`` is the DEQ Hessian; the ``L`` term alone
        gives the loss curvature, the ``λ`` term alone the dynamics curvature.

        Args:
            loss: ``L``, or None to leave the loss term out.
            adjoint: λ rows ``[S, d]``, or None to leave the dynamics term out.

        Returns:
            ``Φ(θ, h)`` on flat θ ``[P]`` and rows ``h`` ``[S, d]``, a 0-dim tensor.
        """

        def phi(theta: Tensor, h: Tensor) -> Tensor:
            value = self.objective(loss, theta, h) if loss is not None else theta.new_zeros(())
            if adjoint is not None:
                value = value + (adjoint * self.dynamics(theta, h)).sum()
            return value

        return phi


def check_first_call(
    f: FixedPointMap, x: Any, h0: Tensor, theta: Parameters, state_advice: str | None = None
) -> None:
    """Call ``f(x, h0, θ)`` once, without gradients: it must return a state like ``h0``.

    A failure of ``f`` is the user's to debug and propagates as it is, unless deqhess can
    name its likely cause: ``h0`` is a default the caller chose (``state_advice``), or a
    floating tensor of ``x`` has another dtype than ``h0`` and θ (deqhess casts nothing).

    Args:
        f: the dynamics ``f(x, h, theta)``.
        x: its input.
        h0: the initial state (of θ's dtype).
        theta: θ, in the structure ``f`` reads.
        state_advice: where ``h0`` is a default (zeros like x), what it is and what to
            pass instead; None where the caller gave ``h0``.

    Raises:
        InputError: ``f`` returned no tensor of ``h0``'s shape and dtype, wrote a tensor
            of ``x`` or θ in place (called on copies), or failed with a ``RuntimeError``,
            ``ValueError`` or ``IndexError`` whose likely cause is named above (the
            failure is its ``__cause__``).
    """
    # on copies: a map writing its inputs in place changes the copies, not the caller's
    x = _pytree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, x)
    theta = theta.clone() if isinstance(theta, Tensor) else {k: v.clone() for k, v in theta.items()}
    try:
        with torch.no_grad():
            out = f(x, h0, theta)
    except _OPERAND_ERRORS as error:
        causes = [c for c in (state_advice, _dtype_advice(x, h0.dtype)) if c is not None]
        if not causes:
            shapes = [f"{label} {tuple(t.shape)}" for label, t in _tensor_leaves(x, "x")]
            add_note(
                error,
                f"deqhess: f raised this at its first call, f(x, h0, theta), with "
                f"{', '.join(shapes) or 'x holding no tensor'} and h0 {tuple(h0.shape)} "
                "(Equilibrium(f, theta, x, h0) takes x before h0, and h0 shaped like the "
                "state f returns).",
            )
            raise
        raise InputError(f"f failed on the initial state: {'; '.join(causes)}.") from error
    if state_advice is not None and isinstance(out, Tensor) and out.shape != h0.shape:
        raise InputError(
            f"f returned shape {tuple(out.shape)} on the initial state: {state_advice}."
        )
    check_state_map(out, h0, "f(x, h, theta)")
    theta_leaves = _tensor_leaves(theta, "theta") if isinstance(theta, Tensor) else [
        (f"theta[{k!r}]", v) for k, v in theta.items()
    ]  # fmt: skip
    written = [  # (an inference tensor keeps no version: not seen under inference_mode)
        label for label, t in _tensor_leaves(x, "x") + theta_leaves
        if not t.is_inference() and t._version
    ]  # fmt: skip
    if written:
        raise InputError(
            f"f modified {', '.join(written[:4])} in place (e.g. x.mul_(…), theta['b'] += …): "
            "its derivatives in them are then undefined (torch.func refuses them), and the "
            "caller's tensors would change at every call. Use out-of-place operations on "
            "x and theta (x * …, theta['b'] + …)."
        )


def _dtype_advice(x: Any, dtype: torch.dtype) -> str | None:
    """Name a floating tensor of ``x`` of another dtype than the state's and θ's, if any."""
    for label, t in _tensor_leaves(x, "x"):
        if t.is_floating_point() and t.dtype != dtype:
            return (
                f"{label} is {t.dtype} but theta and h0 are {dtype}, and deqhess passes x "
                f"to f as it is; convert x with .to({dtype}) (or theta and h0 to {t.dtype})"
            )
    return None


def _check_finite(t: Tensor, label: str) -> None:
    if not all_finite(t):
        raise InputError(
            f"{label} contains non-finite values (NaN or inf); pass finite values "
            "(check the data and the previous optimisation step)."
        )


def _tensor_leaves(x: Any, name: str) -> list[tuple[str, Tensor]]:
    """The tensors of ``x`` (itself, or leaves of its tuples, lists and dicts), labelled."""
    if isinstance(x, Tensor):
        return [(name, x)]
    leaves, _ = _pytree.tree_flatten_with_path(x)
    return [(name + _pytree.keystr(path), t) for path, t in leaves if isinstance(t, Tensor)]


def _detached(theta: Parameters) -> Parameters:
    if isinstance(theta, Tensor):
        return theta.detach()
    return {k: v.detach() for k, v in theta.items()}
