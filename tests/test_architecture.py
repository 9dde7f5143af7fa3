"""The package's shape: an acyclic import graph, method knowledge only in doran_jax/adapters/, a
method registered from outside the package trains end to end, family records drive loading."""

import ast
import concurrent.futures
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import doran_jax as dj
from configs import tiny
from doran_jax import checkpoint, experiment, models, peft_io, sharding
from doran_jax import run as run_lib
from doran_jax.adapters import method as method_registry
from doran_jax.targets import flatten

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "doran_jax"


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    out[name.removesuffix(".__init__")] = path
  return out


def _imports(name: str, path: pathlib.Path, known) -> set[str]:
  """doran_jax modules `name` imports anywhere in its file (module level or inside functions)."""
  package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base])
      # `from pkg import submodule` depends on the submodule; `from module import name` on it.
      for a in node.names:
        found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
  return {m for m in found if m in known and m != name}


def _find_cycle(graph: dict[str, set[str]]):
  """A list of modules forming an import cycle (first == last), or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "active"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "active":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_import_graph_has_no_cycle():
  modules = _modules()
  graph = {name: _imports(name, path, modules) for name, path in modules.items()}
  cycle = _find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)
  assert len(graph) > 20 and graph["doran_jax.trainer"] and "doran_jax.trainer" not in graph[
      "doran_jax.evaluate"]


def test_graph_check_catches_a_cycle(tmp_path):
  # The checker itself can fail: two modules importing each other are reported as a cycle.
  a, b = tmp_path / "a.py", tmp_path / "b.py"
  a.write_text("from doran_jax import b\n")
  b.write_text("import doran_jax.a\n")
  known = {"doran_jax.a", "doran_jax.b"}
  graph = {"doran_jax.a": _imports("doran_jax.a", a, known),
           "doran_jax.b": _imports("doran_jax.b", b, known)}
  assert _find_cycle(graph) == ["doran_jax.a", "doran_jax.b", "doran_jax.a"]
  assert _find_cycle({"doran_jax.a": {"doran_jax.b"}, "doran_jax.b": set()}) is None


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter():
  env = {**os.environ, "USE_TORCH": "0"}

  def load(name):
    proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd="/", env=env,
                          capture_output=True, text=True, timeout=300)
    return name, proc.returncode, proc.stderr[-800:]

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = list(pool.map(load, sorted(_modules())))
  failed = [(n, err) for n, rc, err in results if rc]
  assert not failed, failed


def test_no_method_branch_outside_the_adapters_package():
  pattern = re.compile(r"""method\s*(==|!=)\s*["']|method\s+(not\s+)?in\s*[(\[{"']""")
  offenders = []
  for name, path in _modules().items():
    if name.startswith("doran_jax.adapters"):
      continue
    for i, line in enumerate(path.read_text().splitlines(), 1):
      if pattern.search(line) and not line.lstrip().startswith(("#", ">>>")):
        offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
  assert not offenders, offenders
  assert pattern.search('if cfg.method == "doran":') and pattern.search("x.method in ('a', 'b')")


# ------------------------------------------------------------------------------ a toy method

def _toy_leaves(key, w0_IxO, cfg):
  """A LoRA with a learnable per-output scale on ΔW: W' = W0 + s·A·B·diag(c)."""
  d_in, d_out = w0_IxO.shape
  return {"lora_a": jax.random.normal(key, (d_in, cfg.stored_rank)) / np.sqrt(d_in),
          "lora_b": jnp.zeros((cfg.stored_rank, d_out)), "col_scale": jnp.ones((d_out,))}


TOY = method_registry.Method(
    name="toy_scaled_lora",
    leaf_axes=lambda cfg: {"lora_a": ("in", "rank"), "lora_b": ("rank", "out"),
                           "col_scale": ("out",)},
    init_leaves=_toy_leaves,
    low_rank=lambda leaves, generated, cfg: (leaves["lora_a"],
                                             leaves["lora_b"] * leaves["col_scale"][None, :]))


@pytest.fixture
def toy_method():
  method_registry.register(TOY, replace=True)
  yield TOY
  method_registry.unregister(TOY.name)


def test_a_method_registered_in_a_test_trains_end_to_end(shared_data, tmp_path, toy_method):
  c = tiny.get_config(f"kind=text,steps=2,workdir={tmp_path}")
  with c.unlocked():
    c.adapter.method = toy_method.name
    c.data.path = str(shared_data / "text" / "sst2")
    c.mesh = "data:1"
  run = run_lib.setup(c)
  leaves = flatten(run.state.trainable["adapters"]["targets"])
  assert {p.rsplit("/", 1)[1] for p in leaves} == {"lora_a", "lora_b", "col_scale"}
  # Shardings derived from the declared axes; W' = W0 at init, merged = factored.
  params = models.from_config(models.tiny_config("bert", vocab_size=30522, num_labels=2),
                              "classification", seed=c.seed).params
  cfg = run.adapter_cfg
  merged = dj.apply_adapters(params, run.state.trainable["adapters"], cfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, merged, params)
  results = experiment.train(c, run=run)
  assert results["status"] == "done" and np.isfinite(results["eval"]["eval_loss"])
  trained = flatten(jax.device_get(results["state"].trainable["adapters"]["targets"]))
  assert any(np.abs(v).max() > 0 for p, v in trained.items() if p.endswith("lora_b"))
  # Checkpointed with the rest and restored by path and shape.
  mngr = checkpoint.manager(str(tmp_path / "checkpoints"))
  state, _ = checkpoint.restore(mngr, sharding.abstract(run.state))
  mngr.close()
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.trainable),
                         jax.device_get(results["state"].trainable))
  # The adapter export works; the PEFT export is refused: the method declares no mapping.
  assert (tmp_path / "export" / "adapters" / "adapter_config.json").exists()
  with pytest.raises(ValueError, match="toy_scaled_lora.*no adapter to export to PEFT"):
    peft_io.peft_tensors(params, jax.device_get(results["state"].trainable["adapters"]), cfg)


