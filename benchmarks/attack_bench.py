"""Attack throughput vs the model's raw batched forward throughput (efficiency).

python benchmarks/attack_bench.py [--models=lenet,resnet] [--population=400]
    [--generations=100] [--num_images=1000] [--slots=N] [--weights=model=PATH,...]
    [--dtype=float32|bfloat16] [--precision=highest|high|default]

For each model: the attack's candidate evaluations per second (only evaluations of
images still being attacked count: population x (generations + 1) per image) and,
in the same process and on the same device, the images per second of a plain
jitted forward at the attack's batch size (slots x population): the candidate
forward that the attack uses (the receptive-field forward where it is the default,
see --forward) and the model's plain forward. The attack's rate over its own
forward's rate is its efficiency. Without --weights the models are randomly
initialised and each image's label is the model's own prediction, so every image
is attacked.
Compilation is excluded from both timings (each is run once before it is timed).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from propmaps_jax import attack, batching, models  # noqa: E402
from propmaps_jax.models import checkpoint

flags.DEFINE_list("models", ["lenet", "resnet"], "Models (registry names).")
flags.DEFINE_integer("population", 400, "DE population size.")
flags.DEFINE_integer("generations", 100, "Maximum DE generations.")
flags.DEFINE_integer("pixels", 1, "Pixels per candidate.")
flags.DEFINE_integer("num_images", 1000, "Images attacked per model.")
flags.DEFINE_integer(
    "slots", None, "Images attacked at once; default ~32768/population."
)
flags.DEFINE_list("weights", [], "model=PATH pairs of trained weights (optional).")
flags.DEFINE_string("cifar10_path", None, "CIFAR-10 for real images (else random).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Model compute dtype.")
flags.DEFINE_enum(
    "precision",
    "highest",
    ["highest", "high", "default"],
    "jax.default_matmul_precision of both timings (highest: true float32).",
)
flags.DEFINE_integer("forward_repeats", 5, "Timed forward passes.")
flags.DEFINE_enum(
    "forward",
    "auto",
    ["auto", "plain"],
    "The attack's candidate forward: auto (the library's default: receptive-field "
    "windows where measured faster) or plain (the model's own forward).",
)
flags.DEFINE_bool(
    "full_length",
    False,
    "Add a large constant to logit 0 and attack label 0 so that no attack can "
    "succeed: every image runs all generations (steady-state throughput).",
)
FLAGS = flags.FLAGS


def load_model(name: str, weights: dict[str, str]):
    """(apply_fn, variables, trained?) of a model: given weights, else a random init."""
    dtype = jnp.bfloat16 if FLAGS.dtype == "bfloat16" else jnp.float32
    if name in weights:
        config, variables, _ = checkpoint.load_weights(name, weights[name])
        module = models.create_model(config, dtype=dtype)
        return models.make_apply_fn(module), variables, True
    module = models.create_model(name, dtype=dtype)
    variables = models.init_variables(module, jax.random.key(0))
    return models.make_apply_fn(module), variables, False


def test_images(count: int):
    """(images, labels or None): CIFAR-10 test images when available, else random."""
    path = FLAGS.cifar10_path or os.environ.get("CIFAR10_PATH")
    if path:
        from propmaps_jax import data

        dataset = data.load_cifar10(path)
        return dataset.x_test[:count], dataset.y_test[:count]
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), None


def _rate(forward, args, count: int) -> float:
    """`count` per second of `forward(*args)` (compiled first, then timed)."""
    forward(*args).block_until_ready()
    start = time.perf_counter()
    for _ in range(FLAGS.forward_repeats):
        out = forward(*args)
    out.block_until_ready()
    return count * FLAGS.forward_repeats / (time.perf_counter() - start)


def forward_throughput(apply_fn, variables, batch: int) -> float:
    """Images per second of a jitted forward of `batch` uint8 images."""
    forward = jax.jit(lambda v, x: jnp.argmax(apply_fn(v, x), -1))
    images = jnp.asarray(
        np.random.default_rng(1).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    )
    return _rate(forward, (variables, images), batch)


def candidate_throughput(candidate_forward, variables, slots, population) -> float:
    """Candidates per second of a jitted candidate forward at the attack's shapes."""
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.integers(0, 256, (slots, 32, 32, 3), dtype=np.uint8))
    rows_cols = rng.integers(0, 32, (slots, population, 1, 2))
    rgb = rng.integers(0, 256, (slots, population, 1, 3))
    pixels = jnp.asarray(np.concatenate([rows_cols, rgb], -1), jnp.int32)
    forward = jax.jit(lambda v, x, p: jnp.argmax(candidate_forward(v, x, p), -1))
    return _rate(forward, (variables, images, pixels), slots * population)


