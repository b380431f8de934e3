"""The interface each backend implements, one ``Protocol`` per op.

Kernels take plain arrays and static Python values; only the API layer (``attention.py``,
``cache.py``, ``moe.py``) knows about pytrees (``KVCache``, ``AttentionMetadata``) and validates
user input. By the time an implementation is called, ranks, dtypes and sizes are valid, integer
metadata is int32, and ``check_supported`` accepted the configuration. The table in
``backends.py`` names which object implements which op for each backend; the modules listed
there satisfy these protocols structurally (``tests/test_registry.py`` checks it).

Shapes: ``T`` query rows, ``S`` sequences, ``H``/``Hkv`` query/KV heads, ``D`` head dim, ``NB``
cache blocks of ``BS`` tokens, ``MB`` blocks per sequence, ``E`` experts, ``k`` experts per
token, ``Hd`` hidden size, ``I`` expert intermediate size. Meaning: ``docs/contract.md``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax


@runtime_checkable
class AttentionKernels(Protocol):
    """Paged attention over any mix of decode rows and prefill chunks."""

    def check_supported(
        self,
        *,
        head_dim: int,
        block_size: int,
        q_dtype,
        kv_dtype,
        return_lse: bool = False,
        num_groups: int = 1,
    ) -> None:
        """Raise ``NotImplementedError`` naming what is supported (and suggesting
        ``backend="xla"``) for a configuration these kernels cannot run; ``return_lse=True``
        is passed only when the caller asks for the lse output; ``num_groups``: query heads
        per KV head."""

    def paged_attention(
        self,
        q: jax.Array,  # [T, H, D]  f32 | bf16 | f16
        k_pages: jax.Array,  # [NB, Hkv, BS, D]  f32 | bf16 | f16 | float8_e4m3fn
        v_pages: jax.Array,  # [NB, Hkv, BS, D]
        block_tables: jax.Array,  # i32[S, MB]
        context_lens: jax.Array,  # i32[S]: KV tokens including this step's; 0 = inactive
        cu_seqlens_q: jax.Array,  # i32[S + 1]: rows of sequence i are cu[i]:cu[i + 1]
        *,
        scale: float,
        softcap: float | None,  # > 0 when set
        sliding_window: int | None,  # > 0 when set
        alibi_slopes: jax.Array | None,  # f32[H]
        sinks: jax.Array | None,  # f32[H]
        k_scale: jax.Array | None,  # f32[Hkv]: float8 caches hold x / scale
        v_scale: jax.Array | None,  # f32[Hkv]
        interpret: bool = False,
        return_lse: bool = False,
    ) -> jax.Array:  # [T, H, D] in q.dtype; rows that see no key are 0
        # return_lse: (out, lse f32[T, H]), lse = log of the softmax denominator (sink
        # included), -inf for rows that see nothing, written once per row in the epilogue
        ...


@runtime_checkable
class DecodeKernels(Protocol):
    """One query row per sequence (``cu_seqlens_q == arange(S + 1)``), on kernels that split the
    KV of long contexts across programs."""

    def check_supported(
        self,
        *,
        head_dim: int,
        block_size: int,
        q_dtype,
        kv_dtype,
        return_lse: bool = False,
        num_groups: int = 1,
    ) -> None: ...

    def paged_decode(
        self,
        q: jax.Array,  # [S, H, D]
        k_pages: jax.Array,  # [NB, Hkv, BS, D]
        v_pages: jax.Array,  # [NB, Hkv, BS, D]
        block_tables: jax.Array,  # i32[S, MB]
        context_lens: jax.Array,  # i32[S]
        *,
        scale: float,
        softcap: float | None,
        sliding_window: int | None,
        alibi_slopes: jax.Array | None,
        sinks: jax.Array | None,
        k_scale: jax.Array | None,
        v_scale: jax.Array | None,
        interpret: bool = False,
        return_lse: bool = False,
    ) -> jax.Array:  # [S, H, D] in q.dtype; return_lse: (out, lse f32[S, H])
        ...


@runtime_checkable
class KVWriteKernels(Protocol):
    """Write this step's K/V rows into their slots, in place under donation."""

    def check_supported(self, **config) -> None: ...

    def write_kv(
        self,
        k_pages: jax.Array,  # [NB, Hkv, BS, D]
        v_pages: jax.Array,  # [NB, Hkv, BS, D]
        k: jax.Array,  # [T, Hkv, D]
        v: jax.Array,  # [T, Hkv, D]
        slot_mapping: jax.Array,  # i32[T]: block * BS + offset; < 0 (or >= NB * BS): skipped
        *,
        k_scale: jax.Array | None,  # f32[Hkv]: float8 caches store saturate(x / scale)
        v_scale: jax.Array | None,
        interpret: bool = False,
    ) -> tuple[jax.Array, jax.Array]:  # the new (k_pages, v_pages)
        ...


