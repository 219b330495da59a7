"""The train experiment's run directory: the workdir, created only once every
input is checked (and removed again when a failed run wrote nothing into it), and
the settings under which a checkpoint resumes (with the starting weights known by
their content, never by their path).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from experiments.runs import rundir, stopping, storage
from propmaps_jax.errors import PropmapsError

CHECKPOINT = "checkpoint.msgpack"


def init_weights_sha256(path: str | None) -> str | None:
    """What identifies the starting weights: the SHA-256 of the file's bytes (never
    its path, so that a resume through a symlink or another path is the same run)."""
    if path is None:
        return None
    if os.path.isdir(path):
        raise PropmapsError(
            f"--init_weights={path} is a folder: pass a Keras .h5 file or a "
            "checkpoint of ours"
        )
    if not os.path.isfile(path):
        raise PropmapsError(
            f"--init_weights={path} does not exist: pass a Keras .h5 file or a "
            "checkpoint of ours"
        )
    return rundir.file_sha256(path)


def _saved_setting(saved: dict[str, Any], key: str, current: Any) -> Any:
    """A checkpoint's setting; a checkpoint written before the starting weights were
    recorded by full hash ("name sha256:<first 16 hex digits>") counts as equal when
    the digits are the start of the current hash."""
    if key == "init_weights_sha256" and key not in saved and "init_weights" in saved:
        old = saved["init_weights"]
        if old is None:
            return None
        digits = str(old).rsplit("sha256:", 1)[-1]
        return current if current and current.startswith(digits) else digits
    return saved.get(key)


def _setting_text(key: str, value: Any) -> str:
    if key == "init_weights_sha256":
        return "none" if value is None else f"SHA-256 {value[:12]}"
    return repr(value)


def check_settings(saved: dict[str, Any], current: dict[str, Any], path: str) -> None:
    """Raise unless the checkpoint was written under the same settings."""
    flag_names = {"init_weights_sha256": "init_weights", "train_examples": None}
    diffs = []
    for key, value in current.items():
        old = _saved_setting(saved, key, value)
        if old == value:
            continue
        name = flag_names.get(key, key)
        old_text, new_text = _setting_text(key, old), _setting_text(key, value)
        if name is None:
            diffs.append(f"{old_text} {key.replace('_', ' ')} (now {new_text})")
        elif key == "init_weights_sha256":
            diffs.append(f"--{name} of {old_text} (now {new_text})")
        else:
            diffs.append(f"--{name}={old_text} (now {new_text})")
    if diffs:
        raise PropmapsError(
            f"{path} was trained with other settings: {', '.join(diffs)}; "
            "rerun with the same flags to resume, or use a new --workdir"
        )


def workdir_path(path: str | None) -> str:
    """--workdir, checked without creating anything: given, and not a file or under
    one (created later by `prepare_workdir`, once every input is checked)."""
    if not path:
        raise PropmapsError(
            "--workdir is required: the folder where results are written"
        )
    if storage.is_url(path):
        return storage.normalize(path)  # checked by prepare_workdir
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        where = (
            "is" if parent == os.path.abspath(path) else f"is under {parent}, which is"
        )
        raise PropmapsError(f"--workdir={path} {where} a file: pass a folder")
    return path


def prepare_workdir(path: str) -> bool:
    """Create --workdir if needed and check that files can be written there (a probe
    file created and removed) before training; True when this run created it."""
    if storage.is_url(path):
        rundir.check_workdir(path)  # the bucket, the credentials (one line)
        return False
    created = not os.path.isdir(path)
    probe = os.path.join(path, f".write-probe-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        remove_if_empty(path, created)
        raise PropmapsError(
            f"--workdir={path} is not writable ({e.strerror}): pass a folder you "
            "can write to"
        ) from None
    return created


def remove_if_empty(path: str, created: bool) -> None:
    """Remove a workdir this run created when nothing was written into it."""
    if (
        created
        and not storage.is_url(path)
        and os.path.isdir(path)
        and not os.listdir(path)
    ):
        os.rmdir(path)


def exists(path: str) -> bool:
    """Whether `path` exists; False when its store cannot be reached."""
    try:
        return storage.isfile(path)
    except (OSError, storage.StorageError):
        return False


def kept_after_divergence(
    saved_step: int | None, steps_per_epoch: int, path: str
) -> str:
    """What a diverged run keeps: the last checkpoint written while everything
    was finite (`path`, at `saved_step`), if any."""
    if saved_step is None:
        return "nothing was saved"
    when = (
        f"after epoch {saved_step // steps_per_epoch}"
        if saved_step % steps_per_epoch == 0
        else f"at step {saved_step}"
    )
    return f"the last good checkpoint ({path}, {when}) is kept"


def exit_interrupted(stop: KeyboardInterrupt, workdir: str | None) -> None:
    """Exit with one line (what is kept, how to resume) after Ctrl-C or SIGTERM
    (`stopping.Terminated`, with the shell's status 143)."""
    kept = os.path.join(workdir or "", CHECKPOINT)
    if workdir and exists(kept):
        message = f"{kept} (the last checkpoint) is kept; run the same command "
        message += "again to resume"
    else:
        message = "no checkpoint was written yet"
    what, status = stopping.interruption(stop)
    sys.stderr.write(f"{what}: {message}\n")
    sys.exit(status)