def test_an_undeclared_leaf_is_an_error(toy_method):
  bb = models.from_config(models.tiny_config("bert"), "classification")
  sneaky = method_registry.Method(
      name="toy_undeclared", leaf_axes=lambda cfg: {"lora_a": ("in", "rank")},
      init_leaves=_toy_leaves, low_rank=TOY.low_rank)
  method_registry.register(sneaky, replace=True)
  try:
    with pytest.raises(ValueError, match="declares.*leaf_axes"):
      dj.init_adapters(jax.random.key(0), bb.params,
                       dj.AdapterConfig(method="toy_undeclared", rank=2))
  finally:
    method_registry.unregister("toy_undeclared")
  adapters = dj.init_adapters(jax.random.key(0), bb.params,
                              dj.AdapterConfig(method=toy_method.name, rank=2))
  adapters["targets"]["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["extra"] = (
      jnp.zeros(3))
  mesh = sharding.make_mesh("data:1")
  specs = sharding.param_specs(bb.params, mesh, sharding.REPLICATED_RULES)
  with pytest.raises(ValueError, match="query/extra' is not declared"):
    sharding.adapter_specs(adapters, bb.params, specs, dj.AdapterConfig(method=toy_method.name,
                                                                        rank=2), mesh)


# ------------------------------------------------------------------------------ family records

def test_family_records_drive_heads_presets_and_rules():
  bert = models.registry.get("bert")
  assert bert.head("classification") == r"classifier/.*"
  assert bert.targets("attention") == r".*/(query|value)/kernel"
  assert models.registry.get("gpt2").head("classification") == r"score/.*"
  rules = models.registry.get("gpt2").tensor_parallel_rules()
  assert any("c_attn" in r and spec == ("fsdp", "model") for r, spec in rules)
  with pytest.raises(ValueError, match="unsupported model_type 'bart'.*bert"):
    models.registry.for_model_type("bart")
  with pytest.raises(ValueError, match="does not support task 'causal_lm'"):
    bert.check_task("causal_lm")


