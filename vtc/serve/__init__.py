"""Serving vtc's pre-LLM methods inside vLLM (docs/serving.md).

:func:`register` is vLLM's general plugin (entry point ``vllm.general_plugins``: vLLM calls it
in every process it starts). It points the ``LlavaForConditionalGeneration`` architecture at
:class:`vtc.serve.vllm_llava.VtcLlavaForConditionalGeneration`, which behaves as vLLM's own
class until a method is selected (``--hf-overrides '{"vtc_method": ..., "vtc_budget": ...}'``
or ``VTC_METHOD``/``VTC_BUDGET``). The reduction itself is :mod:`vtc.serve.core`, engine-free.

Example:
    >>> from vtc.serve.core import serve_plan  # what the plugin runs, importable without vLLM
"""

from __future__ import annotations

ARCHITECTURE = "LlavaForConditionalGeneration"


def register() -> None:
    """Register vtc's LLaVA class with vLLM's model registry (by name: vLLM imports it lazily).

    Example:
        >>> register()  # doctest: +SKIP
    """
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, "vtc.serve.vllm_llava:VtcLlavaForConditionalGeneration")
