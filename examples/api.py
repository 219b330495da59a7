"""The public API in one example: attack a few test images of the bundled LeNet,
their locality study and propagation maps, and a committed attack.csv as arrays.

README.md shows this file as it is and a test runs it (tests/cli/test_readme.py);
CI runs it with the installed wheel from another folder. From the repository root:
`python examples/api.py` (PROPMAPS_RUN=DIR reads the run directory DIR instead).
"""

import os

import jax
import numpy as np

import propmaps_jax as pj
from propmaps_jax.analysis import locality_study, propagation
from propmaps_jax.models import checkpoint

# A model is data: features(variables, images in 0..255) -> (logits, {layer: maps}),
# any JAX function (pj.models.contract says what it must be), plus its variables.
model_config, variables, _ = checkpoint.load_weights("lenet")  # the bundled LeNet
features = pj.models.linen_features(pj.models.create_model(model_config))
apply_fn = pj.models.logits_of(features)  # the attack's half: logits only

# The first test images (CIFAR10_PATH, else downloaded once into ~/.cache).
test = pj.data.load_cifar10(os.environ.get("CIFAR10_PATH"))
images, labels = test.x_test[:8], test.y_test[:8]
indices = np.arange(8)

# The one-pixel attack (the paper's differential evolution, here 10 generations);
# image i's random numbers come from its dataset index, whatever the batching.
config = pj.attack.AttackConfig(generations=10)
key = jax.random.key(0)
result = pj.attack.attack(apply_fn, variables, images, labels, indices, key, config)
print(f"fooled {result.success.sum()} of {len(images)} images")

# The locality study of these attacks in one call (Table 1: the attack's colour
# moved next door and to a random pixel, by distance; the controls).
study = locality_study.locality_study(
    apply_fn, variables, images, labels, result, indices=indices, controls=False
)
print(locality_study.table1_markdown({"lenet": study}))

# The propagation maps of an attack result: per convolution, the max over channels
# of |FM - FM_adv|, (images, height, width), in forward order.
maps = propagation.maps_of_result(features, variables, images, result.pixels)
print({layer: pm.shape for layer, pm in maps["pm"]["max"].items()})

# A committed run's attack.csv as arrays, every row checked.
run = pj.results.read_attack_results(
    os.environ.get("PROPMAPS_RUN", "docs/results/lenet_1000_cpu")
)
print(f"{run.success.sum()} of {run.attacked.sum()} fooled; pixels {run.pixels.shape}")
