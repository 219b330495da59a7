"""experiments/attack.py: attack.csv, summary, resume, settings clashes, flags."""

import json
import os
import re
import shutil
import time

import jax
import numpy as np
import pytest
from conftest import launch

from experiments.runs import attack_run, rundir
from experiments.runs import chunks as chunk_store
from propmaps_jax import data, models
from propmaps_jax.attack import AttackConfig, AttackResult, ProgressInfo
from propmaps_jax.errors import PropmapsError
from propmaps_jax.results import attack_csv as results
from propmaps_jax.results import hashing, provenance
from tests._fixtures import interrupted_run, save_lenet_tiny, tiny_attack_setup

CONFIG = AttackConfig(pixels=1, population=8, generations=3)
NUM_SAMPLES = 10
MISLABELED = (1, 6, 7)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny LeNet checkpoint and a fake CIFAR-10 whose test labels are the model's
    predictions except for three mislabeled (misclassified) images."""
    folder = tmp_path_factory.mktemp("attack_run")
    kwargs, (module, variables, x_test, y_test, _) = tiny_attack_setup(
        folder, MISLABELED, CONFIG, NUM_SAMPLES
    )
    return folder, kwargs, (module, variables, x_test, y_test)


@pytest.fixture(scope="module")
def finished(setup):
    folder, kwargs, _ = setup
    workdir = str(folder / "uninterrupted")
    summary = attack_run.run_attack(workdir, **kwargs).summary
    return workdir, summary


def assert_candidates_reproduce(table, rows, module, variables, x_test, y_test):
    """The float32 model on each selected row's candidate gives its prediction,
    success and p(true)."""
    logits_fn = jax.jit(models.make_logits_fn(module, variables))
    for i in np.flatnonzero(rows):
        image = x_test[i].copy()
        row, col, r, g, b = table["pixels"][i, 0]
        image[row, col] = (r, g, b)
        probs = np.asarray(jax.nn.softmax(logits_fn(image[None])[0]))
        assert probs.argmax() == table["pred_after"][i]
        assert (probs.argmax() != y_test[i]) == table["success"][i]
        np.testing.assert_allclose(probs[y_test[i]], table["prob_true_after"][i], 1e-5)


def test_attack_csv_and_summary(setup, finished):
    _, _, (module, variables, x_test, y_test) = setup
    workdir, summary = finished
    with open(os.path.join(workdir, "attack.csv")) as f:
        assert f.readline().strip() == ",".join(results.attack_columns(1))
    table = results.read_attack_csv(os.path.join(workdir, "attack.csv"))
    np.testing.assert_array_equal(table["index"], np.arange(NUM_SAMPLES))
    np.testing.assert_array_equal(table["label"], y_test[:NUM_SAMPLES])
    misclassified = np.isin(np.arange(NUM_SAMPLES), MISLABELED)
    np.testing.assert_array_equal(table["attacked"], ~misclassified)
    assert not table["success"][misclassified].any()
    assert (table["pixels"][misclassified] == -1).all()
    assert (table["evaluations"][misclassified] == 0).all()
    # Every attacked row's candidate reproduces its prediction and p(true).
    assert_candidates_reproduce(
        table, ~misclassified, module, variables, x_test, y_test
    )
    for i in np.flatnonzero(~misclassified):
        expected_evaluations = CONFIG.population * (table["generations"][i] + 1)
        assert table["evaluations"][i] == expected_evaluations
    assert summary["num_samples"] == NUM_SAMPLES
    assert summary["attacked"] == NUM_SAMPLES - len(MISLABELED)
    assert summary["accuracy_before"] == pytest.approx(0.7)
    assert summary["successes"] == int(table["success"].sum()) > 0
    assert summary["success_rate_attacked"] == pytest.approx(summary["successes"] / 7)
    assert summary["success_rate_all"] == pytest.approx(summary["successes"] / 10)
    assert summary["settings"]["population"] == 8
    assert "device_kind" in summary["device"]
    # The chunks are kept (a damaged attack.csv is rebuilt from them), each
    # recorded by its SHA-256 in the summary, as attack.csv is.
    chunks = os.path.join(workdir, ".attack_chunks")
    assert sorted(summary["chunks_sha256"]) == sorted(
        n for n in os.listdir(chunks) if n.startswith("chunk_")
    )
    assert summary["attack_csv_sha256"] == rundir.file_sha256(
        os.path.join(workdir, "attack.csv")
    )


def test_finished_run_is_not_recomputed(setup, finished, monkeypatch):
    _, kwargs, _ = setup
    workdir, summary = finished

    def fail(*args, **kwargs):
        raise AssertionError("attack_stream called for a finished run")

    monkeypatch.setattr(attack_run, "attack_stream", fail)
    assert attack_run.run_attack(workdir, **kwargs).summary == summary


def test_other_settings_are_refused(setup, finished):
    _, kwargs, _ = setup
    workdir, _ = finished
    before = {
        name: open(os.path.join(workdir, name)).read()
        for name in ("attack.csv", "attack_summary.json")
    }
    other = dict(kwargs, config=AttackConfig(population=9, generations=3))
    with pytest.raises(PropmapsError, match=r"other settings \(population: 8 -> 9\)"):
        attack_run.run_attack(workdir, **other)
    for name, text in before.items():
        assert open(os.path.join(workdir, name)).read() == text


def test_interrupted_run_resumes_to_the_same_files(setup, finished, monkeypatch):
    folder, kwargs, _ = setup
    workdir, summary = finished
    resumed = str(folder / "interrupted")
    save_chunk = chunk_store.save_chunk
    calls = []

    def save_then_die(*args):
        save_chunk(*args)
        calls.append(args[1:3])
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after two of three chunks

    monkeypatch.setattr(chunk_store, "save_chunk", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        attack_run.run_attack(resumed, **kwargs)
    assert calls == [(0, 4), (4, 8)]
    assert not os.path.exists(os.path.join(resumed, "attack.csv"))
    # Resume with another chunk size: only [8, 10) is attacked.
    resumed_summary = attack_run.run_attack(
        resumed, **dict(kwargs, chunk_size=1)
    ).summary
    assert calls[2:] == [(8, 9), (9, 10)]
    with (
        open(os.path.join(workdir, "attack.csv")) as a,
        open(os.path.join(resumed, "attack.csv")) as b,
    ):
        assert a.read() == b.read()
    with open(os.path.join(resumed, "attack_summary.json")) as f:
        assert json.load(f) == resumed_summary
    for name in attack_run.RUN_SPECIFIC:
        summary.pop(name), resumed_summary.pop(name)
    assert resumed_summary == summary


def test_a_run_grows_and_is_read_at_fewer_samples(setup, finished, monkeypatch, capsys):
    """With --sample=first a run's count may change in place: a larger count
    continues it, a smaller one takes its first images' results; either gives the
    files of a fresh run of that count, and no image is attacked twice."""
    folder, kwargs, _ = setup
    workdir, _ = finished
    full_csv = open(os.path.join(workdir, "attack.csv")).read()
    save_chunk, saved = chunk_store.save_chunk, []

    def record(*args):
        save_chunk(*args)
        saved.append(args[1:3])

    monkeypatch.setattr(chunk_store, "save_chunk", record)
    grown = str(folder / "grown")
    attack_run.run_attack(grown, **dict(kwargs, num_samples=6))
    six_csv = open(os.path.join(grown, "attack.csv")).read()
    assert saved == [(0, 4), (4, 6)] and len(six_csv.splitlines()) == 1 + 6
    summary = attack_run.run_attack(grown, **kwargs).summary
    assert saved[2:] == [(6, 8), (8, 10)]  # only the new images are attacked
    assert summary["num_samples"] == NUM_SAMPLES
    assert open(os.path.join(grown, "attack.csv")).read() == full_csv
    assert "holds a finished run of 6 samples" in capsys.readouterr().err

    # A first look at a larger run: its first 6 images, as a run of 6 gives them.
    look = str(folder / "look")
    shutil.copytree(workdir, look)
    del saved[:]
    attack_run.run_attack(look, **dict(kwargs, num_samples=6))
    assert saved == [(4, 6)]  # the chunk [4, 8) reaches past 6: 4 and 5 again
    assert open(os.path.join(look, "attack.csv")).read() == six_csv
    chunks = os.listdir(os.path.join(look, ".attack_chunks"))
    assert "chunk_0000008_0000010.json" in chunks and "stale" not in chunks
    # ... and back to all 10 without an attack: the chunks past 6 were kept.
    attack_run.run_attack(look, **kwargs)
    assert saved == [(4, 6)]
    assert open(os.path.join(look, "attack.csv")).read() == full_csv


def test_a_random_sample_cannot_change_its_count(setup):
    """--sample=random draws another set of images at each count: refused."""
    folder, kwargs, _ = setup
    workdir = str(folder / "random")
    random6 = dict(kwargs, num_samples=6, sample="random")
    attack_run.run_attack(workdir, **random6)
    with pytest.raises(PropmapsError, match=r"other settings \(num_samples: 6 -> 8\)"):
        attack_run.run_attack(workdir, **dict(random6, num_samples=8))


def test_sample_indices():
    np.testing.assert_array_equal(
        attack_run.sample_indices(100, 5, 0, "first"), np.arange(5)
    )
    drawn = attack_run.sample_indices(100, 20, 3, "random")
    assert len(set(drawn)) == 20 and (np.diff(drawn) > 0).all() and drawn.max() < 100
    np.testing.assert_array_equal(
        drawn, attack_run.sample_indices(100, 20, 3, "random")
    )
    assert not np.array_equal(drawn, attack_run.sample_indices(100, 20, 4, "random"))
    with pytest.raises(PropmapsError, match="exceeds the 100 test images"):
        attack_run.sample_indices(100, 101, 0, "first")


def test_parse_target():
    assert attack_run.parse_target("none") is None
    assert attack_run.parse_target("all") == "all"
    assert attack_run.parse_target("3") == 3
    with pytest.raises(PropmapsError, match="class in 0..9"):
        attack_run.parse_target("10")
    with pytest.raises(PropmapsError, match="none, all or a class"):
        attack_run.parse_target("cat")


def test_bad_flag_gives_a_one_line_error(tmp_path):
    done = launch("--experiment=attack", f"--workdir={tmp_path}", "--population=3")
    assert done.returncode == 2, done.stderr
    assert "error: population must be an integer >= 4" in done.stderr
    assert "Traceback" not in done.stderr


def test_bfloat16_search_reports_float32_results(setup):
    """--search_dtype=bfloat16: the search's model runs in bfloat16, every reported
    number is the float32 model's, and the run's settings and summary say so."""
    folder, kwargs, (module, variables, x_test, y_test) = setup
    workdir = str(folder / "bfloat16")
    summary = attack_run.run_attack(workdir, **kwargs, search_dtype="bfloat16").summary
    assert summary["settings"]["search_dtype"] == "bfloat16"
    assert summary["search_dtype"] == "bfloat16" and summary["search_rejections"] >= 0
    table = results.read_attack_csv(os.path.join(workdir, "attack.csv"))
    assert_candidates_reproduce(
        table, table["attacked"], module, variables, x_test, y_test
    )
    # A float32 run keeps its settings as before (no search_dtype entry).
    keys = {"model": "m", "weights_sha256": "a", "dataset_sha256": "b"}
    assert "search_dtype" not in attack_run._settings(keys, 1, 0, "first", CONFIG, None)


def test_settings_identify_weights_and_data_by_content(setup, finished):
    """The settings hold provenance.describe's keys; the weights path is recorded
    outside them."""
    _, kwargs, (_, _, x_test, y_test) = setup
    _, summary = finished
    expected = provenance.describe("lenet_tiny", kwargs["weights"], x_test, y_test)
    assert {k: summary["settings"][k] for k in provenance.KEYS} == expected
    assert "weights" not in summary["settings"]
    assert summary["model"]["weights"] == os.path.abspath(kwargs["weights"])


def test_same_weights_under_another_path_resume(setup, finished, monkeypatch):
    """A copy or a symlink of the weights resumes a finished and an unfinished run."""
    folder, kwargs, _ = setup
    workdir, _ = finished
    copy = str(folder / "copy_of_weights.msgpack")
    shutil.copyfile(kwargs["weights"], copy)
    link = str(folder / "link_to_weights.msgpack")
    if not os.path.lexists(link):
        os.symlink(kwargs["weights"], link)
    with open(os.path.join(workdir, "attack_summary.json")) as f:
        stored = json.load(f)
    assert attack_run.run_attack(workdir, **dict(kwargs, weights=copy)).summary == (
        stored
    )
    resumed = str(folder / "resumed_by_link")
    interrupted_run(resumed, kwargs, monkeypatch)
    attack_run.run_attack(resumed, **dict(kwargs, weights=link))
    with (
        open(os.path.join(workdir, "attack.csv")) as a,
        open(os.path.join(resumed, "attack.csv")) as b,
    ):
        assert a.read() == b.read()


def other_weights(folder):
    path = str(folder / "other_weights.msgpack")
    save_lenet_tiny(path, 99)
    return path


def other_data(kwargs):
    dataset = kwargs["dataset"]
    x_test = dataset.x_test.copy()
    x_test[0, 0, 0, 0] ^= 1  # one bit of one pixel
    return data.Cifar10(
        dataset.x_train, dataset.y_train, x_test, dataset.y_test, source="fake2"
    )


@pytest.mark.parametrize("finished_run", [True, False], ids=["finished", "unfinished"])
def test_other_weights_or_data_are_refused(setup, finished, monkeypatch, finished_run):
    """A resume with other weights (by content) or other test data (one bit) is
    refused with one line that names the difference; nothing is written."""
    folder, kwargs, _ = setup
    if finished_run:
        workdir, _ = finished
    else:
        workdir = str(folder / "unfinished_for_refusals")
        if not os.path.isdir(workdir):
            interrupted_run(workdir, kwargs, monkeypatch)
    before = {
        os.path.join(d, f): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(workdir)
        for f in files
    }
    for changed, pattern in [
        (dict(weights=other_weights(folder)), r"\(weights_sha256: '[0-9a-f]{12}' -> "),
        (dict(dataset=other_data(kwargs)), r"\(dataset_sha256: '[0-9a-f]{12}' -> "),
        (dict(seed=1), r"\(seed: 0 -> 1\)"),
    ]:
        with pytest.raises(PropmapsError, match="already holds an attack") as e:
            attack_run.run_attack(workdir, **dict(kwargs, **changed))
        assert re.search(pattern, str(e.value)) and "\n" not in str(e.value)
    after = {
        os.path.join(d, f): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(workdir)
        for f in files
    }
    assert after == before


def test_run_recorded_before_hashes_resumes_by_path(setup, finished, monkeypatch):
    """A run whose settings.json predates content hashes (a "weights" path, no
    hashes) resumes when its path-based settings match, and is refused otherwise."""
    folder, kwargs, _ = setup
    workdir, _ = finished
    legacy_dir = str(folder / "legacy")
    interrupted_run(legacy_dir, kwargs, monkeypatch)
    settings_path = os.path.join(legacy_dir, ".attack_chunks", "settings.json")
    settings = json.load(open(settings_path))
    legacy = {"model": settings.pop("model"), "weights": kwargs["weights"]}
    for key in ("weights_sha256", "dataset_sha256"):
        settings.pop(key)
    legacy.update(settings)
    with open(settings_path, "w") as f:
        json.dump(legacy, f)
    copy = str(folder / "legacy_copy.msgpack")
    shutil.copyfile(kwargs["weights"], copy)
    with pytest.raises(PropmapsError, match=r"weights: '.*' -> '.*legacy_copy"):
        attack_run.run_attack(legacy_dir, **dict(kwargs, weights=copy))
    attack_run.run_attack(legacy_dir, **kwargs)
    with (
        open(os.path.join(workdir, "attack.csv")) as a,
        open(os.path.join(legacy_dir, "attack.csv")) as b,
    ):
        assert a.read() == b.read()


def test_resume_never_repeats_a_row(setup, finished, monkeypatch):
    """Chunks that overlap (resumes with other chunk sizes, a stray copy) or hold
    rows of other images never put an image twice into attack.csv."""
    folder, kwargs, _ = setup
    workdir, _ = finished
    resumed = str(folder / "overlapping")
    interrupted_run(resumed, dict(kwargs, chunk_size=2), monkeypatch, chunks=3)
    chunks = os.path.join(resumed, ".attack_chunks")
    names = sorted(n for n in os.listdir(chunks) if n.startswith("chunk_"))
    assert names == [f"chunk_{a:07d}_{b:07d}.json" for a, b in [(0, 2), (2, 4), (4, 6)]]
    first = json.load(open(os.path.join(chunks, names[0])))
    second = json.load(open(os.path.join(chunks, names[1])))
    # A chunk [0, 4) overlapping [0, 2) and [2, 4), and a chunk [4, 8) whose rows
    # are those of other images: neither may add a row twice.
    both = dict(first, rows=first["rows"] + second["rows"])
    with open(os.path.join(chunks, "chunk_0000000_0000004.json"), "w") as f:
        json.dump(both, f)
    with open(os.path.join(chunks, "chunk_0000004_0000008.json"), "w") as f:
        json.dump(dict(both, rows=both["rows"]), f)
    indices = np.arange(NUM_SAMPLES)
    shash = hashing.settings_sha256(
        json.load(open(os.path.join(chunks, "settings.json")))
    )
    end, done, _ = chunk_store.finished_prefix(chunks, indices, {shash}, False)
    assert end == 6
    rows = [r for c in done for r in c["rows"]]
    assert [int(r.split(",")[0]) for r in rows] == list(range(6))
    attack_run.run_attack(resumed, **kwargs)
    with (
        open(os.path.join(workdir, "attack.csv")) as a,
        open(os.path.join(resumed, "attack.csv")) as b,
    ):
        assert a.read() == b.read()


def test_rows_are_checked_before_attack_csv_is_written(tmp_path):
    before = attack_run._Before(
        images=None,
        indices=np.array([3, 5]),
        labels=None,
        pred=None,
        prob_true=None,
        attacked=None,
    )
    chunks = [{"rows": ["3,1"]}, {"rows": ["3,1", "5,1"]}]
    with pytest.raises(PropmapsError, match="repeated or missing rows"):
        attack_run._write_results(str(tmp_path), before, 1, chunks, {})
    assert os.listdir(tmp_path) == []


def test_expected_remaining_generations():
    """The ETA's estimator against hand-computed cases."""
    expected = attack_run.expected_remaining_generations
    # Nothing finished: the worst case, marked as a bound: (10-3) + (10-0) + 2 * 11.
    assert expected(np.array([]), np.array([3, 0]), 2, 10) == (39.0, True)
    done = np.array([0, 2, 4, 10, 10])  # three successes, two failures (G = 10)
    # Running at g=3: finished images that outlasted 3 are 4, 10, 10: mean 8, so 5.
    # Running at g=10: none outlasted it; its worst case is 0.
    # Not started: mean(G_i + 1) = 26 / 5 + 1 = 6.2.
    remaining, bound = expected(done, np.array([3, 10]), 1, 10)
    assert not bound and remaining == pytest.approx(5 + 0 + 6.2)
    # Never more than the worst case, never less than 0.
    for g in range(11):
        r, _ = expected(done, np.array([g]), 0, 10)
        assert 0 <= r <= 10 - g


