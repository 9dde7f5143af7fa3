"""Parity with Hugging Face PEFT on the real all-MiniLM-L6-v2 and a tiny GPT-2.

Run: pytest tests/test_peft_parity.py -x -q
Every comparison uses adapters perturbed away from their initialisation (W' != W0), the same
backbone weights and head on both sides (the torch model is loaded from our own
`models.save_pretrained` folder, which PEFT's base_model_name_or_path names), and eval mode
(dropout off) on both sides.
"""

import copy
import dataclasses
import json
import os
import re

import numpy as np
import pytest

EXTRA = "the PEFT parity tests need the extra: pip install -r requirements-parity.txt"
torch = pytest.importorskip("torch", reason=EXTRA)
peft = pytest.importorskip("peft", reason=EXTRA)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import transformers  # noqa: E402

from doran_jax import dropout, models, peft_io  # noqa: E402
from doran_jax.models import hf_io  # noqa: E402
from doran_jax.adapters import AdapterConfig, apply_adapters, init_adapters  # noqa: E402
from doran_jax.adapters.core import targets_for  # noqa: E402
from doran_jax.targets import flatten, unflatten  # noqa: E402

torch.set_num_threads(2)

SENTENCES = [
    "a gripping , funny and deeply moving film .",
    "the plot is thin and the acting is even worse .",
    "i did not expect to like it this much !",
    "it 's a bit long , but the ending makes up for it .",
]
LABELS = np.array([1, 0, 1, 1])
QV = r".*/(query|value)/kernel"
ALL_LINEAR = r".*/(query|key|value|attention/output/dense|intermediate/dense|output/dense)/kernel"


def assert_close(ours, theirs, rel, what):
  """Elementwise |ours - theirs| <= rel * max|theirs|: relative to the tensor's scale."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
  assert np.all(np.isfinite(ours)) and np.all(np.isfinite(theirs)), what
  scale = np.max(np.abs(theirs))
  err = np.max(np.abs(ours - theirs))
  assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel} * {scale:.3g}"


def perturb(adapters, seed):
  """Moves every leaf away from its init (B = 0, m = ||W0||, ...): x(1 + 0.1ε) + 0.05ε'."""
  rng = np.random.default_rng(seed)

  def move(x):
    x = np.asarray(x, np.float32)
    noise = rng.standard_normal((2,) + x.shape).astype(np.float32)
    return jnp.asarray(x * (1 + 0.1 * noise[0]) + 0.05 * noise[1])

  return jax.tree_util.tree_map(move, adapters)


def make_adapters(params, cfg, seed=0):
  return perturb(init_adapters(jax.random.key(seed), params, cfg), seed)


def module(peft_model, target):
  return peft_model.base_model.model.get_submodule(peft_io.torch_module_name(target.module_path))


def torch_from_ours(bb, params, folder, auto_class):
  """Saves `params` as a transformers folder and loads it in torch: the base PEFT wraps.

  Every torch parameter comes from our params: nothing is missing, unused or initialised fresh.
  """
  models.save_pretrained(bb, params, folder)
  torch_model, info = getattr(transformers, auto_class).from_pretrained(
      folder, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  ours = hf_io.to_torch_names(params, no_transpose=bb.family.no_transpose)
  # transformers 5 renames some modules on load (ViT): those are covered by the loading info.
  for name, p in torch_model.named_parameters():  # tied weights are listed once
    assert p.dtype == torch.float32, name
    if name in ours:
      np.testing.assert_array_equal(p.detach().numpy(), ours[name], err_msg=name)
  return torch_model.eval()


# ------------------------------------------------------------------------------------ MiniLM


class MiniLM:
  """Our and the torch MiniLM with the same weights and head, a tokenised batch, jitted calls."""

  def __init__(self, folder):
    self.bb = models.load_backbone("minilm", "classification", num_labels=2)
    self.params = self.bb.params
    # The fresh head goes along in the folder, so both sides share it.
    self.folder = folder
    self.torch_model = torch_from_ours(self.bb, self.params, folder,
                                       "AutoModelForSequenceClassification")
    tokenizer = transformers.AutoTokenizer.from_pretrained(models.minilm_path())
    self.batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="np"))
    self.torch_batch = {k: torch.from_numpy(v) for k, v in self.batch.items()}
    bb = self.bb

    def loss(p):
      logits = bb.apply(p, self.batch)
      return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean(), logits

    # Both take the effective params, whose structure is the same for every adapter config,
    # so each compiles once for the whole module.
    self.logits = jax.jit(lambda p: bb.apply(p, self.batch))
    self.loss_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))

  def peft_logits(self, peft_model):
    with torch.no_grad():
      return peft_model(**self.torch_batch).logits.numpy()

  def load_peft(self, folder, trainable=False):
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(self.torch_model), folder,
                                        is_trainable=trainable)
    return pm.eval()


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
  return MiniLM(str(tmp_path_factory.mktemp("minilm")))


