"""CIFAR-10 as uint8 NHWC arrays and int32 labels, train and test, official order.

Sources, in the order `load_cifar10` tries them:
1. an explicit `path` (the experiments pass `--cifar10_path`, else `$CIFAR10_PATH`):
   the official `cifar-10-python.tar.gz`, its extracted `cifar-10-batches-py/` folder
   (or a folder that contains it), or an `.npz` with `x_train, y_train, x_test, y_test`
   or with `x, y` alone (one split of images, read as the training split, with no
   test images: e.g. the first 4,000 training images, lossless); `tfds` or
   `tfds:DATA_DIR` reads a prepared tensorflow-datasets "cifar10" instead (an
   opt-in: building it needs TensorFlow);
2. otherwise the official archive, downloaded once into a cache folder and read
   from there (`propmaps_jax.data.download`).

The experiments attack and evaluate the dataset's test slot; `attack_split` puts
the training split there instead (the `.npz` of `x, y` alone needs it).
"""

from __future__ import annotations

import builtins
import dataclasses
import io
import os
import pickle
import stat
import tarfile
import zlib
from collections.abc import Callable

import numpy as np

from propmaps_jax.data.download import (
    ARCHIVE_NAME,
    BATCHES_DIR,
    TEST_FILE,
    TRAIN_FILES,
    fetch_cifar10,
)
from propmaps_jax.errors import DataError

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
TFDS_SOURCE = "tfds"
HOW_TO_POINT = (
    f"pass `path`: cifar-10-python.tar.gz, its extracted {BATCHES_DIR}/ folder or "
    "an .npz with x_train/y_train/x_test/y_test (or x/y: training images only) (or "
    "give no path to download CIFAR-10 on first use)"
)
SPLITS = ("test", "train")
# The two layouts of an .npz source: both splits, or one split of training images.
NPZ_SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_XY_KEYS = ("x", "y")


@dataclasses.dataclass(frozen=True)
class Cifar10:
    """CIFAR-10 splits: images uint8 (N, 32, 32, 3), labels int32 (N,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) of "train" or "test"."""
        if name == "train":
            return self.x_train, self.y_train
        if name == "test":
            return self.x_test, self.y_test
        raise DataError(f"unknown split {name!r}; use 'train' or 'test'")


def validate_split(images: np.ndarray, labels: np.ndarray, where: str) -> None:
    """Raise DataError unless images are uint8 (N, 32, 32, 3) with N labels in 0..9."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(
            f"{where}: images must be uint8 of shape (N, 32, 32, 3), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.shape != (images.shape[0],):
        raise DataError(
            f"{where}: expected {images.shape[0]} labels, got shape {labels.shape}"
        )
    check_label_range(labels, where)


def check_label_range(labels: np.ndarray, where: str) -> None:
    """DataError unless every label is in 0..NUM_CLASSES - 1 (any integer dtype:
    checked before a cast could wrap a value into range)."""
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(
            f"{where}: labels must be in 0..{NUM_CLASSES - 1}, "
            f"found {labels.min()}..{labels.max()}"
        )


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol-2 pickles written by Python 3 call it: the
    bytes of latin-1 text, nothing else (no codec lookup by name)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is admitted for latin-1 text only")
    return text.encode("latin1")


def _plain_dtype(*args) -> np.dtype:
    """`numpy.dtype` for the dtypes of plain numeric arrays (no object arrays)."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"object dtype {dtype} is not plain data")
    return dtype


