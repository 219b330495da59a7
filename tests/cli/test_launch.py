"""The launcher: experiment selection, one-line errors, flags shared by experiments."""

import importlib
import os
import subprocess
import sys
import tomllib

import pytest
from conftest import ROOT
from conftest import launch as launch_py

import launch


@pytest.mark.parametrize("args", [(), ("--help",), ("-h",), ("--helpfull",)])
def test_help_lists_the_experiments(args):
    result = launch_py(*args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in launch.EXPERIMENTS:
        (line,) = [x for x in lines if x.startswith(f"  {name} ")]
        assert launch.summary(name) in line and len(launch.summary(name)) > 20
    assert "python launch.py --experiment=NAME --help" in result.stdout
    assert result.stderr == ""


def test_experiment_help_lists_its_own_and_shared_flags():
    result = launch_py("--experiment=train", "--help")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("usage: python launch.py --experiment=train [flags]")
    own, shared = out.split("shared flags it reads:")
    for flag in ("--learning_rate=FLOAT", "--[no]augment", "--warmup_epochs"):
        assert flag in own
    for flag in ("--workdir=STRING", "--cifar10_path", "--model", "--precision"):
        assert flag in shared
    # not absl's own flags, nor shared flags that train does not read
    for flag in ("--helpfull", "--verbosity", "--signed", "--columns", "--slots"):
        assert flag not in out
    assert "Peak learning rate" in own  # the flag's help text


def test_flags_read_by_each_experiment():
    """What each experiment declares (its FLAGS_READ) behind --help and the flag
    check: shared flags read and passed to helpers (common.load_data takes
    --cifar10_path) are declared, unused ones are not."""
    read = {name: launch.flags_read(name) for name in launch.EXPERIMENTS}
    for name in launch.EXPERIMENTS:
        assert {"workdir", "precision"} <= read[name], name
        # readings reads run folders only, no data
        assert ("cifar10_path" in read[name]) == (name != "readings"), name
    assert {"model", "weights", "signed", "columns"} <= read["statistics"]
    assert {"population", "generations", "slots", "distributed"} <= read["locality"]
    assert "weights" not in read["locality"]  # it has --weights_<model>
    assert not {"signed", "columns", "slots", "seed"} & read["evaluate"]
    assert "init_weights" in read["train"] and "signed" not in read["train"]


def test_every_flag_an_experiment_reads_is_declared():
    """Each FLAGS.x / FLAGS["x"] in an experiment's own source is one of its own
    flags or declared in its FLAGS_READ (a flag read but not declared would be
    refused on the command line and missing from --help)."""
    import re

    for name in launch.EXPERIMENTS:
        with open(os.path.join(ROOT, "experiments", f"{name}.py")) as f:
            source = f.read()
        used = set(re.findall(r"\bFLAGS\.([a-z_0-9]+)\b", source))
        used |= set(re.findall(r"\bFLAGS\[\"([a-z_0-9]+)\"\]", source))
        used -= {"is_parsed", "unparse_flags"}
        assert used <= launch.flags_read(name), (name, used - launch.flags_read(name))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--experiment=nope"], "unknown experiment 'nope'; choose one of: locality"),
        (["--experiment=attack", "--experiment=evaluate"], "given 2 times"),
        (["--experiment", "attack", "--experiment=attack"], "given 2 times"),
        (["--model=lenet"], "missing --experiment"),
        (["--experiment=attack", "--sample=nope"], "flag --sample=nope: value should"),
        (
            ["--experiment=attack", "--num_sample=5"],
            "--num_sample is not a flag of --experiment=attack (did you mean "
            "--num_samples?)",
        ),
        (["--experiment=evaluate", "--population=5"], "--population is not a flag"),
        (["--experiment=evaluate", "--seed=1"], "--seed is not a flag of"),
        (["--experiment=locality", "--weights=w.h5"], "--weights is not a flag of"),
        (["--experiment=train", "--epochs=x"], "flag --epochs=x: invalid literal"),
        (["--experiment=train", "extra"], "unexpected arguments: extra"),
    ],
)
def test_check_refuses_bad_command_lines(args, message):
    with pytest.raises(launch.UsageError) as error:
        launch.check(args)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_check_accepts_good_command_lines_and_leaves_flags_alone():
    from absl import flags

    before = flags.FLAGS["model"].value if flags.FLAGS.is_parsed() else None
    args = ["--experiment=statistics", "--model=lenet", "--signed", "--workdir=x"]
    assert launch.check(args) == "statistics"
    assert launch.check(["--experiment", "locality", "--weights_resnet=r.h5"]) == (
        "locality"
    )
    after = flags.FLAGS["model"].value if flags.FLAGS.is_parsed() else None
    assert before == after
    assert not flags.FLAGS["model"].present


def test_user_error_is_one_line_without_traceback(tmp_path):
    result = launch_py(
        "--experiment=evaluate",
        "--model=lenet",
        f"--weights={tmp_path / 'missing.msgpack'}",
        f"--workdir={tmp_path / 'out'}",
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert (
        lines[-1]
        == f"error: weights file {tmp_path / 'missing.msgpack'} does not exist"
    )
    assert "Traceback" not in result.stderr


def _python(code: str) -> subprocess.CompletedProcess:
    """`python -c code` in a new process from the repository root."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True
    )


@pytest.mark.e2e
def test_help_in_a_new_process_imports_no_jax():
    """`python launch.py --help` as a user runs it: exit 0, the overview, and no
    JAX imported before an experiment is chosen (so it answers at once)."""
    code = (
        "import sys, runpy; sys.argv = ['launch.py', '--help']; "
        "runpy.run_path('launch.py', run_name='__main__'); "
        "print('jax imported:', 'jax' in sys.modules)"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert "experiments:" in result.stdout
    assert result.stdout.strip().endswith("jax imported: False")


@pytest.mark.e2e
def test_all_experiment_modules_import_together():
    # Shared flags are defined once in experiments/common.py; importing every
    # experiment in one process must not raise absl's DuplicateFlagError.
    code = (
        "import experiments.attack, experiments.evaluate, experiments.locality, "
        "experiments.propagation, experiments.statistics, experiments.train; "
        "from absl import flags; print(flags.FLAGS['model'].default)"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "resnet"


def test_the_console_command_is_the_launcher():
    """pyproject's `propmaps` command (`pip install .`) runs what `python launch.py`
    runs, and the packages it needs are installed with it."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    module, _, name = project["project"]["scripts"]["propmaps"].partition(":")
    assert getattr(importlib.import_module(module), name) is launch.run
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {"experiments", "experiments.*", "propmaps_jax", "propmaps_jax.*"} <= set(
        include
    )
