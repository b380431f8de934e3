"""KV-cache write (vLLM's reshape_and_cache): scatter this step's K/V rows into their slots.

Token i of ``k, v`` [T, Hkv, D] goes to ``pages[slot // BS, h, slot % BS]`` for every KV head h;
``slot < 0`` (padding) and slots past the cache are skipped. float8_e4m3fn caches store
``saturate(x / scale[h])`` (±448). The page arrays are updated in place through
``input_output_aliases`` (no copy of the cache under ``jax.jit(..., donate_argnums=...)``):
every byte outside the addressed slots is left as it was.

Grid ``(cdiv(T, block_t), Hkv)``: a program moves ``block_t`` tokens of one KV head, K and V,
as [block_t, D] tiles (head dims that are not powers of two are padded with masked lanes).
Static: block_t, head dim, block size, the store dtype and whether the cache is float8.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

FP8 = jnp.dtype(jnp.float8_e4m3fn)
FP8_MAX = 448.0
BLOCK_T = 64  # tokens per program: 2 x 64 x 128 x 2 B = 32 KB moved per program (bf16)
NUM_WARPS = 4


def check_supported(**config) -> None:
    """Every cache this API builds (f32, bf16, f16, float8_e4m3fn; any head dim and block size)."""
    del config


def _div_rn(x, y, interpret: bool):
    """x / y rounded to nearest like XLA's division (Triton's f32 `/` is approximate), so the
    float8 values match the xla backend's bit for bit."""
    if interpret:
        return x / y
    [out] = plgpu.elementwise_inline_asm(
        "div.rn.f32 $0, $1, $2;",
        args=[x, jnp.broadcast_to(y, x.shape)],
        constraints="=f,f,f",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)],
    )
    return out


def _kv_write_kernel(
    # inputs
    slot_ref,  # i32[T]
    k_ref,  # [T, Hkv, D]
    v_ref,  # [T, Hkv, D]
    k_scale_ref,  # f32[Hkv] | None
    v_scale_ref,  # f32[Hkv] | None
    k_pages_in,  # [NB, Hkv, BS, D] (aliased with k_pages_ref)
    v_pages_in,  # [NB, Hkv, BS, D] (aliased with v_pages_ref)
    # outputs
    k_pages_ref,  # [NB, Hkv, BS, D]
    v_pages_ref,  # [NB, Hkv, BS, D]
    *,
    num_tokens: int,
    num_blocks: int,
    block_size: int,
    head_dim: int,
    dp: int,
    block_t: int,
    interpret: bool,
):
    del k_pages_in, v_pages_in  # same buffers as the outputs
    h = pl.program_id(1)
    tok = pl.program_id(0) * block_t + jnp.arange(block_t, dtype=jnp.int32)
    tok_ok = tok < num_tokens
    slot = plgpu.load(slot_ref.at[tok], mask=tok_ok, other=-1)
    ok = tok_ok & (slot >= 0) & (slot < num_blocks * block_size)
    # Skipped tokens address page `num_blocks` (past the end): never dereferenced on the GPU,
    # and dropped, not wrapped or clamped onto a real slot, by the interpreter's scatter.
    page = jnp.where(ok, slot // block_size, num_blocks)
    off = jnp.where(ok, slot % block_size, 0)
    d = jnp.arange(dp, dtype=jnp.int32)
    ld_mask = tok_ok[:, None] if dp == head_dim else tok_ok[:, None] & (d < head_dim)[None, :]
    st_mask = ok[:, None] if dp == head_dim else ok[:, None] & (d < head_dim)[None, :]
    src = (tok[:, None], h, d[None, :])
    dst = (page[:, None], h, off[:, None], d[None, :])
    for x_ref, scale_ref, pages_ref in (
        (k_ref, k_scale_ref, k_pages_ref),
        (v_ref, v_scale_ref, v_pages_ref),
    ):
        x = plgpu.load(x_ref.at[src], mask=ld_mask, other=0.0)  # [block_t, dp]
        if scale_ref is not None:
            x = _div_rn(x.astype(jnp.float32), scale_ref[h], interpret)
            x = jnp.clip(x, -FP8_MAX, FP8_MAX)  # saturate: e4m3fn has no inf
        plgpu.store(pages_ref.at[dst], x.astype(pages_ref.dtype), mask=st_mask)


@functools.partial(jax.jit, static_argnames=("interpret", "block_t"))
def write_kv(
    k_pages,
    v_pages,
    k,
    v,
    slot_mapping,
    *,
    k_scale,
    v_scale,
    interpret: bool = False,
    block_t: int = BLOCK_T,
):
    """Writes ``k, v`` [T, Hkv, D] into ``k_pages, v_pages`` [NB, Hkv, BS, D] at ``slot_mapping``.

    With block size 16, slot 45 is page 45 // 16 = 2, offset 45 % 16 = 13; slot -1 writes nothing.
    Returns the updated (k_pages, v_pages), aliased with the inputs.
    """
    num_blocks, num_kv_heads, block_size, head_dim = k_pages.shape
    num_tokens = k.shape[0]
    fp8 = jnp.dtype(k_pages.dtype) == FP8
    if fp8 and (k_scale is None or v_scale is None):
        raise ValueError("k_scale and v_scale are required for a float8_e4m3fn cache")
    if num_tokens == 0:
        return k_pages, v_pages
    if block_t < 1 or block_t & (block_t - 1):
        raise ValueError(f"{block_t=} must be a power of two")
    dp = max(16, 1 << (head_dim - 1).bit_length())
    scales = [k_scale.astype(jnp.float32), v_scale.astype(jnp.float32)] if fp8 else []
    kernel = functools.partial(
        _kv_write_kernel,
        num_tokens=num_tokens,
        num_blocks=num_blocks,
        block_size=block_size,
        head_dim=head_dim,
        dp=dp,
        block_t=block_t,
        interpret=interpret,
    )
    if not fp8:  # no scale refs: slot the None placeholders in
        kernel = functools.partial(_no_scales, kernel)
    n_in = 3 + len(scales)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(num_tokens, block_t), num_kv_heads),
        out_shape=(
            jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),  # k_pages
            jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype),
        ),  # v_pages
        input_output_aliases={n_in: 0, n_in + 1: 1},
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=interpret,
        name=f"kv_write_d{head_dim}_bs{block_size}_t{block_t}{'_fp8' if fp8 else ''}",
    )(
        slot_mapping.astype(jnp.int32),  # slot_mapping
        k,
        v,
        *scales,
        k_pages,
        v_pages,
    )


def _no_scales(kernel, slot_ref, k_ref, v_ref, *refs):
    return kernel(slot_ref, k_ref, v_ref, None, None, *refs)
