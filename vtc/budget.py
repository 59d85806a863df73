"""The unified budget: visual tokens per image, averaged over the LLM's layers.

An ``int`` is a count of tokens, a ``float`` in (0, 1] a fraction of the model's
per-image token count. Every method is driven by the same number; an in-LLM
method solves its own keep counts so that ``sum_l n_l / L`` meets it.
"""

from __future__ import annotations

from numbers import Integral, Real

from .errors import BudgetError


def resolve_count(value: int | float, total: int, what: str = "budget") -> float:
    """Turn a count or a fraction of ``total`` into a token count (float, not rounded).

    Example:
        >>> resolve_count(0.25, 576)
        144.0
        >>> resolve_count(192, 576)
        192.0
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise BudgetError(f"{what} must be an int (tokens) or a float in (0, 1] (fraction), got {value!r}")
    if isinstance(value, Integral):
        count = float(value)
    else:
        if not 0.0 < value <= 1.0:
            raise BudgetError(
                f"{what}={value!r}: a float is a fraction of the {total} visual tokens per image and must be "
                f"in (0, 1]; pass an int for a token count"
            )
        count = float(value) * total
    if count <= 0:
        raise BudgetError(f"{what}={value!r} keeps no visual token; use a value in [1, {total}] tokens")
    if count > total:
        raise BudgetError(
            f"{what}={value!r} is above the model's {total} visual tokens per image; use at most {total}"
        )
    return count


def keep_count(value: int | float, total: int, what: str = "keep") -> int:
    """Resolve a count or fraction to a whole number of tokens, at least 1.

    Example:
        >>> keep_count(0.5, 575)
        288
    """
    return max(1, min(total, int(round(resolve_count(value, total, what)))))


def keep_after_layer(method: str, budget: int | float, n: int, num_layers: int, layer: int) -> int:
    """Tokens to keep after ``layer`` so that an image of ``n`` tokens, all kept in the first ``layer``
    layers, averages ``budget`` tokens over ``num_layers`` (one in-LLM prune: FastV, DART).

    Example:
        >>> keep_after_layer("fastv", 192, 576, 32, 2)
        166
    """
    target = resolve_count(budget, n)
    keep = round((target * num_layers - layer * n) / (num_layers - layer))
    if keep < 1:
        lowest = (layer * n + (num_layers - layer)) / num_layers
        raise BudgetError(
            f"{method} with layer={layer} on {num_layers} layers keeps all {n} tokens in its first {layer} "
            f"layers, so it cannot reach budget {budget!r}: the lowest feasible budget is {lowest:.1f} "
            f"tokens ({lowest / n:.3f}); raise the budget or lower `layer`"
        )
    return keep
