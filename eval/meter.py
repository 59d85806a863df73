"""Per-generate cost meter: prefill latency, time to first token, KV-cache bytes, vtc stats."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import nn

import vtc


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def cache_bytes(cache) -> int:
    """Bytes held by a ``DynamicCache``'s keys and values (0 when there is none).

    Example:
        >>> cache_bytes(None)
        0
    """
    layers = getattr(cache, "layers", None) or []
    return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values) if t is not None)


@dataclass
class GenerateMeter:
    """Hooks on a model that time the first forward (the prefill) of each ``generate`` call.

    ``with meter.measure(inputs): model.generate(**inputs)`` appends one record: prefill
    seconds, time to first token (from the ``generate`` call to the end of the prefill),
    KV-cache bytes after the prefill, and the prefill's tokens and analytic FLOPs per
    sequence (from ``vtc.stats`` when a method is applied, else the unreduced count).

    Example:
        >>> meter = GenerateMeter(model)                            # doctest: +SKIP
        >>> with meter.measure(inputs): model.generate(**inputs)    # doctest: +SKIP
        >>> meter.records[-1]["prefill_s"]                          # doctest: +SKIP
    """

    model: nn.Module
    records: list[dict] = field(default_factory=list)

    @contextlib.contextmanager
    def measure(self, inputs: dict):
        device = next(self.model.parameters()).device
        state: dict = {}

        def pre(module, args, kwargs):
            state.setdefault("t0", _now(device))

        def post(module, args, kwargs, output):
            if "t1" not in state:
                state["t1"] = _now(device)
                state["kv"] = cache_bytes(getattr(output, "cache", None))

        handles = [
            self.model.register_forward_pre_hook(pre, with_kwargs=True),
            self.model.register_forward_hook(post, with_kwargs=True),
        ]
        start = _now(device)
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
        if "t1" in state:
            batch = inputs["input_ids"].shape[0]
            record = {"prefill_s": state["t1"] - state["t0"], "ttft_s": state["t1"] - start,
                      "kv_cache_bytes": state["kv"] / batch, "batch": batch}
            record.update(self._tokens(inputs))
            self.records.append(record)

    def _tokens(self, inputs: dict) -> dict:
        if vtc.is_applied(self.model):
            st = vtc.stats(self.model)
            return {"images": st.images, "tokens_entering_llm": st.tokens_entering_llm,
                    "equivalent_tokens": st.equivalent_tokens, "flops": st.flops, "flops_full": st.flops_full}
        from vtc.flops import prefill_flops
        from vtc.registry import get_adapter

        info = get_adapter(self.model).info()
        ids = inputs["input_ids"][:1]
        placeholders = ids == self.model.config.image_token_id
        # Tiled images differ in size: each is a run of placeholders (the first sample's).
        sizes = [rows.numel() for _, rows in vtc.ops.runs(placeholders)] if info.tiled else \
            [info.image_tokens] * (int(placeholders.sum()) // info.image_tokens)
        text = ids.shape[1] - sum(sizes)
        flops = prefill_flops(info, None, text, sizes)
        n = sum(sizes) / len(sizes) if sizes else 0
        return {"images": len(sizes), "tokens_entering_llm": n, "equivalent_tokens": float(n), "flops": flops,
                "flops_full": flops}
