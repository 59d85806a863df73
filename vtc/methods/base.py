"""The method base class: a validated config that compiles to a :class:`~vtc.plan.Plan`."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from vtc.budget import keep_count, resolve_count
from vtc.errors import BudgetError, VtcError
from vtc.plan import ModelInfo, Plan


@dataclasses.dataclass
class Method:
    """Base of every method: native parameters are dataclass fields.

    Subclasses set ``name`` and ``summary`` and implement :meth:`stages`; the unified
    ``budget`` and the native parameters are reconciled in :meth:`compile`.

    Example:
        >>> from vtc.registry import get_method
        >>> get_method("vtc_cls").create(keep=64).keep
        64
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # Parameters without which the method cannot compile (a schedule file): such methods are
    # left out of default sweeps and benchmarks.
    requires: ClassVar[tuple[str, ...]] = ()
    # Reduces video only, images pass whole (dycoke): left out of default sweeps, which run image tasks,
    # where its cells would be the full model under a budget's name; a sweep runs it when named.
    video_only: ClassVar[bool] = False

    @classmethod
    def create(cls, **params) -> Method:
        """Build the config from keyword parameters, refusing unknown ones by name."""
        allowed = cls.param_names()
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise VtcError(
                f"method {cls.name!r} has no parameter(s) {', '.join(unknown)}; "
                f"its parameters: {', '.join(allowed) or '(none)'}"
            )
        return cls(**params)

    @classmethod
    def param_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def describe_params(cls) -> str:
        """``name=default`` for each native parameter, for ``vtc methods``."""
        return ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls))

    def compile(self, info: ModelInfo, budget: int | float | None = None) -> Plan:
        """The plan of this method on a model described by ``info`` at ``budget``."""
        raise NotImplementedError

    def _plan(self, info: ModelInfo, stages: tuple, budget) -> Plan:
        params = {**dataclasses.asdict(self), "budget": budget}
        return Plan(self.name, stages, info.image_tokens, info.num_layers, params)


@dataclasses.dataclass
class PreLLMTopK(Method):
    """Shared budget logic of methods that keep top-k tokens per image before the LLM.

    Their equivalent tokens are the tokens they keep, so ``budget`` is ``keep``.
    """

    keep: int | float | None = None
    default_keep: ClassVar[float] = 1 / 3

    def resolve_keep(self, info: ModelInfo, budget) -> int:
        if budget is not None and self.keep is not None:
            raise BudgetError(f"{self.name}: give either budget or keep, not both (they mean the same here)")
        if budget is not None:
            return max(1, round(resolve_count(budget, info.image_tokens)))
        return keep_count(self.keep if self.keep is not None else self.default_keep, info.image_tokens)


def no_cls_alternatives(info: ModelInfo) -> str:
    """The methods to name when a [CLS]-attention method is refused on a tower without [CLS].

    Example:
        >>> no_cls_alternatives(ModelInfo("qwen2_5_vl", 1024, 28, 32, 31, False, received_layer=31))
        'visionzip (it ranks patches by the attention they receive), fastv, pdrop, random, merge or divprune'
    """
    received = "visionzip (it ranks patches by the attention they receive), " if info.received_layer is not None else ""
    return f"{received}fastv, pdrop, random, merge or divprune"