def test_a_fresh_parameter_left_frozen_is_an_error(tmp_path):
  encoder = models.from_config(models.tiny_config("bert"), "features", seed=1)
  models.save_pretrained(encoder, encoder.params, str(tmp_path))
  bb = models.load_backbone(str(tmp_path), "classification", num_labels=3)
  # A bare encoder has no pooler or classifier: both are fresh.
  assert set(bb.fresh) >= {"classifier/bias", "classifier/kernel"}
  lora = method_registry.get("lora")
  with pytest.raises(ValueError, match=r"freshly initialised.*classifier/bias.*config.head"):
    run_lib.check_fresh_params(bb, {}, lora)
  head, _ = run_lib.split_params(bb.params, False, r"(classifier|bert/pooler)/.*")
  run_lib.check_fresh_params(bb, head, lora)   # a head that trains them: no error
  run_lib.check_fresh_params(bb, {}, method_registry.get("full"))


# ------------------------------------------------------------------------------ sharded eval

EVAL_WORKER = r"""
import json, sys
import jax
import numpy as np
from configs import tiny
from doran_jax import experiment, sharding
from doran_jax import run as run_lib
from doran_jax.targets import flatten

out = {}
for mesh in ("data:1", "data:8"):
  c = tiny.get_config("kind=text,method=dora")
  with c.unlocked():
    c.data.path = sys.argv[1]
    c.mesh = mesh
    c.eval_batch_size = 16
  run = run_lib.setup(c)
  trainable = jax.tree_util.tree_map(lambda x: x + 0.01, run.state.trainable)  # perturbed
  seen = []
  predict = experiment.evaluate.make_predict_fn(run.backbone.apply, run.mesh)
  def spy(params, batch):
    logits = predict(params, batch)
    seen.append(str(logits.sharding.spec))
    return logits
  merged = experiment.evaluate.merged_params(run.frozen, trainable, run.adapter_cfg)
  metrics = experiment.evaluate.evaluate(spy, "classification", merged, run.eval_data, 16,
                                         mesh=run.mesh)
  out[mesh] = {"metrics": metrics, "specs": sorted(set(seen)), "devices": jax.device_count()}
# GPT-2 under tensor-parallel rules: its kernels are (in, out) like every other family's.
from doran_jax import models
bb = models.from_config(models.tiny_config("gpt2"), "causal_lm")
mesh = sharding.make_mesh("data:2,fsdp:2,model:2")
specs = flatten(sharding.param_specs(bb.params, mesh, bb.family.tensor_parallel_rules(), bb.transposed))
out["gpt2"] = {k: str(v) for k, v in specs.items() if k.startswith("transformer/h/0/")}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_eval_on_8_devices_is_sharded_and_equals_one_device(shared_data):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", EVAL_WORKER, str(shared_data / "text" / "sst2")],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  import json
  out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
  one, eight = out["data:1"], out["data:8"]
  assert eight["devices"] == 8
  assert eight["specs"] == ["P('data',)"], eight["specs"]   # rows split over data
  assert one["specs"] in (["P(None,)"], ["P()"]), one["specs"]
  for k in ("accuracy", "macro_f1", "mcc", "n"):
    assert eight["metrics"][k] == one["metrics"][k], k
  np.testing.assert_allclose(eight["metrics"]["eval_loss"], one["metrics"]["eval_loss"], rtol=1e-5)
  gpt2 = out["gpt2"]
  # c_attn and c_fc are column parallel, the two c_proj row parallel.
  assert gpt2["transformer/h/0/attn/c_attn/kernel"] == "P('fsdp', 'model')", gpt2
  assert gpt2["transformer/h/0/mlp/c_fc/kernel"] == "P('fsdp', 'model')", gpt2
  assert gpt2["transformer/h/0/attn/c_proj/kernel"] == "P('model', 'fsdp')", gpt2
