"""Random contractive DEQ problems and their unrolled float64 references.

A problem is drawn by hypothesis: a state of rank 1–3 with its samples along any
``batch_dim`` (or one coupled system), a dict θ with a 0-dim entry in random order,
a 1-Lipschitz nonlinearity and a loss ``L(h)`` or ``L(h, θ)`` that may couple the
samples. The map is

    f(x, h, θ) = act(gain · W h_s + U x_s + b)    for each sample s (rows [S, d]),

with ‖W‖₂ = c ∈ [0.1, 0.5] and |gain| ≤ 1, so ‖∂f/∂h‖₂ ≤ c: a contraction. The
references share no code with deqhess: ``K`` plain iterations from zero,
differentiated by ``torch.func``, with ``K`` the smallest count giving ``K² cᴷ < 1e-13``
(the error of the unrolled first and second derivatives), and θ flattened here.

Profiles: ``DEQHESS_PROPERTIES=short`` (default: a few derandomised examples per test,
part of the default suite) or ``long`` (many random examples; run by
``benchmarks/properties.py``, which prints the examples run and the worst errors).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from torch import Tensor, nn

PROFILE = os.environ.get("DEQHESS_PROPERTIES", "short")
if PROFILE not in ("short", "long"):
    raise ValueError(f"DEQHESS_PROPERTIES must be 'short' or 'long'; got {PROFILE!r}.")

#: exactness bound for every derivative: the unrolled reference is exact to ~1e-13
#: relative, the implicit one to the solves' 1e-12 (iterative) and rounding amplified
#: by cond(I − J) ≤ 1/(1 − c) ≤ 2; 1e-9 leaves three orders of margin.
TOLERANCE = 1e-9

NONLINEARITIES: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "sin": torch.sin,
    "softplus": torch.nn.functional.softplus,
}
LOSSES = ("separable", "coupling", "readout", "readout_coupling")  # the last two use θ


def examples(short: int, long: int) -> settings:
    """Hypothesis settings: ``short`` derandomised examples, or ``long`` random ones."""
    return settings(
        max_examples=short if PROFILE == "short" else long,
        derandomize=PROFILE == "short",
        database=None,
        deadline=None,
        # no shrinking: a failure prints its full problem, and the issue-9 expected
        # failures would otherwise spend minutes shrinking
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
        print_blob=True,
    )


def unroll_steps(contraction: float) -> int:
    """The smallest ``K`` with ``K² cᴷ < 1e-13``."""
    k = 1
    while k * k * contraction**k >= 1e-13:
        k += 1
    return k


@dataclass
class RandomDEQ:
    """One drawn problem (float64) and its references."""

    shape: tuple[int, ...]
    batch_dim: int | None
    samples: int
    width: int
    theta: dict[str, Tensor]
    x: Tensor  # [S, m]
    act: Callable[[Tensor], Tensor]
    contraction: float
    loss_kind: str
    target: Tensor  # [S, d]
    description: str

    # --- the problem -------------------------------------------------------------
    def rows(self, h: Tensor) -> Tensor:
        """State-shaped ``h`` → ``[S, d]`` (written here, not taken from deqhess); any
        number of samples, so that one problem serves batches of several sizes."""
        if self.batch_dim is None:
            return h.reshape(1, -1)
        return torch.movedim(h, self.batch_dim, 0).reshape(h.shape[self.batch_dim], -1)

    def f(self, x: Tensor, h: Tensor, t: dict[str, Tensor]) -> Tensor:
        out = self.act(t["gain"] * self.rows(h) @ t["W"].T + x @ t["U"].T + t["b"])
        if self.batch_dim is None:
            return out.reshape(h.shape)
        moved = torch.movedim(h, self.batch_dim, 0).shape
        return torch.movedim(out.reshape(moved), 0, self.batch_dim)

    @property
    def uses_theta(self) -> bool:
        return self.loss_kind.startswith("readout")

    def loss_value(self, h: Tensor, t: dict[str, Tensor] | None, target: Tensor) -> Tensor:
        r = self.rows(h)
        if self.loss_kind == "separable":
            return 0.5 * (r - target).pow(2).sum() + torch.log(torch.cosh(2 * r)).sum()
        if self.loss_kind == "coupling":  # couples every entry of every sample
            return 0.3 * r.sum() ** 2 + torch.logsumexp(r.reshape(-1), 0) + (r * target).sum()
        readout = torch.logsumexp(r @ t["W"][:, : min(2, self.width)], dim=1).sum()
        value = readout + 0.01 * t["U"].pow(2).sum() + t["gain"] ** 2 * (r * target).sum()
        if self.loss_kind == "readout_coupling":
            value = value + (r.sum(0) @ t["b"]) ** 2
        return value

    @property
    def loss(self) -> Callable[..., Tensor]:
        """``L(h)`` or ``L(h, θ)`` as deqhess receives it."""
        if self.uses_theta:
            return lambda h, t: self.loss_value(h, t, self.target)
        return lambda h: self.loss_value(h, None, self.target)

    @property
    def h0(self) -> Tensor:
        return torch.zeros(self.shape, dtype=torch.float64)

    # --- independent flattening and references -----------------------------------
    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.theta.values())

    def flat(self) -> Tensor:
        return torch.cat([t.reshape(-1) for t in self.theta.values()])

    def structured(self, flat: Tensor) -> dict[str, Tensor]:
        out, offset = {}, 0
        for name, t in self.theta.items():
            out[name] = flat[offset : offset + t.numel()].reshape(t.shape)
            offset += t.numel()
        return out

    def unrolled_state(self, flat: Tensor) -> Tensor:
        theta, h = self.structured(flat), self.h0
        for _ in range(unroll_steps(self.contraction)):
            h = self.f(self.x, h, theta)
        return h

    def objective(self, flat: Tensor) -> Tensor:
        """θ ↦ L(h_K(θ), θ) through K unrolled steps."""
        h = self.unrolled_state(flat)
        return self.loss_value(h, self.structured(flat), self.target)

    def reference_split(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """(Z ``[N, P]``, loss curvature ``[I; Z]ᵀ ∇²L [I; Z]``) from the unrolled state."""
        z = torch.func.jacfwd(lambda t: self.unrolled_state(t).reshape(-1))(flat)
        h = self.unrolled_state(flat).reshape(-1)
        p = flat.numel()

        def joint(v: Tensor) -> Tensor:
            return self.loss_value(v[p:].reshape(self.shape), self.structured(v[:p]), self.target)

        hess = torch.func.hessian(joint)(torch.cat([flat, h]))
        lift = torch.cat([torch.eye(p, dtype=flat.dtype), z])
        return z, lift.T @ hess @ lift


class ProblemCell(nn.Module):
    """A problem's ``f(x, h, θ)`` as a cell, θ registered as parameters in θ's order.

    Args:
        problem: the problem.
        batched_start: start from zeros ``[S, width]`` shaped by each batch's ``x`` (a
            model over a data set); else from the problem's own ``h0``.
    """

    def __init__(self, problem: RandomDEQ, batched_start: bool = False) -> None:
        super().__init__()
        self.problem, self.batched_start = problem, batched_start
        for name, t in problem.theta.items():
            self.register_parameter(name, nn.Parameter(t.clone()))

    def forward(self, x: Any, h: Tensor) -> Tensor:
        return self.problem.f(x, h, {n: getattr(self, n) for n in self.problem.theta})

    def init_state(self, x: Tensor) -> Tensor:
        if self.batched_start:
            return x.new_zeros(x.shape[0], self.problem.width)
        return self.problem.h0


@st.composite
def random_deqs(
    draw: Any, batch_dims: tuple[str, ...] = ("none", "any"), max_rank: int = 3
) -> RandomDEQ:
    """A :class:`RandomDEQ`; ``batch_dims`` lists ``"none"`` (one coupled system),
    ``"first"`` (samples along dim 0) and ``"any"`` (samples along any dim, negative
    indices too)."""
    seed = draw(st.integers(0, 2**31 - 1))
    rank = draw(st.integers(1, max_rank))
    kind = draw(st.sampled_from(batch_dims))
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        shape = tuple(_dims(draw, rank))
        batch_dim, samples = None, 1
        width = math.prod(shape)
    else:
        samples = draw(st.integers(1, 3))
        features = _dims(draw, rank - 1)
        position = 0 if kind == "first" else draw(st.integers(0, rank - 1))
        shape = (*features[:position], samples, *features[position:])
        negative = kind == "any" and draw(st.booleans())
        batch_dim = position - rank if negative else position
        width = math.prod(features)
    m = draw(st.integers(1, 3))
    contraction = draw(st.floats(0.1, 0.5))
    w = torch.randn(width, width, generator=g, dtype=torch.float64)
    entries = {
        "W": contraction * w / torch.linalg.matrix_norm(w, ord=2),
        "U": torch.randn(width, m, generator=g, dtype=torch.float64),
        "b": 0.3 * torch.randn(width, generator=g, dtype=torch.float64),
        # |gain| >= 0.2 keeps J = ∂f/∂h away from 0, so a solve that drops J is caught
        "gain": torch.tensor(
            draw(st.sampled_from([-1.0, 1.0])) * draw(st.floats(0.2, 1.0)), dtype=torch.float64
        ),
    }
    order = draw(st.permutations(list(entries)))
    act_name = draw(st.sampled_from(sorted(NONLINEARITIES)))
    loss_kind = draw(st.sampled_from(LOSSES))
    return RandomDEQ(
        shape=shape,
        batch_dim=batch_dim,
        samples=samples,
        width=width,
        theta={k: entries[k] for k in order},
        x=torch.randn(samples, m, generator=g, dtype=torch.float64),
        act=NONLINEARITIES[act_name],
        contraction=contraction,
        loss_kind=loss_kind,
        target=torch.randn(samples, width, generator=g, dtype=torch.float64),
        description=(
            f"shape={shape} batch_dim={batch_dim} m={m} c={contraction:.2f} act={act_name} "
            f"loss={loss_kind} θ order={order} seed={seed}"
        ),
    )


def _dims(draw: Any, count: int, budget: int = 8) -> list[int]:
    """``count`` sizes in 1–3 whose product stays within ``budget`` (P stays below ~100)."""
    dims = []
    for _ in range(count):
        dims.append(draw(st.integers(1, max(1, min(3, budget)))))
        budget //= dims[-1]
    return dims


# --------------------------------------------------------------------------- results
#: per test: examples run; per quantity: the worst relative error seen (a benchmark reads it).
EXAMPLES: Counter[str] = Counter()
WORST: dict[str, float] = {}


def relative_error(got: Tensor, want: Tensor) -> float:
    scale = float(torch.linalg.vector_norm(want))
    return float(torch.linalg.vector_norm(got - want)) / max(scale, 1e-300)


def check(quantity: str, got: Tensor, want: Tensor, problem: RandomDEQ) -> None:
    """Record the relative error of ``got`` and assert it is within :data:`TOLERANCE`."""
    error = relative_error(got.detach(), want.detach())
    WORST[quantity] = max(WORST.get(quantity, 0.0), error)
    assert error <= TOLERANCE, f"{quantity}: relative error {error:.2e} on {problem.description}"
