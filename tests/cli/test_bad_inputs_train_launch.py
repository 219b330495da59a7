"""Bad command lines of the launcher and the train experiment, as a user types them:
each gives the expected exit code and ONE line naming the problem, no traceback, and
leaves nothing behind (the whole path from argv to exit status, in process; Ctrl-C
in a real process)."""

import os
import signal
import subprocess

import numpy as np
import pytest
from conftest import launch

from tests._fixtures import start_interruptible


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 64), ("test", 16)):
        arrays[f"x_{split}"] = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        arrays[f"y_{split}"] = rng.integers(0, 10, n)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, **arrays)
    return str(path)


TRAIN = ["--experiment=train", "--model=lenet_tiny", "--epochs=2", "--batch_size=32"]

# (argv, exit code, a phrase of the one line, of stdout for help). In argv, {tmp}
# is a fresh folder and {data} the tiny dataset; WORKDIR marks the workdir that must
# not exist afterwards.
CASES = {
    "no arguments: the overview": ([], 0, "experiments:"),
    "repeated --experiment": (
        ["--experiment=attack", "--experiment=evaluate"],
        2,
        "error: --experiment given 2 times (attack, evaluate); give it once",
    ),
    "flags without --experiment": (["--model=lenet"], 2, "error: missing --experiment"),
    "a flag that the experiment does not read": (
        ["--experiment=evaluate", "--signed"],
        2,
        "error: --signed is not a flag of --experiment=evaluate; python launch.py "
        "--experiment=evaluate --help lists its flags",
    ),
    "a misspelled flag": (
        ["--experiment=train", "--learning_rat=0.1"],
        2,
        "error: --learning_rat is not a flag of --experiment=train (did you mean "
        "--learning_rate?)",
    ),
    "train: NaN learning rate": (
        [*TRAIN, "--learning_rate=nan", "--workdir={tmp}/WORKDIR"],
        2,
        "error: --learning_rate must be a positive number, got nan",
    ),
    "train: workdir is a file": (
        [*TRAIN, "--workdir={tmp}/a_file", "--cifar10_path={data}"],
        2,
        "is a file: pass a folder",
    ),
    "train: workdir not writable": (
        [*TRAIN, "--workdir=/proc/WORKDIR", "--cifar10_path={data}"],
        2,
        "error: --workdir=/proc/WORKDIR is not writable",
    ),
    "train: a workdir name too long for the filesystem, before loading data": (
        [*TRAIN, "--workdir={tmp}/" + "n" * 300, "--cifar10_path=/nonexistent"],
        2,
        "has a folder name of 300 bytes",
    ),
    "train: diverges at once": (
        [
            *TRAIN,
            "--batch_size=16",
            "--learning_rate=1e30",
            "--workdir={tmp}/WORKDIR",
            "--cifar10_path={data}",
        ],
        2,
        "error: training diverged at epoch 1 (",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line(case, tmp_path, tiny_npz):
    argv, code, phrase = CASES[case]
    if "/proc/" in " ".join(argv) and not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux /proc (a folder that refuses files even to root)")
    (tmp_path / "a_file").write_text("not a folder")
    argv = [a.format(tmp=tmp_path, data=tiny_npz) for a in argv]
    result = launch(*argv)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    if code == 0:
        assert phrase in result.stdout
        return
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    assert errors[0] == result.stderr.strip().splitlines()[-1]
    assert phrase in errors[0]
    assert not (tmp_path / "WORKDIR").exists()  # nothing left behind


def _platform_present(platform: str) -> bool:
    import jax

    try:
        return bool(jax.devices(platform))
    except RuntimeError:
        return False


@pytest.mark.e2e
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_a_missing_jax_platform_is_one_line(platform, tmp_path, tiny_npz):
    """JAX_PLATFORMS names a platform this machine does not have: one line naming
    JAX_PLATFORMS, what was asked and what is available, exit 2, nothing left."""
    if _platform_present(platform):
        pytest.skip(f"this machine has a {platform} device")
    workdir = tmp_path / "run"
    result = launch(
        *TRAIN,
        f"--workdir={workdir}",
        f"--cifar10_path={tiny_npz}",
        env={"JAX_PLATFORMS": platform},
        subprocess=True,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: JAX_PLATFORMS={platform} "), result.stderr
    assert "available: cpu" in last
    assert not workdir.exists()


@pytest.mark.e2e
def test_garbage_xla_flags_leave_no_lock(tmp_path, tiny_npz):
    """XLA refuses an unknown flag in XLA_FLAGS by ending the process from C++ (no
    Python cleanup runs): that happens before the workdir is locked, so no stale
    lock is left, and the next run starts without taking one over."""
    workdir = tmp_path / "run"
    argv = [*TRAIN, f"--workdir={workdir}", f"--cifar10_path={tiny_npz}"]
    result = launch(*argv, env={"XLA_FLAGS": "--nonsense_flag"}, subprocess=True)
    assert result.returncode != 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "--nonsense_flag" in result.stderr.strip().splitlines()[-1]
    assert not (workdir / ".lock").exists()
    again = launch(*argv)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "taking over the lock" not in again.stderr
    assert not (workdir / ".lock").exists()


@pytest.mark.e2e
def test_ctrl_c_is_one_line_with_exit_130(tmp_path, tiny_npz):
    """Ctrl-C during training: one line that says what is kept and how to resume,
    exit status 130, no KeyboardInterrupt traceback."""
    workdir = tmp_path / "run"
    script = (
        "import runpy, sys; sys.argv = sys.argv[1:]; "
        "runpy.run_path('launch.py', run_name='__main__')"
    )
    argv = [
        "launch.py",
        *TRAIN,
        "--epochs=100000",
        f"--workdir={workdir}",
        f"--cifar10_path={tiny_npz}",
    ]
    process = start_interruptible(script, *argv, stdout=subprocess.DEVNULL)
    lines = []
    for line in process.stderr:  # until the first epoch's checkpoint is written
        lines.append(line)
        if "epoch 2/100000 step" in line:
            break
    process.send_signal(signal.SIGINT)
    lines += process.stderr.readlines()
    process.stderr.close()
    process.wait(timeout=60)
    stderr = "".join(lines)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == (
        f"interrupted: {workdir / 'checkpoint.msgpack'} (the last checkpoint) is "
        "kept; run the same command again to resume"
    )
    assert "Traceback" not in stderr
