"""Sweeps through a vLLM server: ``vtc sweep --backend vllm``.

Each cell starts ``vllm serve`` (the serve venv, :mod:`vtc.eval.serve`) with the cell's method
and budget on 127.0.0.1, lmms-eval asks it the task's questions through :class:`ServedLMM`
(OpenAI chat completions, many at once), and the cell's row goes to the same ``results.jsonl``
as the Hugging Face backend's, with the analytic token and FLOP counts of the plan and the
server's measured throughput and time to first token.
"""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm


class ServedLMM(lmms):
    """An lmms-eval "simple" model answering through an OpenAI-compatible server at ``url``
    (``http://127.0.0.1:PORT/v1``), ``concurrency`` requests at a time; plain HTTP, no client library.

    Example:
        >>> lm = ServedLMM("http://127.0.0.1:8000/v1", concurrency=16)  # doctest: +SKIP
    """

    is_simple = True

    def __init__(self, url: str, model: str = "toy", concurrency: int = 16, max_new_tokens: int = 64) -> None:
        super().__init__()
        self.url, self.served_name = url.rstrip("/"), model
        self.concurrency, self.max_new_tokens = concurrency, max_new_tokens
        self.ttft: list[float] = []
        self.first_request: tuple[str, int] | None = None  # a prompt and its image count, for the cost counts
        self.show_progress, self.bar_label = True, "vllm responding"

    def _ask(self, context: str, visuals: list, gen_kwargs: dict) -> str:
        from vtc.eval.serve import image_url

        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else [u for u in (until or []) if u]
        content = [{"type": "image_url", "image_url": {"url": image_url(im)}} for im in visuals]
        content.append({"type": "text", "text": context})
        body = {"model": self.served_name, "messages": [{"role": "user", "content": content}],
                "max_tokens": int(kwargs.get("max_new_tokens", self.max_new_tokens)),
                "temperature": float(kwargs.get("temperature", 0) or 0), "stream": True}
        if until:
            body["stop"] = until
        request = urllib.request.Request(f"{self.url}/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        t0, first, text = time.perf_counter(), None, ""
        with urllib.request.urlopen(request, timeout=600) as response:
            for line in response:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choices = json.loads(line[6:]).get("choices") or [{}]
                piece = (choices[0].get("delta") or {}).get("content")
                if piece:
                    first = first if first is not None else time.perf_counter() - t0
                    text += piece
        self.ttft.append(first if first is not None else time.perf_counter() - t0)
        return text

    def generate_until(self, requests: list[Instance]) -> list[str]:
        prepared = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            prepared.append((context, doc_to_visual(self.task_dict[task][split][doc_id]) or [], gen_kwargs))
        if prepared and self.first_request is None:
            self.first_request = (prepared[0][0], len(prepared[0][1]))
        bar = tqdm(total=len(prepared), disable=not self.show_progress, desc=self.bar_label, unit="question")

        def one(item):
            answer = self._ask(*item)
            bar.update(1)
            return answer

        with ThreadPoolExecutor(self.concurrency) as pool:
            answers = list(pool.map(one, prepared))
        bar.close()
        return answers

    def loglikelihood(self, requests):
        raise NotImplementedError("the served backend generates answers; loglikelihood tasks are not supported")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the served backend does not support multi-round generation")


def text_tokens(spec, first_request: tuple[str, int] | None) -> int:
    """Text tokens of the cell's first prompt (the chat template's, image placeholders left out)."""
    import vtc

    if first_request is None:
        return 0
    context, images = first_request
    processor = vtc.load_processor(spec.model_path())
    content = [{"type": "image"}] * images + [{"type": "text", "text": context}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    ids = processor.tokenizer(text)["input_ids"]
    image_token = getattr(processor, "image_token_id", None)
    return sum(1 for t in ids if t != image_token)


def plan_costs(spec, cell, text: int = 0) -> dict:
    """The analytic costs of a cell's plan on the model for a prompt of ``text`` tokens and one image
    (token counts per image, prefill FLOPs), as the HF backend counts them."""
    import vtc
    from vtc.eval.sweep import _meta_model
    from vtc.flops import make_stats
    from vtc.registry import get_adapter

    meta = _meta_model(spec.model_path())
    info = get_adapter(meta).info()
    plan = vtc.plan(meta, cell.method, cell.budget, **dict(cell.params)) if cell.method else None
    if plan is None:
        from vtc.plan import Plan

        plan = Plan("full", (), info.image_tokens, info.num_layers)
    stats = make_stats(info, plan, text, [info.image_tokens])
    return {"tokens_entering_llm": stats.tokens_entering_llm, "equivalent_tokens": stats.equivalent_tokens,
            "flops": stats.flops, "flops_full": stats.flops_full}


def run_cells(spec, manager, todo: list, out: Path, progress: bool, verbose: bool) -> bool:
    """Evaluate ``todo`` through vLLM, one server per cell; rows as the HF backend writes them."""

    from lmms_eval.evaluator import simple_evaluate

    from vtc.eval.report import write_reports
    from vtc.eval.serve import server
    from vtc.eval.store import append_jsonl
    from vtc.eval.sweep import quiet_lmms_bars, result_row

    wrote = False
    for i, cell in enumerate(todo, 1):
        params = dict(cell.params) or None
        start = time.time()
        with server(spec.model_path(), cell.method, cell.budget, log=out / f"vllm-{cell.name}.log",
                    params=params) as url:
            lm = ServedLMM(url, concurrency=spec.batch_size)
            lm.show_progress, lm.bar_label = progress, f"cell {i}/{len(todo)} {cell.name} (vllm)"
            t0 = time.perf_counter()
            with quiet_lmms_bars(not verbose):
                results = simple_evaluate(model=lm, tasks=spec.tasks, limit=spec.limit, task_manager=manager,
                                          batch_size=spec.batch_size, log_samples=False,
                                          verbosity="INFO" if verbose else "WARNING")
            wall = time.perf_counter() - t0
        if results is None:
            continue
        ttft = sorted(lm.ttft)
        text = text_tokens(spec, lm.first_request)
        per_request = wall / len(ttft) if ttft else None
        costs = {**plan_costs(spec, cell, text), "backend": "vllm", "requests": len(ttft),
                 "requests_per_s": len(ttft) / wall if wall else None,
                 # the summary's time per sample: the server's wall time per request at this concurrency
                 "prefill_s_per_sample": per_request, "prefill_s_per_sample_eval": per_request,
                 "kv_cache_bytes": None, "peak_memory_bytes": None,
                 "ttft_s": ttft[len(ttft) // 2] if ttft else None, "ttft_s_min": ttft[0] if ttft else None,
                 "ttft_s_max": ttft[-1] if ttft else None, "concurrency": spec.batch_size}
        row = result_row(spec, cell, results, costs, start)
        append_jsonl(out / "results.jsonl", row)
        write_reports(out)
        wrote = True
    return wrote
