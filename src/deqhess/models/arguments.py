"""What a user passes to :class:`deqhess.ModelCurvature`, read and checked.

Which parameters (``theta``), which DEQ layer splits the Hessian (``split_at``), how a
loss's batches combine (its ``reduction``), how a batch's samples are counted and cut
(``batch_dim``, ``exclude_unconverged``), and what of a model's output is differentiated.
Each is refused with :class:`deqhess.InputError` saying what was received and what to pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from ..errors import InputError
from ..implicit.loss import positional_counts
from ..nn import DEQ

__all__ = [
    "chosen_names",
    "deq_layers",
    "loss_reduction",
    "restricted",
    "sample_counter",
    "split_layer",
]


def loss_reduction(loss: Any) -> str:
    """The data-set reduction a loss implies by its ``reduction`` attribute.

    Args:
        loss: the loss function (an ``nn.Module`` loss, or any callable).

    Returns:
        ``"mean"`` (also for ``"batchmean"``, a mean over samples, and for a loss without
        the attribute) or ``"sum"``.

    Raises:
        InputError: ``"none"`` (the loss must give one number per batch) or another value.
    """
    value = getattr(loss, "reduction", "mean")
    if value in ("mean", "sum"):
        return value
    if value == "batchmean":  # KLDivLoss: the sum over a sample, averaged over samples
        return "mean"
    if value == "none":
        raise InputError(
            "the loss has reduction='none', but each batch's loss must be one number (a "
            "0-dim tensor): give the loss reduction='mean' or 'sum'."
        )
    raise InputError(
        f"the loss's reduction attribute is {value!r}, which deqhess cannot read as a mean or "
        "a sum over samples; pass reduction='mean' or 'sum' to say which it is."
    )


def check_loss_arguments(loss: Any) -> None:
    """Refuse a loss that cannot be called as ``loss(output, target)``.

    Args:
        loss: the loss function (an ``nn.Module`` loss, or any callable).

    Raises:
        InputError: its signature (its ``forward``'s, for a module) requires more than
            two positional arguments (``nn.GaussianNLLLoss`` takes a variance too) or
            takes fewer than two. A signature that cannot be read, or takes ``*args``,
            is left to the call.
    """
    counts = positional_counts(loss, follow_wrapped=False)  # its own signature counts
    if counts is None:
        return
    required, positional = counts
    if required <= 2 <= positional:
        return
    name = type(loss).__name__ if isinstance(loss, nn.Module) else getattr(loss, "__name__", loss)
    takes = f"requires {required}" if required > 2 else f"takes {positional}"
    raise InputError(
        f"the loss is called as loss(output, target), but {name} {takes} positional "
        "arguments. Take what else it needs from the model's output or the target in a "
        "wrapper, e.g. for nn.GaussianNLLLoss a model returning (mean, var) and "
        "loss=lambda out, y: gaussian_nll(out[0], y, out[1])."
    )


def restricted(x: Any, target: Any, keep: Tensor, dim: int | None) -> tuple[Tensor, Tensor]:
    """A batch's samples ``keep`` (``[k]`` indices along ``dim``), of ``x`` and ``target``.

    Returns:
        ``(x, target)`` of the kept samples.

    Raises:
        InputError: ``x`` or ``target`` is not a tensor, or ``dim`` is not 0.
    """
    if not (isinstance(x, Tensor) and isinstance(target, Tensor)) or dim != 0:
        raise InputError(
            "exclude_unconverged needs tensor inputs and targets whose first dimension "
            f"indexes the samples (batch_dim=0); got x of type {type(x).__name__} and target "
            f"of type {type(target).__name__}, batch_dim={dim}."
        )
    return x.index_select(0, keep.to(x.device)), target.index_select(0, keep.to(target.device))


def sample_counter(dim: int | None) -> Callable[[Any], int]:
    """``x ↦`` its sample count: its size along ``dim`` (1 when ``dim`` is None)."""

    def size(x: Any) -> int:
        if dim is None:
            return 1
        if not isinstance(x, Tensor) or x.ndim <= dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InputError(
                f"cannot count the samples of a batch whose x is {shape} along "
                f"batch_dim={dim}; pass batch_size_fn=lambda x: ... (the number of "
                "samples in x), or the batch_dim that indexes them."
            )
        return x.shape[dim]

    return size


def chosen_names(model: nn.Module, params: Sequence[str] | Sequence[Tensor] | None) -> list[str]:
    """The names of the parameters ``theta`` chooses (None: all that require grad).

    Returns:
        The names, in the order given (or the model's).

    Raises:
        InputError: a name or tensor that is not the model's, one named twice, or
            nothing chosen.
    """
    named = dict(model.named_parameters())
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
    else:
        if isinstance(params, (str, Tensor)):
            params = [params]
        by_identity = {id(p): n for n, p in named.items()}
        names = [
            by_identity.get(id(p), "<not a parameter of the model>") if isinstance(p, Tensor) else p
            for p in params
        ]
        # a parameter tied between two modules has one name in named_parameters(); its
        # other names (in state_dict(), say) mean the same tensor
        aliases = {n: by_identity[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
        names = [aliases.get(n, n) if isinstance(n, str) else n for n in names]
        unknown = [n for n in names if n not in named]
        if unknown:
            raise InputError(f"unknown parameter names {unknown}; the model has {list(named)}.")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise InputError(
                f"theta names {repeated} more than once; name each parameter once (a "
                "parameter shared by two modules is one parameter, under either name)."
            )
    if not names:
        raise InputError(
            "no parameters chosen: the model has none that require grad."
            if params is None
            else "theta is empty: name the parameters to differentiate in, or pass "
            "theta=None for all that require grad."
        )
    return names


def deq_layers(model: nn.Module) -> list[DEQ]:
    """The model's :class:`deqhess.nn.DEQ` layers, in module order."""
    return [m for m in model.modules() if isinstance(m, DEQ)]


def split_layer(model: nn.Module, split_at: nn.Module | str | None) -> DEQ | None:
    """The DEQ layer ``split_at`` names (None: the model's only one, if it has one).

    Returns:
        The layer, or None where the model has none or several and none was named.

    Raises:
        InputError: ``split_at`` is not one of the model's DEQ layers.
    """
    layers = deq_layers(model)
    if split_at is None:
        return layers[0] if len(layers) == 1 else None
    if isinstance(split_at, str):
        try:
            split_at = model.get_submodule(split_at)
        except AttributeError as error:
            raise InputError(f"split_at={split_at!r} is not a submodule of the model.") from error
    chosen = next((layer for layer in layers if layer is split_at), None)
    if chosen is None:
        raise InputError(
            f"split_at must be one of the model's deqhess.nn.DEQ layers; got "
            f"{type(split_at).__name__}."
        )
    return chosen