@pytest.mark.parametrize("targets", [QV, ALL_LINEAR], ids=["query_value", "all_linear"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_logits_and_gradients_match_peft(minilm, method, targets, tmp_path):
  cfg = AdapterConfig(method=method, rank=8, alpha=16.0, targets=targets)
  adapters = make_adapters(minilm.params, cfg)
  peft_io.save_peft_adapter(str(tmp_path), minilm.params, adapters, cfg,
                            base_model_name_or_path=minilm.folder,
                            task_type="classification")
  pm = minilm.load_peft(str(tmp_path), trainable=True)

  # Ours: d loss / d W' from the jitted model, pulled back through apply_adapters.
  eff, pullback = jax.vjp(lambda ad: apply_adapters(minilm.params, ad, cfg), adapters)
  (loss, logits), grad_eff = minilm.loss_grad(eff)
  (grads,) = pullback(grad_eff)
  base_logits = minilm.logits(minilm.params)
  assert np.max(np.abs(logits - base_logits)) > 1e-2  # the adapter really changes the model

  torch_logits = pm(**minilm.torch_batch).logits
  torch_loss = torch.nn.functional.cross_entropy(torch_logits, torch.from_numpy(LABELS))
  torch_loss.backward()
  assert_close(logits, torch_logits.detach().numpy(), 1e-4, "logits")
  assert_close(loss, torch_loss.item(), 1e-4, "loss")

  targets_ = targets_for(minilm.params, cfg)
  assert len(targets_) == (12 if targets == QV else 36)
  for t in targets_:
    mod = module(pm, t)
    g = flatten(grads["targets"])
    prefix = t.module_path + "/"
    assert_close(g[prefix + "lora_a"], mod.lora_A["default"].weight.grad.numpy().T, 1e-3,
                 f"dA {t.path}")
    assert_close(g[prefix + "lora_b"], mod.lora_B["default"].weight.grad.numpy().T, 1e-3,
                 f"dB {t.path}")
    if method == "dora":
      assert_close(g[prefix + "magnitude"],
                   mod.lora_magnitude_vector["default"].weight.grad.numpy(), 1e-3, f"dm {t.path}")


def dyndora_gates(adapters, cfg, params, key):
  """Gates with pruned components: the first target keeps none, the others a random subset."""
  flat = flatten(adapters)
  targets = targets_for(params, cfg)
  for i, t in enumerate(targets):
    k1, k2 = jax.random.split(jax.random.fold_in(key, i))
    gate = 1.0 + 0.5 * jax.random.normal(k1, (cfg.stored_rank,))
    live = jax.random.bernoulli(k2, 0.6, (cfg.stored_rank,)).at[0].set(True)
    key_gate = "targets/" + t.module_path + "/gate"
    assert key_gate in flat
    flat[key_gate] = jnp.where(live, gate, 0.0) * (i != 0)
  return unflatten(flat)


@pytest.mark.parametrize("method", ["lora", "dora", "doran", "dyndora"])
def test_export_loads_in_peft_with_our_eval_outputs(minilm, method, tmp_path):
  cfg = AdapterConfig(method=method, rank=4, alpha=8.0, targets=QV, tau_init=0.5)
  adapters = make_adapters(minilm.params, cfg, seed=1)
  if method == "dyndora":
    adapters = dyndora_gates(adapters, cfg, minilm.params, jax.random.key(7))
  # A trained head travels as modules_to_save; the torch base keeps the old one.
  head = jax.tree_util.tree_map(lambda x: x + 0.05 * jnp.sign(x), minilm.params["classifier"])
  params = {**minilm.params, "classifier": head}
  peft_io.save_peft_adapter(str(tmp_path), params, adapters, cfg,
                            base_model_name_or_path=minilm.folder,
                            task_type="classification", modules_to_save=("classifier",))
  ours = minilm.logits(apply_adapters(params, adapters, cfg, train=False))
  theirs = minilm.peft_logits(minilm.load_peft(str(tmp_path)))
  assert np.max(np.abs(ours - minilm.logits(minilm.params))) > 1e-2
  assert_close(ours, theirs, 1e-4, f"{method} eval logits")

  with open(tmp_path / "adapter_config.json") as f:
    config = json.load(f)
  assert config["use_dora"] == (method in ("dora", "doran"))
  assert config["modules_to_save"] == ["classifier"]
  if method == "dyndora":
    gates = flatten(adapters)
    ranks = {peft_io.torch_module_name(t.module_path):
             int(np.sum(np.asarray(gates["targets/" + t.module_path + "/gate"]) != 0))
             for t in targets_for(minilm.params, cfg)}
    live = {n: r for n, r in ranks.items() if r}
    assert len(live) == len(ranks) - 1  # the fully pruned layer is left out
    assert sorted(config["target_modules"]) == sorted(live)
    assert config["r"] == max(live.values())
    assert {n: r for n, r in live.items() if r != config["r"]} == config["rank_pattern"]
    assert config["alpha_pattern"].keys() == config["rank_pattern"].keys()
    assert not config["use_rslora"]


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_ours_to_peft_to_ours_is_the_identity(minilm, method, tmp_path):
  cfg = AdapterConfig(method=method, rank=4, alpha=8.0, targets=ALL_LINEAR, rslora=True,
                      dropout=0.1)
  adapters = make_adapters(minilm.params, cfg, seed=2)
  peft_io.save_peft_adapter(str(tmp_path), minilm.params, adapters, cfg,
                            base_model_name_or_path=minilm.folder)
  back, cfg_back = peft_io.load_peft_adapter(str(tmp_path), minilm.params)
  assert (cfg_back.method, cfg_back.rank, cfg_back.alpha, cfg_back.rslora, cfg_back.dropout) == (
      method, 4, 8.0, True, 0.1)
  assert targets_for(minilm.params, cfg_back) == targets_for(minilm.params, cfg)
  ours, theirs = flatten(adapters), flatten(back)
  assert ours.keys() == theirs.keys()
  for k in ours:
    np.testing.assert_array_equal(np.asarray(ours[k]), np.asarray(theirs[k]), err_msg=k)


PEFT_MADE = {
    "lora_patterns": dict(r=4, lora_alpha=8, target_modules=["query", "key", "value"],
                          rank_pattern={"key": 2}, alpha_pattern={"value": 3}),
    "dora_rslora": dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
                        use_dora=True, use_rslora=True),
}


@pytest.mark.parametrize("name", sorted(PEFT_MADE))
def test_peft_made_adapter_imports_with_peft_outputs(minilm, name, tmp_path):
  config = peft.LoraConfig(task_type="SEQ_CLS", **PEFT_MADE[name])
  pm = peft.get_peft_model(copy.deepcopy(minilm.torch_model), config)
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_" in n or "modules_to_save" in n:
        noise = torch.randn(p.shape, generator=gen)
        p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen)).add_(0.05 * noise)
  pm.eval()
  theirs = minilm.peft_logits(pm)
  pm.save_pretrained(str(tmp_path))

  params = peft_io.load_peft_modules_to_save(str(tmp_path), minilm.params)
  assert not np.allclose(params["classifier"]["kernel"], minilm.params["classifier"]["kernel"])
  adapters, cfg = peft_io.load_peft_adapter(str(tmp_path), params)
  ours = minilm.logits(apply_adapters(params, adapters, cfg))
  assert np.max(np.abs(theirs - minilm.logits(minilm.params))) > 1e-2
  assert_close(ours, theirs, 1e-4, f"{name} logits")
  assert cfg.method == ("dora" if config.use_dora else "lora")
  n_targets = {"lora_patterns": 18, "dora_rslora": 12 + 12 + 6 + 1}[name]  # dense: + pooler
  assert len(targets_for(params, cfg)) == n_targets


