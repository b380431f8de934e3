"""Serve Hugging Face checkpoints on the paged-attention ops.

``load_model(dir)`` reads ``config.json`` + ``*.safetensors`` of a supported family (Llama 3,
Qwen2/2.5, Qwen3, Mistral, Gemma 2, Mixtral, Qwen3-MoE, gpt-oss with its MXFP4 experts
dequantized); ``random_model(config)`` makes one of random weights; :class:`Engine` serves it with
continuous batching, chunked prefill and prefix caching; ``python -m jax_paged_attn.serve``
is the command line. Needs the ``models`` extra (``safetensors``).
"""

from jax_paged_attn.models.allocator import BlockAllocator, OutOfBlocksError, block_hashes
from jax_paged_attn.models.config import (
    FAMILIES,
    NOT_YET,
    MissingTensorError,
    ModelConfig,
    ModelError,
    UnsupportedArchitectureError,
    UnsupportedConfigError,
    load_config,
    parse_config,
    supported_architectures,
)
from jax_paged_attn.models.engine import Engine, Progress, Request, TokenEvent
from jax_paged_attn.models.loader import Checkpoint, Model, load_model, random_model
from jax_paged_attn.models.model import dense_logits
from jax_paged_attn.models.sampling import SamplingParams, sample

__all__ = [
    "FAMILIES",
    "NOT_YET",
    "BlockAllocator",
    "Checkpoint",
    "Engine",
    "MissingTensorError",
    "Model",
    "ModelConfig",
    "ModelError",
    "OutOfBlocksError",
    "Progress",
    "Request",
    "SamplingParams",
    "TokenEvent",
    "UnsupportedArchitectureError",
    "UnsupportedConfigError",
    "block_hashes",
    "dense_logits",
    "load_config",
    "load_model",
    "parse_config",
    "random_model",
    "sample",
    "supported_architectures",
]
