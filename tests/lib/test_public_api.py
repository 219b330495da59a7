"""The public API: every module and subpackage is an attribute of the package, and
every module of a subpackage an attribute of that subpackage, each imported on
first use and found under its one dotted path (no aliases)."""

import importlib
import pkgutil
import subprocess
import sys

import pytest

import propmaps_jax as pj


@pytest.mark.parametrize("name", pj.SUBMODULES)
def test_modules_are_attributes_of_the_package(name):
    assert getattr(pj, name) is importlib.import_module(f"propmaps_jax.{name}")


SUBPACKAGES = ("analysis", "attack", "data", "figures", "models", "results")


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_a_fresh_import_reaches_every_module_of_a_subpackage(package):
    """`pj.analysis.propagation` works in a new process (no earlier import)."""
    path = importlib.import_module(f"propmaps_jax.{package}").__path__
    names = sorted(m.name for m in pkgutil.iter_modules(path))
    code = (
        "import propmaps_jax as pj\n"
        f"for name in {names!r}:\n"
        f"    module = getattr(pj.{package}, name)\n"
        f"    assert module.__name__ == 'propmaps_jax.{package}.' + name, name\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


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
