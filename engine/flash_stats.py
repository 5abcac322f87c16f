"""BLOOM's causal ALiBi attention and its per-row statistics in one flash-attention kernel (Triton).

One pass over the keys, in blocks, with the online softmax of flash attention, computes for every query row i
  - the attention output (the layer's context), and
  - mass on key 0, entropy and local mass (keys i, i-1, i-2) of the row's probabilities,
from the same scores, so no [B, H, L, L] tensor is ever written. Besides flash attention's running maximum
m, sum l = sum_j e_j (e_j = exp(s_j - m)) and output accumulator, the kernel keeps three more running sums,
rescaled with l whenever m moves: t = sum_j e_j (s_j - m) (the entropy is log l - t / l, with no large
numbers subtracted), e_0 and the e_j of the local keys. Given the output projection's per-head Gram
matrices, its epilogue also gives each head's output norm ||W_h c|| for the contribution; a second small
kernel takes the norms of the projection's output rows. Diagnosis of the bloom-1b7 and bloom-7b1 shapes
runs at 0.94-0.96x and 0.99x a plain SDPA forward on an H200 (docs/benchmarks.md).

The scores are BLOOM's own: s_ij = bf16(alpha q_i.k_j + bf16(slope_h j)) in a bf16 model, as its eager
`alibi.baddbmm` computes and rounds them (in fp32 without the roundings), masked causally; the softmax and
the statistics are in fp32. Positions are the key indices, which is BLOOM's ALiBi for unpadded or
right-padded rows (transformers counts positions over the attention mask; right padding leaves every real
key at its index, and causal masking keeps real queries off the pads): callers pass no other batches.
"""

from __future__ import annotations

import os

import torch

try:  # shipped with PyTorch's CUDA builds; on a CPU-only install diagnosis takes the eager paths
    import triton
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def kernel_available(device: torch.device) -> bool:
    """Whether the kernel can run on `device`: Triton on a CUDA device with bf16 tensor cores (compute capability
    8.0 or newer: A100, H100, RTX 30xx and later), or on the CPU under Triton's interpreter (TRITON_INTERPRET=1
    before Triton is imported, as the tests set it)."""
    if triton is None:
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _blocks(head_dim: int, device: torch.device) -> tuple[int, int, dict]:
    """(BLOCK_M, BLOCK_N, launch options) for a head size; BLOCK_M must be a multiple of BLOCK_N (the kernel's
    key loop is split at multiples of BLOCK_N)."""
    if device.type != "cuda":
        return 32, 32, {}
    # the fastest configuration of the kernel alone at the bloom-1b7 and bloom-7b1 shapes (d = 128, L = 512 and
    # 2048) on an H200 since the key blocks are split by kind (docs/benchmarks.md): 64 x 64, the best before the
    # split, is 1.3x-1.6x slower than 64 x 32 with it
    return 64, 32, {"num_warps": 4, "num_stages": 3}


def gram_parts(gram: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The per-head Gram matrices W_h^T W_h ([H, d, d], fp32) as the kernel multiplies them: in fp32 as they
    are, or for a bf16/fp16 model as two tensors of its dtype, the rounded matrix and the rounding's remainder,
    whose sum holds the fp32 matrix to about 2^-16 relative (tensor-core products, accumulated in fp32)."""
    if dtype == torch.float32:
        return gram.contiguous(), None
    hi = gram.contiguous().to(dtype)
    return hi, (gram - hi).to(dtype)  # the difference in fp32 (type promotion)


def attention_with_statistics(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                              scale: float, gram: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                              rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal ALiBi attention of q, k, v [B, H, L, d] with BLOOM's scores (module docstring). Returns the
    context [B, L, H * d] in q's dtype, ready for the output projection, and the row statistics [S, H, B, L] in
    fp32: mass on key 0, entropy in nats, local mass and, given the output projection's `gram_parts`, each
    head's output norm ||W_h c|| (S = 4; else 3), written into `rows` when given (contiguous).
    `slopes`: [H] fp32, on q's device. q, k and v may be strided views, as BLOOM's `_reshape` gives them."""
    batch, n_heads, length, head_dim = q.shape
    if not (q.stride() == k.stride() == v.stride() and q.stride(-1) == 1):  # the kernel takes one set of strides
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty((batch, length, n_heads, head_dim), dtype=q.dtype, device=q.device)
    shape = (3 if gram is None else 4, n_heads, batch, length)
    if rows is None:
        rows = torch.empty(shape, dtype=torch.float32, device=q.device)
    elif rows.shape != shape or not rows.is_contiguous() or rows.dtype != torch.float32:
        raise ValueError(f"rows must be a contiguous fp32 tensor of shape {shape}")
    gram_hi, gram_lo = gram if gram is not None else (None, None)
    block_m, block_n, options = _blocks(head_dim, q.device)
    from .flash_stats_kernel import attention_statistics

    interpreted = q.device.type == "cpu"
    attention_statistics[(batch * n_heads, triton.cdiv(length, block_m))](
        q, k, v, out, rows, slopes, gram_hi, gram_lo, float(scale), n_heads, batch, length, *q.stride()[:3],
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=block_m, BLOCK_N=block_n,
        ROUND=q.dtype != torch.float32, IEEE=q.dtype == torch.float32,
        BITWISE=interpreted and q.dtype == torch.bfloat16, UPCAST=interpreted and q.dtype != torch.float32,
        HEAD_NORM=gram is not None, GRAM_LO=gram_lo is not None, **options)
    return out.view(batch, length, n_heads * head_dim), rows


def output_norms(y: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """||y_r - bias|| in fp32 for every row r of y [..., width] (the layer output's norm, less the shared
    bias, that the contribution divides by), flattened to [rows]; into `out` when given."""
    from .flash_stats_kernel import row_norms

    width = y.shape[-1]
    y = y.reshape(-1, width)
    if y.stride(-1) != 1:
        y = y.contiguous()
    out = out if out is not None else torch.empty(y.shape[0], dtype=torch.float32, device=y.device)
    bias = bias if bias is not None else torch.zeros(width, dtype=y.dtype, device=y.device)
    block_r = 32 if y.device.type == "cpu" else 16
    row_norms[(triton.cdiv(y.shape[0], block_r),)](y, bias, out, y.shape[0], width, y.stride(0), BLOCK_R=block_r,
                                                   BLOCK_C=min(1024, triton.next_power_of_2(width)))
    return out