# ------------------------------------------------------------------------------------ GPT-2

ZERO_UNIT = 5  # output unit of c_attn whose column of W0 is zeroed in every layer
MLP = "transformer/h/1/mlp"  # a module of Conv1D kernels, saved whole as modules_to_save


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
  """Tiny GPT-2, ours and torch (from our saved weights), with a zero-norm c_attn column."""
  bb = models.from_config(models.tiny_config("gpt2"), "causal_lm", seed=3)
  flat = flatten(bb.params)
  for path in flat:
    if path.endswith("c_attn/kernel"):
      assert re.fullmatch(bb.family.no_transpose, path)  # torch's Conv1D, stored (in, out)
      flat[path] = flat[path].at[:, ZERO_UNIT].set(0.0)  # ours is (in, out) too
  bb = bb.replace(params=unflatten(flat))
  folder = str(tmp_path_factory.mktemp("gpt2"))  # the base model PEFT's config points at
  torch_model = torch_from_ours(bb, bb.params, folder, "AutoModelForCausalLM")
  weight = torch_model.transformer.h[0].attn.c_attn.weight.detach()
  assert float(weight[:, ZERO_UNIT].abs().max()) == 0.0  # torch Conv1D is (in, out)
  assert float(weight.abs().sum()) > 0
  ids = np.random.default_rng(0).integers(1, 128, size=(2, 10)).astype(np.int32)
  logits = jax.jit(lambda p: bb.apply(p, {"input_ids": ids}))
  return bb, torch_model, folder, ids, logits


