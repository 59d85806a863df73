"""Composed plans: the pre-LLM stages of one method, then the in-LLM stages of another.

``vtc.apply(model, ["vtc_cls", "pdrop"], budget=64)`` or ``method="vtc_cls+pdrop"``.

Budget split: the overall budget ``B`` (equivalent tokens) is met by the whole plan. The
first method keeps ``min(N, 2B)`` tokens per image before the LLM unless its own ``keep`` is
given (``vtc_cls.keep=...``); the second method then solves its in-LLM stages for ``B`` on
what enters the LLM. Parameters are routed by name to the method that has them; a name both
have must be prefixed (``pdrop.ratio``, ``vtc_cls.keep``).
"""

from __future__ import annotations

import dataclasses

from vtc.errors import VtcError
from vtc.plan import ModelInfo, Plan
from vtc.registry import get_method

from .base import Method


def split_spec(method: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"a+b"`` or ``["a", "b"]`` -> ``["a", "b"]``.

    Example:
        >>> split_spec("vtc_cls+pdrop")
        ['vtc_cls', 'pdrop']
    """
    names = method.split("+") if isinstance(method, str) else list(method)
    return [n.strip() for n in names if n.strip()]


def create_method(method: str | list[str] | tuple[str, ...], params: dict) -> Method:
    """The method (or composition) a user named, with its parameters checked.

    Example:
        >>> create_method("vtc_cls+pdrop", {"pdrop.ratio": 0.5}).name
        'vtc_cls+pdrop'
    """
    names = split_spec(method)
    if len(names) == 1:
        return get_method(names[0]).create(**params)
    if len(names) != 2:
        raise VtcError(f"compose exactly two methods (a pre-LLM one, then an in-LLM one), got {names}")
    classes = [get_method(n) for n in names]
    routed: list[dict] = [{}, {}]
    for key, value in params.items():
        scope, _, name = key.rpartition(".")
        owners = [i for i, (n, c) in enumerate(zip(names, classes)) if scope in ("", n) and name in c.param_names()]
        if len(owners) != 1:
            raise VtcError(
                f"parameter {key!r} " + ("belongs to both methods: prefix it, e.g. "
                                         f"{names[1]}.{name}" if owners else f"belongs to neither {names}")
            )
        routed[owners[0]][name] = value
    return Composed(classes[0].create(**routed[0]), classes[1].create(**routed[1]))


@dataclasses.dataclass
class Composed(Method):
    """The pre-LLM stages of ``first`` followed by the in-LLM stages of ``second``."""

    first: Method = None
    second: Method = None

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.first.name}+{self.second.name}"

    def compile(self, info: ModelInfo, budget=None) -> Plan:
        from vtc.budget import resolve_count

        n = info.image_tokens
        target = resolve_count(budget, n) if budget is not None else None
        own_keep = getattr(self.first, "keep", None) is not None
        pre_budget = None if own_keep else (min(n, max(1, round(2 * target))) if target is not None else None)
        pre = self.first.compile(info, pre_budget)
        if pre.layer_stages or not pre.vision_stages:
            raise VtcError(f"{self.first.name} has no pre-LLM stage to compose; put a pre-LLM method first")
        entering = pre.tokens_entering_llm
        inner = dataclasses.replace(info, image_tokens=entering)
        post_budget = None if target is None else min(target, entering) / entering
        post = self.second.compile(inner, post_budget)
        if post.vision_stages:
            raise VtcError(f"{self.second.name} reduces before the LLM; compose it first, or use an in-LLM method")
        params = {self.first.name: pre.params, self.second.name: post.params, "budget": budget}
        return Plan(self.name, pre.stages + post.stages, n, info.num_layers, params)
