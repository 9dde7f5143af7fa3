"""ViT: the image encoder family (modules in modeling/vit.py)."""

from __future__ import annotations

from doran_jax.models.modeling import vit as modeling
from doran_jax.models.registry import Family, register


def tiny_vit(**overrides):
  import transformers  # configs only: no model class is used
  return transformers.ViTConfig(**{**dict(image_size=16, patch_size=8, num_channels=3,
                                          hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=48), **overrides})


VIT = register(Family(
    name="vit", model_types=("vit",), tasks=modeling.TASKS,
    heads={"image_classification": r"classifier/.*"},
    target_presets={"attention": r".*/(query|value)/kernel",
                    "all_linear": r".*/encoder/.*/(query|key|value|dense)/kernel"},
    column_parallel=r"query|key|value|intermediate/dense",
    row_parallel=r"attention/output/dense|output/dense",
    input_keys={"image_classification": ("pixel_values",), "features": ("pixel_values",)},
    tiny_config=tiny_vit, build=modeling.build, prefix=modeling.prefix,
    tied_params=modeling.tied_params, no_transpose=modeling.NO_TRANSPOSE,
    renames=modeling.RENAMES,
    # transformers 5 builds ViT with new module names (its checkpoints keep the old ones).
    torch_modules=(
        ("vit.encoder.layer.*.attention.attention.query", "vit.layers.*.attention.q_proj"),
        ("vit.encoder.layer.*.attention.attention.key", "vit.layers.*.attention.k_proj"),
        ("vit.encoder.layer.*.attention.attention.value", "vit.layers.*.attention.v_proj"),
        ("vit.encoder.layer.*.attention.output.dense", "vit.layers.*.attention.o_proj"),
        ("vit.encoder.layer.*.intermediate.dense", "vit.layers.*.mlp.fc1"),
        ("vit.encoder.layer.*.output.dense", "vit.layers.*.mlp.fc2"),
        ("vit.encoder.layer.*.layernorm_before", "vit.layers.*.layernorm_before"),
        ("vit.encoder.layer.*.layernorm_after", "vit.layers.*.layernorm_after")),
    # ViT's image processor: x in [0, 1] -> (x - 0.5) / 0.5.
    image_mean=0.5, image_std=0.5))
