"""The launcher: experiment selection, one-line errors, flags shared by experiments."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args, env=None):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "error: missing --experiment; choose one of: locality, attack"),
        (("--experiment=nope",), "error: unknown experiment 'nope'; choose one of"),
    ],
)
def test_experiment_selection_errors(args, message):
    result = _launch(*args)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(message)
    assert "Traceback" not in result.stderr


def test_user_error_is_one_line_without_traceback(tmp_path):
    result = _launch(
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


def test_all_experiment_modules_import_together():
    # Shared flags are defined once in experiments/common.py; importing every
    # experiment in one process must not raise absl's DuplicateFlagError.
    code = (
        "import experiments.attack, experiments.evaluate, experiments.locality, "
        "experiments.propagation, experiments.statistics, experiments.train; "
        "from absl import flags; print(flags.FLAGS['model'].default)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "resnet"
