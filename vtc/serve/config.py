"""Which method and budget a served LLaVA model runs: from the checkpoint's config, as vLLM's
``--hf-overrides`` set it, else from the environment.

* ``--hf-overrides '{"vtc_method": "vtc_cls", "vtc_budget": 48}'`` (``vtc_params``: a dict of the
  method's native parameters), which vLLM applies to the config in every process;
* or ``VTC_METHOD``, ``VTC_BUDGET`` (a count, a fraction, or ``1/3``) and ``VTC_PARAMS`` (JSON).
"""

from __future__ import annotations

import functools
import json
import os

from .core import ServePlan, serve_plan


def parse_budget(text: str | int | float | None) -> int | float | None:
    """A budget from a config value or the environment: an int count, a float fraction, ``"1/3"``.

    Example:
        >>> parse_budget("1/3"), parse_budget("48"), parse_budget(0.5), parse_budget(None)
        (0.3333333333333333, 48, 0.5, None)
    """
    if text is None or isinstance(text, (int, float)):
        return text
    text = str(text).strip()
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text) if any(c in text for c in ".eE") else int(text)


def selection(config) -> tuple[str, int | float | None, dict] | None:
    """``(method, budget, params)`` configured for ``config``, or None (serve uncompressed).

    Example:
        >>> import types
        >>> selection(types.SimpleNamespace(vtc_method="pool", vtc_budget="1/9"))
        ('pool', 0.1111111111111111, {})
    """
    method = getattr(config, "vtc_method", None) or os.environ.get("VTC_METHOD")
    if not method or method == "none":
        return None
    from_config = getattr(config, "vtc_method", None) is not None
    budget = getattr(config, "vtc_budget", None) if from_config else os.environ.get("VTC_BUDGET")
    params = getattr(config, "vtc_params", None) if from_config else json.loads(os.environ.get("VTC_PARAMS", "{}"))
    return method, parse_budget(budget), dict(params or {})


def served_plan(config) -> ServePlan | None:
    """The :class:`~vtc.serve.core.ServePlan` configured for a LLaVA ``config``, or None.

    Example:
        >>> import types
        >>> served_plan(types.SimpleNamespace(vtc_method=None)) is None or "VTC_METHOD" in os.environ
        True
    """
    chosen = selection(config)
    if chosen is None:
        return None
    method, budget, params = chosen
    return _compiled(config.to_json_string(use_diff=False), method, budget, json.dumps(params, sort_keys=True))


@functools.lru_cache(maxsize=16)
def _compiled(config_json: str, method: str, budget, params: str) -> ServePlan:
    from transformers import LlavaConfig

    config = LlavaConfig.from_dict(json.loads(config_json))
    return serve_plan(config, method, budget, **json.loads(params))
