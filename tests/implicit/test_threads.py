"""Equilibrium from several threads: one process-wide lock keeps every product exact.

torch.func's forward-mode AD keeps its dual levels in process-wide state; without the
lock, four threads taking HVPs on two equilibria get HVPs tens of percent off or fail
with "no level exists" (measured: 70% off, and RuntimeErrors, on every run).
"""

from __future__ import annotations

import threading

import torch
from problems import case

import deqhess as dh
from deqhess.locking import ENGINE_LOCK


def test_hvps_from_several_threads_are_exact():
    """Four threads, two equilibria (dense LU and GMRES), each HVP after forget() so that
    λ (a gradient and a solve) is recomputed too; every result must equal the one
    computed alone to rounding (1e-12: the same operations in another order at most)."""
    c = case("tanh_batched")
    equilibria = [
        dh.Equilibrium(c.f, c.theta, c.x, c.h0, batch_dim=0, linear_solver=solver)
        for solver in ("dense", "gmres")
    ]
    directions = torch.randn(6, equilibria[0].num_parameters)
    references = [[eq.hvp(c.loss_theta, v) for v in directions] for eq in equilibria]
    errors: list[float] = []
    failures: list[BaseException] = []

    def work(k: int) -> None:
        eq, expected = equilibria[k % 2], references[k % 2]
        try:
            for _ in range(3):
                for v, want in zip(directions, expected, strict=True):
                    eq.forget(c.loss_theta)
                    got = eq.hvp(c.loss_theta, v)
                    errors.append(float((got - want).norm() / want.norm()))
        except BaseException as err:  # reported below, in the main thread
            failures.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert len(errors) == 4 * 3 * 6 and max(errors) <= 1e-12


def test_the_lock_is_held_while_the_loss_is_differentiated():
    c = case("tanh_coupled")
    eq = dh.Equilibrium(c.f, c.theta, c.x, c.h0)
    held: list[bool] = []

    def loss(h):
        held.append(ENGINE_LOCK._is_owned())
        return c.loss(h)

    eq.grad(loss)
    eq.hvp(loss, torch.ones(eq.num_parameters))
    eq.hessian(loss)
    assert held and all(held)
