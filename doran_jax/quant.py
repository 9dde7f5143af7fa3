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
(`quantize`) runs in NumPy on the host, one tensor at a time, while a checkpoint is read: the
kernel is read in its own dtype (bf16 stays bf16) in column stripes, one stripe per worker
thread (NumPy releases the GIL in its loops), each converted to float32 a cache-sized chunk of
whole 64-row blocks at a time; an NF4 code is 15 minus the number of codebook midpoints ≥ v
(15 vectorised comparisons, no search). It equals `_reference_quantize`, the straightforward
whole-tensor definition, bit for bit (codes, scales, double-quantisation arrays, ‖W0‖²; tested),
and is 7-11x faster on one core (`benchmarks/quantize_speed.py`). It is deterministic whatever
the thread count, so a restarted run re-derives the identical base instead of checkpointing it.
Each kernel also keeps ‖W0‖² per output unit of its dequantised float32 values (`col_sq_norm`),
computed once here as a float64 sum over the inputs in order, for DoRA/DoRAN's column norm in
factored mode.

`matmul(x, q)` is x · dequantize(q) with a custom VJP whose residual is q itself: the backward
pass re-dequantises instead of keeping a full-precision copy of every kernel alive.

Why our own module and not qwix (0.1.8, the maintained JAX quantisation library; read, not
used): its `QArray` is a fine pure pytree, but its NF4 values are `jnp.uint4`, which NumPy
(ml_dtypes) and XLA:CPU store one byte per value, so the base would be 8 bits per weight where it
is built and placed; it has no double quantisation of block scales; and it quantises with jnp on
a device, where we quantise on the host before anything is placed. Packing nibbles into uint8
ourselves is ~150 lines and keeps 4 bits per weight on every backend.

Example:
  >>> q = quantize(w_IxO, "nf4")                     # host NumPy (threads), w (in, out)
  >>> w_hat = dequantize(q, jnp.bfloat16)            # jit-able
  >>> y = matmul(x, q)                               # x · w_hat in x's dtype