# numpy's array reconstructors (pickle protocols up to 4, and 5) under both of
# their module names (numpy < 2 and >= 2).
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]
# The only globals a CIFAR-10 batch may name: what numpy arrays are rebuilt from
# (the official files, pickled by Python 2) and the plain data builtins that
# protocol-2 pickles written by Python 3 use for bytes. Anything else could run
# code, and is refused before it is looked up.
_BATCH_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
    ("_codecs", "encode"): _latin1_bytes,
    **{
        (module, name): getattr(builtins, name)
        for module in ("__builtin__", "builtins")
        for name in ("bytes", "bytearray", "set", "frozenset")
    },
}


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that builds plain data only: `find_class` admits the globals of
    `_BATCH_GLOBALS` and refuses every other one, so a crafted file cannot run code.
    """

    def __init__(self, raw: bytes, where: str):
        super().__init__(io.BytesIO(raw), encoding="bytes")
        self.where = where

    def find_class(self, module: str, name: str):
        found = _BATCH_GLOBALS.get((module, name))
        if found is None:
            raise DataError(
                f"{self.where} is not a plain CIFAR-10 batch: its pickle names "
                f"{module}.{name}, which could run code, and was refused before "
                "anything ran; use the official archive (or give no path to "
                "download it)"
            )
        return found


def _decode_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _BatchUnpickler(raw, where).load()
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except DataError:
        raise
    except Exception as e:  # any unpickling problem means the file is damaged
        raise DataError(
            f"{where} is not a readable CIFAR-10 batch ({type(e).__name__}: {e}); "
            "the file may be truncated or corrupt: download it again"
        ) from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"{where}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}"
        )
    # Rows are channel-major (1024 R, 1024 G, 1024 B), each 32x32 row-major. One
    # channel at a time: 3x faster than one strided transpose of all three (0.02
    # against 0.06 s per 10,000 images here).
    planes = data.reshape(-1, 3, 1024)
    images = np.empty((len(data), 1024, 3), np.uint8)
    for channel in range(3):
        images[:, :, channel] = planes[:, channel]
    images = images.reshape(-1, 32, 32, 3)
    labels = labels.astype(np.int32)
    validate_split(images, labels, where)
    return images, labels


def _concat(
    parts: list[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
    )


def _from_reader(read: Callable[[str], bytes], where: str) -> Cifar10:
    train = _concat([_decode_batch(read(f), f"{where}/{f}") for f in TRAIN_FILES])
    test = _decode_batch(read(TEST_FILE), f"{where}/{TEST_FILE}")
    return Cifar10(*train, *test, source=where)


def _load_folder(folder: str) -> Cifar10:
    if not os.path.exists(os.path.join(folder, TEST_FILE)) and os.path.isdir(
        os.path.join(folder, BATCHES_DIR)
    ):
        folder = os.path.join(folder, BATCHES_DIR)
    missing = [
        f
        for f in (*TRAIN_FILES, TEST_FILE)
        if not os.path.isfile(os.path.join(folder, f))
    ]
    if missing:
        raise DataError(
            f"{folder} is not a {BATCHES_DIR} folder: missing {', '.join(missing)}; "
            + HOW_TO_POINT
        )

    def read(name: str) -> bytes:
        with open(os.path.join(folder, name), "rb") as f:
            return f.read()

    return _from_reader(read, folder)


def _load_tar(path: str) -> Cifar10:
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {
                os.path.basename(m.name): m
                for m in tar.getmembers()
                if m.isfile() and os.path.basename(m.name) in (*TRAIN_FILES, TEST_FILE)
            }
            missing = [f for f in (*TRAIN_FILES, TEST_FILE) if f not in members]
            if missing:
                raise DataError(
                    f"{path} does not contain the CIFAR-10 batches "
                    f"(missing {', '.join(missing)}); " + HOW_TO_POINT
                )

            def read(name: str) -> bytes:
                return tar.extractfile(members[name]).read()

            return _from_reader(read, path)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        reason = " ".join(str(e).split())  # tarfile's reasons span several lines
        raise DataError(
            f"{path} is not a readable tar archive ({type(e).__name__}: {reason}); "
            "it may be truncated or corrupt: download it again"
        ) from None


def _npz_labels(labels: np.ndarray, path: str, name: str, where: str) -> np.ndarray:
    """`labels` (array `name` of the file at `path`; `where`: the split, for the
    messages) as int32 (N,), checked integer and in 0..9 in their own dtype, before
    the cast, which could wrap a large value into range."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {name} must hold integer labels, got {labels.dtype}")
    if labels.ndim == 2 and labels.shape[1] == 1:  # a column vector, as some exports
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(
            f"{path}: {name} must be a vector of labels (N,), got shape {labels.shape}"
        )
    check_label_range(labels, where)
    return labels.astype(np.int32)


