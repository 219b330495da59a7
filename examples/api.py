"""The public API in one example: attack a few test images of the bundled LeNet,
read a committed attack.csv, and the propagation maps of attack results.

README.md shows this file as it is and a test runs it (tests/cli/test_readme.py);
CI runs it with the installed wheel from another folder. From the repository root:
`python examples/api.py` (PROPMAPS_RUN=DIR reads the run directory DIR instead).
"""

import os

import jax
import numpy as np

import propmaps_jax as pj
from experiments.runs import attack_csv
from propmaps_jax.analysis import propagation
from propmaps_jax.models import checkpoint

# A model is data: apply_fn(variables, images in 0..255) -> logits, plus variables.
model_config, variables, _ = checkpoint.load_weights("lenet")  # the bundled LeNet
model = pj.models.create_model(model_config)
apply_fn = pj.models.make_apply_fn(model)  # any linen module, with `train` or not

# The first test images (CIFAR10_PATH, else downloaded once into ~/.cache); the
# attack takes the images the model classifies correctly.
test = pj.data.load_cifar10(os.environ.get("CIFAR10_PATH"))
images, labels = test.x_test[:8], test.y_test[:8]
right = np.asarray(apply_fn(variables, images)).argmax(-1) == labels
images, labels, indices = images[right], labels[right], np.flatnonzero(right)

# The one-pixel attack (the paper's differential evolution, here 10 generations);
# image i's random numbers come from its dataset index, whatever the batching.
config = pj.attack.AttackConfig(generations=10)
key = jax.random.key(0)
result = pj.attack.attack(apply_fn, variables, images, labels, indices, key, config)
print(f"fooled {result.success.sum()} of {len(images)} images")
print("pixels (row, col, r, g, b):", result.pixels[:, 0].tolist())

# A committed run's attack.csv as arrays, every row checked: one row per sampled
# test image, its pixels (N, k, 5).
run = os.environ.get("PROPMAPS_RUN", "docs/results/lenet_1000_cpu")
table = attack_csv.read_attack_csv(os.path.join(run, "attack.csv"))
print(f"{run}: {table['success'].sum()} of {table['attacked'].sum()} fooled")

# The propagation maps of its first successful attacks: per convolution, the max
# over channels of |FM - FM_adv|, (images, height, width), in forward order.
rows = np.flatnonzero(table["success"])[:4]
clean = test.x_test[table["index"][rows]]
adversarial = pj.attack.apply_pixels_batch(clean, table["pixels"][rows])
maps = propagation.propagation_maps(model, variables, clean, adversarial)
print({layer: pm.shape for layer, pm in maps.items()})
