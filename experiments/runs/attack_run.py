"""The one-pixel attack run behind the attack and locality experiments:
DIR/attack.csv + DIR/attack_summary.json, chunk by chunk, resumable.

`run_attack(workdir, model_name=..., weights=..., dataset=..., ...)` attacks the
sampled test images and returns the run in memory (`attack_csv.AttackRun`: the rows,
the SHA-256 of attack.csv's bytes, the summary), so that the locality study goes on
from it without reading the files back. Everything (the arguments, the workdir, the
weights loaded against the model, the data) is checked before anything is written;
DIR is created with the first result. Results are kept chunk by chunk in
DIR/.attack_chunks/ (each chunk written atomically, ending after at most MAX_CHUNK_S
seconds of work, and carrying its settings' hash); a run stopped by Ctrl-C (exit
130), SIGTERM (143), --max_minutes (75) or a failed write (74), each with one line,
or killed, started again with the same arguments, resumes after the last finished
chunk, and the final files equal those of an uninterrupted run (apart from timings
in the summary). One run at a time holds DIR (`runs.lock`); a damaged attack.csv is
rebuilt from the chunks (`integrity`). A run is identified by its settings: the
model, the SHA-256 of its weights and of the test split (`provenance`), and the
attack settings; the same weights under another path resume, other weights, data or
settings are refused in one line naming the difference. With target="all" each
target class gets its own DIR/target_<c>/ run and DIR/attack_summary.json aggregates
them.

The attack's flags are defined here, because both experiments read them
(`flag_groups.ATTACK`); nothing here reads them: each experiment's `main` passes
their values as arguments.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from experiments import common
from experiments.report.progress import say
from experiments.runs import (
    budget,
    chunks,
    integrity,
    lock,
    rundir,
    stopping,
    storage,
)
from propmaps_jax import data, evaluation, models
from propmaps_jax.attack import AttackConfig, ProgressInfo, attack_stream
from propmaps_jax.errors import PropmapsError
from propmaps_jax.progress import format_duration
from propmaps_jax.results import attack_csv, hashing, provenance

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
    "slots",
    None,
    "Images attacked at once (all devices); default by backend: 512 // population "
    "per CPU device (1 at population 400), about 32768 / population per accelerator, "
    "fewer where that would not fit in half the device's memory by the estimate of "
    "propmaps_jax.memory. A value given here is used as is.",
)
flags.DEFINE_integer(
    "chunk_size",
    None,
    "Sampled images per atomically written result chunk; default about 1/20 of "
    "--num_samples (10 to 500).",
)

CSV_NAME, SUMMARY_NAME = attack_csv.CSV_NAME, attack_csv.SUMMARY_NAME
CHUNKS_DIR = chunks.CHUNKS_DIR
# Default chunk: about 1/20 of the run (a progress line and a saved chunk every
# 5%), between 10 and 500 images. Slots carry on across chunk ends, so small chunks
# cost only a host sync and a small file each.
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 10, 500
BEFORE_BATCH = 1000
# A chunk file also ends after this many seconds of work (checked every
# 1/CHUNK_STEPS of a chunk), so that a stop at any moment loses at most a few
# minutes: a default chunk of ResNet-32 on a CPU (50 images) takes ~17 minutes.
MAX_CHUNK_S = 120.0
CHUNK_STEPS = 10
# Seconds per device call while attacking: Ctrl-C is handled between calls.
DEVICE_CALL_S = 1.0
# Summary entries that describe one execution rather than the results.
RUN_SPECIFIC = (
    "wall_time_s",
    "images_per_s",
    "device",
    "slots",
    "chunk_size",
    "chunks_sha256",
)


@dataclasses.dataclass(frozen=True)
class AttackOptions:
    """The settings of an attack run that the attack flags give (both experiments):
    `run_attack`'s keyword arguments besides the model, its weights and the data."""

    num_samples: int
    seed: int
    sample: str
    config: AttackConfig
    target: int | str | None = None
    slots: int | None = None
    chunk_size: int | None = None
    search_dtype: str = "float32"

    def check(self) -> None:
        """The values checked before any data or weights are read."""
        check_run_flags(
            self.num_samples, self.chunk_size, self.slots, self.search_dtype
        )

    def arguments(self) -> dict[str, Any]:
        """As `run_attack`'s keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def attack_options(flag_values) -> AttackOptions:
    """The attack flags' values (defined above), as `main` passes them in."""
    return AttackOptions(
        num_samples=flag_values.num_samples,
        seed=flag_values.seed,
        sample=flag_values.sample,
        config=AttackConfig(
            pixels=flag_values.pixels,
            population=flag_values.population,
            generations=flag_values.generations,
        ),
        target=parse_target(flag_values.target),
        slots=flag_values.slots,
        chunk_size=flag_values.chunk_size,
        search_dtype=flag_values.search_dtype,
    )


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


