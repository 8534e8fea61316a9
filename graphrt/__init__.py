"""graphrt: an LLM inference runtime built around CUDA graphs."""

from pathlib import Path as _Path

# graphrt.kernels and graphrt.capture live in the top-level kernels/ and capture/ folders
# (setuptools package-dir). Installs map them; when graphrt is imported straight from a source
# checkout (python -m pytest in the repo, or a legacy editable install), map them here.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "capture" / "graph_runner.py").is_file() and str(_checkout) not in __path__:
    __path__.append(str(_checkout))

from graphrt.config import EngineConfig
from graphrt.engine import Engine, EngineOverloaded, RequestRejected
from graphrt.request import CompletionOutput, RequestOutput, TokenLogprob
from graphrt.sampling_params import SamplingParams

__all__ = [
    "CompletionOutput",
    "Engine",
    "EngineConfig",
    "EngineOverloaded",
    "RequestOutput",
    "RequestRejected",
    "SamplingParams",
    "TokenLogprob",
]
__version__ = "0.1.0"
