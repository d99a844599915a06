"""qtool: quantize LLMs with one registry of backends, then evaluate and compare them."""

__version__ = "0.1.0"

from qtool.api import LoadedModel, evaluate_perplexity, generate, load, quantize  # noqa: E402
from qtool.errors import QtoolError  # noqa: E402

__all__ = ["LoadedModel", "QtoolError", "evaluate_perplexity", "generate", "load", "quantize", "__version__"]