def _settings(
    provenance_keys: dict[str, str],
    num_samples: int,
    seed: int,
    sample: str,
    config: AttackConfig,
    target: int | str | None,
    search_dtype: str = "float32",
    numerics_keys: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The settings that decide an attack run's results (compared on resume).

    `provenance_keys`: `provenance.describe(...)`: the model's name and the SHA-256
    of its weights and of the test split, so that the same weights under another
    path resume, and other weights or data are refused. The numerics (search
    dtype, `numerics_keys`: default `numerics()`, the precision and x64 in force)
    are entries only where not the default, so that a run resumed under other
    numerics is refused like any other change of settings.
    """
    settings = {
        **{k: provenance_keys[k] for k in provenance.KEYS},
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
    settings.update(numerics() if numerics_keys is None else numerics_keys)
    return settings


# --precision values (jax.default_matmul_precision) that compute in true float32:
# the launcher's default, and no setting at all (in-process calls; on a CPU the
# same numbers, on an accelerator JAX's own default, which the launcher never
# leaves in place).
_DEFAULT_PRECISIONS = (None, "highest", "float32")


def numerics() -> dict[str, Any]:
    """The numerics in force that decide an attack's numbers, as settings entries,
    only where they differ from the defaults every committed run was made with
    (float32 matmuls at --precision=highest, jax_enable_x64 off): `precision`
    (jax.default_matmul_precision, set by --precision) and `jax_enable_x64`.
    Runs made under the defaults keep the settings they were started with."""
    found: dict[str, Any] = {}
    precision = jax.config.jax_default_matmul_precision
    if precision not in _DEFAULT_PRECISIONS:
        found["precision"] = str(precision)
    if jax.config.jax_enable_x64:
        found["jax_enable_x64"] = True
    return found


def _legacy_settings(settings: dict, weights: str | None) -> dict:
    """The settings as runs made before content hashes recorded them: the weights
    by absolute path (None: bundled) and no dataset."""
    legacy = {k: v for k, v in settings.items() if k not in provenance.KEYS[1:]}
    return {
        "model": legacy.pop("model"),
        "weights": os.path.abspath(weights) if weights else None,
        **legacy,
    }


def _count_may_change(settings: Any) -> bool:
    """Whether runs of these settings at other sample counts are the same run:
    settings recorded by content with the first test images sampled (--sample=first).

    Then the first N images are the first N of any larger count, and each image's
    attack depends only on the image and its own key (`fold_in(key(seed), test
    index)`), so a run's results on the images two counts share are the same: a
    run directory can grow (the same command with a larger --num_samples
    continues it) or be read at a smaller count (its first N images). A seeded
    random sample (--sample=random) is another set of images at each count.
    """
    return (
        isinstance(settings, dict)
        and "weights_sha256" in settings
        and settings.get("sample") == "first"
    )


def other_count(stored: Any, settings: dict) -> bool:
    """Whether `stored` are these settings but for the sample count, and runs of
    them may change count (`_count_may_change`)."""
    if not (_count_may_change(stored) and _count_may_change(settings)):
        return False

    def rest(d: dict) -> dict:
        return {k: v for k, v in d.items() if k != "num_samples"}

    return rest(stored) == rest(settings) and stored.get("num_samples") != settings.get(
        "num_samples"
    )


def _settings_hashes(settings: dict, num_test: int) -> frozenset[str]:
    """The settings hashes a chunk of this run may carry: this run's, and where
    the count may change (`_count_may_change`) those of the same run at every
    other sample count."""
    if not _count_may_change(settings):
        return frozenset({hashing.settings_sha256(settings)})
    return frozenset(
        hashing.settings_sha256({**settings, "num_samples": k})
        for k in range(1, num_test + 1)
    )


def _require_same(workdir: str, stored: Any, settings: dict, legacy: dict) -> None:
    """PropmapsError unless `stored` (a run's recorded settings) are these, or
    these at another sample count (`other_count`).

    A run recorded before content hashes existed (a "weights" path, no hashes)
    cannot say which data it used: it is accepted when its path-based settings
    match, as it was before.
    """
    if not isinstance(stored, dict):
        raise PropmapsError(
            f"{workdir} holds an unreadable attack record; use another --workdir or "
            "delete it"
        )
    if "weights_sha256" not in stored and "weights" in stored:
        rundir.require_same_settings(workdir, stored, legacy, "an attack")
    elif not other_count(stored, settings):
        rundir.require_same_settings(workdir, stored, settings, "an attack")


def _finished(workdir: str, summary: dict) -> tuple[attack_csv.AttackRun | None, str]:
    """(the finished run, '') when DIR/attack.csv is the finished result its
    summary records (read once: its rows and the SHA-256 of its bytes), else
    (None, what is wrong with it: missing, edited, truncated, or rows that fail
    the checks)."""
    csv_path = os.path.join(workdir, CSV_NAME)
    try:
        table, sha256 = attack_csv.read_recorded_csv(csv_path, summary)
    except PropmapsError as e:  # the problem alone: the caller says what it does
        return None, e.problem
    return attack_csv.AttackRun(workdir, csv_path, table, summary, sha256), ""


def _check_workdir(
    workdir: str, settings: dict, legacy: dict
) -> tuple[str, attack_csv.AttackRun | None, bool]:
    """(status, run, legacy_ok): ("finished", the finished run, _) / ("resume",
    None, _) / ("new", None, _); error on a clash of settings. legacy_ok: the
    run's settings.json matches, so chunks written before chunks recorded their
    settings hash may be taken.

    A settings.json without any chunk (left by a run that failed or was stopped
    before its first result) holds nothing: the directory counts as new. A
    finished run whose attack.csv is missing, edited or truncated (or whose
    summary is unreadable) is rebuilt from its chunks, else attacked again; one
    line says so.
    """
    summary_path = os.path.join(workdir, SUMMARY_NAME)
    chunks_dir = os.path.join(workdir, CHUNKS_DIR)
    settings_path = os.path.join(chunks_dir, "settings.json")
    has_chunks = bool(chunks.chunk_files(chunks_dir))
    summary = None
    if storage.isfile(summary_path):
        summary = integrity.read_json_record(summary_path)
        if summary is None or not isinstance(summary.get("settings"), dict):
            integrity.note(
                f"{summary_path} is empty or unreadable: recomputing the run's "
                "results" + (" from its chunks" if has_chunks else "")
            )
            summary = None
        else:
            _require_same(workdir, summary["settings"], settings, legacy)
            if other_count(summary["settings"], settings):
                integrity.note(
                    f"{workdir} holds a finished run of "
                    f"{summary['settings']['num_samples']} samples: this run of "
                    f"{settings['num_samples']} "
                    + (
                        "takes its results on the images they share (its chunks "
                        "stay for the other count)"
                        if has_chunks
                        else "attacks every image, as its chunks are gone"
                    )
                )
                summary = None
    legacy_ok = False
    if has_chunks and storage.isfile(settings_path):
        stored = integrity.read_json_record(settings_path)
        _require_same(workdir, stored, settings, legacy)
        legacy_ok = True
    if summary is not None:
        finished, problem = _finished(workdir, summary)
        if finished is not None:
            return "finished", finished, legacy_ok
        integrity.note(
            f"{problem}: "
            + (
                "rebuilding it from the run's chunks"
                if has_chunks
                else "its chunks are gone, so the attack runs again"
            )
        )
        return ("resume" if has_chunks else "new"), None, legacy_ok
    if has_chunks:
        return "resume", None, legacy_ok
    if storage.exists(os.path.join(workdir, CSV_NAME)) and not storage.exists(
        summary_path
    ):
        raise PropmapsError(
            f"{workdir} holds an {CSV_NAME} without its summary; delete it or use "
            "another --workdir"
        )
    return "new", None, legacy_ok


def _open_workdir(
    workdir: str,
    settings: dict,
    legacy: dict,
    indices: np.ndarray,
    num_test: int,
    image_shape: tuple[int, int] | None = None,
) -> tuple[int, list[dict], attack_csv.AttackRun | None]:
    """(resume_from, finished chunks, None), or (-1, [], the run) for a finished run
    (None on the processes other than the first).

    Every chunk is checked before it is believed (`attack_csv.read_chunk`: its
    content hash, or the summary's record of its file, its settings hash, its rows
    by the row rules with pixels inside `image_shape`); one that fails is moved to
    .attack_chunks/damaged/ with one line and its images are attacked again.
    Nothing is written until the first result is (see `_attack_chunks`), apart
    from the hashes added to chunks that predate them and chunks moved aside.
    Process 0 owns the files; the others follow its decision.
    """
    status, resume_from, finished, done_chunks = "new", 0, None, []
    if _is_main_process():
        status, finished, legacy_ok = _check_workdir(workdir, settings, legacy)
        chunks_dir = os.path.join(workdir, CHUNKS_DIR)
        if status != "finished" and storage.isdir(chunks_dir):
            resume_from, done_chunks, kinds = chunks.finished_prefix(
                chunks_dir,
                indices,
                _settings_hashes(settings, num_test),
                legacy_ok,
                _recorded_chunks(workdir),
                settings.get("target"),
                image_shape,
            )
            shash = hashing.settings_sha256(settings)
            chunks.sort_out_chunks(chunks_dir, kinds, shash, done_chunks)
    resume_from = _broadcast(-1 if status == "finished" else resume_from)
    if resume_from < 0:
        return -1, [], finished
    return resume_from, done_chunks, None


def _recorded_chunks(workdir: str) -> dict[str, str]:
    """{chunk file name: SHA-256} as DIR/attack_summary.json records them ({} when
    it has no readable record)."""
    summary = integrity.read_json_record(os.path.join(workdir, SUMMARY_NAME))
    recorded = (summary or {}).get("chunks_sha256")
    return recorded if isinstance(recorded, dict) else {}


def _default_chunk_size(chunk_size: int | None, num_samples: int) -> int:
    if chunk_size is None:
        chunk_size = min(max(num_samples // 20, MIN_CHUNK_SIZE), MAX_CHUNK_SIZE)
    if int(chunk_size) < 1:
        raise PropmapsError(f"--chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def _check_slots(slots: int | None) -> None:
    if slots is not None and int(slots) < 1:
        raise PropmapsError(
            f"--slots must be >= 1 (images attacked at once), got {slots}; leave it "
            "out for the default"
        )


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
    return attack_csv.format_row(row)


def expected_remaining_generations(
    finished_generations: np.ndarray,
    running_generations: np.ndarray,
    not_started: int,
    max_generations: int,
) -> tuple[float, bool]:
    """(expected DE generations still to run, whether that is only an upper bound).

    The estimator behind the attack's ETA. An image's attack runs generations
    0..G_i (G_i + 1 populations evaluated), where G_i is the generation of its
    first success, or max_generations when it fails: failed attacks run them all,
    which is why the images that finish first are mostly successes and a rate
    of finished images is not a rate of time. `finished_generations` holds G_i
    of the images of finished chunks (an unbiased sample: a chunk is finished only
    when all its images are). For an image still running after g generations its
    remaining count is estimated by the mean of (G_i - g) over the finished
    images that outlasted g (G_i > g: they too had not succeeded by g; failures
    are among them) and by its worst case, max_generations - g, when there are
    none; an image not started yet is expected to cost the mean of G_i + 1, or
    max_generations + 1 with no finished images. Without any finished image the
    result is the worst case, an upper bound (second value True).
    """
    g_max = int(max_generations)
    running = np.asarray(running_generations, np.int64)
    done = np.sort(np.asarray(finished_generations, np.int64))
    if done.size == 0:
        worst = float(np.sum(g_max - running)) + not_started * (g_max + 1)
        return worst, True
    # Suffix sums: mean of done[done > g] for every running g at once.
    suffix = np.concatenate([np.cumsum(done[::-1])[::-1], [0]])
    first_above = np.searchsorted(done, running, side="right")
    count = done.size - first_above
    outlasting_mean = np.where(
        count > 0, suffix[first_above] / np.maximum(count, 1), g_max
    )
    per_running = np.clip(outlasting_mean - running, 0, g_max - running)
    per_new = float(np.mean(done)) + 1.0
    return float(per_running.sum()) + not_started * per_new, False


class _AttackProgress:
    """Progress lines of an attack run, each printed once (stderr), at most every
    `every_s` seconds and only when an image finished (or once a minute).

    Shown: images finished (in any order; the count never goes back) and still
    running; the success rate over the images of finished chunks only (every image
    there has its final outcome, whereas the images that finish first are mostly
    successes, so a rate over finished images would start near 100%); and an ETA
    from the evaluations still expected (`expected_remaining_generations`) at the
    evaluation rate measured so far (marked "<=" while it is the worst case).
    Images finished before a resume count as done but not in the rates. The ETA
    assumes a steady evaluation rate; at the very end fewer images run at once
    than there are slots, so the last minutes may go slower than it says.
    `later_work_s`: estimated seconds of the work after this attack in the same job
    (the locality job's later models), added as a whole-job ETA; None: none.
    """

    HEARTBEAT_S = 60.0

    def __init__(
        self,
        total: int,
        queue_start: int,
        done_chunks: list[dict],
        population: int,
        max_generations: int,
        every_s: float = 10.0,
        later_work_s: float | None = None,
    ):
        self.total, self.start = total, queue_start
        self.later_work_s = later_work_s
        self.population, self.max_generations = population, max_generations
        self.every_s = every_s
        self.generations, success = attack_csv.chunk_outcomes(done_chunks)
        self.chunk_images, self.chunk_successes = len(success), int(success.sum())
        self.resumed_successes = self.chunk_successes
        self.done, self.successes = queue_start, self.chunk_successes
        self.running = np.zeros(0, np.int64)  # generations of running images
        self.t0 = time.time()
        # Evaluations done by this execution: the library's count while a chunk
        # runs, the finished chunks' exact count at chunk ends.
        self.evaluations, self.chunk_evaluations = 0, 0
        self.rate_from: tuple[float, int] | None = None  # first (time, evaluations)
        self.evaluations_per_s: float | None = None
        self.last_print, self.last_done = 0.0, -1

    def on_engine(self, info: ProgressInfo) -> None:
        """The library's report while a chunk runs."""
        self.done = max(self.done, self.start + info.finished)
        self.successes = max(self.successes, self.resumed_successes + info.successes)
        self.running = np.asarray(info.running_generations, np.int64)
        self._observe(info.evaluations)

    def on_chunk(self, queue_end: int, result, last: bool) -> None:
        """A chunk finished: its attacked images' outcomes (AttackResult)."""
        self.generations = np.concatenate(
            [self.generations, np.asarray(result.generations, np.int64)]
        )
        self.chunk_images += len(result.success)
        self.chunk_successes += int(np.sum(result.success))
        self.chunk_evaluations += int(np.sum(result.evaluations))
        self.done = max(self.done, queue_end)
        self.successes = max(self.successes, self.chunk_successes)
        self._observe(self.chunk_evaluations, force=last)

    def _observe(self, evaluations: int, force: bool = False) -> None:
        """Update the evaluation rate, then maybe print a line.

        The rate is measured from the first observation on, so that the time to
        compile (before it) does not count; until a second one there is no ETA.
        """
        now = time.time()
        self.evaluations = max(self.evaluations, evaluations)
        if self.rate_from is None:
            self.rate_from = (now, self.evaluations)
        elif now - self.rate_from[0] > 0.5 and self.evaluations > self.rate_from[1]:
            self.evaluations_per_s = (self.evaluations - self.rate_from[1]) / (
                now - self.rate_from[0]
            )
        self._print(now, force)

    def eta_s(self) -> tuple[float, bool]:
        """(seconds still expected, whether only an upper bound)."""
        unfinished = self.total - self.done
        if unfinished <= 0:
            return 0.0, False
        if not self.evaluations_per_s:
            return float("inf"), True
        # The last report's running images, less those finished since.
        running = np.sort(self.running)[::-1][:unfinished]
        remaining, bound = expected_remaining_generations(
            self.generations, running, unfinished - len(running), self.max_generations
        )
        return self.population * remaining / self.evaluations_per_s, bound

    def line(self, now: float) -> str:
        elapsed = max(now - self.t0, 1e-9)
        text = f"{self.done}/{self.total} attacked images finished"
        running = min(len(self.running), self.total - self.done)
        if running:
            text += f" ({running} running)"
        if self.chunk_images:
            text += (
                f"; success {self.chunk_successes / self.chunk_images:.1%} over the "
                f"{self.chunk_images} images of finished chunks"
            )
        else:
            text += (
                f"; successes so far: {self.successes} (a rate after the first chunk)"
            )
        eta, bound = self.eta_s()
        rate = (self.done - self.start) / elapsed
        line = (
            f"{text}; {rate:.2f} images/s, elapsed {format_duration(elapsed)}, "
            f"ETA {'<=' if bound and eta != float('inf') else ''}"
            f"{format_duration(eta)}"
        )
        if self.later_work_s is not None:
            line += (
                f"; whole job ETA {format_duration(eta + self.later_work_s)} (estimate)"
            )
        return line

    def _print(self, now: float, force: bool = False) -> None:
        if not _is_main_process():
            return
        if not force:
            if now - self.last_print < self.every_s:
                return
            if self.done == self.last_done and now - self.last_print < self.HEARTBEAT_S:
                return
        self.last_print, self.last_done = now, self.done
        say(self.line(now))


def _grid(n: int, chunk_size: int, resume_from: int) -> list[int]:
    """The ends at which the engine reports back: every multiple of the chunk size
    and every `chunk_size // CHUNK_STEPS` images, after `resume_from`, and n.

    A chunk file ends at a multiple of the chunk size, or at the first report
    after MAX_CHUNK_S seconds of work (or after the --max_minutes deadline).
    """
    step = max(1, chunk_size // CHUNK_STEPS)
    ends = set(range(step, n, step)) | set(range(chunk_size, n, chunk_size)) | {n}
    return sorted(e for e in ends if e > resume_from)


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
    settings: dict,
    search_apply_fn=None,
    later_work_s: float | None = None,
) -> list[dict]:
    """Attack chunk after chunk from `resume_from`; save each chunk as it finishes.

    A chunk holds `chunk_size` images, or fewer when MAX_CHUNK_S seconds of work
    have passed (so that a stop loses at most a few minutes); results do not
    depend on it (per-image keys), only the file boundaries do. The run's
    settings.json is written just before the first chunk of this execution, so
    that a run that fails before any result leaves nothing behind. Past the
    --max_minutes deadline, `stopping.TimeLimit` is raised after the chunk that
    was being written.
    """
    n = len(before.indices)
    ends = _grid(n, chunk_size, resume_from)
    # The queue holds every attacked image of the run, so that a resumed run has
    # the same program; it starts at the first image after the finished chunks.
    queue = np.flatnonzero(before.attacked)
    queue_ends = [int(np.sum(before.attacked[:e])) for e in ends]
    queue_start = int(np.sum(before.attacked[:resume_from]))
    progress = _AttackProgress(
        len(queue),
        queue_start,
        done_chunks,
        config.population,
        config.generations,
        later_work_s=later_work_s,
    )
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
        # Short device calls: Ctrl-C (handled between calls) stops within about
        # this long, at the cost of one small host sync per call.
        progress_every_s=DEVICE_CALL_S,
        search_apply_fn=search_apply_fn,
    )
    chunks_dir = os.path.join(workdir, CHUNKS_DIR)
    settings_path = os.path.join(chunks_dir, "settings.json")
    shash = hashing.settings_sha256(settings)
    chunk_start, piece_start, tick = resume_from, resume_from, time.time()
    pending: dict[str, Any] = attack_csv.empty_chunk()
    for end, queue_end, result in zip(ends, queue_ends, stream, strict=True):
        pending["rows"] += [
            _row(
                before,
                pos,
                result,
                int(np.searchsorted(queue, pos)) - queue_start
                if before.attacked[pos]
                else None,
                config.pixels,
            )
            for pos in range(piece_start, end)
        ]
        pending["successes"] += int(np.sum(result.success))
        pending["evaluations"] += int(np.sum(result.evaluations))
        pending["search_rejections"] += int(np.sum(result.search_rejections))
        progress.on_chunk(queue_end, result, last=end == n)
        piece_start, queue_start = end, queue_end
        now = time.time()
        late = stopping.past_deadline()
        if not (end == n or end % chunk_size == 0 or now - tick >= MAX_CHUNK_S or late):
            continue
        chunk = {**pending, "seconds": now - tick, "settings_sha256": shash}
        tick, pending = now, attack_csv.empty_chunk()
        if _is_main_process():
            if chunk_start == resume_from:
                rundir.write_json(settings_path, settings)
            chunks.save_chunk(chunks_dir, chunk_start, end, chunk)
        done_chunks.append(
            {**chunk, "_path": chunks.chunk_path(chunks_dir, chunk_start, end)}
        )
        chunk_start = end
        if late and end < n:
            raise stopping.TimeLimit(
                f"{end} of {n} sampled images are done and kept in {workdir}"
            )
    return done_chunks


def _write_results(
    workdir: str, before: _Before, pixels: int, done_chunks: list[dict], summary: dict
) -> attack_csv.AttackRun | None:
    """attack.csv and attack_summary.json from the chunks; the run as written
    (None on the processes other than the first, which write nothing).

    The rows must be exactly one per sampled image, in order: a repeated or
    missing row is never written. The summary records the SHA-256 of attack.csv
    and of each chunk file it was built from; the chunks are kept, so that a
    damaged attack.csv is rebuilt from them by the same command.
    """
    if not _is_main_process():
        return None
    rows = [row for c in done_chunks for row in c["rows"]]
    row_indices = [attack_csv.row_index(row) for row in rows]
    if row_indices != [int(i) for i in before.indices]:
        raise PropmapsError(
            f"{workdir}/{CHUNKS_DIR} does not hold one result per sampled image "
            "(repeated or missing rows); delete it and run again"
        )
    text = attack_csv.csv_text(pixels, rows)
    csv_path = os.path.join(workdir, CSV_NAME)
    # The rows pass the same rules every reader applies, before anything is written.
    table = attack_csv.read_attack_text(
        csv_path,
        text,
        summary["settings"]["target"],
        tuple(before.images.shape[1:3]),
        summary,
    )
    summary["attack_csv_sha256"] = hashing.text_sha256(text)
    summary["settings_sha256"] = hashing.settings_sha256(summary["settings"])
    summary["chunks_sha256"] = {  # of the bytes written or read back
        os.path.basename(c["_path"]): c["_sha256"] for c in done_chunks
    }
    rundir.write_text(csv_path, text)
    rundir.write_json(os.path.join(workdir, SUMMARY_NAME), summary)
    return attack_csv.AttackRun(
        workdir, csv_path, table, summary, summary["attack_csv_sha256"]
    )


def run_attack(workdir: str, **kwargs: Any) -> attack_csv.AttackRun | None:
    """`_run_attack` in the checked `workdir` (`rundir.check_workdir`), holding its
    lock (`runs.lock`): one writer per run directory; a second run on it is
    refused with one line naming the first. Only the first process of a
    multi-host run holds it (and gets the run; the others get None).
    """
    workdir = rundir.check_workdir(workdir)
    with lock.hold(workdir, _is_main_process()):
        return _run_attack(workdir, **kwargs)


def _run_attack(
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
    loaded: tuple | None = None,
    later_work_s: float | None = None,
) -> attack_csv.AttackRun | None:
    """Attack sampled test images; write workdir/attack.csv and attack_summary.json.

    Everything is checked before anything is written (the arguments, the data,
    the weights loaded against the model, the workdir); the workdir and its
    settings record are created only when the first result is written.
    Resumable: a finished run with the same settings returns its summary, an
    unfinished one continues, other settings (model, weights or test data by
    content, attack settings) raise PropmapsError. `target`: None (untargeted), a
    class, or "all" (one run per class in workdir/target_<c>/). `loaded`:
    `common.load_model(model_name, weights)` when already done. `later_work_s`:
    the seconds of work expected after this run in the same job (the progress
    lines' whole-job ETA). Returns the run (`attack_csv.AttackRun`: its rows as
    written or, when finished before, as read once, with their SHA-256 and the
    summary); None on the processes other than the first of a multi-host run.
    """
    target = parse_target(target)
    chunk_size = _default_chunk_size(chunk_size, num_samples)
    _check_slots(slots)
    _check_search_dtype(search_dtype)
    x_test, y_test = dataset.split("test")
    indices = sample_indices(len(x_test), num_samples, seed, sample)
    if loaded is None:
        loaded = common.load_model(model_name, weights)
    common.check_computes(loaded, x_test, model_name, weights)
    # A user-given batch that cannot fit is refused before anything is compiled.
    budget.check_batch(
        loaded[1], loaded[2], slots, config.population, pixels=config.pixels
    )
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
            loaded=loaded,
            later_work_s=later_work_s,
        )
    settings = _settings(
        provenance.describe(model_name, weights, x_test, y_test),
        num_samples,
        seed,
        sample,
        config,
        target,
        search_dtype,
    )
    legacy = _legacy_settings(settings, weights)
    resume_from, done_chunks, finished = _open_workdir(
        workdir, settings, legacy, indices, len(x_test), tuple(x_test.shape[1:3])
    )
    if resume_from < 0:
        logging.info("%s: finished run with the same settings, nothing to do", workdir)
        return finished

    start_time = time.time()
    model_config, module, variables, metadata = loaded
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
        settings=settings,
        search_apply_fn=_search_apply_fn(model_config, search_dtype),
        later_work_s=later_work_s,
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
        weights=weights,
        wall_time=sum(c["seconds"] for c in done_chunks),
        slots=slots,
        chunk_size=chunk_size,
    )
    logging.info("attack finished in %.1f s", time.time() - start_time)
    return _write_results(workdir, before, config.pixels, done_chunks, summary)


