"""Side by side with torchattacks' OnePixel: same architecture, weights, images.

python benchmarks/peer_bench.py [--models=lenet,resnet] [--num_images=100]
    [--num_images_resnet=N] [--population=400] [--generations=100]
    [--weights=model=PATH,...] [--cifar10_path=DIR] [--inf_batch=400]

Needs the optional benchmark dependencies (not runtime ones):
    pip install torch==2.13.0 scipy tqdm requests
    pip install --no-deps torchattacks==3.5.1

For each model: the Flax weights (bundled, or --weights) are copied into an
equivalent PyTorch module and the two forwards are checked to agree (logits within
1e-4 on 64 test images; the run stops otherwise). Then, in one process, one after
the other: torchattacks' `OnePixel` (one image at a time, its own differential
evolution, `popsize` = population since it is divided by the 5 numbers of a
candidate, `steps` = generations, `inf_batch` evaluations per forward) and this
project's `attack.attack` at the paper's settings, on the same first N test images
that the model classifies correctly. Printed per attack: wall seconds (ours with
its compilation, as a user sees it), useful evaluations (images forwarded while
searching), evaluations per second, and the number of images fooled (checked by
a forward of the returned image for torchattacks, by the attack's own report for
ours).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import torch_models  # noqa: E402
from propmaps_jax import attack, data, models  # noqa: E402
from propmaps_jax.models import checkpoint

flags.DEFINE_list("models", ["lenet", "resnet"], "Models: lenet, resnet.")
flags.DEFINE_integer("num_images", 100, "First N test images (correct ones attacked).")
flags.DEFINE_integer("num_images_resnet", None, "N for ResNet-32 (default num_images).")
flags.DEFINE_integer("population", 400, "DE population size (both attacks).")
flags.DEFINE_integer("generations", 100, "Maximum DE generations (both attacks).")
flags.DEFINE_list("weights", [], "model=PATH pairs (default: the bundled weights).")
flags.DEFINE_string("cifar10_path", None, "CIFAR-10 (default $CIFAR10_PATH).")
flags.DEFINE_integer("inf_batch", 400, "torchattacks: evaluations per forward.")
flags.DEFINE_integer("seed", 0, "Seed of both attacks.")
flags.DEFINE_bool("receptive", True, "Ours: the receptive-field candidate forward.")
FLAGS = flags.FLAGS


def run_peer(net, images, labels) -> dict:
    import torch
    import torchattacks

    forwarded = [0]  # images the model forwards: torchattacks' evaluations

    def count(_module, args):
        forwarded[0] += args[0].shape[0]

    hook = net.register_forward_pre_hook(count)
    atk = torchattacks.OnePixel(
        net,
        pixels=1,
        steps=FLAGS.generations,
        popsize=FLAGS.population,
        inf_batch=FLAGS.inf_batch,
    )
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    np.random.seed(FLAGS.seed)
    tick = time.perf_counter()
    adv = atk(x, y)
    seconds = time.perf_counter() - tick
    hook.remove()
    with torch.no_grad():
        fooled = int((net(adv).argmax(1) != y).sum())
    return {"seconds": seconds, "evaluations": forwarded[0], "fooled": fooled}


def run_ours(name, config, variables, images, labels, indices) -> dict:
    module = models.create_model(config)
    apply_fn = models.make_apply_fn(module)
    candidate_forward = None
    if FLAGS.receptive:
        from propmaps_jax.models import receptive

        candidate_forward = receptive.make_candidate_forward(module, 1)
    cfg = attack.AttackConfig(
        pixels=1, population=FLAGS.population, generations=FLAGS.generations
    )
    key = jax.random.key(FLAGS.seed)

    tick = time.perf_counter()
    result = attack.attack(
        apply_fn,
        variables,
        images,
        labels,
        indices,
        key,
        cfg,
        candidate_forward=candidate_forward,
    )
    return {
        "seconds": time.perf_counter() - tick,
        "evaluations": int(result.evaluations.sum()),
        "fooled": int(result.success.sum()),
        "forward": "receptive" if candidate_forward is not None else "full",
    }


def check_agreement(name, config, variables, net, images) -> float:
    import torch

    module = models.create_model(config)
    ours = np.asarray(jax.jit(module.apply)(variables, images.astype(np.float32)))
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    with torch.no_grad():
        theirs = net(x).numpy()
    diff = float(np.abs(ours - theirs).max())
    if diff > 1e-4:
        sys.exit(f"error: {name}: PyTorch copy's logits differ by {diff:.2e} > 1e-4")
    return diff


def main(argv: list[str]) -> None:
    del argv
    import torch
    import torchattacks

    path = FLAGS.cifar10_path or os.environ.get("CIFAR10_PATH")
    dataset = data.load_cifar10(path)
    weights = dict(item.split("=", 1) for item in FLAGS.weights)
    print(
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), torchattacks {torchattacks.__version__}"
        f", {os.cpu_count()} CPUs; population {FLAGS.population}, generations "
        f"{FLAGS.generations}, torchattacks inf_batch {FLAGS.inf_batch}"
    )
    header = (
        f"{'model':7s} {'images':>6s} {'attacked':>8s} {'who':12s} {'seconds':>8s} "
        f"{'evals':>10s} {'evals/s':>8s} {'fooled':>6s}"
    )
    rows = []
    for name in FLAGS.models:
        count = FLAGS.num_images
        if name == "resnet" and FLAGS.num_images_resnet:
            count = FLAGS.num_images_resnet
        config, variables, _ = checkpoint.load_weights(name, weights.get(name))
        net = torch_models.to_torch(config, variables)
        diff = check_agreement(name, config, variables, net, dataset.x_test[:64])
        x, y = dataset.x_test[:count], dataset.y_test[:count]
        module = models.create_model(config)
        pred = np.asarray(jax.jit(module.apply)(variables, x.astype(np.float32)))
        keep = np.flatnonzero(pred.argmax(-1) == y)
        images, labels = x[keep], y[keep].astype(np.int32)
        print(f"{name}: logits agree within {diff:.1e}; attacking {len(keep)}/{count}")
        peer = run_peer(net, images, labels)
        ours = run_ours(name, config, variables, images, labels, keep)
        for who, r in (("torchattacks", peer), (f"ours-{ours['forward']}", ours)):
            rows.append(
                f"{name:7s} {count:6d} {len(keep):8d} {who:12s} {r['seconds']:8.1f} "
                f"{r['evaluations']:10d} {r['evaluations'] / r['seconds']:8.0f} "
                f"{r['fooled']:6d}"
            )
        print(header, *rows[-2:], sep="\n", flush=True)
        speedup = peer["seconds"] / ours["seconds"]
        print(f"{name}: ours is {speedup:.2f}x torchattacks (compilation included)")
    print("\n" + header, *rows, sep="\n")


if __name__ == "__main__":
    app.run(main)
