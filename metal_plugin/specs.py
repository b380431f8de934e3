"""Kernel specialisations: MSL body + header strings, names, launch shapes.

A :class:`KernelSpec` is exactly what travels to ``mlx.core.fast.metal_kernel`` (on a Mac)
or in the ``backend_config`` of the ``mps.metal_kernel_jit`` custom call: MLX writes the
kernel signature itself and no template arguments travel, so every compile-time constant
is baked into the header and each specialisation carries its own name
(``paged_prefill_bf16_kvbf16_d128_b16``). The emulator compiles the same strings.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import numpy as np

KERNEL_DIR = pathlib.Path(__file__).parent / "kernels"

SUPPORTED_HEAD_DIMS = tuple(range(16, 257, 16))  # lane owns dims lane + 32 i < HEAD_DIM
SUPPORTED_BLOCK_SIZES = (8, 16, 32, 64, 128, 256)
Q_DTYPES = ("float32", "float16", "bfloat16")
KV_DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3fn")
MOE_DTYPES = ("float32", "float16", "bfloat16")
MOE_ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "swigluoai": 3}
MOE_MAX_PAIRS = 256  # token-expert pairs; the GEMV re-reads weights per pair: decode only
MAX_BUFFERS = 31  # Metal buffer slots

PREFILL_SIMDGROUPS = 2  # 64 threads per (row, head)
DECODE_SIMDGROUPS = 4  # 128 threads per (partition, head, sequence)
DECODE_PARTITION = 512  # keys per decode partition (a split-KV decode's usual size)
MOE_THREADS = 64

# MLX's names for the dtypes it writes into kernel signatures.
MSL_TYPES = {
    "float32": "float",
    "float16": "float16_t",
    "bfloat16": "bfloat16_t",
    "int32": "int32_t",
    "uint32": "uint32_t",
    "uint8": "uint8_t",
    "int8": "int8_t",
    "bool": "bool",
}
TAGS = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float8_e4m3fn": "f8e4m3"}


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One launch: the strings MLX compiles plus grid/threadgroup (in threads) and outputs."""

    name: str
    source: str
    header: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    out_shapes: tuple[tuple[int, ...], ...]
    out_dtypes: tuple[str, ...]

    def __post_init__(self):
        n = len(self.input_names) + len(self.output_names)
        if n > MAX_BUFFERS:
            raise ValueError(f"{self.name}: {n} buffers, Metal allows {MAX_BUFFERS}")
        if any(g % t for g, t in zip(self.grid, self.threadgroup)):
            raise ValueError(
                f"{self.name}: grid {self.grid} is not a whole number of "
                f"threadgroups {self.threadgroup}"
            )

    def backend_config(self) -> dict:
        """The JSON object of the ``mps.metal_kernel_jit`` custom call (jax-mps PR #212)."""
        return {
            "name": self.name,
            "source": self.source,
            "header": self.header,
            "input_names": list(self.input_names),
            "output_names": list(self.output_names),
            "grid": list(self.grid),
            "threadgroup": list(self.threadgroup),
        }


@functools.cache
def _read(name: str) -> str:
    return (KERNEL_DIR / name).read_text()


def _header(consts: dict, types: dict) -> str:
    lines = ["// specialisation constants"]
    lines += [f"#define {k} {int(v)}" for k, v in consts.items()]
    lines += [f"typedef {MSL_TYPES[v]} {k};" for k, v in types.items()]
    return "\n".join(lines) + "\n" + _read("common.metal")


def storage_dtype(dtype: str) -> str:
    """float8 buffers travel as bytes: MLX (and Metal) have no float8 type."""
    return "uint8" if dtype == "float8_e4m3fn" else dtype


ATTN_INPUTS = (
    "q",
    "k_pages",
    "v_pages",
    "block_tables",
    "context_lens",
    "cu_seqlens_q",
    "alibi_slopes",
    "sinks",
    "k_scale",
    "v_scale",
    "iparams",
    "fparams",
)


def attention(
    *,
    q_dtype: str,
    kv_dtype: str,
    head_dim: int,
    block_size: int,
    num_rows: int,
    num_heads: int,
    num_parts: int,
    partition: int,
    decode: bool,
    lse: bool = False,
) -> KernelSpec:
    """Paged attention: one threadgroup per (partition, head, row).

    ``num_parts == 1`` writes the final output directly (with ``lse``, also the rows' f32 log
    softmax denominators); otherwise the partial outputs, max logits and exp-sums go to
    :func:`attention_reduce`.
    """
    lse = lse and num_parts == 1
    nsg = DECODE_SIMDGROUPS if decode else PREFILL_SIMDGROUPS
    direct = num_parts == 1
    # A name must pin down its header (MLX caches kernels by name): one partition spanning
    # every key has a fixed size, so it does not vary with the block table's width.
    partition = 1 << 30 if direct else partition
    kind = "paged_decode" if decode else "paged_prefill"
    name = (
        f"{kind}_{TAGS[q_dtype]}_kv{TAGS[kv_dtype]}_d{head_dim}_b{block_size}"
        + ("" if direct else f"_p{partition}")
        + ("_lse" if lse else "")
    )
    header = _header(
        dict(
            HEAD_DIM=head_dim,
            BLOCK_SIZE=block_size,
            NSG=nsg,
            PART=partition,
            DIRECT_OUT=direct,
            WRITE_LSE=lse,
            KV_FP8=kv_dtype == "float8_e4m3fn",
        ),
        dict(q_t=q_dtype, kv_t=storage_dtype(kv_dtype)),
    )
    if direct:
        outs, shapes, dts = ("out",), ((num_rows, num_heads, head_dim),), (q_dtype,)
        if lse:
            outs, shapes = outs + ("lse",), shapes + ((num_rows, num_heads),)
            dts = dts + ("float32",)
    else:
        outs = ("part_out", "part_m", "part_l")
        shapes = (
            (num_rows, num_heads, num_parts, head_dim),
            (num_rows, num_heads, num_parts),
            (num_rows, num_heads, num_parts),
        )
        dts = ("float32",) * 3
    return KernelSpec(
        name,
        _read("paged_attention.metal"),
        header,
        ATTN_INPUTS,
        outs,
        (32 * nsg * num_parts, num_heads, num_rows),
        (32 * nsg, 1, 1),
        shapes,
        dts,
    )


