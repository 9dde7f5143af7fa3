"""Quantised frozen kernels (QLoRA-style bases): int8 per-output-channel absmax and NF4 block-wise.

  int8: codes int8 (in, out), w ≈ codes · s_O with s_O = max_i |w_iO| / 127 per output unit.
  nf4:  blocks of 64 consecutive inputs of one output unit (torch's row-major blocks of an
        (out, in) weight, as bitsandbytes takes them); w ≈ NF4[code] · absmax_block with the
        QLoRA paper's 16-value NormalFloat codebook; two 4-bit codes per byte along the input axis.
        Optional double quantisation of the absmax (Dettmers et al. 2023, §3): the mean is
        subtracted and the centred absmax are stored as int8 in blocks of 256 with one float32
        scale per block (0.127 bits per weight instead of 0.5).

A `QuantizedKernel` is a plain pytree (flax.struct dataclass): its children are arrays, its
logical shape and format are static, so it lives in the frozen params tree where a kernel would,
is placed and sharded like any leaf, and `dequantize` is a jit-able jnp function. Quantisation
(`quantize`) runs in NumPy on the host, one tensor at a time, while a checkpoint is read; it is
deterministic, so a restarted run re-derives the identical base instead of checkpointing it.
Each kernel also keeps ‖W0‖² per output unit of its dequantised float32 values (`col_sq_norm`),
computed once here, for DoRA/DoRAN's column norm in factored mode.

`matmul(x, q)` is x · dequantize(q) with a custom VJP whose residual is q itself: the backward
pass re-dequantises instead of keeping a full-precision copy of every kernel alive.

Why our own module and not qwix (0.1.8, the maintained JAX quantisation library; read, not
used): its `QArray` is a fine pure pytree, but its NF4 values are `jnp.uint4`, which NumPy
(ml_dtypes) and XLA:CPU store one byte per value, so the base would be 8 bits per weight where it
is built and placed; it has no double quantisation of block scales; and it quantises with jnp on
a device, where we quantise on the host before anything is placed. Packing nibbles into uint8
ourselves is ~150 lines and keeps 4 bits per weight on every backend.

Example:
  >>> q = quantize(w_IxO, "nf4")                     # host NumPy, w (in, out)
  >>> w_hat = dequantize(q, jnp.bfloat16)            # jit-able
  >>> y = matmul(x, q)                               # x · w_hat in x's dtype
"""

from __future__ import annotations

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("none", "int8", "nf4")
NF4_BLOCK = 64
DQ_BLOCK = 256

# The 16 NF4 values as published (QLoRA, Dettmers et al. 2023, appendix E; bitsandbytes' table).
NF4_CODEBOOK = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
_NF4_MIDPOINTS = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2


@flax.struct.dataclass
class QuantizedKernel:
  """A frozen (in, out) kernel stored quantised. Build with `quantize`.

  Attributes:
    codes: int8 (in, out) for 'int8'; uint8 (ceil(in/64)·32, out) for 'nf4' (the even input
      row in the low nibble, the odd one in the high nibble; rows past `in` are padding).
    scales: 'int8': float32 (out,). 'nf4': float32 absmax (ceil(in/64), out), or with double
      quantisation int8 codes of the centred absmax, flattened and padded to 256·n.
    dq_scales: double quantisation only: float32 (n,) per block of 256 absmax; else None.
    dq_offset: double quantisation only: float32 () mean absmax; else None.
    col_sq_norm: float32 (out,) Σ_i dequantize(q)_iO² (float32 values, float64 sum).
    fmt: 'int8' | 'nf4'.
    shape: the logical kernel shape (in, out).
    dtype: the name of the float dtype it stands for (the load's param_dtype).
  """

  codes: Any
  scales: Any
  dq_scales: Any
  dq_offset: Any
  col_sq_norm: Any
  fmt: str = flax.struct.field(pytree_node=False, default="nf4")
  shape: tuple = flax.struct.field(pytree_node=False, default=())
  dtype: str = flax.struct.field(pytree_node=False, default="float32")

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes held by the stored arrays."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                   for x in jax.tree_util.tree_leaves(self)))

  @property
  def double_quant(self) -> bool:
    return self.dq_scales is not None

  @property
  def T(self):  # noqa: N802  (array protocol name)
    raise ValueError("a QuantizedKernel is stored (in, out) and cannot be transposed; quantised "
                     "bases are for kernels in our (in, out) layout.")


def is_quantized(x) -> bool:
  return isinstance(x, QuantizedKernel)


def check_format(fmt: str) -> str:
  if fmt not in FORMATS:
    raise ValueError(f"unknown quantisation format {fmt!r}; choose one of {', '.join(FORMATS)} "
                     "(model.quantize).")
  return fmt


