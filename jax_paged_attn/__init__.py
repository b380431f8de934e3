"""jax_paged_attn: paged-KV-cache attention, KV-cache ops and fused MoE for LLM serving in JAX.

The public API (see docs/contract.md and README.md): ``KVCache``, ``write_kv``, ``copy_blocks``,
``gather_blocks``, ``scatter_blocks``, ``update_kv_scales``, ``AttentionMetadata``,
``check_metadata``, ``paged_attention``, ``paged_decode``, ``PagedAttention``, ``moe_topk``,
``fused_moe``, ``merge_attention_states``, ``MLACache``, ``write_mla_kv``,
``paged_mla_attention``, ``cascade_attention``; scale-out with ``shard_map`` in
``jax_paged_attn.sharding`` and ``jax_paged_attn.context_parallel``.
"""

from jax_paged_attn import context_parallel, sharding
from jax_paged_attn.attention import PagedAttention, paged_attention, paged_decode
from jax_paged_attn.backends import BACKENDS
from jax_paged_attn.cache import (
    KVCache,
    copy_blocks,
    gather_blocks,
    scatter_blocks,
    update_kv_scales,
    write_kv,
)
from jax_paged_attn.cascade import cascade_attention, shared_prefix
from jax_paged_attn.context_parallel import (
    context_parallel_decode,
    context_parallel_specs,
    merge_states_across,
    split_context,
)
from jax_paged_attn.metadata import AttentionMetadata, check_metadata, metadata_checks
from jax_paged_attn.mla import MLACache, paged_mla_attention, write_mla_kv
from jax_paged_attn.moe import fused_moe, moe_topk
from jax_paged_attn.sharding import (
    attention_specs,
    kv_head_layout,
    local_expert_ids,
    local_layer,
    replicate_kv_heads,
    shard_cache,
    shard_fused_moe,
    shard_layer,
    shard_paged_attention,
    shard_paged_decode,
    unreplicate_kv_heads,
)
from jax_paged_attn.states import merge_attention_states

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "AttentionMetadata",
    "KVCache",
    "MLACache",
    "PagedAttention",
    "cascade_attention",
    "check_metadata",
    "copy_blocks",
    "fused_moe",
    "gather_blocks",
    "merge_attention_states",
    "metadata_checks",
    "moe_topk",
    "paged_attention",
    "paged_decode",
    "paged_mla_attention",
    "scatter_blocks",
    "shared_prefix",
    "update_kv_scales",
    "write_kv",
    "write_mla_kv",
    # scale-out (jax_paged_attn.sharding)
    "attention_specs",
    "kv_head_layout",
    "local_expert_ids",
    "local_layer",
    "replicate_kv_heads",
    "shard_cache",
    "shard_fused_moe",
    "shard_layer",
    "shard_paged_attention",
    "shard_paged_decode",
    "sharding",
    "unreplicate_kv_heads",
    # context parallelism (jax_paged_attn.context_parallel)
    "context_parallel",
    "context_parallel_decode",
    "context_parallel_specs",
    "merge_states_across",
    "split_context",
]
