"""The examples in the public docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import vtc

# Modules that import an optional dependency the test environment lacks (vLLM: the serve venv).
OPTIONAL = {"vtc.serve.vllm_llava"}


def all_modules() -> list[str]:
    """Every module of the three packages, so a new one cannot skip its examples."""
    names = []
    for package in ("vtc", "vtc.patches", "vtc.eval"):
        names.append(package)
        path = importlib.import_module(package).__path__
        names += [m.name for m in pkgutil.walk_packages(path, f"{package}.") if m.name not in OPTIONAL]
    return sorted(set(names))


MODULES = all_modules()


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"vtc": vtc}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
