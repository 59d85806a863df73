"""The two registries: methods (``vtc/methods/``) and model adapters (``patches/``).

Each method or adapter registers itself with one decorator line; the folders are
scanned on first use, so adding one is adding a file.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from .errors import UnknownMethodError, UnsupportedModelError

if TYPE_CHECKING:
    from .methods.base import Method

METHODS: dict[str, type[Method]] = {}
ADAPTERS: list[type] = []
_SCANNED: set[str] = set()


def register_method(cls):
    """Class decorator: make a :class:`~vtc.methods.base.Method` available by its ``name``.

    Example:
        >>> from vtc.methods.base import Method
        >>> @register_method
        ... class Noop(Method):
        ...     name = "noop_example"
        >>> "noop_example" in METHODS
        True
        >>> del METHODS["noop_example"]
    """
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def register_adapter(cls):
    """Class decorator: make a model-family adapter (``patches/*.py``) available."""
    if cls not in ADAPTERS:
        ADAPTERS.append(cls)
    return cls


def _import_all(package: str) -> None:
    # Scan once, even if a module of the folder was imported (and registered) before.
    if package in _SCANNED:
        return
    _SCANNED.add(package)
    pkg = importlib.import_module(package)
    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{package}.{mod.name}")


def methods() -> dict[str, type[Method]]:
    """All registered methods by name (scans ``vtc.methods`` once)."""
    _import_all("vtc.methods")
    return METHODS


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``, or an error listing the known ones.

    Example:
        >>> get_method("fastv").name
        'fastv'
    """
    known = methods()
    if name not in known:
        raise UnknownMethodError(f"unknown method {name!r}; available methods: {', '.join(sorted(known))}")
    return known[name]


def adapters() -> list[type]:
    """All registered adapter classes (scans ``vtc.patches`` once)."""
    _import_all("vtc.patches")
    return ADAPTERS


def get_adapter(model):
    """An adapter instance for ``model``, chosen by class name or ``config.model_type``."""
    for cls in adapters():
        if cls.matches(model):
            return cls(model)
    supported = ", ".join(name for cls in adapters() for name in cls.class_names)
    raise UnsupportedModelError(
        f"vtc has no adapter for {type(model).__name__} (model_type "
        f"{getattr(getattr(model, 'config', None), 'model_type', '?')!r}); supported: {supported}"
    )