def bench(name: str, weights: dict[str, str]) -> dict:
    apply_fn, variables, trained = load_model(name, weights)
    forward_fn = jax.jit(apply_fn)
    config = attack.AttackConfig(
        pixels=FLAGS.pixels, population=FLAGS.population, generations=FLAGS.generations
    )
    images, labels = test_images(FLAGS.num_images)
    predictions = batching.map_batches(
        lambda x: jnp.argmax(forward_fn(variables, x), -1),
        [images],
        min(1000, len(images)),
    )
    if labels is None or not trained:
        labels = predictions  # random weights: attack the model's own decisions
    keep = predictions == labels
    images, labels = images[keep], labels[keep]
    if FLAGS.full_length:
        model_fn = apply_fn
        apply_fn = lambda v, x: model_fn(v, x).at[:, 0].add(1e4)  # noqa: E731
        labels = np.zeros_like(labels)
    indices = np.flatnonzero(keep)
    devices = jax.device_count()
    slots = FLAGS.slots or devices * attack.default_slots(
        config.population, len(images), devices
    )
    candidate_forward = None
    if FLAGS.forward == "auto":
        platform = jax.devices()[0].platform
        candidate_forward = attack.default_candidate_forward(
            apply_fn, None, config, platform
        )
    run = lambda: attack.attack(  # noqa: E731
        apply_fn,
        variables,
        images,
        labels,
        indices,
        jax.random.key(0),
        config,
        slots=slots,
        candidate_forward=candidate_forward,
    )
    start = time.perf_counter()
    run()  # compiles
    compile_and_run = time.perf_counter() - start
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    evaluations = int(result.evaluations.sum())
    batch = slots * config.population
    plain = forward_throughput(apply_fn, variables, batch)
    forward = plain
    if candidate_forward is not None:
        per_device = slots // devices
        forward = (
            candidate_throughput(
                candidate_forward, variables, per_device, config.population
            )
            * devices
        )
    return {
        "model": name,
        "weights": ("trained" if trained else "random")
        + (", full length" if FLAGS.full_length else ""),
        "images": len(images),
        "population": config.population,
        "slots": slots,
        "batch": batch,
        "mean_generations": float(result.generations.mean()),
        "success_rate": float(result.success.mean()),
        "seconds": seconds,
        "compile_s": compile_and_run - seconds,
        "attack_evals_per_s": evaluations / seconds,
        "forward": "receptive" if candidate_forward is not None else "plain",
        "forward_images_per_s": forward,
        "plain_images_per_s": plain,
        "efficiency": evaluations / seconds / forward,
    }


def main(argv: list[str]) -> None:
    del argv
    weights = dict(item.split("=", 1) for item in FLAGS.weights)
    with jax.default_matmul_precision(FLAGS.precision):
        rows = [bench(name, weights) for name in FLAGS.models]
    device = jax.devices()[0]
    print(
        f"device: {jax.device_count()} x {device.device_kind} "
        f"({jax.default_backend()}), jax {jax.__version__}, dtype {FLAGS.dtype}, "
        f"precision {FLAGS.precision}, "
        f"generations <= {FLAGS.generations}"
    )
    print(
        "| model | weights | images | population | slots | batch | mean gens | "
        "success | attack s | compile s | attack evals/s | forward | "
        "forward images/s | plain forward images/s | efficiency |"
    )
    print("|" + "---|" * 15)
    for r in rows:
        print(
            f"| {r['model']} | {r['weights']} | {r['images']} | {r['population']} | "
            f"{r['slots']} | {r['batch']} | {r['mean_generations']:.1f} | "
            f"{r['success_rate']:.0%} | {r['seconds']:.1f} | {r['compile_s']:.1f} | "
            f"{r['attack_evals_per_s']:,.0f} | {r['forward']} | "
            f"{r['forward_images_per_s']:,.0f} | {r['plain_images_per_s']:,.0f} | "
            f"{r['efficiency']:.2f} |"
        )


if __name__ == "__main__":
    app.run(main)
