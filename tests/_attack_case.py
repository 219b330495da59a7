"""A small, fixed attack case shared by the in-process and the subprocess tests."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from propmaps_jax import attack, models

NUM_IMAGES = 8
SLOTS = 4
CONFIG = attack.AttackConfig(pixels=1, population=8, generations=4)


@functools.lru_cache(maxsize=1)
def lenet_case():
    """(apply_fn, variables, images, labels, indices): a tiny LeNet and images it
    classifies. The compiled attack program is cached on apply_fn (equal modules
    give equal apply_fns), never on the variables."""
    module = models.create_model("lenet_tiny")
    variables = models.init_variables(module, jax.random.key(2))
    apply_fn = models.make_apply_fn(module)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(NUM_IMAGES, 32, 32, 3), dtype=np.uint8)
    labels = np.asarray(jnp.argmax(apply_fn(variables, images), -1))
    indices = np.arange(100, 100 + NUM_IMAGES)
    return apply_fn, variables, images, labels, indices


def attack_args(case=None) -> tuple:
    """The positional arguments of `attack.attack` / `attack.attack_stream` for the
    fixed case: (apply_fn, variables, images, labels, indices, key, CONFIG)."""
    return (*(case or lenet_case()), jax.random.key(7), CONFIG)


def attack_case(
    slots: int | None = None, chunk_ends=None, case=None, **kwargs
) -> attack.AttackResult:
    """The engine's results for the fixed case (`kwargs`: more options of
    `attack.attack`, e.g. on_progress)."""
    return attack.attack(
        *attack_args(case), slots=slots, chunk_ends=chunk_ends, **kwargs
    )
