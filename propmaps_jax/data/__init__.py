"""CIFAR-10: `cifar10` reads it (a path, an archive, an .npz or tensorflow-datasets)
and chooses the split that experiments attack (`attack_split`), `download` fetches
the official archive into a cache on first use. Their public names are re-exported
here (`pj.data.load_cifar10`)."""

from propmaps_jax.data.cifar10 import (
    HOW_TO_POINT,
    IMAGE_SHAPE,
    NUM_CLASSES,
    SPLITS,
    TFDS_SOURCE,
    Cifar10,
    attack_split,
    load_cifar10,
    load_from_path,
    load_from_tfds,
    validate_split,
)
from propmaps_jax.data.download import (
    ARCHIVE_NAME,
    BATCHES_DIR,
    CACHE_ENV,
    CIFAR10_MD5,
    CIFAR10_URL,
    DOWNLOAD_CHUNK_BYTES,
    DOWNLOAD_TIMEOUT_S,
    LOCAL_COPY,
    MD5_ENV,
    TEST_FILE,
    TRAIN_FILES,
    URL_ENV,
    USER_AGENT,
    cache_dir,
    download_source,
    fetch_cifar10,
)

__all__ = [
    "ARCHIVE_NAME",
    "BATCHES_DIR",
    "CACHE_ENV",
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "DOWNLOAD_CHUNK_BYTES",
    "DOWNLOAD_TIMEOUT_S",
    "HOW_TO_POINT",
    "IMAGE_SHAPE",
    "LOCAL_COPY",
    "MD5_ENV",
    "NUM_CLASSES",
    "SPLITS",
    "TEST_FILE",
    "TFDS_SOURCE",
    "TRAIN_FILES",
    "URL_ENV",
    "USER_AGENT",
    "Cifar10",
    "attack_split",
    "cache_dir",
    "download_source",
    "fetch_cifar10",
    "load_cifar10",
    "load_from_path",
    "load_from_tfds",
    "validate_split",
]

from propmaps_jax._lazy import submodule_getattr  # noqa: E402

__getattr__ = submodule_getattr(__name__, __path__)