def test_progress_lines_are_honest(capsys):
    """The rate is over images of finished chunks only; each line printed once;
    the ETA counts running attacks (failures run every generation)."""
    progress = attack_run._AttackProgress(
        total=10, queue_start=0, done_chunks=[], population=4, max_generations=10
    )
    progress.every_s = 0.0
    # As if the run had started, and the first report had come, 10 s ago with no
    # evaluations: 12.4 evaluations per s, 0.3 images per s.
    progress.t0 = time.time() - 10.0
    progress.rate_from = (progress.t0, 0)
    # Fields this test does not use are 0 (the library may add some).
    info = ProgressInfo(
        **{
            **dict.fromkeys(ProgressInfo._fields, 0),
            "finished": 3,
            "successes": 3,
            "evaluations": 4 * (3 * 1 + 7 * 4),
            "running_generations": np.full(7, 3, np.int32),
            "total": 10,
            "max_generations": 10,
        }
    )
    progress.on_engine(info)
    line = capsys.readouterr().err
    assert "3/10 attacked images finished (7 running)" in line
    assert "successes so far: 3 (a rate after the first chunk)" in line
    # No success rate before a chunk has finished (3 of 3 is not "100%"); worst
    # case: 7 running at generation 3 of 10 need 4 * 7 * 7 = 196 evaluations.
    assert "%" not in line and "0.30 images/s" in line
    assert re.search(r"ETA <=0:00:1[5-7]", line), line
    progress.on_engine(info)  # nothing finished since: no second line
    assert capsys.readouterr().err == ""
    result = AttackResult(
        success=np.array([1, 1, 1, 0, 0], bool),
        pixels=None,
        prob_true_after=None,
        pred_after=None,
        generations=np.array([0, 0, 0, 10, 10]),
        evaluations=np.array([4, 4, 4, 44, 44]),
        search_rejections=None,
    )
    progress.on_chunk(5, result, last=False)
    line = capsys.readouterr().err
    assert "success 60.0% over the 5 images of finished chunks" in line
    assert "ETA <=" not in line and line.count("\n") == 1
