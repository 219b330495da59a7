"""The one-pixel attack on CIFAR-10 test images: attack.csv + attack_summary.json.

python launch.py --experiment=attack --model=resnet --weights=PATH \
    --num_samples=5000 --seed=0 --workdir=DIR [--pixels=1 --population=400
    --generations=100 --target=none|CLASS|all --sample=first|random]

Results are kept chunk by chunk in DIR/.attack_chunks/ (each chunk written
atomically); a killed run started again with the same flags resumes after the
last finished chunk, and the final files equal those of an uninterrupted run
(apart from timings in the summary). With --target=all each target class gets its
own DIR/target_<c>/ run and DIR/attack_summary.json aggregates them.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import re
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from experiments import common, results, rundir
from propmaps_jax import data, models
from propmaps_jax.attack import AttackConfig, attack_stream
from propmaps_jax.errors import PropmapsError

flags.DEFINE_integer("num_samples", 5000, "Number of CIFAR-10 test images sampled.")
flags.DEFINE_integer("pixels", 1, "Pixels changed per image (k).")
flags.DEFINE_integer("population", 400, "DE population size.")
flags.DEFINE_integer("generations", 100, "Maximum number of DE generations.")
flags.DEFINE_string(
    "target",
    "none",
    "none: untargeted; CLASS (0..9): targeted at that class; all: every other class.",
)
flags.DEFINE_enum("sample", "first", ["first", "random"], "Which test images.")
flags.DEFINE_enum(
    "search_dtype",
    "float32",
    ["float32", "bfloat16"],
    "Compute dtype of the model in the DE search. bfloat16: faster on accelerators; "
    "every reported result still comes from a float32 forward, and a bfloat16 "
    "success that float32 rejects is counted (search_rejections) while the search "
    "goes on.",
)
flags.DEFINE_integer(
    "slots", None, "Images attacked at once (all devices); default ~32768/population."
)
flags.DEFINE_integer(
    "chunk_size",
    None,
    "Sampled images per atomically written result chunk; default about 1/20 of "
    "--num_samples (10 to 500).",
)
FLAGS = flags.FLAGS

CSV_NAME = "attack.csv"
SUMMARY_NAME = "attack_summary.json"
CHUNKS_DIR = ".attack_chunks"
# Default chunk: about 1/20 of the run (a progress line and a saved chunk every
# 5%), between 10 and 500 images. Slots carry on across chunk ends, so small chunks
# cost only a host sync and a small file each.
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 10, 500
BEFORE_BATCH = 1000
# Summary entries that describe one execution rather than the results.
RUN_SPECIFIC = ("wall_time_s", "images_per_s", "device", "slots", "chunk_size")


def sample_indices(
    num_test: int, num_samples: int, seed: int, sample: str
) -> np.ndarray:
    """Test-set indices: the first `num_samples`, or a seeded random sorted set."""
    if num_samples < 1:
        raise PropmapsError(f"--num_samples must be >= 1, got {num_samples}")
    if num_samples > num_test:
        raise PropmapsError(
            f"--num_samples={num_samples} exceeds the {num_test} test images"
        )
    if sample == "first":
        return np.arange(num_samples, dtype=np.int64)
    if sample == "random":
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(num_test, num_samples, replace=False)).astype(
            np.int64
        )
    raise PropmapsError(f"--sample must be 'first' or 'random', got {sample!r}")


def parse_target(value: str | int | None, num_classes: int = 10) -> int | str | None:
    """--target as None (untargeted), a class index, or "all"."""
    if value is None or value == "none":
        return None
    if value == "all":
        return "all"
    try:
        target = int(value)
    except (TypeError, ValueError):
        raise PropmapsError(
            f"--target must be none, all or a class in 0..{num_classes - 1}, "
            f"got {value!r}"
        ) from None
    if not 0 <= target < num_classes:
        raise PropmapsError(
            f"--target must be a class in 0..{num_classes - 1}, got {target}"
        )
    return target


def _is_main_process() -> bool:
    return jax.process_index() == 0


def _broadcast(value: int) -> int:
    """Process 0's value on every process (a no-op with one process)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _format_row(values: list[Any]) -> str:
    return ",".join(f"{v:.9g}" if isinstance(v, float) else str(v) for v in values)


