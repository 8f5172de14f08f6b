"""deqhess against JAX (optimistix, implicit adjoint, per-sample LU, jit) on the same problems.

Run: ``make bench-extras`` once (JAX, jaxlib, optimistix, lineax, equinox into the project's
.venv), then ``.venv/bin/python benchmarks/vs_jax.py [--threads 1] [--rounds 7]
[--device cpu]`` (``--device`` places deqhess; JAX runs on its default backend).

The problem is the issue's tanh DEQ ``h = tanh(W h + U x + b)`` (‖W‖₂ = 0.5) with the loss
``Σ log cosh(h − y) + 0.1 Σₛ (Σⱼ hₛⱼ)² / n``, float64, both libraries solving the fixed
point to 1e-12 relative:

* n=64, m=32, B=16 (P = 6,208): the dense Hessian from scratch (solve, factorise, Z,
  assemble) against ``jax.jit(jax.hessian(L))``; cached HVP and cached gradient;
* n=256, m=64, B=64 (P = 82,176): cached HVP against JAX's linearized HVP
  (``jax.linearize(jax.grad(L), θ)``, jitted: the fixed point and LU are its residuals,
  each call does the tangent solves) and against deqhess's cached gradient, with one
  solve with ``I − J`` timed beside them (the HVP needs two, the gradient one).

deqhess runs with ``batch_dim=0`` (samples declared independent) and without
(``batch_dim=None``, one coupled system); JAX solves each sample's fixed point under
``vmap`` with a per-sample LU (``optx.ImplicitAdjoint(lx.LU())``), its fastest form here.
"Cached": the fixed point and the factorisation are reused while each call does its own
solves (the gradient its ∇L, adjoint solve and VJP — ``eq.forget(loss)`` drops the cached
λ first — the HVP its two solves and AD passes).

Timing: both libraries use ``--threads`` threads (torch's intra-op threads; for 1, XLA's
flags for one thread and the process pinned to one core, as XLA otherwise still used two).
On a shared machine absolute times wander, so each figure is the median over ``--rounds``
rounds (a millisecond product: the mean of 10–20 calls in a row), and each ratio the
median of per-round CPU-time ratios, deqhess and JAX timed back to back within a round.
Agreement is the relative Frobenius difference of the results (goal ≤ 1e-9).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

GOALS = {"hessian": 0.8, "hvp": 0.8, "hvp_over_grad": 1.5}
TOL = 1e-12


def _threads_from_argv() -> int:
    """The thread count, read before JAX is imported (XLA reads its flags at import)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--problems", default="6k,82k", help="comma list of: 6k, 82k")
    parser.add_argument(
        "--device", default="cpu",
        help="deqhess's device: cpu (default) or cuda[:index] (JAX keeps its own default)",
    )  # fmt: skip
    return parser.parse_args()


ARGS = _threads_from_argv() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads == 1:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    )
    # XLA still ran on two cores with those flags (CPU time 1.8× its wall time): pin the
    # whole process, both libraries' threads, to one core for a single-core comparison
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import device_of, synchronize  # noqa: E402

import deqhess as dh  # noqa: E402

try:
    import jax
    import jax.numpy as jnp
    import lineax as lx
    import optimistix as optx
except ImportError:  # pragma: no cover - the extra is optional
    sys.exit("vs_jax.py needs the benchmark extra: run `make bench-extras` first.")

jax.config.update("jax_enable_x64", True)


