"""graphrt: an LLM inference runtime built around CUDA graphs.

The public names are imported on first use (PEP 562), so ``import graphrt`` and the modules
that need only configs or request types (the server's API processes) do not load torch.
"""

from __future__ import annotations

import importlib
from pathlib import Path as _Path
from typing import TYPE_CHECKING, Any

# graphrt.kernels and graphrt.capture live in the top-level kernels/ and capture/ folders
# (setuptools package-dir). Those folders have no __init__.py: they are namespace portions, so
# from the checkout's root (first on sys.path under `python -m`, pytest and `python -c`) they can
# never shadow an installed top-level package of the same name, such as Hugging Face's
# `kernels`, which transformers imports. A wheel maps them under graphrt/; when graphrt is
# imported straight from a checkout (PYTHONPATH, or an editable install, whose finder does not
# map nested namespace portions) the checkout's root joins graphrt's search path here.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "capture" / "graph_runner.py").is_file() and str(_checkout) not in __path__:
    __path__.append(str(_checkout))

_EXPORTS = {
    "CompletionOutput": "graphrt.request",
    "Engine": "graphrt.engine",
    "EngineConfig": "graphrt.config",
    "EngineOverloaded": "graphrt.errors",
    "RequestOutput": "graphrt.request",
    "RequestRejected": "graphrt.errors",
    "SamplingParams": "graphrt.sampling_params",
    "StructuredOutputsParams": "graphrt.sampling_params",
    "TokenLogprob": "graphrt.request",
}
__all__ = [
    "CompletionOutput",
    "Engine",
    "EngineConfig",
    "EngineOverloaded",
    "RequestOutput",
    "RequestRejected",
    "SamplingParams",
    "StructuredOutputsParams",
    "TokenLogprob",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from graphrt.config import EngineConfig
    from graphrt.engine import Engine
    from graphrt.errors import EngineOverloaded, RequestRejected
    from graphrt.request import CompletionOutput, RequestOutput, TokenLogprob
    from graphrt.sampling_params import SamplingParams, StructuredOutputsParams


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'graphrt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