@functools.cache
def _before_program(apply_fn):
    """Jitted (prediction, p(label)) of a model, cached on apply_fn (not weights)."""

    def forward(variables, images, labels):
        logits = apply_fn(variables, images)
        probs = jax.nn.softmax(logits, -1)
        return jnp.argmax(logits, -1), jnp.take_along_axis(probs, labels[:, None], -1)

    return jax.jit(forward)


def predict_before(apply_fn, variables, images: np.ndarray, labels: np.ndarray):
    """(prediction, p(label)) of each image before the attack, in batches."""
    forward = _before_program(apply_fn)
    preds, probs = [], []
    for i in range(0, len(images), BEFORE_BATCH):
        batch = slice(i, i + BEFORE_BATCH)
        pred, prob = forward(variables, images[batch], labels[batch])
        preds.append(np.asarray(pred))
        probs.append(np.asarray(prob)[:, 0])
    return (
        np.concatenate(preds).astype(np.int64),
        np.concatenate(probs).astype(np.float32),
    )


def _chunk_path(chunks_dir: str, start: int, end: int) -> str:
    return os.path.join(chunks_dir, f"chunk_{start:07d}_{end:07d}.json")


def _finished_prefix(chunks_dir: str) -> tuple[int, list[dict]]:
    """End of the contiguous run of finished chunks from 0, and those chunks."""
    found = {}
    for path in glob.glob(os.path.join(chunks_dir, "chunk_*_*.json")):
        match = re.fullmatch(r"chunk_(\d+)_(\d+)\.json", os.path.basename(path))
        if match:
            found[int(match.group(1))] = (int(match.group(2)), path)
    end, chunks = 0, []
    while end in found:
        next_end, path = found[end]
        with open(path) as f:
            chunks.append(json.load(f))
        end = next_end
    return end, chunks


def _save_chunk(chunks_dir: str, start: int, end: int, chunk: dict) -> None:
    """Atomically write one finished chunk of rows."""
    rundir.write_json(_chunk_path(chunks_dir, start, end), chunk)


def _settings(
    model_name: str,
    weights: str | None,
    num_samples: int,
    seed: int,
    sample: str,
    config: AttackConfig,
    target: int | str | None,
    search_dtype: str = "float32",
) -> dict[str, Any]:
    settings = {
        "model": model_name,
        "weights": os.path.abspath(weights) if weights else None,
        "num_samples": int(num_samples),
        "seed": int(seed),
        "sample": sample,
        "target": target,
        **config.to_dict(),
    }
    # Only when not the default: float32 runs keep the settings they were started
    # with, so that runs begun before this setting existed still resume.
    if search_dtype != "float32":
        settings["search_dtype"] = search_dtype
    return settings


def _check_workdir(workdir: str, settings: dict) -> tuple[str, dict | None]:
    """("finished", summary) / ("resume", None) / ("new", None); error on a clash."""
    summary_path = os.path.join(workdir, SUMMARY_NAME)
    settings_path = os.path.join(workdir, CHUNKS_DIR, "settings.json")
    for path in (summary_path, settings_path):
        if not os.path.isfile(path):
            continue
        stored = rundir.read_json(path)
        stored = stored.get("settings", stored) if path == summary_path else stored
        rundir.require_same_settings(workdir, stored, settings, "an attack")
    if os.path.isfile(summary_path) and os.path.isfile(os.path.join(workdir, CSV_NAME)):
        return "finished", rundir.read_json(summary_path)
    if os.path.isfile(settings_path):
        return "resume", None
    if os.path.exists(os.path.join(workdir, CSV_NAME)):
        raise PropmapsError(
            f"{workdir} holds an {CSV_NAME} without its summary; delete it or use "
            "another --workdir"
        )
    return "new", None


def _open_workdir(workdir: str, settings: dict) -> tuple[int, list[dict], dict | None]:
    """(resume_from, finished chunks, None), or (-1, [], summary) for a finished run.

    Process 0 owns the files; the others follow its decision.
    """
    status, resume_from, finished_summary, done_chunks = "new", 0, None, []
    if _is_main_process():
        os.makedirs(workdir, exist_ok=True)
        status, finished_summary = _check_workdir(workdir, settings)
        if status == "resume":
            resume_from, done_chunks = _finished_prefix(
                os.path.join(workdir, CHUNKS_DIR)
            )
        elif status == "new":
            rundir.write_json(
                os.path.join(workdir, CHUNKS_DIR, "settings.json"), settings
            )
    resume_from = _broadcast(-1 if status == "finished" else resume_from)
    if resume_from < 0:
        return -1, [], finished_summary or {"settings": settings}
    return resume_from, done_chunks, None


