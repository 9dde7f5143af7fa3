r"""ViT-B/16 (ImageNet-21k) on fine-grained visual classification (FGVC) through tensorflow-datasets.

  python train.py --config configs/vit_fgvc.py:task=oxford_flowers102,method=doran \
      --config.data.data_dir=~/tensorflow_datasets
  python train.py --config configs/vit_fgvc.py:task=stanford_dogs,method=dora

Tasks available in tfds: cub200 (caltech_birds2011), oxford_flowers102, stanford_dogs. (Stanford Cars
and NABirds are not in tfds: convert them to a tfds folder in data_dir first.)
"""

from doran_jax import config_lib, data

TASKS = {
    "cub200": ("caltech_birds2011", "label", 200),
    "oxford_flowers102": ("oxford_flowers102", "label", 102),
    "stanford_dogs": ("stanford_dogs", "label", 120),
}


def get_config(arg=None):
  c = config_lib.base_config()
  c.workdir = "runs/fgvc"
  c.model.name = "google/vit-base-patch16-224-in21k"
  c.model.task = "image_classification"
  c.adapter = config_lib.adapter_defaults(method="doran", rank=8, alpha=16.0,
                                          targets=r".*/(query|value)/kernel")
  c.data = data.default_data_config("tfds_image", name="oxford_flowers102", image_size=224,
                                    limit=None, eval_limit=None, eval_split="test")
  c.batch_size = 32
  c.num_epochs = 30.0
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 200
  c.optim.schedule = "cosine"
  c.optim.weight_decay = 1e-4
  c.checkpoint.every = 500
  c.task_name = "oxford_flowers102"
  config_lib.apply_arg(c, arg, aliases={"task": "task_name"})
  with c.unlocked():
    if c.task_name not in TASKS:
      raise ValueError(f"unknown FGVC task {c.task_name!r}; choose one of {', '.join(TASKS)}.")
    c.data.name, c.data.label_key, c.model.num_labels = TASKS[c.task_name]
    if c.workdir == "runs/fgvc":
      c.workdir = f"runs/fgvc_{c.task_name}_{c.adapter.method}"
  return c