# ----------------------------------------------------------------------------------- host side

def quantize(w_IxO, fmt: str, *, double_quant: bool = False, dtype=None) -> QuantizedKernel:
  """Quantises a 2-D (in, out) kernel on the host (NumPy; deterministic).

  Args:
    w_IxO: the kernel (numpy, ml_dtypes or jax array); read as float32.
    fmt: 'int8' (per-output-channel absmax) or 'nf4' (block 64, the NF4 codebook).
    double_quant: nf4 only: store the block absmax as int8 in blocks of 256 (QLoRA's double
      quantisation).
    dtype: the float dtype the kernel stands for (default: w's).

  Example:
    >>> q = quantize(np.random.randn(64, 32).astype(np.float32), "nf4", double_quant=True)
    >>> q.codes.shape, q.codes.dtype
    ((32, 32), dtype('uint8'))
  """
  check_format(fmt)
  if fmt == "none":
    raise ValueError("quantize(w, 'none'): nothing to do; keep the float kernel.")
  w = np.asarray(w_IxO, np.float32)
  if w.ndim != 2:
    raise ValueError(f"quantize takes a 2-D (in, out) kernel; got shape {w.shape}.")
  name = np.dtype(dtype if dtype is not None else np.asarray(w_IxO).dtype).name
  if fmt == "int8":
    if double_quant:
      raise ValueError("double_quant applies to nf4's block scales; int8 has one scale per "
                       "output unit. Set model.double_quant=False or model.quantize='nf4'.")
    scale_O = np.abs(w).max(axis=0) / np.float32(127.0)
    safe = np.where(scale_O > 0, scale_O, np.float32(1.0))
    codes = np.clip(np.rint(w / safe), -127, 127).astype(np.int8)
    q = QuantizedKernel(codes=codes, scales=scale_O.astype(np.float32), dq_scales=None,
                        dq_offset=None, col_sq_norm=None, fmt=fmt, shape=w.shape, dtype=name)
  else:
    d_in, d_out = w.shape
    n_blocks = -(-d_in // NF4_BLOCK)
    padded = np.zeros((n_blocks * NF4_BLOCK, d_out), np.float32)
    padded[:d_in] = w
    blocks = padded.reshape(n_blocks, NF4_BLOCK, d_out)
    absmax_BxO = np.abs(blocks).max(axis=1)
    safe = np.where(absmax_BxO > 0, absmax_BxO, np.float32(1.0))
    idx = np.searchsorted(_NF4_MIDPOINTS, blocks / safe[:, None, :]).astype(np.uint8)
    idx = idx.reshape(n_blocks * NF4_BLOCK, d_out)
    codes = (idx[0::2] | (idx[1::2] << 4)).astype(np.uint8)
    dq_scales = dq_offset = None
    scales = absmax_BxO.astype(np.float32)
    if double_quant:
      scales, dq_scales, dq_offset = _double_quantize(scales)
    q = QuantizedKernel(codes=codes, scales=scales, dq_scales=dq_scales, dq_offset=dq_offset,
                        col_sq_norm=None, fmt=fmt, shape=w.shape, dtype=name)
  w_hat = _dequantize(q, np)
  sq = np.sum(np.square(w_hat.astype(np.float64)), axis=0).astype(np.float32)
  return q.replace(col_sq_norm=sq)


def _double_quantize(absmax_BxO):
  """Centred absmax -> int8 per block of 256 (+ float32 scale per block, float32 mean)."""
  flat = absmax_BxO.reshape(-1).astype(np.float32)
  offset = np.float32(flat.mean())
  n = -(-flat.size // DQ_BLOCK)
  centred = np.zeros(n * DQ_BLOCK, np.float32)
  centred[:flat.size] = flat - offset
  blocks = centred.reshape(n, DQ_BLOCK)
  s2 = np.abs(blocks).max(axis=1) / np.float32(127.0)
  safe = np.where(s2 > 0, s2, np.float32(1.0))
  codes = np.clip(np.rint(blocks / safe[:, None]), -127, 127).astype(np.int8).reshape(-1)
  return codes, s2.astype(np.float32), np.asarray(offset, np.float32)


def block_absmax(q: QuantizedKernel, xp=np):
  """nf4: the float32 (ceil(in/64), out) block absmax the codes multiply (after double quant)."""
  n_blocks, d_out = -(-q.shape[0] // NF4_BLOCK), q.shape[1]
  if q.dq_scales is None:
    return xp.asarray(q.scales, xp.float32)
  codes = xp.asarray(q.scales).astype(xp.float32).reshape(-1, DQ_BLOCK)
  flat = (codes * xp.asarray(q.dq_scales, xp.float32)[:, None]).reshape(-1)
  return (flat[:n_blocks * d_out] + xp.asarray(q.dq_offset, xp.float32)).reshape(n_blocks, d_out)


def _dequantize(q: QuantizedKernel, xp):
  """float32 (in, out) values, with NumPy (xp=np, on the host) or jax.numpy (xp=jnp)."""
  d_in, d_out = q.shape
  if q.fmt == "int8":
    return xp.asarray(q.codes).astype(xp.float32) * xp.asarray(q.scales, xp.float32)[None, :]
  codes = xp.asarray(q.codes)
  idx = xp.stack([codes & 0xF, codes >> 4], axis=1).reshape(-1, d_out)
  values = xp.asarray(NF4_CODEBOOK)[idx.astype(xp.int32)]
  absmax = block_absmax(q, xp)
  n_blocks = absmax.shape[0]
  w = values.reshape(n_blocks, NF4_BLOCK, d_out) * absmax[:, None, :]
  return w.reshape(n_blocks * NF4_BLOCK, d_out)[:d_in]


# ----------------------------------------------------------------------------------- device side

def dequantize(q: QuantizedKernel, dtype=None):
  """The (in, out) kernel in `dtype` (default: the dtype it stands for); jit-able.

  Example:
    >>> w = jax.jit(dequantize, static_argnums=1)(q, jnp.bfloat16)
  """
  dtype = jnp.dtype(q.dtype if dtype is None else dtype)
  return _dequantize(q, jnp).astype(dtype)


def as_array(w, dtype=None):
  """A kernel as an array: dequantised when quantised, else `jnp.asarray(w, dtype)`."""
  if is_quantized(w):
    return dequantize(w, dtype)
  return jnp.asarray(w, dtype)


@jax.custom_vjp
def matmul(x, q: QuantizedKernel):
  """x (..., in) · dequantize(q, x.dtype) (..., out); no gradient to q.

  The backward pass dequantises again (g · Wᵀ), so no full-precision kernel is kept between
  the forward and the backward pass.

  Example:
    >>> y = matmul(x_BxTxI.astype(jnp.bfloat16), q)      # (B, T, out) bf16
  """
  return jnp.matmul(x, dequantize(q, x.dtype))


def _matmul_fwd(x, q):
  return matmul(x, q), (q, jnp.zeros((0,), x.dtype))


def _matmul_bwd(res, g):
  q, like = res
  w = dequantize(q, g.dtype)
  dx = jnp.matmul(g, w.T).astype(like.dtype)
  return dx, None


matmul.defvjp(_matmul_fwd, _matmul_bwd)


# ----------------------------------------------------------------------------------- trees

def _map(fn, tree):
  return jax.tree_util.tree_map(lambda x: fn(x) if is_quantized(x) else x, tree,
                                is_leaf=is_quantized)


def dequantize_params(params, dtype=None):
  """The params tree with every QuantizedKernel replaced by its dequantised array (jit-able;
  the merged export's path).

  Example:
    >>> float_params = dequantize_params(bb.params)        # each kernel in its own dtype
  """
  return _map(lambda q: dequantize(q, dtype), params)


def any_quantized(tree) -> bool:
  return any(is_quantized(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_quantized))


def param_bytes(tree) -> int:
  """Bytes held by a params tree (QuantizedKernels count their stored arrays)."""
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                 for x in jax.tree_util.tree_leaves(tree)))


def analytic_bits(fmt: str, *, double_quant: bool = False, d_in: Optional[int] = None,
                  d_out: Optional[int] = None) -> float:
  """Bits per weight of a quantised (in, out) kernel: codes, scales and the kept ‖W0‖².

  With the shape, the per-unit (int8 scale, ‖W0‖²) and per-kernel (double quantisation's mean)
  terms are included (no padding); without it, the asymptotic figure (nf4: 4.5, or 4.127 with
  double quantisation; int8: 8).

  Example:
    >>> analytic_bits("nf4"), analytic_bits("nf4", double_quant=True)
    (4.5, 4.127...)
  """
  check_format(fmt)
  if fmt == "none":
    return 32.0
  per_unit = 0.0 if d_in is None else 32.0 / d_in            # one float32 per output unit
  per_kernel = 0.0 if d_in is None or d_out is None else 32.0 / (d_in * d_out)
  if fmt == "int8":
    return 8.0 + 2 * per_unit                                  # codes, scale, ‖W0‖²
  if double_quant:
    return 4.0 + 8.0 / NF4_BLOCK + 32.0 / (NF4_BLOCK * DQ_BLOCK) + per_unit + per_kernel
  return 4.0 + 32.0 / NF4_BLOCK + per_unit
