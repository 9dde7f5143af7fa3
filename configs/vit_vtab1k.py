r"""ViT-B/16 (ImageNet-21k) on a VTAB-1k task through tensorflow-datasets, as in the DoRAN paper.

Needs the checkpoint (hub name or a local folder) and the tfds data prepared in data_dir:
  python train.py --config configs/vit_vtab1k.py:task=cifar100,method=doran \
      --config.data.data_dir=~/tensorflow_datasets
  python train.py --config configs/vit_vtab1k.py:task=dtd --config.model.name=/ckpt/vit-b16-in21k

VTAB-1k: 800 training + 200 validation images (data.limit / data.eval_limit); for final numbers
train on all 1000 and evaluate on the test split (see doran_jax.data.default_data_config).
"""

from doran_jax import config_lib, data

# tfds names of the VTAB-1k tasks with their label key and class count.
TASKS = {
    "cifar100": ("cifar100", "label", 100), "caltech101": ("caltech101", "label", 102),
    "dtd": ("dtd", "label", 47), "oxford_flowers102": ("oxford_flowers102", "label", 102),
    "oxford_iiit_pet": ("oxford_iiit_pet", "label", 37), "svhn": ("svhn_cropped", "label", 10),
    "sun397": ("sun397", "label", 397), "eurosat": ("eurosat/rgb", "label", 10),
    "resisc45": ("resisc45", "label", 45), "patch_camelyon": ("patch_camelyon", "label", 2),
}


def get_config(arg=None):
  c = config_lib.base_config()
  c.workdir = "runs/vtab1k"
  c.model.name = "google/vit-base-patch16-224-in21k"
  c.model.task = "image_classification"
  c.adapter = config_lib.adapter_defaults(method="doran", rank=8, alpha=16.0,
                                          targets=r".*/(query|value)/kernel")
  c.data = data.default_data_config("tfds_image", name="cifar100", image_size=224)
  c.batch_size = 64
  c.num_steps = 1250  # 100 epochs of 800 images at batch 64
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"
  c.optim.weight_decay = 1e-4
  c.checkpoint.every = 250
  c.task_name = "cifar100"
  config_lib.apply_arg(c, arg, aliases={"task": "task_name"})
  with c.unlocked():
    name, label_key, num_classes = TASKS[c.task_name] if c.task_name in TASKS else (c.task_name, "label", 0)
    c.data.name = name
    c.data.label_key = label_key
    c.model.num_labels = num_classes
    if c.workdir == "runs/vtab1k":
      c.workdir = f"runs/vtab1k_{c.task_name}_{c.adapter.method}"
  return c