"""

from __future__ import annotations

import concurrent.futures
import os
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

def quantize(w_IxO, fmt: str, *, double_quant: bool = False, dtype=None,
             threads: Optional[int] = None) -> QuantizedKernel:
  """Quantises a 2-D (in, out) kernel on the host (NumPy; deterministic).

  Bit for bit the result of `_reference_quantize` (the straightforward definition), computed
  column stripe by column stripe in cache-sized float32 chunks read from the kernel's own dtype,
  on `threads` threads (NumPy releases the GIL in its loops).

  Args:
    w_IxO: the kernel (numpy, ml_dtypes or jax array); read as float32.
    fmt: 'int8' (per-output-channel absmax) or 'nf4' (block 64, the NF4 codebook).
    double_quant: nf4 only: store the block absmax as int8 in blocks of 256 (QLoRA's double
      quantisation).
    dtype: the float dtype the kernel stands for (default: w's).
    threads: worker threads (default: the CPUs this process may run on); the result does not
      depend on it.

  Example:
    >>> q = quantize(np.random.randn(64, 32).astype(np.float32), "nf4", double_quant=True)
    >>> q.codes.shape, q.codes.dtype
    ((32, 32), dtype('uint8'))
  """
  w, name = _check_quantize_args(w_IxO, fmt, double_quant, dtype)
  d_in, d_out = w.shape
  if d_out < 2 or d_in == 0:
    # NumPy sums a single column pairwise, not row after row: keep the definition's own order.
    return _reference_quantize(w, fmt, double_quant=double_quant, dtype=name)
  stripes = _stripes(d_out, threads)
  run = _runner(threads, len(stripes))
  if fmt == "int8":
    scale_O = np.empty(d_out, np.float32)
    run(lambda c: _int8_scales(w, scale_O, *c), stripes)
    if not np.all(np.isfinite(scale_O)):
      return _reference_quantize(w, fmt, dtype=name)      # inf or NaN in the kernel
    codes = np.empty((d_in, d_out), np.int8)
    sq_O = np.empty(d_out, np.float64)
    run(lambda c: _int8_codes_and_norm(w, scale_O, codes, sq_O, *c), stripes)
    return QuantizedKernel(codes=codes, scales=scale_O, dq_scales=None, dq_offset=None,
                           col_sq_norm=sq_O.astype(np.float32), fmt=fmt, shape=w.shape, dtype=name)
  n_blocks = -(-d_in // NF4_BLOCK)
  codes = np.empty((n_blocks * NF4_BLOCK // 2, d_out), np.uint8)
  absmax_BxO = np.empty((n_blocks, d_out), np.float32)
  run(lambda c: _nf4_codes(w, codes, absmax_BxO, *c), stripes)
  if not np.all(np.isfinite(absmax_BxO)):
    return _reference_quantize(w, fmt, double_quant=double_quant, dtype=name)
  dq_scales = dq_offset = None
  scales = absmax_BxO
  if double_quant:
    scales, dq_scales, dq_offset = _double_quantize(scales)
  q = QuantizedKernel(codes=codes, scales=scales, dq_scales=dq_scales, dq_offset=dq_offset,
                      col_sq_norm=None, fmt=fmt, shape=w.shape, dtype=name)
  used_BxO = block_absmax(q, np)           # what dequantize multiplies by (after double quant)
  sq_O = np.empty(d_out, np.float64)
  run(lambda c: _nf4_norm(codes, used_BxO, d_in, sq_O, *c), stripes)
  return q.replace(col_sq_norm=sq_O.astype(np.float32))


def _check_quantize_args(w_IxO, fmt, double_quant, dtype):
  """(the kernel as a host array in its own dtype, the dtype name it stands for), or an error."""
  check_format(fmt)
  if fmt == "none":
    raise ValueError("quantize(w, 'none'): nothing to do; keep the float kernel.")
  w = np.asarray(w_IxO)
  if w.ndim != 2:
    raise ValueError(f"quantize takes a 2-D (in, out) kernel; got shape {w.shape}.")
  if fmt == "int8" and double_quant:
    raise ValueError("double_quant applies to nf4's block scales; int8 has one scale per "
                     "output unit. Set model.double_quant=False or model.quantize='nf4'.")
  name = np.dtype(dtype if dtype is not None else w.dtype).name
  return w, name


def _reference_quantize(w_IxO, fmt: str, *, double_quant: bool = False,
                        dtype=None) -> QuantizedKernel:
  """The definition `quantize` equals bit for bit: the whole kernel at once in float32, a
  searchsorted over the NF4 midpoints (a value on a midpoint takes the lower code; NaN the
  last), ‖W0‖² as a float64 sum over the inputs of the float32 dequantised values. Slow (the
  tests and benchmarks/quantize_speed.py compare against it) and used for the corner cases
  `quantize` hands back to it."""
  w_in, name = _check_quantize_args(w_IxO, fmt, double_quant, dtype)
  w = np.asarray(w_in, np.float32)
  if fmt == "int8":
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


# The fast path works on column stripes (each thread owns whole output units, so every
# per-unit sum runs over the inputs in order, as the definition's) read in chunks of about
# _CHUNK values, whole NF4 blocks of rows at a time: every temporary stays in cache.
_STRIPE = 2048
_CHUNK = 1 << 17
_BF16 = np.dtype(jnp.bfloat16)


def _threads(threads: Optional[int]) -> int:
  if threads is None:
    try:
      return len(os.sched_getaffinity(0))
    except AttributeError:                    # not Linux
      return os.cpu_count() or 1
  return max(1, int(threads))


def _stripes(d_out: int, threads: Optional[int]) -> list[tuple[int, int]]:
  """Column ranges of width >= 2 (NumPy sums a width-1 column pairwise) and <= _STRIPE, at
  least one per thread where the kernel is wide enough (128 columns each)."""
  n = max(-(-d_out // _STRIPE), min(_threads(threads), d_out // 128), 1)
  bounds = [d_out * k // n for k in range(n + 1)]
  return list(zip(bounds[:-1], bounds[1:]))


def _runner(threads: Optional[int], n_tasks: int):
  """map(fn, items) for its side effects: in this thread, or on a pool of worker threads."""
  n = min(_threads(threads), n_tasks)
  if n <= 1:
    return lambda fn, items: [fn(x) for x in items]

  def run(fn, items):
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
      list(pool.map(fn, items))                # re-raises a worker's exception here
  return run


def _rows(width: int) -> int:
  """Rows per chunk: whole NF4 blocks, about _CHUNK values."""
  return NF4_BLOCK * max(1, _CHUNK // (NF4_BLOCK * width))


def _read_f32(out, w, r0, r1, c0, c1):
  """out[...] = w[r0:r1, c0:c1] as float32 (bf16 by widening its bits: exact, and 4x faster
  than ml_dtypes' cast)."""
  if w.dtype == _BF16:
    np.left_shift(w.view(np.uint16)[r0:r1, c0:c1], 16, out=out.view(np.uint32), dtype=np.uint32)
  else:
    out[...] = w[r0:r1, c0:c1]


def _int8_scales(w, scale_O, c0, c1):
  """scale_O[c0:c1] = max_i |w_i·| / 127 (float32), read in chunks."""
  width, rows = c1 - c0, _rows(c1 - c0)
  x = np.empty((rows, width), np.float32)
  m = np.zeros(width, np.float32)
  for r0 in range(0, w.shape[0], rows):
    n = min(rows, w.shape[0] - r0)
    xc = x[:n]
    _read_f32(xc, w, r0, r0 + n, c0, c1)
    np.abs(xc, out=xc)
    np.maximum(m, xc.max(axis=0), out=m)
  scale_O[c0:c1] = m / np.float32(127.0)


def _int8_codes_and_norm(w, scale_O, codes, sq_O, c0, c1):
  """codes[:, c0:c1] = rint(w / scale) and sq_O[c0:c1] = Σ_i (codes · scale)² (float64)."""
  width, rows = c1 - c0, _rows(c1 - c0)
  scale = scale_O[c0:c1]
  safe = np.where(scale > 0, scale, np.float32(1.0))
  x = np.empty((rows, width), np.float32)
  acc = _RowSum(rows, width)
  for r0 in range(0, w.shape[0], rows):
    n = min(rows, w.shape[0] - r0)
    xc = x[:n]
    _read_f32(xc, w, r0, r0 + n, c0, c1)
    np.divide(xc, safe, out=xc)
    np.rint(xc, out=xc)
    np.clip(xc, -127, 127, out=xc)
    c = codes[r0:r0 + n, c0:c1]
    c[...] = xc                                 # float32 -> int8, whole numbers in [-127, 127]
    np.multiply(c, scale, out=xc, dtype=np.float32)
    acc.add(xc)
  sq_O[c0:c1] = acc.total


def _nf4_codes(w, codes, absmax_BxO, c0, c1):
  """codes and block absmax of columns c0:c1, one chunk of whole blocks at a time."""
  d_in, width, rows = w.shape[0], c1 - c0, _rows(c1 - c0)
  x = np.empty((rows, width), np.float32)
  le = np.empty((rows, width), np.bool_)
  idx = np.empty((rows, width), np.uint8)
  high = np.empty((rows // 2, width), np.uint8)
  for r0 in range(0, -(-d_in // NF4_BLOCK) * NF4_BLOCK, rows):
    n = min(rows, d_in - r0)
    padded = -(-n // NF4_BLOCK) * NF4_BLOCK
    xc, ic = x[:padded], idx[:padded]
    _read_f32(xc[:n], w, r0, r0 + n, c0, c1)
    xc[n:] = 0.0
    blocks = xc.reshape(-1, NF4_BLOCK, width)
    absmax = np.abs(blocks).max(axis=1)
    absmax_BxO[r0 // NF4_BLOCK:r0 // NF4_BLOCK + len(absmax), c0:c1] = absmax
    safe = np.where(absmax > 0, absmax, np.float32(1.0))
    np.divide(blocks, safe[:, None, :], out=blocks)
    # searchsorted(midpoints, v) (side 'left') = #{m < v} = 15 - #{m >= v}; NaN gives 15 too.
    ic[...] = 0
    for m in _NF4_MIDPOINTS:
      np.less_equal(xc, m, out=le[:padded])
      np.add(ic, le[:padded].view(np.uint8), out=ic)
    np.subtract(np.uint8(15), ic, out=ic)
    h = high[:padded // 2]
    np.left_shift(ic[1::2], 4, out=h)
    np.bitwise_or(ic[0::2], h, out=codes[r0 // 2:(r0 + padded) // 2, c0:c1])


def _nf4_norm(codes, used_BxO, d_in, sq_O, c0, c1):
  """sq_O[c0:c1] = Σ_i (NF4[code_i·] · absmax)² (float32 products, float64 sum)."""
  width, rows = c1 - c0, _rows(c1 - c0)
  idx = np.empty((rows, width), np.uint8)
  values = np.empty((rows, width), np.float32)
  acc = _RowSum(rows, width)
  for r0 in range(0, d_in, rows):
    n = min(rows, d_in - r0)
    padded = -(-n // NF4_BLOCK) * NF4_BLOCK
    packed = codes[r0 // 2:(r0 + padded) // 2, c0:c1]
    np.bitwise_and(packed, 0xF, out=idx[0:padded:2])
    np.right_shift(packed, 4, out=idx[1:padded:2])
    v = values[:padded]
    np.take(NF4_CODEBOOK, idx[:padded], out=v, mode="clip")   # codes < 16
    blocks = v.reshape(-1, NF4_BLOCK, width)
    b0 = r0 // NF4_BLOCK
    np.multiply(blocks, used_BxO[b0:b0 + len(blocks), None, c0:c1], out=blocks)
    acc.add(v[:n])
  sq_O[c0:c1] = acc.total


class _RowSum:
  """Σ_i x_i² over rows fed in chunks, in float64, added row after row in input order (what
  np.sum(axis=0) does over a whole C-contiguous array at least 2 wide): the running total is
  row 0 of the buffer that each chunk's squares are reduced with."""

  def __init__(self, rows: int, width: int):
    self.buf = np.empty((rows + 1, width), np.float64)
    self.total = np.zeros(width, np.float64)

  def add(self, x):
    n = len(x)
    self.buf[0] = self.total
    np.square(x, out=self.buf[1:n + 1], dtype=np.float64)
    np.add.reduce(self.buf[:n + 1], axis=0, out=self.total)


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
