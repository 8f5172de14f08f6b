"""The cell's module hooks see the layer as the mathematics does.

The ecosystem's curvature tools (BackPACK, curvlinops' KFAC, ASDL, laplace-torch's
backends) observe a model through module hooks: forward (pre-)hooks record each
module's input, backward hooks or tensor hooks on the module's output record the
gradient that reaches it. A DEQ's solver evaluates its cell dozens of times, and the
backward evaluates it again for every Jacobian product; none of those evaluations is a
step of the model. So the layer evaluates its cell with the observing hooks of every
submodule set aside (:func:`hooks_set_aside`), and then once, visibly, at the fixed point
(:mod:`deqhess.nn.observed`).

Hooks that *define* the map are kept: the legacy ``weight_norm`` and ``spectral_norm``
(their forward pre-hooks compute the weight) and ``torch.nn.utils.prune`` (its pre-hook
applies the mask). Global module hooks (``register_module_forward_hook``) are
process-wide and are left alone.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator

from torch import nn

__all__ = ["has_hooks", "hooks_set_aside"]

#: the per-module hook registries torch consults in ``Module.__call__``
_REGISTRIES = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
)


def _defines_map(hook: object) -> bool:
    """Whether a forward pre-hook is part of the module's map (not an observer)."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return isinstance(hook, (WeightNorm, SpectralNorm, BasePruningMethod))


def has_hooks(module: nn.Module) -> bool:
    """Whether any submodule of ``module`` (itself included) holds an observing hook."""
    for m in module.modules():
        for registry in _REGISTRIES:
            hooks = getattr(m, registry, None)
            if hooks and any(not _defines_map(h) for h in hooks.values()):
                return True
    return False


@contextlib.contextmanager
def hooks_set_aside(module: nn.Module) -> Iterator[None]:
    """Within the block, ``module`` and its submodules run without their observing hooks.

    Each registry is replaced by a copy holding only the map-defining hooks and put back
    afterwards (the same dict objects, so hook handles stay valid). Nothing is done for a
    module with no hooks, the usual case. The registries are the module's own, so another
    thread calling the same modules meanwhile would not see their hooks either (the
    layer's derivative computations hold :data:`deqhess.locking.ENGINE_LOCK`; a bare
    forward solve does not).
    """
    saved: list[tuple[nn.Module, str, OrderedDict]] = []
    try:
        for m in module.modules():
            for registry in _REGISTRIES:
                hooks = getattr(m, registry, None)
                if not hooks:
                    continue
                kept = OrderedDict((k, h) for k, h in hooks.items() if _defines_map(h))
                if len(kept) == len(hooks):
                    continue
                saved.append((m, registry, hooks))
                setattr(m, registry, kept)
        yield
    finally:
        for m, registry, hooks in reversed(saved):
            setattr(m, registry, hooks)
