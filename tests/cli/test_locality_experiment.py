"""End to end: `launch.py --experiment=locality`, a tiny model, a tiny .npz dataset.

The experiment runs through launch.py in process (conftest.launch resets the absl
flags before and after each run).
"""

import csv
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import launch

from propmaps_jax import models
from propmaps_jax.analysis import locality
from propmaps_jax.errors import PropmapsError
from propmaps_jax.results.attack_csv import read_attack_csv
from tests._fixtures import save_lenet_tiny

NUM_SAMPLES = 16


def run_launch(*args, check=True):
    proc = launch("--experiment=locality", *args, env={"CIFAR10_PATH": None})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A lenet_tiny checkpoint and an .npz whose test images it barely gets right."""
    folder = tmp_path_factory.mktemp("locality")
    weights = str(folder / "lenet_tiny.msgpack")
    module, variables = save_lenet_tiny(weights, 3)
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, (512, 32, 32, 3), dtype=np.uint8)
    logits = np.asarray(models.make_logits_fn(module, variables)(pool))
    top2 = np.sort(logits, axis=1)[:, -2:]
    # The smallest top-2 margins: one pixel is likely to flip these.
    chosen = np.argsort(top2[:, 1] - top2[:, 0])[:NUM_SAMPLES]
    x = pool[chosen]
    y = logits[chosen].argmax(axis=1).astype(np.int64)
    y[::4] = (y[::4] + 1) % 10  # a quarter misclassified: not attacked
    data = str(folder / "tiny.npz")
    np.savez(data, x_train=x, y_train=y, x_test=x, y_test=y)
    return {
        "folder": folder,
        "weights": weights,
        "data": data,
        "module": module,
        "variables": variables,
        "x": x,
        "y": y,
    }


def tiny_args(setup, workdir):
    return [
        "--models=lenet_tiny",
        f"--weights_lenet_tiny={setup['weights']}",
        f"--cifar10_path={setup['data']}",
        f"--num_samples={NUM_SAMPLES}",
        "--population=8",
        "--generations=3",
        "--vulnerability_maps=2",
        "--max_distance=2",
        "--batch_size=512",
        f"--workdir={workdir}",
    ]


@pytest.fixture(scope="module")
def finished_run(tiny_setup):
    workdir = str(tiny_setup["folder"] / "run")
    proc = run_launch(*tiny_args(tiny_setup, workdir))
    return workdir, proc


def test_end_to_end_writes_every_file(finished_run, tiny_setup):
    workdir, proc = finished_run
    table = read_attack_csv(os.path.join(workdir, "lenet_tiny", "attack.csv"))
    successes = int(table["success"].sum())
    assert successes >= 1, "the tiny setup should give successful attacks"
    maps = min(2, successes)
    for name in [
        "table1.md",
        "table1.csv",
        "locality.json",
        "locality_vs_distance.png",
        "lenet_tiny/locality.csv",
        "lenet_tiny/locality.json",
        "lenet_tiny/vulnerability_maps.npz",
        "lenet_tiny/controls.csv",
        "lenet_tiny/controls.json",
        "controls.csv",
        "locality_controls.png",
    ]:
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    first = table["index"][table["success"]][:maps]
    for index in first:
        png = os.path.join(workdir, f"vulnerability_map_lenet_tiny_{index}.png")
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "images/s" in proc.stderr  # progress lines
    # The results table goes to stdout, progress and logs to stderr.
    assert "# Table 1" in proc.stdout and "# Table 1" not in proc.stderr
    # It ends with Table 1 and the verdict, the other tables left to table1.md.
    last = proc.stdout.strip().splitlines()
    assert last[-1] == f"All the tables and controls: {workdir}/table1.md", last[-3:]
    assert last[-3].startswith("**Verdict (lenet_tiny): locality beyond fragility")
    assert "## Controls" not in proc.stdout and "## Within images" not in proc.stdout

    summary = json.load(open(os.path.join(workdir, "locality.json")))
    res = summary["models"]["lenet_tiny"]
    correct = int(table["attacked"].sum())
    assert res["original_all"]["successes"] == successes
    assert res["original_all"]["n"] == NUM_SAMPLES
    assert res["original_correct"]["n"] == correct
    assert res["accuracy_on_samples"]["rate"] == pytest.approx(correct / NUM_SAMPLES)
    assert res["random"]["n"] == res["nearby"]["n"] == successes
    assert [r["distance"] for r in res["distance"]] == [1, 2]
    assert summary["settings"]["attack"]["population"] == 8

    md = open(os.path.join(workdir, "table1.md")).read()
    for row in ("original one-pixel attack", "on random pixels", "on nearby pixels"):
        assert row in md
    assert f"{successes}/{NUM_SAMPLES}" in md and f"{successes}/{correct}" in md

    with open(os.path.join(workdir, "table1.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["row"] for r in rows][2:] == ["on random pixels", "on nearby pixels"]
    assert int(rows[0]["lenet_tiny_successes"]) == successes
    assert float(rows[0]["lenet_tiny_ci_low"]) <= float(rows[0]["lenet_tiny_rate"])


def test_sample_count_per_model(tiny_setup):
    """--num_samples_<model>: each model attacks its own first N images; the table
    says how many; a count for a model not in --models is refused."""
    workdir = str(tiny_setup["folder"] / "per_model")
    args = [
        *(a for a in tiny_args(tiny_setup, workdir) if not a.startswith("--models")),
        "--vulnerability_maps=0",  # their figures are end_to_end's
    ]
    run_launch(*args, "--models=lenet_tiny,lenet", "--num_samples_lenet=4")
    summary = json.load(open(os.path.join(workdir, "locality.json")))
    assert summary["settings"]["num_samples"] == {"lenet_tiny": NUM_SAMPLES, "lenet": 4}
    assert summary["models"]["lenet"]["original_all"]["n"] == 4
    assert summary["models"]["lenet_tiny"]["original_all"]["n"] == NUM_SAMPLES
    table = read_attack_csv(os.path.join(workdir, "lenet", "attack.csv"))
    assert list(table["index"]) == [0, 1, 2, 3]
    md = open(os.path.join(workdir, "table1.md")).read()
    assert f"lenet_tiny: {NUM_SAMPLES} samples, lenet: 4 samples" in md
    assert "| lenet (ours, 4 samples) |" in md
    # The same command with a larger count continues from those 4 images (what
    # the job's "first look" hint promises).
    proc = run_launch(*args, "--models=lenet_tiny,lenet", "--num_samples_lenet=6")
    assert "holds a finished run of 4 samples" in proc.stderr
    table = read_attack_csv(os.path.join(workdir, "lenet", "attack.csv"))
    assert list(table["index"]) == [0, 1, 2, 3, 4, 5]
    summary = json.load(open(os.path.join(workdir, "locality.json")))
    assert summary["models"]["lenet"]["original_all"]["n"] == 6
    assert (
        "| lenet (ours, 6 samples) |" in open(os.path.join(workdir, "table1.md")).read()
    )

    proc = run_launch(
        *tiny_args(tiny_setup, workdir), "--num_samples_lenet=4", check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--num_samples_lenet is given but 'lenet' is not in --models" in proc.stderr
    proc = run_launch(
        *tiny_args(tiny_setup, workdir), "--num_samples_lenet_tiny=0", check=False
    )
    assert (
        proc.returncode == 2 and "--num_samples_lenet_tiny must be >= 1" in proc.stderr
    )
    proc = run_launch(
        *tiny_args(tiny_setup, workdir), "--num_samples_lenet_tiny=17", check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--num_samples_lenet_tiny=17 exceeds the {NUM_SAMPLES} test" in proc.stderr


def test_moved_pixels_against_an_independent_forward(finished_run, tiny_setup):
    """Valid positions; each recorded outcome matches a plain NumPy recomputation."""
    workdir, _ = finished_run
    with open(os.path.join(workdir, "lenet_tiny", "locality.csv")) as f:
        rows = list(csv.DictReader(f))
    table = read_attack_csv(os.path.join(workdir, "lenet_tiny", "attack.csv"))
    assert [int(r["index"]) for r in rows] == list(table["index"][table["success"]])
    logits_fn = models.make_logits_fn(tiny_setup["module"], tiny_setup["variables"])
    nearby_hits = random_hits = 0
    for r in rows:
        i, row, col = int(r["index"]), int(r["row"]), int(r["col"])
        colour = [int(r["r"]), int(r["g"]), int(r["b"])]
        for kind in ("nearby", "random"):
            new_row, new_col = int(r[f"{kind}_row"]), int(r[f"{kind}_col"])
            assert (new_row, new_col) != (row, col)
            assert 0 <= new_row < 32 and 0 <= new_col < 32
            if kind == "nearby":
                assert max(abs(new_row - row), abs(new_col - col)) == 1
            moved = np.array(tiny_setup["x"][i], copy=True)
            moved[new_row, new_col] = colour
            pred = int(np.argmax(np.asarray(logits_fn(jnp.asarray(moved[None])))[0]))
            assert pred == int(r[f"{kind}_pred"])
            success = pred != tiny_setup["y"][i]
            assert success == bool(int(r[f"{kind}_success"]))
            nearby_hits += success and kind == "nearby"
            random_hits += success and kind == "random"
        expected_n = len(locality.chebyshev_offsets(1)[0])
        assert int(r["ring1_n"]) <= expected_n
    res = json.load(open(os.path.join(workdir, "locality.json")))["models"]
    assert res["lenet_tiny"]["nearby"]["successes"] == nearby_hits
    assert res["lenet_tiny"]["random"]["successes"] == random_hits


def test_controls_against_an_independent_forward(finished_run, tiny_setup):
    """controls.csv: margins and each control's outcome recomputed in NumPy."""
    workdir, _ = finished_run
    with open(os.path.join(workdir, "lenet_tiny", "controls.csv")) as f:
        rows = list(csv.DictReader(f))
    with open(os.path.join(workdir, "lenet_tiny", "locality.csv")) as f:
        moved = {int(r["index"]): r for r in csv.DictReader(f)}
    table = read_attack_csv(os.path.join(workdir, "lenet_tiny", "attack.csv"))
    assert [int(r["index"]) for r in rows] == list(table["index"][table["attacked"]])
    logits_fn = models.make_logits_fn(tiny_setup["module"], tiny_setup["variables"])
    x, y = tiny_setup["x"], tiny_setup["y"]

    def pred(image):
        return int(np.argmax(np.asarray(logits_fn(jnp.asarray(image[None])))[0]))

    hits = {"own": 0, "nearby": 0, "context": 0}
    for r in rows:
        i = int(r["index"])
        logits = np.asarray(logits_fn(jnp.asarray(x[i][None])), np.float64)[0]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        margin = p[y[i]] - np.delete(p, y[i]).max()
        assert float(r["margin"]) == pytest.approx(margin, abs=1e-5)
        if not int(r["success"]):
            assert r["own_random_colour_success"] == ""
            continue
        m = moved[i]
        row, col = int(m["row"]), int(m["col"])
        colour = [int(m["r"]), int(m["g"]), int(m["b"])]
        cases = {
            "own": ((row, col), [int(r[f"own_{c}"]) for c in "rgb"]),
            "nearby": (
                (int(m["nearby_row"]), int(m["nearby_col"])),
                [int(r[f"nearby_colour_{c}"]) for c in "rgb"],
            ),
        }
        if int(r["context_found"]):
            cr, cc = int(r["context_row"]), int(r["context_col"])
            assert max(abs(cr - row), abs(cc - col)) >= 3
            assert float(r["context_distance"]) <= 12.0 + 1e-3
            cases["context"] = ((cr, cc), colour)
        else:
            assert r["context_success"] == ""
        column = {
            "own": "own_random_colour_success",
            "nearby": "nearby_random_colour_success",
            "context": "context_success",
        }
        for kind, ((pr, pc), c) in cases.items():
            image = np.array(x[i], copy=True)
            image[pr, pc] = c
            success = pred(image) != y[i]
            assert success == bool(int(r[column[kind]]))
            hits[kind] += success
    res = json.load(open(os.path.join(workdir, "locality.json")))["models"]
    strata = res["lenet_tiny"]["controls"]["strata"]["all"]
    assert strata["own_random_colour"]["successes"] == hits["own"]
    assert strata["nearby_random_colour"]["successes"] == hits["nearby"]
    assert strata["context"]["successes"] == hits["context"]
    md = open(os.path.join(workdir, "table1.md")).read()
    assert "## Controls" in md and "Rule (fixed before the numbers" in md


