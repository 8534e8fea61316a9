"""graphrt: an LLM inference runtime built around CUDA graphs."""

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