def _bump_mlp(params):
  """`params` with GPT-2's layer-1 MLP moved: a trained module for modules_to_save."""
  flat = flatten(params)
  for p in flat:
    if p.startswith(MLP + "/"):
      flat[p] = flat[p] + 0.05 * jnp.sign(flat[p]) + 0.01
  return unflatten(flat)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_gpt2_conv1d_export_matches_peft(gpt2, method, tmp_path):
  bb, torch_model, folder, ids, logits = gpt2
  cfg = AdapterConfig(method=method, rank=4, alpha=8.0, targets=r".*/c_attn/kernel")
  adapters = make_adapters(bb.params, cfg, seed=4)
  flat = flatten(adapters)
  # Layer 1 keeps W0's zero column in V (B's column zero too): PEFT would divide 0 by 0 there.
  b = "targets/transformer/h/1/attn/c_attn/lora_b"
  assert b in flat
  flat[b] = flat[b].at[:, ZERO_UNIT].set(0.0)
  adapters = unflatten(flat)
  # A trained Conv1D module rides along whole: its kernels are (in, out) in torch as in ours.
  params = _bump_mlp(bb.params)
  out = str(tmp_path / "peft")
  peft_io.save_peft_adapter(out, params, adapters, cfg, base_model_name_or_path=folder,
                            task_type="causal_lm", modules_to_save=(MLP,),
                            no_transpose=bb.family.no_transpose)
  with open(os.path.join(out, "adapter_config.json")) as f:
    assert json.load(f)["fan_in_fan_out"] is True
  pm = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), out).eval()
  with torch.no_grad():
    theirs = pm(input_ids=torch.from_numpy(ids).long()).logits.numpy()
  ours = np.asarray(logits(apply_adapters(params, adapters, cfg, train=False)))
  assert np.max(np.abs(ours - np.asarray(logits(bb.params)))) > 1e-3
  assert np.max(np.abs(ours - np.asarray(logits(apply_adapters(bb.params, adapters, cfg))))) > 1e-3
  assert_close(ours, theirs, 1e-4, f"gpt2 {method} logits")

  # Back into our tree: fan_in_fan_out describes torch's base weight only, ours stays (in, out).
  back_params = peft_io.load_peft_modules_to_save(out, bb.params,
                                                  no_transpose=bb.family.no_transpose)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back_params, params)
  back, cfg_back = peft_io.load_peft_adapter(out, back_params)
  assert cfg_back.transposed == ()
  assert targets_for(bb.params, cfg_back) == targets_for(bb.params, cfg)
  again = np.asarray(logits(apply_adapters(back_params, back, cfg_back)))
  assert_close(again, ours, 1e-5, f"gpt2 {method} re-imported logits")
  if method == "dora":
    mag = back["targets"]["transformer"]["h"]["1"]["attn"]["c_attn"]["magnitude"]
    assert float(mag[ZERO_UNIT]) == 0.0  # the dead unit is exported as m = 0 ...
    b = back["targets"]["transformer"]["h"]["1"]["attn"]["c_attn"]["lora_b"]
    assert np.any(np.asarray(b[:, ZERO_UNIT]))  # ... with a nonzero V column for PEFT's norm


