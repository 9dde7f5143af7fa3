"""DynDoRA (Mao et al. 2024): ΔW = (α/r0)·A·diag(c)·B with rank-1 components pruned during training.

Init (adapter.init='official', the default, as the official code github.com/MIkumikumi0116/DoRA
does it with torch.nn.init.kaiming_uniform_ at its defaults, a=0, gain sqrt(2)): every entry
U(±sqrt(6/fan_in)), fan_in being the torch weight's second axis: `in` for A's (r0, in) weight
and r0 for B's (out, r0) weight; in our (in, r0) / (r0, out) layout A ~ U(±sqrt(6/in)),
B ~ U(±sqrt(6/r0)). adapter.init='gaussian' is this library's earlier choice, A ~ U(±1/sqrt(in)),
B ~ N(0, 0.02²). Both random, so every component has an importance signal; gate c = 0, so
W' = W0 at step 0. The pruning schedule (doran_jax.adapters.dynrank) runs as an optax
transformation chained after the optimizer; its state lives in opt_state.

RECIPE is the official training recipe (Build_Finetune_Config_List.py), applied by
config_lib.apply_arg for method=dyndora below the config argument and flags: alpha 8 (scale
alpha/r0), lora_dropout 0.1 (so mode='factored'), every linear layer of each block (the family's
'all_linear' preset), AdamW weight decay 0.01, 6% warm-up, gradient clipping 1.0.

What still departs from the official code:
  - weight decay skips vectors (gates, biases): the official AdamW decays every trainable
    tensor, the gate c too (at lr ~1e-4 and decay 0.01 a relative 1e-6 per step);
  - prune_interval stays config.dyndora.prune_interval (10 steps; the official CoLA runs use
    100 with ~8,000 steps, 15 epochs at batch 16): our runs are shorter;
  - the learning rate comes from the config's per-method table (the official grid is
    {1.00e-4, 1.48e-4, 2.19e-4} for RoBERTa-base at batch 16);
  - the backbone is MiniLM (BERT family), not RoBERTa-base; configs/cola.py trains its pooler
    in full with the classifier (the counterpart of RoBERTa's classification-head dense layer,
    which the official code trains in full) and does not adapt it.

Example:
  >>> cfg = AdapterConfig(method="dyndora", rank=8, alpha=8.0, targets=r".*/encoder/.*/kernel")
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from doran_jax.adapters import dynrank, lora
from doran_jax.adapters.method import Method, Training, register
from doran_jax.errors import ConfigError

B_INIT_STD = 0.02
LEAF_AXES = {**lora.LEAF_AXES, "gate": ("rank",)}
RECIPE = {"adapter.alpha": 8.0, "adapter.dropout": 0.1, "adapter.mode": "factored",
          "adapter.targets": "all_linear", "optim.weight_decay": 0.01, "optim.warmup_ratio": 0.06,
          "optim.clip_norm": 1.0}


def kaiming_bound(fan_in: int) -> float:
  """torch.nn.init.kaiming_uniform_'s bound at its defaults (a=0, leaky_relu): sqrt(6 / fan_in)."""
  return math.sqrt(6.0 / fan_in)


def stored_rank(cfg) -> int:
  """r0 = ceil(init_rank_factor · rank): the components the pruning starts from."""
  return math.ceil(cfg.init_rank_factor * cfg.rank)


def init_leaves(key, w0_IxO, cfg) -> dict:
  d_in, d_out = w0_IxO.shape
  r0 = cfg.stored_rank
  key_a, key_b = jax.random.split(key)
  if cfg.init == "official":
    bound_a, bound_b = kaiming_bound(d_in), kaiming_bound(r0)
    b_RxO = jax.random.uniform(key_b, (r0, d_out), jnp.float32, -bound_b, bound_b)
  else:
    bound_a = 1.0 / math.sqrt(d_in)
    b_RxO = B_INIT_STD * jax.random.normal(key_b, (r0, d_out), jnp.float32)
  return {
      "lora_a": jax.random.uniform(key_a, (d_in, r0), jnp.float32, -bound_a, bound_a),
      "lora_b": b_RxO,
      "gate": jnp.zeros((r0,), jnp.float32),
  }


def low_rank(leaves, generated, cfg):
  del generated, cfg
  return leaves["lora_a"], leaves["gate"][:, None] * leaves["lora_b"]


def peft_factors(w0_IxO, leaves, a_IxR, b_RxO, cfg):
  del w0_IxO, cfg
  # low_rank already folds the gate into B; only live components are exported.
  live = np.asarray(leaves["gate"]) != 0
  return np.asarray(a_IxR, np.float32)[:, live], np.asarray(b_RxO, np.float32)[live], None


def peft_fields(cfg, ranks) -> dict:
  # The live rank varies per layer but the scale alpha/r0 does not: PEFT's per-layer
  # alpha_l / r_l is made equal to it (no rslora, which PEFT does not combine with patterns).
  scale = cfg.scale
  r = max(ranks.values())
  fields = {"use_dora": False, "r": r, "lora_alpha": scale * r, "use_rslora": False,
            "rank_pattern": {}, "alpha_pattern": {}}
  for name, r_l in sorted(ranks.items()):
    if r_l != r:
      fields["rank_pattern"][name] = r_l
      fields["alpha_pattern"][name] = scale * r_l
  return fields


def training(cfg, dyn_cfg, num_steps: int) -> Training:
  if dyn_cfg is None:
    raise ConfigError(
        "method 'dyndora' needs its schedule: config.dyndora (prune_start, prune_end, "
        "prune_interval, ema_beta, eta).")
  dynrank.schedule(num_steps, dyn_cfg)  # validates the section before anything compiles
  return Training(
      transform=dynrank.pruning(cfg, dyn_cfg, num_steps),
      regularizer=lambda adapters, step: dynrank.regularizer(adapters, step, num_steps, dyn_cfg),
      summary=lambda adapters: {"live_adapter_params": dynrank.count_live_params(adapters),
                                "live_ranks": dynrank.live_ranks(adapters)})


METHOD = register(Method(name="dyndora", leaf_axes=lambda cfg: LEAF_AXES,
                         init_leaves=init_leaves, low_rank=low_rank, stored_rank=stored_rank,
                         peft_factors=peft_factors, peft_fields=peft_fields, training=training,
                         recipe=RECIPE))