@runtime_checkable
class MoEKernels(Protocol):
    """Fused mixture of experts: gate-up GEMM, activation, down GEMM, weighted top-k combine."""

    def check_supported(
        self,
        *,
        dtype,
        num_tokens=None,
        top_k=None,
        num_experts=None,
        hidden=None,
        inter=None,
        activation: str = "silu",
        bias: bool = False,  # whether the call has b_gate_up or b_down
        w_dtype=None,  # the expert weights' dtype (float8_e4m3fn: SPEC 4.2, xla only today)
        act_quant: str | None = None,  # None | "fp8_token_group"
    ) -> None: ...

    def fused_moe(
        self,
        x: jax.Array,  # [T, Hd]  bf16 | f16 | f32
        w_gate_up: jax.Array,  # [E, Hd, 2I]: gate = [..., :I], up = [..., I:]
        w_down: jax.Array,  # [E, I, Hd]
        topk_weights: jax.Array,  # f32[T, k]
        topk_ids: jax.Array,  # i32[T, k]: ids outside [0, E) contribute zero
        *,
        activation: str,  # "silu" | "gelu" | "gelu_tanh" | "swigluoai"
        b_gate_up: jax.Array | None = None,  # [E, 2I], weights' dtype or f32: GEMM epilogue
        b_down: jax.Array | None = None,  # [E, Hd]: added before the routing weight
        swiglu_alpha: float = 1.702,  # swigluoai: (clip(u) + 1) * g * sigmoid(alpha * g),
        swiglu_limit: float = 7.0,  # g = min(gate, limit), u clipped to [-limit, limit]
        interpret: bool = False,
    ) -> jax.Array:  # [T, Hd] in x.dtype, f32 accumulation
        ...


@runtime_checkable
class MLAKernels(Protocol):
    """Multi-head latent attention (DeepSeek-V2/V3, absorbed form) over a latent paged cache
    ``kv_pages [NB, BS, R + P]``: one KV head, keys the whole row, values its first ``R``
    features. ``R`` latent (kv_lora_rank), ``P`` rotary (rope) dims."""

    def check_supported(self, **config) -> None: ...

    def paged_mla_attention(
        self,
        q_nope: jax.Array,  # [T, H, R]  f32 | bf16 | f16 (already multiplied by W_UK)
        q_pe: jax.Array,  # [T, H, P]  q_nope's dtype
        kv_pages: jax.Array,  # [NB, BS, R + P]  f32 | bf16 | f16 | float8_e4m3fn
        block_tables: jax.Array,  # i32[S, MB]
        context_lens: jax.Array,  # i32[S]
        cu_seqlens_q: jax.Array,  # i32[S + 1]
        *,
        scale: float,  # logit = scale * (q_nope . c_kv + q_pe . k_pe)
        softcap: float | None,
        kv_scale: jax.Array | None,  # f32[]: float8 caches hold x / scale
        interpret: bool = False,
        return_lse: bool = False,
    ) -> jax.Array:  # [T, H, R] in q_nope.dtype; return_lse: (out, lse f32[T, H])
        ...

    def write_mla_kv(
        self,
        kv_pages: jax.Array,  # [NB, BS, R + P]
        c_kv: jax.Array,  # [T, R]
        k_pe: jax.Array,  # [T, P]
        slot_mapping: jax.Array,  # i32[T]: < 0 (or >= NB * BS): skipped
        *,
        scale: jax.Array | None,  # f32[]: float8 caches store saturate(x / scale)
        interpret: bool = False,
    ) -> jax.Array:  # the new kv_pages
        ...


# The protocol of each op name used in the registry table.
OPS: dict[str, type] = {
    "attention": AttentionKernels,
    "decode": DecodeKernels,
    "kv_write": KVWriteKernels,
    "moe": MoEKernels,
    "mla": MLAKernels,
}
