"""The models' batched forward throughput by batch size: where is the knee?

python benchmarks/forward_bench.py [--models=lenet,resnet]
    [--batches=100,200,400,800,1600,3200] [--seconds=3]

Images per second of a plain jitted forward (bundled weights, random images) at
each batch size, best of three timed rounds of about `--seconds` each, compilation
excluded. The attack's default slot count aims at the knee on a CPU
(`attack.DEFAULT_BATCH_PER_CPU`) and at a large batch on an accelerator. With
PyTorch installed (the optional benchmark dependency of peer_bench.py), the same
weights' PyTorch forward is timed beside it (same batches, same process).
"""

import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from propmaps_jax import models  # noqa: E402
from propmaps_jax.models import checkpoint

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


def torch_forward(name, config, variables):
    """The PyTorch copy's forward of NHWC 0..255 images, or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    from benchmarks import torch_models

    net = torch_models.to_torch(config, variables)

    def forward(x):
        with torch.no_grad():
            return net(torch.from_numpy(x.transpose(0, 3, 1, 2) / 255.0).contiguous())

    class Done:  # torch runs synchronously on the CPU
        def __init__(self, out):
            self.out = out

        def block_until_ready(self):
            return self.out

    return lambda x: Done(forward(x))


def main(argv: list[str]) -> None:
    del argv
    device = jax.devices()[0]
    print(f"jax {jax.__version__}, {device.platform} ({device.device_kind})")
    rng = np.random.default_rng(0)
    rows = []
    for name in FLAGS.models:
        config, variables, _ = checkpoint.load_weights(name)
        apply_fn = jax.jit(models.make_apply_fn(models.create_model(config)))
        torch_fn = torch_forward(name, config, variables)
        for batch in (int(b) for b in FLAGS.batches):
            x = rng.integers(0, 256, (batch, 32, 32, 3)).astype(np.float32)
            rate = throughput(functools.partial(apply_fn, variables), jax.device_put(x))
            peer = None if torch_fn is None else throughput(torch_fn, x)
            rows.append((name, batch, rate, peer))
            print(name, batch, f"{rate:.0f}", "" if peer is None else f"{peer:.0f}")
    print(
        f"\n{'model':7s} {'batch':>6s} {'JAX img/s':>10s} {'PyTorch':>8s} {'ratio':>6s}"
    )
    for name, batch, rate, peer in rows:
        tail = "" if peer is None else f"{peer:8.0f} {rate / peer:6.2f}"
        print(f"{name:7s} {batch:6d} {rate:10.0f} {tail}")


if __name__ == "__main__":
    app.run(main)