def _out_in(params, paths):
  return unflatten({p: v.T if p in paths else v for p, v in flatten(params).items()})


def test_out_in_kernels_listed_in_transposed_still_round_trip(gpt2, tmp_path):
  """A tree that keeps GPT-2's Conv1D kernels (out, in) (AdapterConfig.transposed) exports the
  same tensors as ours and imports back with `transposed`."""
  bb, _, folder, _, _ = gpt2
  no_transpose = bb.family.no_transpose
  cfg = AdapterConfig(method="dora", rank=4, alpha=8.0, targets=r".*/(c_attn|attn/c_proj)/kernel")
  adapters = make_adapters(bb.params, cfg, seed=6)
  params = _bump_mlp(bb.params)
  out_in = tuple(sorted(p for p in flatten(params) if re.fullmatch(no_transpose, p)))
  legacy = _out_in(params, out_in)
  cfg_legacy = dataclasses.replace(cfg, transposed=out_in)
  want, fields = peft_io.peft_tensors(params, adapters, cfg, modules_to_save=(MLP,),
                                      no_transpose=no_transpose)
  got, fields_legacy = peft_io.peft_tensors(legacy, adapters, cfg_legacy, modules_to_save=(MLP,),
                                            no_transpose=no_transpose)
  assert fields == fields_legacy and fields["fan_in_fan_out"] is True
  assert want.keys() == got.keys()
  for k in want:
    assert_close(got[k], want[k], 1e-6, k)

  peft_io.save_peft_adapter(str(tmp_path), legacy, adapters, cfg_legacy,
                            base_model_name_or_path=folder, modules_to_save=(MLP,),
                            no_transpose=no_transpose)
  back_legacy = peft_io.load_peft_modules_to_save(
      str(tmp_path), _out_in(bb.params, out_in), no_transpose=no_transpose, transposed=out_in)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back_legacy, legacy)
  back, cfg_back = peft_io.load_peft_adapter(str(tmp_path), legacy, transposed=out_in)
  assert cfg_back.transposed == out_in
  assert targets_for(legacy, cfg_back) == targets_for(legacy, cfg_legacy)
  back = flatten(back)
  for k, v in flatten(adapters).items():
    assert_close(back[k], v, 1e-6, k)


# ------------------------------------------------------------------------------- naming, errors