def _npz_arrays(path: str) -> dict[str, np.ndarray]:
    """The arrays of either layout that the .npz at `path` holds (no pickles)."""
    if os.path.getsize(path) == 0:
        raise DataError(f"{path} is empty (0 bytes); " + HOW_TO_POINT)
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(
            f"{path} is not a readable .npz file ({type(e).__name__}: {e}); "
            "it may be truncated or corrupt"
        ) from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{path} is a single .npy array, not an .npz; " + HOW_TO_POINT)
    arrays = {}
    with npz:
        if not npz.files:
            raise DataError(f"{path} is an empty .npz (no arrays); " + HOW_TO_POINT)
        for name in (*NPZ_SPLIT_KEYS, *NPZ_XY_KEYS):
            if name not in npz.files:
                continue
            try:
                arrays[name] = npz[name]
            except Exception as e:  # object arrays need pickle; a damaged member
                raise DataError(
                    f"{path}: array {name} is not readable without pickle "
                    f"({type(e).__name__}: {e}); save it as a plain numeric array"
                ) from None
    return arrays


def _load_npz(path: str) -> Cifar10:
    arrays = _npz_arrays(path)
    split_keys = [k for k in NPZ_SPLIT_KEYS if k in arrays]
    xy_keys = [k for k in NPZ_XY_KEYS if k in arrays]
    if split_keys and xy_keys:
        raise DataError(
            f"{path} mixes two layouts ({', '.join(split_keys + xy_keys)}); an .npz "
            "source holds either x_train, y_train, x_test, y_test or x, y alone"
        )
    if xy_keys:
        return _load_npz_xy(path, arrays)
    missing = [k for k in NPZ_SPLIT_KEYS if k not in arrays]
    if missing:
        raise DataError(
            f"{path} lacks arrays {', '.join(missing)}; an .npz source needs "
            "x_train, y_train, x_test, y_test (or x, y: training images only)"
        )
    for split in ("train", "test"):
        where = f"{path} ({split})"
        labels = _npz_labels(arrays[f"y_{split}"], path, f"y_{split}", where)
        validate_split(arrays[f"x_{split}"], labels, where)
        arrays[f"y_{split}"] = labels
    return Cifar10(**arrays, source=path)


def _load_npz_xy(path: str, arrays: dict[str, np.ndarray]) -> Cifar10:
    """An .npz of `x, y` alone: one split of images, read as the training split."""
    missing = [k for k in NPZ_XY_KEYS if k not in arrays]
    if missing:
        raise DataError(
            f"{path} lacks array {missing[0]}; an .npz of one split needs x "
            "(uint8 images) and y (integer labels)"
        )
    where = f"{path} (x, y)"
    images, labels = arrays["x"], _npz_labels(arrays["y"], path, "y", where)
    validate_split(images, labels, where)
    if images.shape[0] == 0:
        raise DataError(f"{path} holds no images (x has shape {images.shape})")
    no_test = np.zeros((0, *IMAGE_SHAPE), np.uint8), np.zeros((0,), np.int32)
    return Cifar10(images, labels, *no_test, source=path)


def _is_tarfile(path: str) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, EOFError, tarfile.TarError, zlib.error):
        return False  # a damaged archive: _load_tar reports it if the name says tar


