"""vtc: training-free visual token compression for Hugging Face vision-language models.

Example:
    >>> import vtc
    >>> "fastv" in vtc.list_methods()
    True
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

MIN_TRANSFORMERS = "5.24.0"
# Where vLLM is installed (its venv pins transformers<5.20), vtc imports with an older 5.x for the
# serving plugin (vtc.serve: plans, operators, configs); patching a Hugging Face model still needs
# MIN_TRANSFORMERS, checked when a method is applied.
MIN_TRANSFORMERS_SERVING = "5.16.1"


def _check_transformers(least: str = MIN_TRANSFORMERS) -> None:
    try:
        found = version("transformers")
    except PackageNotFoundError as e:
        raise ImportError(
            f"vtc needs transformers>={MIN_TRANSFORMERS}: pip install 'transformers>={MIN_TRANSFORMERS},<6'"
        ) from e
    from packaging.version import Version

    if Version(found) < Version(least) or Version(found).major != 5:
        raise ImportError(
            f"vtc needs transformers {least} or a later 5.x (found {found}): the hooks depend on "
            f"its model interfaces; pip install 'transformers>={MIN_TRANSFORMERS},<6'"
        )


def _serving() -> bool:
    from importlib.util import find_spec

    return find_spec("vllm") is not None


_check_transformers(MIN_TRANSFORMERS_SERVING if _serving() else MIN_TRANSFORMERS)

from . import ops  # noqa: E402
from .api import (  # noqa: E402
    apply,
    compressed,
    from_pretrained,
    is_applied,
    list_methods,
    list_models,
    load_processor,
    plan,
    remove,
    stats,
)
from .errors import (  # noqa: E402
    BudgetError,
    MethodNotApplicableError,
    UnknownMethodError,
    UnsupportedConfigurationError,
    UnsupportedModelError,
    VtcError,
)
from .flops import Stats  # noqa: E402
from .plan import ModelInfo, Plan, Scorer, Stage  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "MIN_TRANSFORMERS",
    "BudgetError",
    "MethodNotApplicableError",
    "ModelInfo",
    "Plan",
    "Scorer",
    "Stage",
    "Stats",
    "UnknownMethodError",
    "UnsupportedConfigurationError",
    "UnsupportedModelError",
    "VtcError",
    "apply",
    "compressed",
    "from_pretrained",
    "is_applied",
    "list_methods",
    "list_models",
    "load_processor",
    "ops",
    "plan",
    "remove",
    "stats",
]