def _default_chunk_size(chunk_size: int | None, num_samples: int) -> int:
    if chunk_size is None:
        chunk_size = min(max(num_samples // 20, MIN_CHUNK_SIZE), MAX_CHUNK_SIZE)
    if int(chunk_size) < 1:
        raise PropmapsError(f"--chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


@dataclasses.dataclass
class _Before:
    """The sampled images and the model's verdict on them before the attack."""

    images: np.ndarray
    indices: np.ndarray
    labels: np.ndarray
    pred: np.ndarray
    prob_true: np.ndarray
    attacked: np.ndarray  # correctly classified (and not of the target class)


def _row(before: _Before, pos: int, result, j: int | None, pixels: int) -> str:
    """The attack.csv row of sampled image `pos` (result row j, None: not attacked)."""
    row = [
        int(before.indices[pos]),
        int(before.labels[pos]),
        int(before.pred[pos]),
        float(before.prob_true[pos]),
    ]
    if j is not None:
        row += [
            1,
            int(result.success[j]),
            int(result.pred_after[j]),
            float(result.prob_true_after[j]),
            int(result.generations[j]),
            int(result.evaluations[j]),
        ]
        row += [int(v) for v in result.pixels[j].reshape(-1)]
    else:
        # Not attacked: the image is unchanged, so "after" equals "before".
        row += [0, 0, int(before.pred[pos]), float(before.prob_true[pos]), 0, 0]
        row += [-1] * (5 * pixels)
    return _format_row(row)


class _AttackProgress:
    """Progress of attacked images: finished in any order (from the engine while a
    chunk runs) or the prefix of finished chunks, whichever is further, so that the
    count never goes back. Only correctly classified images count (the others take
    no time)."""

    def __init__(self, total: int, queue_start: int, successes: int):
        self.progress = common.Progress(total, "attacked images", initial=queue_start)
        self.start, self.resumed_successes = queue_start, successes
        self.done, self.successes = queue_start, successes

    def on_engine(self, info) -> None:
        self.done = self.start + info.finished
        self.successes = self.resumed_successes + info.successes
        if _is_main_process():
            self.progress.update(self.done, self.successes)

    def on_chunk(self, queue_end: int, successes: int, last: bool) -> None:
        if queue_end >= self.done:
            self.done, self.successes = queue_end, successes
        if _is_main_process():
            self.progress.update(self.done, self.successes, force=last)


def _attack_chunks(
    workdir: str,
    apply_fn,
    variables,
    before: _Before,
    *,
    seed: int,
    config: AttackConfig,
    target: int | None,
    slots: int | None,
    chunk_size: int,
    resume_from: int,
    done_chunks: list[dict],
    num_classes: int,
    search_apply_fn=None,
) -> list[dict]:
    """Attack chunk after chunk from `resume_from`; save each chunk as it finishes."""
    n = len(before.indices)
    ends = list(range(chunk_size, n, chunk_size)) + [n]
    ends = [e for e in ends if e > resume_from]
    # The queue holds every attacked image of the run, so that a resumed run has
    # the same program; it starts at the first image after the finished chunks.
    queue = np.flatnonzero(before.attacked)
    queue_ends = [int(np.sum(before.attacked[:e])) for e in ends]
    queue_start = int(np.sum(before.attacked[:resume_from]))
    successes = sum(c["successes"] for c in done_chunks)
    progress = _AttackProgress(len(queue), queue_start, successes)
    stream = attack_stream(
        apply_fn,
        variables,
        before.images[queue],
        before.labels[queue],
        before.indices[queue],
        jax.random.key(seed),
        config,
        targets=None if target is None else np.full(len(queue), target),
        slots=slots,
        chunk_ends=queue_ends,
        start=queue_start,
        capacity=n,  # one program for resumes and for every target class
        num_classes=num_classes,
        # Every process takes the same path (its device calls are collective).
        on_progress=progress.on_engine,
        search_apply_fn=search_apply_fn,
    )
    chunk_start, tick = resume_from, time.time()
    for end, queue_end, result in zip(ends, queue_ends, stream, strict=True):
        rows = [
            _row(
                before,
                pos,
                result,
                int(np.searchsorted(queue, pos)) - queue_start
                if before.attacked[pos]
                else None,
                config.pixels,
            )
            for pos in range(chunk_start, end)
        ]
        now = time.time()
        chunk = {
            "rows": rows,
            "successes": int(np.sum(result.success)),
            "evaluations": int(np.sum(result.evaluations)),
            "search_rejections": int(np.sum(result.search_rejections)),
            "seconds": now - tick,
        }
        tick = now
        if _is_main_process():
            _save_chunk(os.path.join(workdir, CHUNKS_DIR), chunk_start, end, chunk)
        done_chunks.append(chunk)
        successes += chunk["successes"]
        progress.on_chunk(queue_end, successes, last=end == n)
        chunk_start, queue_start = end, queue_end
    return done_chunks


def _write_results(
    workdir: str, pixels: int, done_chunks: list[dict], summary: dict
) -> None:
    """attack.csv and attack_summary.json from the chunks; the chunks are removed."""
    if not _is_main_process():
        return
    header = ",".join(results.attack_columns(pixels))
    lines = [header] + [row for c in done_chunks for row in c["rows"]]
    rundir.write_text(os.path.join(workdir, CSV_NAME), "\n".join(lines) + "\n")
    rundir.write_json(os.path.join(workdir, SUMMARY_NAME), summary)
    shutil.rmtree(os.path.join(workdir, CHUNKS_DIR), ignore_errors=True)


def run_attack(
    workdir: str,
    *,
    model_name: str,
    weights: str | None,
    dataset: data.Cifar10,
    num_samples: int,
    seed: int,
    sample: str,
    config: AttackConfig,
    target: int | str | None = None,
    slots: int | None = None,
    chunk_size: int | None = None,
    search_dtype: str = "float32",
) -> dict:
    """Attack sampled test images; write workdir/attack.csv and attack_summary.json.

    Resumable: a finished run with the same settings returns its summary, an
    unfinished one continues, other settings raise PropmapsError. `target`: None
    (untargeted), a class, or "all" (one run per class in workdir/target_<c>/).
    Returns the summary dict.
    """
    target = parse_target(target)
    if target == "all":
        return _run_all_targets(
            workdir,
            model_name=model_name,
            weights=weights,
            dataset=dataset,
            num_samples=num_samples,
            seed=seed,
            sample=sample,
            config=config,
            slots=slots,
            chunk_size=chunk_size,
            search_dtype=search_dtype,
        )
    chunk_size = _default_chunk_size(chunk_size, num_samples)
    x_test, y_test = dataset.split("test")
    indices = sample_indices(len(x_test), num_samples, seed, sample)
    settings = _settings(
        model_name, weights, num_samples, seed, sample, config, target, search_dtype
    )
    resume_from, done_chunks, finished = _open_workdir(workdir, settings)
    if finished is not None:
        logging.info("%s: finished run with the same settings, nothing to do", workdir)
        return finished

    start_time = time.time()
    model_config, module, variables, metadata = common.load_model(model_name, weights)
    apply_fn = models.make_apply_fn(module)
    before = _predict_sample(apply_fn, variables, x_test, y_test, indices, target)
    done_chunks = _attack_chunks(
        workdir,
        apply_fn,
        variables,
        before,
        seed=seed,
        config=config,
        target=target,
        slots=slots,
        chunk_size=chunk_size,
        resume_from=resume_from,
        done_chunks=done_chunks,
        num_classes=model_config.num_classes,
        search_apply_fn=_search_apply_fn(model_config, search_dtype),
    )
    summary = _summary(
        settings,
        model_config,
        metadata,
        dataset,
        before.labels,
        before.pred,
        before.attacked,
        done_chunks,
        target,
        wall_time=sum(c["seconds"] for c in done_chunks),
        slots=slots,
        chunk_size=chunk_size,
    )
    logging.info("attack finished in %.1f s", time.time() - start_time)
    _write_results(workdir, config.pixels, done_chunks, summary)
    return summary


def _search_apply_fn(model_config: models.ModelConfig, search_dtype: str):
    """The search's forward: None (the model itself) or the module in bfloat16."""
    if search_dtype == "float32":
        return None
    if search_dtype != "bfloat16":
        raise PropmapsError(
            f"--search_dtype must be float32 or bfloat16, got {search_dtype!r}"
        )
    return models.make_apply_fn(models.create_model(model_config, dtype=jnp.bfloat16))


def _predict_sample(apply_fn, variables, x_test, y_test, indices, target) -> _Before:
    """The sampled images, their labels and the model's verdict before the attack."""
    images = np.asarray(x_test[indices])
    labels = np.asarray(y_test[indices]).astype(np.int64)
    pred, prob_true = predict_before(apply_fn, variables, images, labels)
    attacked = pred == labels
    if target is not None:
        attacked &= labels != target
    return _Before(images, indices, labels, pred, prob_true, attacked)


def _summary(
    settings: dict,
    model_config: models.ModelConfig,
    metadata: dict,
    dataset: data.Cifar10,
    labels: np.ndarray,
    pred_before: np.ndarray,
    attacked: np.ndarray,
    chunks: list[dict],
    target: int | None,
    *,
    wall_time: float,
    slots: int | None,
    chunk_size: int,
) -> dict[str, Any]:
    n = len(labels)
    correct = int(np.sum(pred_before == labels))
    num_attacked = int(np.sum(attacked))
    successes = sum(c["successes"] for c in chunks)
    evaluations = sum(c["evaluations"] for c in chunks)
    # Chunks written before the search dtype existed have no rejections.
    rejections = sum(c.get("search_rejections", 0) for c in chunks)
    return {
        "settings": settings,
        "model": {
            "name": model_config.name,
            "weights": settings["weights"] or "bundled checkpoint",
            "metadata": json.loads(json.dumps(metadata, default=str)),
        },
        "dataset": dataset.source,
        "num_samples": n,
        "correct_before": correct,
        "accuracy_before": correct / n,
        "attacked": num_attacked,
        "not_attacked_misclassified": n - correct,
        "not_attacked_target_class": (
            0
            if target is None
            else int(np.sum((pred_before == labels) & (labels == target)))
        ),
        "successes": successes,
        "success_rate_attacked": successes / num_attacked if num_attacked else 0.0,
        "success_rate_all": successes / n,
        "evaluations": evaluations,
        "search_dtype": settings.get("search_dtype", "float32"),
        "search_rejections": rejections,
        "wall_time_s": wall_time,
        "images_per_s": num_attacked / wall_time if wall_time > 0 else None,
        "device": common.device_description(),
        "slots": slots,
        "chunk_size": chunk_size,
    }


def _run_all_targets(workdir: str, **kwargs: Any) -> dict:
    """Targeted attacks at every class, one sub-run each, and an aggregate summary."""
    per_target = {}
    for target in range(10):
        per_target[target] = run_attack(
            os.path.join(workdir, f"target_{target}"), target=target, **kwargs
        )
    attacked = sum(s["attacked"] for s in per_target.values())
    successes = sum(s["successes"] for s in per_target.values())
    first = per_target[0]
    summary = {
        "settings": {**first["settings"], "target": "all"},
        "model": first["model"],
        "dataset": first["dataset"],
        "num_samples": first["num_samples"],
        "correct_before": first["correct_before"],
        "accuracy_before": first["accuracy_before"],
        "attacked": attacked,
        "successes": successes,
        "success_rate_attacked": successes / attacked if attacked else 0.0,
        "success_rate_all": successes / (9 * first["num_samples"]),
        "per_target": {
            str(t): {
                k: s[k] for k in ("attacked", "successes", "success_rate_attacked")
            }
            for t, s in per_target.items()
        },
        "wall_time_s": sum(s["wall_time_s"] for s in per_target.values()),
        "device": common.device_description(),
    }
    if _is_main_process():
        rundir.write_json(os.path.join(workdir, SUMMARY_NAME), summary)
    return summary


def main(argv: list[str]) -> None:
    """Run the attack experiment from flags."""
    del argv
    if FLAGS.distributed:
        common.initialize_distributed()
    config = AttackConfig(
        pixels=FLAGS.pixels, population=FLAGS.population, generations=FLAGS.generations
    )
    target = parse_target(FLAGS.target)
    workdir = common.require_workdir()
    dataset = common.load_data()
    summary = run_attack(
        workdir,
        model_name=FLAGS.model,
        weights=FLAGS.weights,
        dataset=dataset,
        num_samples=FLAGS.num_samples,
        seed=FLAGS.seed,
        sample=FLAGS.sample,
        config=config,
        target=target,
        slots=FLAGS.slots,
        chunk_size=FLAGS.chunk_size,
        search_dtype=FLAGS.search_dtype,
    )
    logging.info(
        "success rate %.2f%% of %d attacked images (%.2f%% of all %d samples)",
        100 * summary.get("success_rate_attacked", 0.0),
        summary.get("attacked", 0),
        100 * summary.get("success_rate_all", 0.0),
        summary.get("num_samples", 0),
    )
