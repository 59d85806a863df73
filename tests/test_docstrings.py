"""The examples in the public docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

import vtc

MODULES = [
    "vtc", "vtc.budget", "vtc.plan", "vtc.flops", "vtc.reduce", "vtc.registry", "vtc.errors",
    "vtc.ops.select", "vtc.ops.attention", "vtc.ops.merge", "vtc.ops.reduce",
    "vtc.methods.base", "vtc.methods.fastv", "vtc.methods.vtc_cls", "vtc.methods.random", "vtc.methods.pdrop",
    "vtc.methods.pool", "vtc.methods.tome", "vtc.methods.merge", "vtc.methods.visionzip", "vtc.methods.composed",
    "vtc.methods.aim", "vtc.methods.dart", "vtc.ops.duplication", "vtc.methods.sparsevlm", "vtc.ops.relevance",
    "vtc.ops.cluster",
    "vtc.methods.schedule", "vtc.methods.psigmoid", "vtc.eval.search", "vtc.eval.report", "vtc.eval.meter",
    "vtc.methods.hired", "vtc.patches.adapter", "vtc.patches.llava", "vtc.patches.llava_next", "vtc.patches.internvl",
    "vtc.patches.qwen2_5_vl", "vtc.patches.llava_onevision", "vtc.patches.qwen3_vl", "vtc.ops.grid",
    "vtc.patches.decoder", "vtc.patches.tome", "vtc.testing", "vtc.api",
    "vtc.serve", "vtc.serve.core", "vtc.serve.config", "vtc.eval.serve",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"vtc": vtc}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
