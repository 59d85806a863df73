"""Exceptions raised by vtc. Every message says what was wrong and what is allowed."""

from __future__ import annotations


class VtcError(ValueError):
    """Base class of vtc's errors: bad input that the user can fix.

    Example:
        >>> try:
        ...     raise VtcError("budget 0 is not allowed")
        ... except ValueError as e:
        ...     print(e)
        budget 0 is not allowed
    """


class UnknownMethodError(VtcError):
    """The method name is not registered."""


class UnsupportedModelError(VtcError):
    """No adapter knows this model's class."""


class MethodNotApplicableError(VtcError):
    """The method needs something this model family lacks (a [CLS] token, a square token grid,
    the tiles' regions); sweeps and benchmarks leave such pairs out."""


class BudgetError(VtcError):
    """The budget cannot be met by this method on this model."""


class UnsupportedConfigurationError(VtcError):
    """The model runs in a mode vtc cannot execute a plan in (static cache, drifted signature, ...)."""