# transformers 5 renames ViT's torch modules on load (vit.encoder.layer.N.attention.attention.query
# -> vit.layers.N.attention.q_proj, output.dense -> mlp.fc2, ...) while checkpoints, and so our
# param paths, keep the old names: the ViT family's `torch_modules` maps between the two, and
# PEFT (which converts names only for MoE models) then finds every target.
FAMILIES = {  # task, torch auto class, targets (every linear kernel; ViT's patch conv is 4-D)
    "bert": ("classification", "AutoModelForSequenceClassification", r".*/kernel"),
    "vit": ("image_classification", "AutoModelForImageClassification",
            r"(vit/encoder/.*|classifier)/kernel"),
    "gpt2": ("causal_lm", "AutoModelForCausalLM", r".*/kernel"),
    "llama": ("causal_lm", "AutoModelForCausalLM", r".*/kernel"),
}


def tiny_params(family, task, seed=0, **overrides):
  """(backbone, random params of its shapes, moved off the init scale) for a tiny `family`."""
  bb = models.from_config(models.tiny_config(family, **overrides), task, seed=seed)
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map(
      lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), bb.params)
  return bb, params


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_linear_kernel_maps_to_a_torch_module_peft_loads(family, tmp_path):
  task, auto_class, targets = FAMILIES[family]
  bb, params = tiny_params(family, task)
  no_transpose = bb.family.no_transpose  # GPT-2's Conv1D kernels
  assert bool(no_transpose) == (family == "gpt2")
  cfg = AdapterConfig(method="dora", rank=2, alpha=4.0, targets=targets)
  adapters = make_adapters(params, cfg, seed=5)
  out = str(tmp_path / "peft")
  renamed = bb.family.torch_modules
  assert bool(renamed) == (family == "vit")
  peft_io.save_peft_adapter(out, params, adapters, cfg, base_model_name_or_path="tiny",
                            no_transpose=no_transpose, torch_modules=renamed)
  with open(os.path.join(out, "adapter_config.json")) as f:
    assert json.load(f)["fan_in_fan_out"] is (family == "gpt2")
  tensors, _ = peft_io.peft_tensors(params, adapters, cfg, no_transpose=no_transpose,
                                    torch_modules=renamed)
  torch_model = torch_from_ours(bb, params, str(tmp_path / "base"), auto_class)
  names = dict(torch_model.named_modules())
  for t in targets_for(params, cfg):
    assert peft_io.torch_module_name(t.module_path, renamed) in names, t.path
  pm = peft.PeftModel.from_pretrained(torch_model, out)
  state = pm.state_dict()
  for key, value in tensors.items():
    name = key.replace(".weight", ".default.weight").replace(
        "lora_magnitude_vector", "lora_magnitude_vector.default.weight")
    assert name in state, key
    np.testing.assert_array_equal(state[name].numpy(), value, err_msg=key)
  # Back through the same names: the imported adapter gives our merged weights again.
  back, cfg_back = peft_io.load_peft_adapter(out, params, torch_modules=renamed)
  ours, theirs = (flatten(apply_adapters(params, a, c)) for a, c in ((adapters, cfg),
                                                                      (back, cfg_back)))
  assert set(ours) == set(theirs)
  for k in ours:
    assert_close(theirs[k], ours[k], 1e-5, k)


def test_torch_module_names_map_both_ways():
  vit = models.from_config(models.tiny_config("vit"), "image_classification").family
  for ours, torch_name in [("vit/encoder/layer/11/attention/attention/query",
                            "vit.layers.11.attention.q_proj"),
                           ("vit/encoder/layer/0/output/dense", "vit.layers.0.mlp.fc2"),
                           ("vit/encoder/layer/3/attention/output/dense",
                            "vit.layers.3.attention.o_proj"),
                           ("classifier", "classifier")]:
    assert peft_io.torch_module_name(ours, vit.torch_modules) == torch_name
    assert peft_io.flax_module_path(torch_name, vit.torch_modules) == ours
  # Without the family's map the rule is the plain '/' <-> '.' one.
  assert peft_io.torch_module_name("vit/encoder/layer/0/output/dense") == "vit.encoder.layer.0.output.dense"


