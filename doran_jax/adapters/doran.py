"""DoRAN (Diep et al. 2025): W' = m ⊙ V / (||V|| + ξ), V = W0 + s·A·B, A and B from a hypernetwork.

τ = softplus(ρ) > 0 is learnable (per matrix, or per output unit). In eval mode ξ = τ; in train mode
ξ = τ·exp(σ·ε − σ²/2) with ε ~ N(0, 1) per output unit, so ξ > 0 and E[ξ] = τ.
Init: m = ||W0|| + τ0, so W' = W0 at step 0 in eval mode.

Each component is a switch of AdapterConfig, so an ablation can take them apart:
  generator=False   static per-target A, B (LoRA's init) instead of the hypernetwork: DoRA + τ
  noise_std=0       no noise on τ (deterministic train mode)
  learn_tau=False   τ held at tau_init (ρ gets no gradient)
  share             'model' or 'block' (changes only adapters['hypernet'])

Example (DoRA + τ without noise):
  >>> cfg = AdapterConfig(method="doran", generator=False, noise_std=0.0)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from doran_jax.adapters import dora, hypernet, lora
from doran_jax.adapters.method import Method, register
from doran_jax.adapters.norms import column_norm


def softplus_inverse(y: float) -> float:
  # Plain math: init must also work under jax.eval_shape / jit tracing.
  return math.log(math.expm1(y))


def init_leaves(key, w0_IxO, cfg) -> dict:
  d_in, d_out = w0_IxO.shape
  tau_shape = (d_out,) if cfg.tau_per_output else ()
  leaves = {} if cfg.generator else lora.init_factors(key, d_in, d_out, cfg.rank)
  return {
      **leaves,
      "magnitude": column_norm(w0_IxO, cfg.norm_eps) + cfg.tau_init,
      "tau": jnp.full(tau_shape, softplus_inverse(cfg.tau_init), jnp.float32),
  }


def low_rank(leaves, generated, cfg):
  if not cfg.generator:
    return leaves["lora_a"], leaves["lora_b"]
  if generated is None:
    raise ValueError("doran needs the hypernetwork's generated A and B; adapters['hypernet'] is missing.")
  return generated


def noisy_tau(tau, d_out: int, noise_std: float, key):
  """ξ = τ·exp(σε − σ²/2), ε ~ N(0, 1) per output unit: positive, with mean τ."""
  eps_O = jax.random.normal(key, (d_out,), jnp.float32)
  return tau * jnp.exp(noise_std * eps_O - 0.5 * noise_std**2)


def gain(norm_O, leaves, cfg, key, train):
  rho = leaves["tau"].astype(jnp.float32)
  tau = jax.nn.softplus(rho if cfg.learn_tau else jax.lax.stop_gradient(rho))
  if train and cfg.noise_std > 0:
    if key is None:
      raise ValueError("doran in train mode with noise_std > 0 needs an explicit rng key: "
                       "apply_adapters(..., rng=key, train=True).")
    xi = noisy_tau(tau, norm_O.shape[0], cfg.noise_std, key)
  else:
    xi = tau
  norm = jax.lax.stop_gradient(norm_O) if cfg.detach_norm else norm_O
  return leaves["magnitude"] / (norm + xi)


def leaf_axes(cfg) -> dict:
  own = {"magnitude": ("out",), "tau": ("out",) if cfg.tau_per_output else ()}
  return own if cfg.generator else {**lora.LEAF_AXES, **own}


def peft_factors(w0_IxO, leaves, a_IxR, b_RxO, cfg):
  # τ is folded into PEFT's magnitude: m_peft = m·‖V‖/(‖V‖ + τ), so PEFT's DoRA reproduces ours.
  a_IxR, b_RxO, m_O, _ = dora.peft_magnitude(w0_IxO, leaves, a_IxR, b_RxO, cfg, gain)
  return a_IxR, b_RxO, np.asarray(m_O, np.float32)


def peft_fields(cfg, ranks) -> dict:
  return {**lora.peft_fields(cfg, ranks), "use_dora": True}


METHOD = register(Method(name="doran", leaf_axes=leaf_axes, init_leaves=init_leaves,
                         low_rank=low_rank, gain=gain, generator=hypernet,
                         uses_generator=lambda cfg: cfg.generator,
                         peft_factors=peft_factors, peft_fields=peft_fields))
