"""Race processes over a stale lock, trial after trial; print what was seen.

python tests/_lock_race.py WORKDIR PROCESSES SECONDS TRIALS

Each trial: a lock of a dead process is written in WORKDIR, then PROCESSES
forked workers, released together, each try `lock.acquire(WORKDIR)` and keep
what they got until every one has tried (so two holders would overlap); then the
holders release. Trials go on until TRIALS are done or SECONDS have passed.
Prints one JSON line: {"trials": n, "holders": [count of holders per trial]}.

A separate script (not the test process): the workers are forked from a process
that has not started JAX's threads.
"""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

from experiments.runs import lock
from propmaps_jax.errors import PropmapsError


def _worker(workdir, start, tried, released, holders, stop) -> None:
    while True:
        start.wait()
        if stop.value:
            return
        try:
            got = lock.acquire(workdir)
        except PropmapsError:
            got = False
        if got:
            with holders.get_lock():
                holders.value += 1
        tried.wait()
        if got:
            lock.release(workdir)
        released.wait()


def main(workdir: str, processes: int, seconds: float, trials: int) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, lock.LOCK_NAME)
    context = multiprocessing.get_context("fork")
    start, tried, released = (context.Barrier(processes + 1) for _ in range(3))
    holders, stop = context.Value("i", 0), context.Value("b", 0)
    workers = [
        context.Process(
            target=_worker, args=(workdir, start, tried, released, holders, stop)
        )
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    seen, until = [], time.time() + seconds
    while time.time() < until and len(seen) < trials:
        holders.value = 0
        with open(path, "w") as f:
            json.dump(
                {
                    "pid": dead.pid,
                    "host": socket.gethostname(),
                    "since": f"trial {len(seen)}",
                    "command": "gone",
                },
                f,
            )
        start.wait()
        tried.wait()
        seen.append(holders.value)
        released.wait()
        if os.path.exists(path):
            os.remove(path)
    stop.value = 1
    start.wait()
    for worker in workers:
        worker.join()
    print(json.dumps({"trials": len(seen), "holders": seen}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