@pytest.fixture(scope="module")
def tiny_bert_params():
  return tiny_params("bert", "classification")[1]


def test_bad_exports_raise(tiny_bert_params, tmp_path):
  params = tiny_bert_params
  with pytest.raises(ValueError, match="'full'"):
    peft_io.save_peft_adapter(str(tmp_path), params, {"targets": {}}, AdapterConfig(method="full"),
                              base_model_name_or_path="x")
  cfg = AdapterConfig(method="lora", rank=2, targets=r".*/word_embeddings/embedding")
  with pytest.raises(ValueError, match="kernel"):
    peft_io.peft_tensors(params, init_adapters(jax.random.key(0), params, cfg), cfg)
  cfg = AdapterConfig(method="dyndora", rank=2, targets=QV)
  with pytest.raises(ValueError, match="zero live components"):
    peft_io.peft_tensors(params, init_adapters(jax.random.key(0), params, cfg), cfg)
  cfg = AdapterConfig(method="lora", rank=2, targets=r"(.*/query|classifier)/kernel")
  adapters = init_adapters(jax.random.key(0), params, cfg)
  with pytest.raises(ValueError, match="classifier"):
    peft_io.save_peft_adapter(str(tmp_path), params, adapters, cfg, base_model_name_or_path="x",
                              task_type="classification")
  with pytest.raises(ValueError, match="task_type 'seq_cls'"):
    peft_io.save_peft_adapter(str(tmp_path), params, adapters, cfg, base_model_name_or_path="x",
                              task_type="seq_cls")
  with pytest.raises(ValueError, match="modules_to_save entry 'head'"):
    peft_io.peft_tensors(params, adapters, cfg, modules_to_save=("head",))


def test_import_finds_exactly_the_exported_kernels(tiny_bert_params, tmp_path):
  params = tiny_bert_params
  cfg = AdapterConfig(method="lora", rank=2, targets=(
      r"bert/encoder/layer/0/attention/self/query/kernel|.*/1/attention/output/dense/kernel"))
  peft_io.save_peft_adapter(str(tmp_path), params, make_adapters(params, cfg), cfg,
                            base_model_name_or_path="x")
  _, cfg_back = peft_io.load_peft_adapter(str(tmp_path), params)
  want = [t.path for t in targets_for(params, cfg)]
  assert len(want) == 2
  assert [t.path for t in targets_for(params, cfg_back)] == want


def _rewrite(folder, config_update=None, rename=None):
  """Edits a saved adapter folder in place (config fields, tensor names); returns the folder."""
  from safetensors.numpy import load_file, save_file
  if config_update:
    with open(os.path.join(folder, "adapter_config.json")) as f:
      config = json.load(f)
    config.update(config_update)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
      json.dump(config, f)
  if rename:
    weights = os.path.join(folder, "adapter_model.safetensors")
    tensors = {k.replace(*rename): v for k, v in load_file(weights).items()}
    save_file(tensors, weights)
  return folder