def _file_kind(mode: int) -> str:
    """What a path that is not a regular file or folder is, in words."""
    for test, kind in (
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return kind
    return "special file"


def load_from_path(path: str) -> Cifar10:
    """Load CIFAR-10 from a tar.gz archive, a batches folder or an .npz file (of
    both splits, or of `x, y` alone: a training split, with no test images).

    The dataset's `source` is the absolute path, so that a record of it means the
    same thing from any working directory.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise DataError(f"CIFAR-10 path {path} does not exist; " + HOW_TO_POINT)
    if os.path.isdir(path):
        return _load_folder(path)
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        # A device (/dev/zero never ends), a FIFO (blocks until written), a socket.
        raise DataError(
            f"{path} is a {_file_kind(mode)}, not a file or folder; " + HOW_TO_POINT
        )
    if os.path.getsize(path) == 0:
        raise DataError(f"{path} is empty (0 bytes); " + HOW_TO_POINT)
    if path.endswith(".npz"):
        return _load_npz(path)
    if path.endswith((".tar.gz", ".tgz", ".tar")) or _is_tarfile(path):
        return _load_tar(path)
    raise DataError(
        f"{path} is neither a folder, a .tar.gz nor an .npz; " + HOW_TO_POINT
    )


# ---------------------------------------------------------------------------------
# tensorflow-datasets, an opt-in: path="tfds" or "tfds:DATA_DIR".


def _tfds_split(source, where: str) -> tuple[np.ndarray, np.ndarray]:
    n = len(source)
    images = np.empty((n, *IMAGE_SHAPE), np.uint8)
    labels = np.empty((n,), np.int32)
    for i in range(n):
        record = source[i]
        images[i] = record["image"]
        labels[i] = record["label"]
    validate_split(images, labels, where)
    return images, labels


def _tfds_prepared(tfds, data_dir: str | None) -> bool:
    try:
        return bool(tfds.builder("cifar10", data_dir=data_dir).is_prepared())
    except Exception:
        return False


def load_from_tfds(data_dir: str | None = None) -> Cifar10:
    """CIFAR-10 prepared by tensorflow-datasets (no TensorFlow needed to read it)."""
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
    if data_dir and "://" not in data_dir:  # gs://bucket/... stays a URL
        data_dir = os.path.abspath(os.path.expanduser(data_dir))
    other = (
        "or give no path to download CIFAR-10 on first use, or pass `path`: "
        f"{ARCHIVE_NAME} or its extracted {BATCHES_DIR}/ folder"
    )
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            "the tfds source needs tensorflow-datasets, which is not installed: "
            f"pip install tensorflow-datasets, {other}"
        ) from None
    try:
        # download=False: tfds would need TensorFlow to build it; see the README.
        train = tfds.data_source(
            "cifar10", split="train", data_dir=data_dir, download=False
        )
        test = tfds.data_source(
            "cifar10", split="test", data_dir=data_dir, download=False
        )
        where = f"tfds cifar10 ({data_dir or 'default data dir'})"
        x_train, y_train = _tfds_split(train, where + " train")
        x_test, y_test = _tfds_split(test, where + " test")
    except DataError:
        raise
    except Exception as e:
        if not _tfds_prepared(tfds, data_dir):
            raise DataError(
                "tensorflow-datasets has no prepared 'cifar10' in "
                f"{data_dir or 'its default data dir'} (the tfds source); prepare "
                f"it with file_format='array_record' (needs TensorFlow), {other}"
            ) from None
        raise DataError(
            f"tensorflow-datasets could not read 'cifar10' "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); it "
            f"must be prepared with file_format='array_record', {other}"
        ) from None
    return Cifar10(x_train, y_train, x_test, y_test, source=where)


def _tfds_data_dir(path: str) -> tuple[bool, str | None]:
    """(is a tfds source, its data dir): "tfds" or "tfds:DATA_DIR"."""
    if path == TFDS_SOURCE:
        return True, None
    if path.startswith(TFDS_SOURCE + ":"):
        return True, path[len(TFDS_SOURCE) + 1 :] or None
    return False, None


def load_cifar10(path: str | None = None) -> Cifar10:
    """CIFAR-10 from `path` (a file, a folder, or "tfds[:DATA_DIR]"), else from the
    cache, downloaded there on first use (`fetch_cifar10`)."""
    if not path:
        return load_from_path(fetch_cifar10())
    is_tfds, data_dir = _tfds_data_dir(path)
    if is_tfds:
        return load_from_tfds(data_dir)
    return load_from_path(path)


def attack_split(dataset: Cifar10, split: str) -> Cifar10:
    """`dataset` with `split` in its test slot, the split experiments attack and
    evaluate: "test" returns it unchanged; "train" puts x_train/y_train there
    (the train slot stays) and says so in its `source` ("<source> [train split]").

    DataError when that split holds no images, naming the split to choose instead.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    images, _ = dataset.split(split)
    if len(images) == 0:
        other = SPLITS[1 - SPLITS.index(split)]
        if len(dataset.split(other)[0]) == 0:
            raise DataError(f"{dataset.source} holds no images in either split")
        only = (
            "training images only (e.g. an .npz of x, y)"
            if other == "train"
            else "test images only"
        )
        raise DataError(
            f"{dataset.source} has an empty {split} split: it holds {only}; pass "
            f"`split='{other}'`"
        )
    if split == "test":
        return dataset
    return dataclasses.replace(
        dataset,
        x_test=dataset.x_train,
        y_test=dataset.y_train,
        source=f"{dataset.source} [{split} split]",
    )