def attention_reduce(
    *,
    q_dtype: str,
    head_dim: int,
    num_rows: int,
    num_heads: int,
    num_parts: int,
    lse: bool = False,
) -> KernelSpec:
    """Combines decode partitions; with ``lse`` also writes the rows' f32 lse."""
    name = f"paged_decode_reduce_{TAGS[q_dtype]}_d{head_dim}_p{num_parts}" + ("_lse" if lse else "")
    header = _header(dict(HEAD_DIM=head_dim, NUM_PARTS=num_parts, WRITE_LSE=lse), dict(q_t=q_dtype))
    return KernelSpec(
        name,
        _read("paged_attention_reduce.metal"),
        header,
        ("part_out", "part_m", "part_l", "sinks", "iparams"),
        ("out", "lse") if lse else ("out",),
        (32, num_heads, num_rows),
        (32, 1, 1),
        ((num_rows, num_heads, head_dim), (num_rows, num_heads))[: 2 if lse else 1],
        (q_dtype, "float32")[: 2 if lse else 1],
    )


def kv_write(
    *, src_dtype: str, kv_dtype: str, head_dim: int, num_tokens: int, num_kv_heads: int
) -> KernelSpec:
    name = f"kv_write_{TAGS[src_dtype]}_to_{TAGS[kv_dtype]}_d{head_dim}"
    header = _header(
        dict(HEAD_DIM=head_dim, KV_FP8=kv_dtype == "float8_e4m3fn"),
        dict(src_t=src_dtype, kv_t=storage_dtype(kv_dtype)),
    )
    shape = (num_tokens, num_kv_heads, head_dim)
    return KernelSpec(
        name,
        _read("kv_write.metal"),
        header,
        ("k", "v", "slot_mapping", "k_scale", "v_scale"),
        ("k_rows", "v_rows"),
        (32, num_kv_heads, num_tokens),
        (32, 1, 1),
        (shape, shape),
        (storage_dtype(kv_dtype),) * 2,
    )


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _f32_literal(v: float) -> str:
    return f"{float(v)!r}f"


def _tag(v: float) -> str:
    """A float for a kernel name: 1.702 -> 1p702, -7.0 -> m7p0."""
    return repr(float(v)).replace("-", "m").replace(".", "p").replace("+", "")


def moe_gate_up(
    *,
    x_dtype: str,
    w_dtype: str,
    hidden: int,
    inter: int,
    num_pairs: int,
    activation: str,
    bias: bool = False,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> KernelSpec:
    """``bias``: an f32 ``b_gate_up`` [E, 2I] input follows ``w_gate_up``; alpha and limit
    are baked into the header (and the name) for ``swigluoai`` only."""
    name = f"moe_gemv_gate_up_{activation}_{TAGS[x_dtype]}_w{TAGS[w_dtype]}_h{hidden}_i{inter}"
    if activation == "swigluoai":
        name += f"_a{_tag(swiglu_alpha)}_l{_tag(swiglu_limit)}"
    name += "_bias" if bias else ""
    header = _header(
        dict(HD=hidden, INTER=inter, ACT=MOE_ACTIVATIONS[activation], HAS_BIAS=bias),
        dict(x_t=x_dtype, w_t=w_dtype),
    )
    if activation == "swigluoai":
        header = (
            f"#define SWIGLU_ALPHA {_f32_literal(swiglu_alpha)}\n"
            f"#define SWIGLU_LIMIT {_f32_literal(swiglu_limit)}\n" + header
        )
    return KernelSpec(
        name,
        _read("moe_gate_up.metal"),
        header,
        ("x", "w_gate_up", *(("b_gate_up",) if bias else ()), "topk_ids", "iparams"),
        ("h",),
        (_round_up(inter, MOE_THREADS), num_pairs, 1),
        (MOE_THREADS, 1, 1),
        ((num_pairs, inter),),
        ("float32",),
    )


def moe_down(
    *, x_dtype: str, w_dtype: str, hidden: int, inter: int, num_tokens: int, bias: bool = False
) -> KernelSpec:
    """``bias``: an f32 ``b_down`` [E, Hd] input follows ``w_down``."""
    name = f"moe_gemv_down_{TAGS[x_dtype]}_w{TAGS[w_dtype]}_h{hidden}_i{inter}"
    name += "_bias" if bias else ""
    header = _header(dict(HD=hidden, INTER=inter, HAS_BIAS=bias), dict(x_t=x_dtype, w_t=w_dtype))
    return KernelSpec(
        name,
        _read("moe_down.metal"),
        header,
        ("h", "w_down", *(("b_down",) if bias else ()), "topk_ids", "topk_weights", "iparams"),
        ("out",),
        (_round_up(hidden, MOE_THREADS), num_tokens, 1),
        (MOE_THREADS, 1, 1),
        ((num_tokens, hidden),),
        (x_dtype,),
    )


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name
