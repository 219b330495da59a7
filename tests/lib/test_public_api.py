"""The public API: every module and subpackage is an attribute of the package, and
every module of a subpackage an attribute of that subpackage, each imported on
first use and found under its one dotted path (no aliases)."""

import importlib
import json
import pkgutil
import subprocess
import sys

import pytest

import propmaps_jax as pj


@pytest.mark.parametrize("name", pj.SUBMODULES)
def test_modules_are_attributes_of_the_package(name):
    assert getattr(pj, name) is importlib.import_module(f"propmaps_jax.{name}")


SUBPACKAGES = ("analysis", "attack", "data", "figures", "models", "results")

# One process imports the third-party packages (most of an import's time), then
# forks a child per subpackage that imports propmaps_jax afresh and reaches every
# module of that subpackage: no child sees another's imports of propmaps_jax.
FRESH_IMPORTS = """
import json, os, sys, traceback
import flax.linen, jax, jax.numpy, matplotlib, numpy, optax  # not propmaps_jax

results = {}
for package, names in json.loads(sys.argv[1]).items():
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(read)
        try:
            import propmaps_jax as pj
            for name in names:
                module = getattr(getattr(pj, package), name)
                assert module.__name__ == f"propmaps_jax.{package}.{name}", name
            message = "ok"
        except BaseException:
            message = traceback.format_exc()[-2000:]
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        results[package] = f.read()
    os.wait()
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def fresh_imports():
    """{subpackage: "ok" or the traceback} of a fresh import of each."""
    modules = {}
    for package in SUBPACKAGES:
        path = importlib.import_module(f"propmaps_jax.{package}").__path__
        modules[package] = sorted(m.name for m in pkgutil.iter_modules(path))
    out = subprocess.run(
        [sys.executable, "-c", FRESH_IMPORTS, json.dumps(modules)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_a_fresh_import_reaches_every_module_of_a_subpackage(package, fresh_imports):
    """`pj.analysis.propagation` works in a new process (no earlier import)."""
    assert fresh_imports[package] == "ok", fresh_imports[package]


@pytest.mark.parametrize("old", ["propagation", "perturb", "attack_de", "receptive"])
def test_no_alias_of_a_moved_module(old):
    with pytest.raises(AttributeError, match=old):
        getattr(pj, old)
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(f"propmaps_jax.{old}")


def test_from_imports_of_the_modules():
    from propmaps_jax.analysis.propagation import propagation_maps
    from propmaps_jax.attack.perturb import apply_pixels
    from propmaps_jax.models.checkpoint import atomic_write_bytes

    assert apply_pixels is pj.attack.perturb.apply_pixels
    assert propagation_maps is pj.analysis.propagation.propagation_maps
    assert atomic_write_bytes is pj.models.checkpoint.atomic_write_bytes


def test_importing_the_package_starts_no_jax():
    code = "import sys, propmaps_jax; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
