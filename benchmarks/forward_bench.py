"""The models' batched forward throughput by batch size: where is the knee?

python benchmarks/forward_bench.py [--models=lenet,resnet]
    [--batches=100,200,400,800,1600,3200] [--seconds=3]

Images per second of a plain jitted forward (bundled weights, random images) at
each batch size, best of three timed rounds of about `--seconds` each, compilation
excluded. The attack's default slot count aims at the knee on a CPU
(`attack.DEFAULT_BATCH_PER_CPU`) and at a large batch on an accelerator.
"""

import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from propmaps_jax import checkpoint, models  # noqa: E402

flags.DEFINE_list("models", ["lenet", "resnet"], "Models with bundled weights.")
flags.DEFINE_list("batches", ["100", "200", "400", "800", "1600", "3200"], "Sizes.")
flags.DEFINE_float("seconds", 3.0, "Length of each timed round.")
FLAGS = flags.FLAGS


def throughput(fn, x) -> float:
    fn(x).block_until_ready()
    best = 0.0
    for _ in range(3):
        tick, reps = time.perf_counter(), 0
        while time.perf_counter() - tick < FLAGS.seconds / 3:
            fn(x).block_until_ready()
            reps += 1
        best = max(best, reps * x.shape[0] / (time.perf_counter() - tick))
    return best


def main(argv: list[str]) -> None:
    del argv
    device = jax.devices()[0]
    print(f"jax {jax.__version__}, {device.platform} ({device.device_kind})")
    print(f"{'model':7s} {'batch':>6s} {'images/s':>9s}")
    rng = np.random.default_rng(0)
    for name in FLAGS.models:
        config, variables, _ = checkpoint.load_weights(name)
        apply_fn = jax.jit(models.make_apply_fn(models.create_model(config)))
        for batch in (int(b) for b in FLAGS.batches):
            x = rng.integers(0, 256, (batch, 32, 32, 3)).astype(np.float32)
            rate = throughput(functools.partial(apply_fn, variables), jax.device_put(x))
            print(f"{name:7s} {batch:6d} {rate:9.0f}", flush=True)


if __name__ == "__main__":
    app.run(main)
