"""The public API survives the library's move into subpackages: every short name
is an attribute of the package, and every old dotted path imports the module that
now holds it (the same object, so monkeypatching either reaches both)."""

import importlib
import subprocess
import sys

import pytest

import propmaps_jax as pj


@pytest.mark.parametrize("name", sorted(pj.SUBMODULES))
def test_short_names_are_the_modules(name):
    assert getattr(pj, name) is importlib.import_module(pj.SUBMODULES[name])


@pytest.mark.parametrize("old", sorted(pj.MOVED))
def test_old_dotted_paths_import_the_new_module(old):
    module = importlib.import_module(old)
    home = pj.MOVED[old]
    assert module is importlib.import_module(home)
    assert module.__name__ == home and module.__spec__.name == home


def test_from_imports_of_old_paths():
    from propmaps_jax.checkpoint import atomic_write_bytes
    from propmaps_jax.perturb import apply_pixels
    from propmaps_jax.propagation import propagation_maps

    assert apply_pixels is pj.attack.perturb.apply_pixels
    assert propagation_maps is pj.analysis.propagation.propagation_maps
    assert atomic_write_bytes is pj.models.checkpoint.atomic_write_bytes


def test_importing_the_package_starts_no_jax():
    code = "import sys, propmaps_jax; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
