"""Moved to `experiments.runs.storage`: the same module under its old name."""

import sys

from experiments.runs import storage as _module

sys.modules[__name__] = _module
