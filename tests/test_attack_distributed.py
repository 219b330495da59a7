"""The attack on 4 forced CPU devices and on 2 processes gives the 1-device results."""

import os
import socket
import subprocess
import sys

import numpy as np

from tests._attack_case import SLOTS, attack_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_attack_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_four_devices_and_two_processes_match_one_device(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)  # compiler options could change the last float bits
    four = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    address = f"localhost:{free_port()}"
    runs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(tmp_path / "four.npz")],
            env=four,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    ] + [
        subprocess.Popen(
            [sys.executable, WORKER, str(tmp_path / f"p{i}.npz"), str(i), "2", address],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    reference = attack_case(slots=SLOTS)  # in this process, one device
    for run in runs:
        output, _ = run.communicate(timeout=240)
        assert run.returncode == 0, output.decode()[-3000:]
    four_devices = np.load(tmp_path / "four.npz")
    two_processes = np.load(tmp_path / "p0.npz")
    assert not (tmp_path / "p1.npz").exists()  # only process 0 writes
    assert int(four_devices["device_count"]) == 4
    assert int(two_processes["process_count"]) == 2
    for name, expected in reference._asdict().items():
        np.testing.assert_array_equal(four_devices[name], expected, err_msg=name)
        np.testing.assert_array_equal(two_processes[name], expected, err_msg=name)
