"""Per-call state: one patched instance may serve several threads at once.

The state a forward builds (what the vision stages kept, the sequence a layer stage gathers,
the [CLS] rows captured while the tower runs) lives in attributes declared
:class:`PerThread`: each thread sees its own value, so two threads that call one patched
model at the same time never read each other's state. What must outlive a call (the state
decode steps need) rides on the cache object the call returns, not on the model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class PerThread:
    """A per-thread attribute: each thread sees its own value, ``factory()`` until it sets one.

    Example:
        >>> class Holder:
        ...     state = PerThread(dict)
        >>> h = Holder(); h.state["a"] = 1
        >>> t = threading.Thread(target=lambda: print(h.state)); t.start(); t.join()
        {}
        >>> h.state
        {'a': 1}
    """

    def __init__(self, factory: Callable[[], Any] = lambda: None) -> None:
        self.factory = factory
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def _local(self, obj: Any) -> threading.local:
        local = obj.__dict__.get("_vtc_local")
        if local is None:
            # dict.setdefault is atomic: two threads arriving together get the same object.
            local = obj.__dict__.setdefault("_vtc_local", threading.local())
        return local

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        local = self._local(obj)
        try:
            return getattr(local, self.name)
        except AttributeError:
            value = self.factory()
            setattr(local, self.name, value)
            return value

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(self._local(obj), self.name, value)