def draw(n: int, m: int, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """θ = (W, U, b), x and targets y as float64 arrays, shared by both libraries."""
    g = np.random.default_rng(seed)
    w = g.standard_normal((n, n))
    return dict(
        W=0.5 * w / np.linalg.norm(w, 2),
        U=g.standard_normal((n, m)) / m**0.5,
        b=0.1 * g.standard_normal(n),
        x=g.standard_normal((batch, m)),
        y=np.tanh(g.standard_normal((batch, n))),
    )


DEVICE = device_of(ARGS.device) if ARGS is not None else torch.device("cpu")
#: ratios of CPU time on the CPU; of wall time around synchronised calls on a GPU
CLOCK = "cpu" if DEVICE.type == "cpu" else "wall"


def deqhess_problem(data: dict[str, np.ndarray]):
    """``(f, loss, theta, x, h0)`` for :class:`deqhess.Equilibrium`, on ``--device``."""
    theta = {k: torch.from_numpy(data[k]).to(DEVICE) for k in ("W", "U", "b")}
    x, y = torch.from_numpy(data["x"]).to(DEVICE), torch.from_numpy(data["y"]).to(DEVICE)
    n = y.shape[1]

    def f(x, h, t):
        return torch.tanh(h @ t["W"].T + x @ t["U"].T + t["b"])

    def loss(h):
        return torch.log(torch.cosh(h - y)).sum() + 0.1 * h.sum(-1).pow(2).sum() / n

    return f, loss, theta, x, torch.zeros_like(y)


def jax_loss(data: dict[str, np.ndarray]) -> tuple[Callable, jnp.ndarray]:
    """``L(θ_flat)`` through a per-sample optimistix fixed point, and θ flattened."""
    n, m = data["U"].shape
    x, y = jnp.asarray(data["x"]), jnp.asarray(data["y"])
    solver = optx.FixedPointIteration(rtol=TOL, atol=TOL)
    adjoint = optx.ImplicitAdjoint(linear_solver=lx.LU())

    def fixed_point(flat, xs):
        w, u, b = flat[: n * n].reshape(n, n), flat[n * n : n * (n + m)].reshape(n, m), flat[-n:]

        def cell(h, args):
            return jnp.tanh(w @ h + u @ args + b)

        sol = optx.fixed_point(cell, solver, jnp.zeros(n), xs, adjoint=adjoint, max_steps=1000)
        return sol.value

    def loss(flat):
        h = jax.vmap(fixed_point, in_axes=(None, 0))(flat, x)
        return jnp.sum(jnp.log(jnp.cosh(h - y))) + 0.1 * jnp.sum(jnp.sum(h, -1) ** 2) / n

    flat = jnp.concatenate([jnp.asarray(data[k]).reshape(-1) for k in ("W", "U", "b")])
    return loss, flat


def _timed(fn: Callable[[], object], calls: int = 1) -> tuple[float, float]:
    """(wall, CPU) seconds per call, over ``calls`` calls; CPU time is this process's (the
    torch device is synchronised before and after)."""
    synchronize(DEVICE)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn()
    synchronize(DEVICE)
    return (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls


class Rounds:
    """Named operations timed back to back in each round (after one warm-up call each).

    Ratios use CPU time: on a machine shared with other jobs, a process that is
    descheduled loses wall time it did not spend, while its CPU time stays put (with
    the process pinned to one core the two agree on an idle machine). Each timing is
    the mean of ``calls`` consecutive calls (milliseconds-long operations).
    """

    def __init__(self, rounds: int, calls: int = 1) -> None:
        self.rounds, self.calls = rounds, calls
        self.ops: dict[str, Callable[[], object]] = {}
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}

    def add(self, name: str, fn: Callable[[], object]) -> object:
        self.ops[name] = fn
        return fn()

    def run(self) -> None:
        self.wall = {name: [] for name in self.ops}
        self.cpu = {name: [] for name in self.ops}
        for _ in range(self.rounds):
            for name, fn in self.ops.items():
                wall, cpu = _timed(fn, self.calls)
                self.wall[name].append(wall)
                self.cpu[name].append(cpu)

    def ratio(self, a: str, b: str) -> float:
        """Median over rounds of ``cpu(a) / cpu(b)`` (wall time on a GPU), both from the
        same round."""
        times = self.cpu if CLOCK == "cpu" else self.wall
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    def table(self) -> None:
        print(f"{'':<30}{'CPU median':>12}{'CPU range':>22}{'wall median':>13}")
        for name in self.ops:
            c, w = self.cpu[name], self.wall[name]
            spread = f"{min(c) * 1e3:.1f}–{max(c) * 1e3:.1f} ms"
            print(
                f"{name:<30}{statistics.median(c) * 1e3:>10.1f}ms{spread:>22}"
                f"{statistics.median(w) * 1e3:>11.1f}ms"
            )


def agreement(a, b) -> float:
    a, b = (t.cpu() if isinstance(t, torch.Tensor) else t for t in (a, b))
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _verdict(value: float, goal: float) -> str:
    return f"goal ≤ {goal}: {'met' if value <= goal else 'NOT met'}"


def _block(x):
    return jax.block_until_ready(x)


def problem_6k(rounds: int) -> None:
    data = draw(64, 32, 16)
    f, loss, theta, x, h0 = deqhess_problem(data)
    print("\n== n=64, m=32, B=16: P = 6,208 (dense Hessian; cached HVP and gradient) ==")
    jl, flat = jax_loss(data)
    hessian = jax.jit(jax.hessian(jl))
    compile_s, _ = _timed(lambda: _block(hessian(flat)))
    _, linear = jax.linearize(jax.grad(jl), flat)
    linear = jax.jit(linear)
    v = np.random.default_rng(7).standard_normal(flat.shape[0])
    jv, tv = jnp.asarray(v), torch.from_numpy(v).to(DEVICE)
    print(f"JAX jit of the Hessian (compile + first run): {compile_s:.1f} s")

    dense = Rounds(rounds)  # the second-long Hessians apart from the millisecond products
    small = Rounds(rounds, calls=20)
    h_jax = dense.add("jax hessian", lambda: _block(hessian(flat)))
    hv_jax = small.add("jax hvp", lambda: _block(linear(jv)))
    results = {}
    for batch_dim in (0, None):
        tag = f"bd={batch_dim}"
        results[tag, "H"] = dense.add(
            f"deqhess hessian {tag}",
            lambda b=batch_dim: dh.Equilibrium(f, theta, x, h0, tol=TOL, batch_dim=b).hessian(loss),
        )
        eq = dh.Equilibrium(f, theta, x, h0, tol=TOL, batch_dim=batch_dim)
        eq.grad(loss)
        results[tag, "Hv"] = small.add(f"deqhess hvp {tag}", lambda e=eq: e.hvp(loss, tv))
        small.add(f"deqhess grad {tag}", lambda e=eq: (e.forget(loss), e.grad(loss)))
    for r in (dense, small):
        r.run()
        r.table()
    for batch_dim in (0, None):
        tag = f"bd={batch_dim}"
        hess = dense.ratio(f"deqhess hessian {tag}", "jax hessian")
        hvp = small.ratio(f"deqhess hvp {tag}", "jax hvp")
        over = small.ratio(f"deqhess hvp {tag}", f"deqhess grad {tag}")
        print(f"-- deqhess batch_dim={batch_dim}")
        print(
            f"   dense Hessian / JAX = {hess:.2f} ({_verdict(hess, GOALS['hessian'])}); "
            f"agreement {agreement(results[tag, 'H'], h_jax):.1e}"
        )
        print(
            f"   cached HVP / JAX linearized HVP = {hvp:.2f}; agreement "
            f"{agreement(results[tag, 'Hv'], hv_jax):.1e}"
        )
        goal = _verdict(over, GOALS["hvp_over_grad"])
        print(f"   cached HVP / cached gradient = {over:.2f} ({goal})")


def problem_82k(rounds: int) -> None:
    data = draw(256, 64, 64)
    f, loss, theta, x, h0 = deqhess_problem(data)
    print("\n== n=256, m=64, B=64: P = 82,176 (cached HVP and gradient) ==")
    jl, flat = jax_loss(data)
    _, linear = jax.linearize(jax.grad(jl), flat)
    linear = jax.jit(linear)
    v = np.random.default_rng(7).standard_normal(flat.shape[0])
    jv, tv = jnp.asarray(v), torch.from_numpy(v).to(DEVICE)

    r = Rounds(rounds, calls=10)
    hv_jax = r.add("jax linearized hvp", lambda: _block(linear(jv)))
    results = {}
    for batch_dim in (0, None):
        tag = f"bd={batch_dim}"
        eq = dh.Equilibrium(f, theta, x, h0, tol=TOL, batch_dim=batch_dim)
        eq.grad(loss)
        results[tag] = r.add(f"deqhess hvp {tag}", lambda e=eq: e.hvp(loss, tv))
        r.add(f"deqhess grad {tag}", lambda e=eq: (e.forget(loss), e.grad(loss)))
        state = eq.problem.state
        rhs = torch.randn(1, state.samples, state.width, dtype=torch.float64, device=DEVICE)
        r.add(f"deqhess one solve {tag}", lambda e=eq, b=rhs: e.linearization.solve(b))
        print(f"deqhess batch_dim={batch_dim}: linear solver {eq.info.linear_solver}")
    r.run()
    r.table()
    for batch_dim in (0, None):
        tag = f"bd={batch_dim}"
        hvp = r.ratio(f"deqhess hvp {tag}", "jax linearized hvp")
        over = r.ratio(f"deqhess hvp {tag}", f"deqhess grad {tag}")
        print(f"-- deqhess batch_dim={batch_dim}")
        print(
            f"   cached HVP / JAX linearized HVP = {hvp:.2f} ({_verdict(hvp, GOALS['hvp'])}); "
            f"agreement {agreement(results[tag], hv_jax):.1e}"
        )
        goal = _verdict(over, GOALS["hvp_over_grad"])
        print(f"   cached HVP / cached gradient = {over:.2f} ({goal})")
        times = r.cpu if CLOCK == "cpu" else r.wall
        ms = {k: 1e3 * statistics.median(times[f"deqhess {k} {tag}"]) for k in ("hvp", "grad")}
        solve = 1e3 * statistics.median(times[f"deqhess one solve {tag}"])
        print(
            f"   where it goes: one solve with I − J {solve:.2f} ms (the HVP needs two, the "
            f"gradient one); the rest {ms['hvp'] - 2 * solve:.2f} ms against "
            f"{ms['grad'] - solve:.2f} ms"
        )


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__}, "
        f"optimistix {optx.__version__}; float64; {ARGS.rounds} rounds; deqhess on {DEVICE}, "
        f"JAX on {jax.default_backend()}; ratios of {CLOCK} time"
    )
    problems = {"6k": problem_6k, "82k": problem_82k}
    for name in ARGS.problems.split(","):
        problems[name](ARGS.rounds)


if __name__ == "__main__":
    main()