def test_vulnerability_map_agrees_with_the_attack(finished_run):
    workdir, _ = finished_run
    table = read_attack_csv(os.path.join(workdir, "lenet_tiny", "attack.csv"))
    with np.load(os.path.join(workdir, "lenet_tiny", "vulnerability_maps.npz")) as z:
        maps = {k: z[k] for k in z.files}
    assert maps["success"].shape == (len(maps["index"]), 32, 32)
    for i, index in enumerate(maps["index"]):
        row, col = maps["pixels"][i, 0, :2]
        at = np.flatnonzero(table["index"] == index)[0]
        assert maps["success"][i, row, col]
        np.testing.assert_allclose(
            maps["prob_true"][i, row, col], table["prob_true_after"][at], atol=1e-4
        )


def test_rerun_reuses_results(finished_run, tiny_setup):
    """A rerun reuses the attack and the study, also with the same weights under
    another path (runs are compared by the weights' content)."""
    workdir, _ = finished_run
    before = open(os.path.join(workdir, "lenet_tiny", "locality.csv")).read()
    copy = str(tiny_setup["folder"] / "copy_of_weights.msgpack")
    shutil.copyfile(tiny_setup["weights"], copy)
    args = [
        f"--weights_lenet_tiny={copy}" if a.startswith("--weights_lenet_tiny") else a
        for a in tiny_args(tiny_setup, workdir)
    ]
    proc = run_launch(*args)
    assert "reusing the locality results" in proc.stderr
    assert "reusing the locality controls" in proc.stderr
    assert "images finished" not in proc.stderr  # the attack was not run again
    after = open(os.path.join(workdir, "lenet_tiny", "locality.csv")).read()
    assert before == after


