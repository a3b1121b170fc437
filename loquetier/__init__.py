"""Loquetier: fine-tune and serve many LoRA adapters of one LLM in one runtime, on one GPU, at once."""

from .engine.engine import Engine, RequestOutput
from .llm import LLM
from .sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "Engine", "RequestOutput"]
__version__ = "0.1.0"
