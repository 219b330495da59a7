"""The one-pixel attack (differential evolution), in three rooms and a helper:

- `de`: its settings, the DE pieces, the per-image keys and `attack_image`, the
  pure attack of one image (evosax style: key first, jit/vmap it yourself);
- `engine`: the slot engine that runs many images on each device;
- `driver`: the host driver (checks, sharding, chunks, progress): `attack`,
  `attack_stream`;
- `perturb`: pixels (row, col, r, g, b) written into images.

`pj.attack.X` names the public functions of all of them.
"""

from propmaps_jax.attack.de import (
    AttackConfig,
    ImageResult,
    attack_image,
    candidate_bounds,
    decode_candidates,
    fitness,
    generation_key,
    image_key,
    initial_population,
    make_de,
)
from propmaps_jax.attack.driver import (
    AXIS,
    DEFAULT_BATCH_PER_CPU,
    DEFAULT_BATCH_PER_CPU_OTHER_MODEL,
    DEFAULT_BATCH_PER_DEVICE,
    AttackResult,
    ProgressInfo,
    attack,
    attack_stream,
    concatenate_results,
    default_candidate_forward,
    default_slots,
    is_project_model,
    memory_estimate,
    validate_inputs,
)
from propmaps_jax.attack.perturb import apply_pixels, apply_pixels_batch, move_pixels

__all__ = [
    "AXIS",
    "DEFAULT_BATCH_PER_CPU",
    "DEFAULT_BATCH_PER_CPU_OTHER_MODEL",
    "DEFAULT_BATCH_PER_DEVICE",
    "AttackConfig",
    "AttackResult",
    "ImageResult",
    "ProgressInfo",
    "apply_pixels",
    "apply_pixels_batch",
    "attack",
    "attack_image",
    "attack_stream",
    "candidate_bounds",
    "concatenate_results",
    "decode_candidates",
    "default_candidate_forward",
    "default_slots",
    "fitness",
    "generation_key",
    "image_key",
    "initial_population",
    "is_project_model",
    "make_de",
    "memory_estimate",
    "move_pixels",
    "validate_inputs",
]

from propmaps_jax._lazy import submodule_getattr  # noqa: E402

__getattr__ = submodule_getattr(__name__, __path__)