def test_bad_model_gives_one_line_error(tmp_path):
    proc = run_launch("--models=lenet,alexnet", f"--workdir={tmp_path}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "unknown model 'alexnet' in --models" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_flag_checks_and_two_model_table(tmp_path):
    """Flag errors and Table 1 with both paper models."""
    import dataclasses
    import functools

    import experiments.locality as loc
    import experiments.report.tables as tables
    from experiments.runs import attack_run, locality_run
    from propmaps_jax import stats
    from propmaps_jax.attack import AttackConfig

    errors = {}

    def error(name, fn, *args):
        try:
            fn(*args)
        except PropmapsError as e:
            errors[name] = str(e)

    error("empty", loc.parse_models, " , ")
    error("unknown", loc.parse_models, "lenet,vgg")
    error("twice", loc.parse_models, "lenet,lenet")
    # As main reads the flags: --pixels=3, --target=3, the attack's --weights.
    config = loc.LocalityConfig(
        models=("lenet",),
        weights={"lenet": None},
        num_samples={"lenet": 10},
        own_num_samples={},
        attack=attack_run.AttackOptions(
            num_samples=10,
            seed=0,
            sample="first",
            config=AttackConfig(pixels=1, population=8, generations=2),
        ),
        max_distance=2,
        vulnerability_maps=1,
        batch_size=64,
    )
    with_attack = functools.partial(dataclasses.replace, config.attack)
    three_pixels = with_attack(config=AttackConfig(pixels=3, population=8))
    targeted = with_attack(target=attack_run.parse_target("3"))
    error(
        "pixels", loc.check_config, dataclasses.replace(config, attack=three_pixels), []
    )
    error("target", loc.check_config, dataclasses.replace(config, attack=targeted), [])
    error("weights", loc.check_config, config, ["weights"])
    error("bundled", locality_run.check_weights, "resnet20", None)
    # The same checks from the command line: main reads the flags into the config.
    for flag, says in (("--pixels=3", "use --pixels=1"), ("--target=3", "drop")):
        proc = run_launch("--models=lenet", flag, f"--workdir={tmp_path}", check=False)
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr

    def res(s, c, n, r, nb):
        ring = [{"distance": 1, "pooled": stats.proportion(nb, 8 * s)}]
        return {
            "accuracy_on_samples": stats.proportion(c, n),
            "original_all": stats.proportion(s, n),
            "original_correct": stats.proportion(s, c),
            "random": stats.proportion(r, s),
            "nearby": stats.proportion(nb, s),
            "distance": ring,
        }

    results = {
        "lenet": res(2934, 3700, 5000, 144, 971),
        "resnet": res(1638, 4600, 5000, 51, 513),
    }
    settings = {
        "num_samples": 5000,
        "sample": "first",
        "seed": 0,
        "attack": {"population": 400, "generations": 100},
        "max_distance": 1,
    }
    out = {
        "md": tables.table1_markdown(results, settings),
        "csv": tables.table1_csv(results),
        "errors": errors,
    }
    errors = out["errors"]
    assert "--models is empty" in errors["empty"]
    assert "unknown model 'vgg'" in errors["unknown"]
    assert "twice" in errors["twice"]
    assert "--pixels=3" in errors["pixels"]
    assert "--target" in errors["target"]
    assert "--weights_<model>" in errors["weights"]
    # A missing bundled checkpoint names the flag of this experiment.
    assert "--weights_resnet20=PATH" in errors["bundled"]
    md = out["md"]
    assert "LeNet (paper)" in md and "ResNet (paper)" in md
    assert "59% (2934/5000)" in md and "33% (1638/5000)" in md
    assert "4.9%" in md and "33.1%" in md and "3.1%" in md and "31.3%" in md
    # 1638/5000 with its Wilson interval, as computed by stats.wilson_interval.
    assert "32.8% (1638/5000; 95% CI 31.5–34.1%)" in md
    rows = list(csv.DictReader(out["csv"].splitlines()))
    assert rows[3]["row"] == "on nearby pixels"
    assert float(rows[3]["resnet_paper_rate"]) == 0.313
    assert int(rows[1]["lenet_n"]) == 3700


def test_old_locality_csv_is_one_line_naming_the_rerun(finished_run, tiny_setup):
    """A locality.csv of an older version (no ring columns): exit 2, one line."""
    workdir, _ = finished_run
    copy = str(tiny_setup["folder"] / "old_run")
    shutil.copytree(workdir, copy)
    model_dir = os.path.join(copy, "lenet_tiny")
    with open(os.path.join(model_dir, "locality.csv")) as f:
        rows = list(csv.reader(f))
    keep = [j for j, c in enumerate(rows[0]) if not c.startswith("ring")]
    with open(os.path.join(model_dir, "locality.csv"), "w") as f:
        csv.writer(f).writerows([[r[j] for j in keep] for r in rows])
    os.remove(os.path.join(model_dir, "controls.json"))
    proc = run_launch(*tiny_args(tiny_setup, copy), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "older version" in last and "locality.json" in last
    assert "run the locality experiment again" in last
    assert not os.path.exists(os.path.join(model_dir, "controls.json"))


def test_controls_refuse_margins_of_another_model(tmp_path):
    """run_controls: clean p(true) unlike attack.csv's -> one line, before any draw."""
    from propmaps_jax.analysis import locality_study
    from propmaps_jax.errors import PropmapsError
    from propmaps_jax.results.attack_csv import read_attack_csv

    header = (
        "index,label,pred_before,prob_true_before,attacked,success,pred_after,"
        "prob_true_after,generations,evaluations,row_1,col_1,r_1,g_1,b_1\n"
    )
    (tmp_path / "attack.csv").write_text(
        header + "0,1,1,0.9,1,0,1,0.8,3,32,1,1,1,2,3\n"
    )
    table = read_attack_csv(str(tmp_path / "attack.csv"), summary=None)
    x = np.zeros((1, 8, 8, 3), np.uint8)
    y = np.array([1])

    def apply_fn(variables, images):  # p(true) = softmax of [0, s] at index 1
        return jnp.stack([jnp.zeros(len(images)), jnp.full(len(images), variables)], 1)

    moved = locality_study.moves_table(table, {}, 2)
    # logit 2.1972 gives p(true) = 0.9: accepted (margin 0.8).
    attacked, _, _ = locality_study.run_controls(
        apply_fn, jnp.float32(np.log(9.0)), table, moved, x, y, 0, 8
    )
    assert attacked["margin"] == pytest.approx([0.8], abs=1e-5)
    with pytest.raises(PropmapsError, match="another model or data"):
        locality_study.run_controls(
            apply_fn, jnp.float32(0.0), table, moved, x, y, 0, 8
        )