def test_bad_imports_raise(tiny_bert_params, tmp_path):
  params = tiny_bert_params
  cfg = AdapterConfig(method="dora", rank=2, targets=QV)
  adapters = make_adapters(params, cfg)

  def fresh(name):
    folder = str(tmp_path / name)
    peft_io.save_peft_adapter(folder, params, adapters, cfg, base_model_name_or_path="x")
    return folder

  with pytest.raises(ValueError, match="'IA3'"):
    peft_io.load_peft_adapter(_rewrite(fresh("ia3"), {"peft_type": "IA3"}), params)
  with pytest.raises(ValueError, match="lora_bias"):
    peft_io.load_peft_adapter(_rewrite(fresh("bias"), {"lora_bias": True}), params)
  with pytest.raises(ValueError, match="pissa"):
    peft_io.load_peft_adapter(
        _rewrite(fresh("pissa"), {"init_lora_weights": "pissa"}), params)
  with pytest.raises(ValueError, match="use_dora=False"):
    peft_io.load_peft_adapter(_rewrite(fresh("nodora"), {"use_dora": False}), params)
  with pytest.raises(ValueError, match="'bert.encoder.layer.0.attention.self.qery'"):
    peft_io.load_peft_adapter(
        _rewrite(fresh("name"), rename=("layer.0.attention.self.query",
                                                   "layer.0.attention.self.qery")), params)
  with pytest.raises(ValueError, match="lora_embedding_A"):
    peft_io.load_peft_adapter(
        _rewrite(fresh("emb"), rename=("lora_A.weight", "lora_embedding_A")), params)
  _, other = tiny_params("bert", "classification", hidden_size=16, intermediate_size=24)
  with pytest.raises(ValueError, match=r"needs \(2, 16\)"):
    peft_io.load_peft_adapter(fresh("shape"), other)
  with pytest.raises(ValueError, match="not a PEFT adapter folder"):
    peft_io.load_peft_adapter(str(tmp_path / "missing"), params)


# ------------------------------------------------------------------ lora_dropout against PEFT


class _FixedMask(torch.nn.Module):
  """PEFT's lora_dropout slot with our mask: the same inverted dropout for a fixed key."""

  def __init__(self, keep, p):
    super().__init__()
    self.keep, self.p = keep, p

  def forward(self, x):
    return x * self.keep / (1.0 - self.p) if self.training else x


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_factored_dropout_equals_peft_train_mode(method):
  from flax import linen as nn
  from doran_jax.adapters import factored

  class OneDense(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(10, name="query")(x)

  x = jax.random.normal(jax.random.key(0), (6, 12))
  params = jax.tree_util.tree_map(lambda p: p + 0.1, OneDense().init(jax.random.key(1), x)["params"])
  cfg = AdapterConfig(method=method, rank=4, alpha=8.0, targets=r"query/kernel", dropout=0.5)
  adapters = make_adapters(params, cfg, seed=3)
  rng = jax.random.key(11)
  ours = factored.adapted_apply(lambda params, x, **_: OneDense().apply({"params": params}, x),
                                params, adapters, cfg, x, rng=rng, train=True)
  key0 = jax.random.fold_in(jax.random.fold_in(rng, factored.DROPOUT_STREAM), 0)
  keep = torch.tensor(np.asarray(dropout.keep_mask(key0, 0.5, x.shape), np.float32))

  class OneLinear(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.query = torch.nn.Linear(12, 10)

    def forward(self, x):
      return self.query(x)

  base = OneLinear()
  leaves = adapters["targets"]["query"]
  t = lambda v: torch.tensor(np.asarray(v, np.float32))
  with torch.no_grad():
    base.query.weight.copy_(t(params["query"]["kernel"]).T)
    base.query.bias.copy_(t(params["query"]["bias"]))
  model = peft.get_peft_model(base, peft.LoraConfig(target_modules=["query"], r=4, lora_alpha=8,
                                                    lora_dropout=0.5, use_dora=method == "dora"))
  layer = model.base_model.model.query
  with torch.no_grad():
    layer.lora_A["default"].weight.copy_(t(leaves["lora_a"]).T)
    layer.lora_B["default"].weight.copy_(t(leaves["lora_b"]).T)
    if method == "dora":
      layer.lora_magnitude_vector["default"].weight.copy_(t(leaves["magnitude"]))
  layer.lora_dropout["default"] = _FixedMask(keep, 0.5)
  model.train()
  theirs = model(torch.tensor(np.asarray(x))).detach().numpy()
  assert_close(ours, theirs, 1e-5, f"{method} train-mode dropout vs PEFT")
  model.eval()   # and PEFT's eval output differs from its train output: the mask mattered
  assert np.abs(model(torch.tensor(np.asarray(x))).detach().numpy() - theirs).max() > 1e-3
