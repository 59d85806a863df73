"""vtc as an lmms-eval model: ``lmms-eval --model vtc --model_args pretrained=...,method=...,budget=...``.

Registered through lmms-eval's ``lmms_eval.models`` entry point (see :func:`manifest`).
``pretrained`` defaults to the bundled toy model; every model family vtc supports works,
with batches above 1 (left padding) on CPU or GPU, and data-parallel under
``accelerate launch`` (lmms-eval's multi-process mode: each process takes its share of
the requests; costs are those measured by each process).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

import vtc

from .meter import GenerateMeter


def manifest():
    """The lmms-eval model manifest for ``vtc`` (the entry point's payload)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vtc", simple_class_path="vtc.eval.lmms_plugin.VtcLMM")


def process_device(device: str | None) -> str:
    """The device of this process: under ``accelerate launch`` with several processes, its own GPU.

    Example:
        >>> process_device("cpu")
        'cpu'
    """
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1 and state.device.type == "cuda":
        return str(state.device)
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(value) -> torch.dtype:
    return value if isinstance(value, torch.dtype) else getattr(torch, str(value))


class VtcLMM(lmms):
    """An lmms-eval "simple" model that runs any supported VLM with a vtc method applied.

    ``method`` may be omitted (the unreduced model); other keyword arguments are the
    method's native parameters. Costs of every ``generate`` are kept in ``self.costs``.

    Example:
        >>> lm = VtcLMM(method="vtc_cls", budget=64)                     # doctest: +SKIP
        >>> # lmms-eval --model vtc --model_args method=fastv,budget=0.5 --tasks toy_vqa
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        method: str | None = None,
        budget: int | float | None = None,
        device: str | None = None,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int = 64,
        **method_params,
    ) -> None:
        super().__init__()
        device = process_device(device)
        if pretrained is None:
            from vtc.eval.toy import MODEL_PATH

            pretrained = str(MODEL_PATH)
        hf_kwargs = {"dtype": _dtype(dtype)}
        if attn_implementation:
            hf_kwargs["attn_implementation"] = attn_implementation
        model = vtc.from_pretrained(pretrained, method, budget, **method_params, **hf_kwargs).to(device)
        self._setup(model, vtc.load_processor(pretrained), int(batch_size), max_new_tokens)
        self.pretrained = pretrained

    @classmethod
    def wrap(cls, model, processor, batch_size: int = 1, max_new_tokens: int = 64) -> VtcLMM:
        """Use an already loaded model (with or without a vtc method applied) under lmms-eval.

        Example:
            >>> lm = VtcLMM.wrap(model, processor, batch_size=8)          # doctest: +SKIP
        """
        self = cls.__new__(cls)
        lmms.__init__(self)
        self._setup(model, processor, batch_size, max_new_tokens)
        self._borrowed = True
        return self

    def clean(self) -> None:
        # lmms-eval drops the model's modules after evaluating; a borrowed model (a sweep
        # evaluates it cell after cell) must survive that.
        if not getattr(self, "_borrowed", False):
            super().clean()

    def _setup(self, model, processor, batch_size: int, max_new_tokens: int) -> None:
        from accelerate import Accelerator

        # Under `accelerate launch`, lmms-eval gives each process its share of the requests.
        self.accelerator = Accelerator()
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.model, self.processor = model.eval(), processor
        self.tokenizer = processor.tokenizer
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.meter = GenerateMeter(model)

    @property
    def costs(self) -> list[dict]:
        return self.meter.records

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _prompt(self, context: str, images: int) -> str:
        content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": context}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def inputs(self, contexts: list[str], visuals: list[list]):
        """The model inputs of a batch of prompts and their images (left-padded, on the model's device).

        Example:
            >>> lm.inputs(["What color is the square?"], [[image]])["input_ids"].shape  # doctest: +SKIP
        """
        images = [im for v in visuals for im in v]
        texts = [self._prompt(c, len(v)) for c, v in zip(contexts, visuals)]
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"
        try:
            inputs = self.processor(images=images or None, text=texts, padding=True, return_tensors="pt")
        finally:
            self.tokenizer.padding_side = side
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    @torch.no_grad()
    def _generate(self, contexts: list[str], visuals: list[list], gen_kwargs: dict) -> list[str]:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_new = int(kwargs.pop("max_new_tokens", self.max_new_tokens))
        temperature = float(kwargs.pop("temperature", 0) or 0)
        if getattr(self, "first_request", None) is None:  # what a sweep times after the cell
            self.first_request = (list(contexts), list(visuals))
        inputs = self.inputs(contexts, visuals)
        with self.meter.measure(inputs):
            out = self.model.generate(
                **inputs, max_new_tokens=max_new, do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                num_beams=int(kwargs.get("num_beams", 1) or 1),
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
            )
        answers = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for stop in until:
            answers = [a.split(stop)[0] if stop else a for a in answers]
        return answers

    def generate_until(self, requests: list[Instance]) -> list[str]:
        # Batch requests that share generation settings and image count (samples with other
        # counts would work, but pad each other).
        groups: dict[tuple, list[int]] = defaultdict(list)
        prepared = []
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            visual = doc_to_visual(self.task_dict[task][split][doc_id]) or []
            prepared.append((context, visual, gen_kwargs))
            groups[(repr(sorted(gen_kwargs.items())), len(visual))].append(i)
        results: list[str | None] = [None] * len(requests)
        # A sweep labels the bar with its cell (and may turn it off).
        bar = tqdm(total=len(requests), disable=self.rank != 0 or not getattr(self, "show_progress", True),
                   desc=getattr(self, "bar_label", "vtc responding"), unit="question")
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                answers = self._generate([prepared[i][0] for i in batch], [prepared[i][1] for i in batch],
                                         prepared[batch[0]][2])
                for i, a in zip(batch, answers):
                    results[i] = a
                bar.update(len(batch))
        bar.close()
        return results

    def loglikelihood(self, requests):
        raise NotImplementedError("vtc's lmms-eval model generates answers; loglikelihood tasks are not supported")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vtc's lmms-eval model does not support multi-round generation")