def check_run_flags(
    num_samples: int, chunk_size: int | None, slots: int | None, search_dtype: str
) -> None:
    """The attack's own flags, checked before any data or weights are read."""
    if num_samples < 1:
        raise PropmapsError(f"--num_samples must be >= 1, got {num_samples}")
    _default_chunk_size(chunk_size, num_samples)
    _check_slots(slots)
    _check_search_dtype(search_dtype)


def _check_search_dtype(search_dtype: str) -> None:
    if search_dtype not in ("float32", "bfloat16"):
        raise PropmapsError(
            f"--search_dtype must be float32 or bfloat16, got {search_dtype!r}"
        )


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
    pred, prob_true = evaluation.predict_labels(
        apply_fn, variables, images, labels, BEFORE_BATCH
    )
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
    weights: str | None,
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
            # Where the weights were read from, for the reader; runs are compared
            # by the weights' hash in the settings, never by this path.
            "weights": os.path.abspath(weights) if weights else "bundled checkpoint",
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


def _run_all_targets(workdir: str, **kwargs: Any) -> attack_csv.AttackRun | None:
    """Targeted attacks at every class, one sub-run each, and an aggregate summary
    (the run's, without rows of its own)."""
    runs = {
        target: run_attack(
            os.path.join(workdir, f"target_{target}"), target=target, **kwargs
        )
        for target in range(10)
    }
    if not _is_main_process():
        return None
    per_target = {target: run.summary for target, run in runs.items()}
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
    rundir.write_json(os.path.join(workdir, SUMMARY_NAME), summary)
    return attack_csv.AttackRun(
        workdir, os.path.join(workdir, CSV_NAME), None, summary, None
    )
