"""PanGu-alpha in JAX and Flax."""

from .checkpoints import load_checkpoint
from .config import PanguConfig
from .generate import generate, stream
from .model import forward, init_cache, init_params
from .sampling import Sampler
from .tokenizer import Tokenizer

__all__ = [
    "PanguConfig",
    "Sampler",
    "Tokenizer",
    "forward",
    "generate",
    "init_cache",
    "init_params",
    "load_checkpoint",
    "stream",
]
