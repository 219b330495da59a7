"""CIFAR-10 loading: every source format from small files, tfds mock data, errors.

The download on first use is tested in test_data_download.py.
"""

import os
import pickle
import sys
import tarfile

import numpy as np
import pytest

from experiments import common
from propmaps_jax import data
from propmaps_jax.errors import DataError
from tests._fixtures import assert_dataset_equal

TRAIN_PER_BATCH, TEST_COUNT = 2, 3


def _encode(images: np.ndarray) -> np.ndarray:
    """The official row layout, written independently: R plane, G plane, B plane."""
    n = images.shape[0]
    rows = np.empty((n, 3072), np.uint8)
    for i in range(n):
        for ch in range(3):
            for r in range(32):
                start = ch * 1024 + r * 32
                rows[i, start : start + 32] = images[i, r, :, ch]
    return rows


def _fake_splits(seed: int = 0):
    rng = np.random.default_rng(seed)
    n_train = 5 * TRAIN_PER_BATCH
    x_train = rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8)
    y_train = rng.integers(0, 10, n_train).astype(np.int32)
    x_test = rng.integers(0, 256, (TEST_COUNT, 32, 32, 3), dtype=np.uint8)
    y_test = np.array([3, 8, 9], np.int32)
    return x_train, y_train, x_test, y_test


def _write_batch(path, images, labels, data_rows=None) -> None:
    batch = {
        b"data": _encode(images) if data_rows is None else data_rows,
        b"labels": [int(v) for v in labels],
        b"batch_label": b"fake",
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f)


def _write_folder(root, splits) -> str:
    x_train, y_train, x_test, y_test = splits
    folder = root / data.BATCHES_DIR
    folder.mkdir(parents=True)
    for i in range(5):
        part = slice(i * TRAIN_PER_BATCH, (i + 1) * TRAIN_PER_BATCH)
        _write_batch(folder / f"data_batch_{i + 1}", x_train[part], y_train[part])
    _write_batch(folder / "test_batch", x_test, y_test)
    return str(folder)


def _write_tar(root, splits) -> str:
    folder = _write_folder(root / "src", splits)
    archive = str(root / "cifar-10-python.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=data.BATCHES_DIR)
    return archive


def test_folder_round_trip(tmp_path):
    splits = _fake_splits()
    folder = _write_folder(tmp_path, splits)
    assert_dataset_equal(data.load_from_path(folder), splits)
    # The folder that contains cifar-10-batches-py/ works too.
    assert_dataset_equal(data.load_from_path(str(tmp_path)), splits)


def test_channel_major_decoding_hand_checked(tmp_path):
    splits = _fake_splits()
    dataset = data.load_from_path(_write_folder(tmp_path, splits))
    with open(os.path.join(tmp_path, data.BATCHES_DIR, "test_batch"), "rb") as f:
        row = pickle.load(f, encoding="bytes")[b"data"][1]
    # Pixel (row 5, col 7): R at 5*32+7, G 1024 later, B 2048 later.
    assert tuple(dataset.x_test[1, 5, 7]) == (
        row[167],
        row[1024 + 167],
        row[2048 + 167],
    )


def test_tar_gz_round_trip(tmp_path):
    splits = _fake_splits(1)
    assert_dataset_equal(data.load_from_path(_write_tar(tmp_path, splits)), splits)


def test_npz_round_trip_and_env_variable(tmp_path, monkeypatch):
    splits = _fake_splits(2)
    path = str(tmp_path / "cifar.npz")
    x_train, y_train, x_test, y_test = splits
    # Labels as an int64 column vector, as some exports store them.
    np.savez(
        path,
        x_train=x_train,
        y_train=y_train.astype(np.int64)[:, None],
        x_test=x_test,
        y_test=y_test,
    )
    monkeypatch.setenv("CIFAR10_PATH", path)
    # The environment variable is the experiments' fallback, not the library's.
    dataset = data.load_cifar10(common.cifar10_path(None))
    assert_dataset_equal(dataset, splits)
    assert dataset.source == path


def test_explicit_path_wins_over_environment(tmp_path, monkeypatch):
    splits = _fake_splits(3)
    folder = _write_folder(tmp_path, splits)
    monkeypatch.setenv("CIFAR10_PATH", str(tmp_path / "nowhere"))
    assert_dataset_equal(data.load_cifar10(common.cifar10_path(folder)), splits)


def test_tfds_mock_data(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.delenv("CIFAR10_PATH", raising=False)
    with tfds.testing.mock_data(num_examples=6):
        dataset = data.load_cifar10("tfds")  # an opt-in, never the default
        expected = tfds.data_source("cifar10", split="test")
        expected_images = np.stack([expected[i]["image"] for i in range(6)])
        expected_labels = np.array([expected[i]["label"] for i in range(6)])
    assert dataset.x_train.shape == (6, 32, 32, 3) and dataset.x_train.dtype == np.uint8
    assert dataset.y_test.dtype == np.int32
    np.testing.assert_array_equal(dataset.x_test, expected_images)
    np.testing.assert_array_equal(dataset.y_test, expected_labels)
    assert dataset.source.startswith("tfds cifar10")


def test_tfds_honours_data_dir_variable(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    seen = []

    def fake_source(name, split, data_dir=None, download=True):
        seen.append((name, split, data_dir, download))
        raise FileNotFoundError("dataset cifar10 not found")

    monkeypatch.setattr(tfds, "data_source", fake_source)
    monkeypatch.setenv("TFDS_DATA_DIR", "/some/tfds")
    with pytest.raises(DataError):
        data.load_cifar10("tfds")
    with pytest.raises(DataError):
        data.load_cifar10("tfds:/other/tfds")  # its own data dir wins
    # A gs:// data dir stays a URL. (Not prepared, as tfds would say offline, without
    # asking it: that would look for credentials and for Cloud Storage.)
    monkeypatch.setattr(data.cifar10, "_tfds_prepared", lambda tfds, data_dir: False)
    with pytest.raises(DataError, match="no prepared 'cifar10' in gs://bucket/tens"):
        data.load_cifar10("tfds:gs://bucket/tensorflow_datasets")
    # download=False: tfds itself fetches nothing (building needs TensorFlow).
    assert seen == [
        ("cifar10", "train", "/some/tfds", False),
        ("cifar10", "train", "/other/tfds", False),
        ("cifar10", "train", "gs://bucket/tensorflow_datasets", False),
    ]


def _tfds_failure(monkeypatch, error: Exception) -> str:
    """The one-line DataError of load_cifar10("tfds") when tfds.data_source raises
    `error` (skipped without tensorflow-datasets)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.delenv("CIFAR10_PATH", raising=False)

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(tfds, "data_source", failing)
    with pytest.raises(DataError) as raised:
        data.load_cifar10("tfds")
    return str(raised.value)


def test_tfds_not_prepared_names_the_options(monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", "/nonexistent/tfds")
    message = _tfds_failure(
        monkeypatch, FileNotFoundError("Could not find cifar10\nmore lines")
    )
    assert message.startswith(
        "tensorflow-datasets has no prepared 'cifar10' in /nonexistent/tfds "
        "(the tfds source); prepare it with file_format='array_record'"
    )
    for option in ("give no path to download", "`path`", "cifar-10-python.tar.gz"):
        assert option in message
    assert "\n" not in message
    # The experiments name their flag and the environment variable instead.
    for option in ("--cifar10_path", "CIFAR10_PATH"):
        assert option in common.in_flag_terms(message)


def test_tfds_prepared_but_unreadable_says_why(monkeypatch):
    monkeypatch.setattr(data.cifar10, "_tfds_prepared", lambda tfds, data_dir: True)
    message = _tfds_failure(
        monkeypatch, NotImplementedError("Random access for FileFormat.TFRECORD\nmore")
    )
    assert "could not read 'cifar10' (NotImplementedError: Random access" in message
    assert "file_format='array_record'" in message and "\n" not in message


def _write_tfds_cifar10(data_dir: str, splits) -> list[str]:
    """A prepared tfds "cifar10" (ArrayRecord, as `tfds build` writes it), written
    without TensorFlow: tf.Example protos with PNG images, tfds' own metadata.
    Returns the files written, relative to `data_dir`."""
    import io

    import tensorflow_datasets as tfds
    from array_record.python import array_record_module
    from PIL import Image
    from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2

    def serialized(i, image, label):
        png = io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")
        feature = {
            "id": tf_feature_pb2.Feature(
                bytes_list=tf_feature_pb2.BytesList(value=[f"x_{i}".encode()])
            ),
            "image": tf_feature_pb2.Feature(
                bytes_list=tf_feature_pb2.BytesList(value=[png.getvalue()])
            ),
            "label": tf_feature_pb2.Feature(
                int64_list=tf_feature_pb2.Int64List(value=[int(label)])
            ),
        }
        features = tf_feature_pb2.Features(feature=feature)
        return tf_example_pb2.Example(features=features).SerializeToString()

    builder = tfds.builder("cifar10", data_dir=data_dir, file_format="array_record")
    os.makedirs(builder.data_dir)
    x_train, y_train, x_test, y_test = splits
    infos = []
    for split, images, labels in (
        ("train", x_train, y_train),
        ("test", x_test, y_test),
    ):
        name = f"cifar10-{split}.array_record-00000-of-00001"
        writer = array_record_module.ArrayRecordWriter(
            os.path.join(builder.data_dir, name), "group_size:1"
        )
        size = 0
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            record = serialized(i, image, label)
            writer.write(record)
            size += len(record)
        writer.close()
        template = tfds.core.naming.ShardedFileTemplate(
            data_dir=builder.data_dir,
            template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
            dataset_name="cifar10",
            split=split,
            filetype_suffix="array_record",
        )
        infos.append(
            tfds.core.SplitInfo(
                name=split,
                shard_lengths=[len(labels)],
                num_bytes=size,
                filename_template=template,
            )
        )
    builder.info.set_splits(tfds.core.SplitDict(infos))
    builder.info.write_to_directory(builder.data_dir)
    return [
        os.path.relpath(os.path.join(folder, f), data_dir)
        for folder, _, files in os.walk(data_dir)
        for f in files
    ]


def test_tfds_prepared_copy_on_disk_and_on_gcs(tmp_path, gcs_bucket, monkeypatch):
    """A real prepared copy (not mock data) read through tfds.data_source, from a
    local data dir and from a gs:// one on the emulator, without TensorFlow."""
    pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("array_record")
    import fsspec.registry  # noqa: F401 (the module, for its _registry below)
    import gcsfs.core

    from experiments.runs import storage

    monkeypatch.delenv("CIFAR10_PATH", raising=False)
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    splits = _fake_splits(3)
    local = str(tmp_path / "tensorflow_datasets")
    files = _write_tfds_cifar10(local, splits)
    dataset = data.load_cifar10("tfds:" + local)
    assert_dataset_equal(dataset, splits)
    assert dataset.source == f"tfds cifar10 ({local})"

    remote = storage.join(gcs_bucket, "tensorflow_datasets")
    for name in files:
        with open(os.path.join(local, name), "rb") as f:
            storage.write_bytes(storage.join(remote, name), f.read())
    # tfds reads metadata through etils.epath -> fsspec -> gcsfs, the records through
    # array_record's own Cloud Storage client: point both at the emulator, without
    # credentials (nothing may look for a metadata server or real Cloud Storage).
    emulator = os.environ["STORAGE_EMULATOR_HOST"]
    monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", emulator)

    class EmulatorGCS(gcsfs.core.GCSFileSystem):
        def __init__(self, *args, **kwargs):
            kwargs.pop("finalize_on_close", None)
            super().__init__(*args, **{**kwargs, "token": "anon"})

    registry = sys.modules["fsspec.registry"]._registry  # fsspec.registry: a view
    monkeypatch.setitem(registry, "gs", EmulatorGCS)
    dataset = data.load_cifar10("tfds:" + remote)
    assert_dataset_equal(dataset, splits)
    assert dataset.source == f"tfds cifar10 ({remote})"


def test_tfds_not_installed(monkeypatch):
    monkeypatch.delenv("CIFAR10_PATH", raising=False)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    with pytest.raises(
        DataError, match="needs tensorflow-datasets, which is not installed.*`path`"
    ):
        data.load_cifar10("tfds")


def test_missing_path_and_incomplete_folder(tmp_path):
    with pytest.raises(DataError, match=r"nowhere does not exist; pass `path`"):
        data.load_from_path(str(tmp_path / "nowhere"))
    folder = _write_folder(tmp_path, _fake_splits())
    os.remove(os.path.join(folder, "data_batch_3"))
    with pytest.raises(DataError, match=r"missing data_batch_3"):
        data.load_from_path(folder)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt is neither a folder"):
        data.load_from_path(str(other))


def test_corrupt_pickle(tmp_path):
    folder = _write_folder(tmp_path, _fake_splits())
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        f.write(b"\x80\x04garbage")
    with pytest.raises(DataError, match=r"test_batch is not a readable CIFAR-10 batch"):
        data.load_from_path(folder)


class _RunsCode:
    """Unpickled, calls `function(*args)`: what a crafted batch file would do."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize(
    "payload, refused",
    [
        (lambda marker: _RunsCode(os.system, f"touch {marker}"), "system"),
        (lambda marker: _RunsCode(open, str(marker), "w"), ".open"),
        (
            lambda marker: {b"data": _RunsCode(os.system, f"touch {marker}")},
            "system",
        ),
    ],
    ids=["os.system", "builtins.open", "nested in the batch"],
)
@pytest.mark.parametrize("protocol", [2, 5])
def test_a_pickle_that_would_run_code_is_refused_before_it_runs(
    tmp_path, payload, refused, protocol
):
    """No code from data: the batch is unpickled with a restricted unpickler that
    names the file and the refused global; the payload never runs."""
    folder = _write_folder(tmp_path / "src", _fake_splits())
    marker = tmp_path / "marker"
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump(payload(marker), f, protocol=protocol)
    with pytest.raises(DataError) as raised:
        data.load_from_path(folder)
    message = str(raised.value)
    assert "test_batch is not a plain CIFAR-10 batch" in message
    assert refused in message and "\n" not in message
    assert not marker.exists()


def test_batches_of_every_pickle_protocol_are_read(tmp_path):
    """The restricted unpickler admits what numpy arrays and bytes are rebuilt from
    in every protocol (protocol 2 from Python 3 rebuilds bytes via _codecs)."""
    splits = _fake_splits()
    x_train, y_train, x_test, y_test = splits
    folder = _write_folder(tmp_path, splits)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        batch = {
            b"data": _encode(x_test),
            b"labels": [int(v) for v in y_test],
            b"batch_label": b"testing batch 1 of 1",
            b"filenames": [b"a.png", b"", b"c.png"],
        }
        with open(os.path.join(folder, "test_batch"), "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        assert_dataset_equal(data.load_from_path(folder), splits)


def test_devices_fifos_and_empty_files_are_refused_at_once(tmp_path):
    """/dev/zero (read forever), a FIFO (blocks until someone writes), a 0-byte
    .tar.gz: one line each, without reading them."""
    fifo = tmp_path / "cifar.tar.gz"
    os.mkfifo(fifo)
    empty = tmp_path / "empty.tar.gz"
    empty.write_bytes(b"")
    cases = [
        ("/dev/zero", "/dev/zero is a character device, not a file or folder"),
        (str(fifo), "cifar.tar.gz is a FIFO (named pipe), not a file or folder"),
        (str(empty), "empty.tar.gz is empty (0 bytes); pass `path`"),
    ]
    for path, message in cases:
        with pytest.raises(DataError) as raised:
            data.load_from_path(path)
        assert message in str(raised.value) and "\n" not in str(raised.value)


def test_unreadable_tar_reason_is_one_line(tmp_path):
    archive = tmp_path / "noise.tar.gz"
    archive.write_bytes(b"this is not an archive at all" * 40)
    with pytest.raises(DataError) as raised:
        data.load_from_path(str(archive))
    message = str(raised.value)
    assert "noise.tar.gz is not a readable tar archive" in message
    assert "\n" not in message


def test_truncated_tar_gz(tmp_path):
    archive = _write_tar(tmp_path, _fake_splits())
    size = os.path.getsize(archive)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(open(archive, "rb").read()[: size * 2 // 3])
    with pytest.raises(DataError, match=r"truncated\.tar\.gz.*(truncated|corrupt)"):
        data.load_from_path(str(truncated))


def test_tar_gz_truncated_to_its_first_bytes(tmp_path):
    archive = _write_tar(tmp_path, _fake_splits())
    truncated = tmp_path / "cut.tar.gz"
    truncated.write_bytes(open(archive, "rb").read()[:20])
    with pytest.raises(DataError, match=r"cut\.tar\.gz.*(truncated|corrupt)"):
        data.load_from_path(str(truncated))


def test_tar_without_batches(tmp_path):
    archive = tmp_path / "other.tar.gz"
    note = tmp_path / "README"
    note.write_text("not cifar")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(note, arcname="README")
    with pytest.raises(DataError, match=r"other\.tar\.gz does not contain"):
        data.load_from_path(str(archive))


def test_wrong_shapes(tmp_path):
    x_train, y_train, x_test, y_test = _fake_splits()
    folder = _write_folder(tmp_path, (x_train, y_train, x_test, y_test))
    _write_batch(
        os.path.join(folder, "test_batch"),
        x_test,
        y_test,
        data_rows=np.zeros((3, 3000), np.uint8),
    )
    with pytest.raises(
        DataError, match=r"test_batch: 'data' must be uint8 \(N, 3072\)"
    ):
        data.load_from_path(folder)

    path = str(tmp_path / "bad.npz")
    np.savez(
        path, x_train=x_train, y_train=y_train, x_test=x_test[:, :, :16], y_test=y_test
    )
    with pytest.raises(DataError, match=r"bad\.npz \(test\): images must be uint8"):
        data.load_from_path(path)
    np.savez(path, x_train=x_train, y_train=y_train[:-1], x_test=x_test, y_test=y_test)
    with pytest.raises(DataError, match=r"bad\.npz \(train\): expected 10 labels"):
        data.load_from_path(path)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test)
    with pytest.raises(DataError, match=r"bad\.npz lacks arrays y_test"):
        data.load_from_path(path)


def test_labels_out_of_range(tmp_path):
    x_train, y_train, x_test, _ = _fake_splits()
    folder = _write_folder(tmp_path, (x_train, y_train, x_test, np.array([0, 10, 2])))
    with pytest.raises(
        DataError, match=r"test_batch: labels must be in 0..9, found 0..10"
    ):
        data.load_from_path(folder)
    path = str(tmp_path / "neg.npz")
    np.savez(
        path, x_train=x_train, y_train=-y_train - 1, x_test=x_test, y_test=[0, 1, 2]
    )
    with pytest.raises(DataError, match=r"neg\.npz \(train\): labels must be in 0..9"):
        data.load_from_path(path)


def test_real_copy(cifar10_path):
    dataset = data.load_cifar10(cifar10_path)
    assert dataset.x_train.shape == (50000, 32, 32, 3)
    assert dataset.x_test.shape == (10000, 32, 32, 3)
    assert dataset.x_train.dtype == dataset.x_test.dtype == np.uint8
    assert dataset.y_train.dtype == dataset.y_test.dtype == np.int32
    assert dataset.y_test[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert np.bincount(dataset.y_train, minlength=10).tolist() == [5000] * 10
    assert np.bincount(dataset.y_test, minlength=10).tolist() == [1000] * 10
    # Real photos, not noise: neighbouring pixels are strongly correlated.
    x = dataset.x_test[:100].astype(np.float64)
    assert np.corrcoef(x[:, :, :-1].ravel(), x[:, :, 1:].ravel())[0, 1] > 0.8


# --- An .npz of x, y alone: one split of images, read as the training split.


def _write_xy(path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def test_npz_of_x_y_is_a_training_split_without_test_images(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    y = np.array([6, 9, 9, 4, 1], np.int64)  # int64, as the lossless file stores them
    path = _write_xy(tmp_path / "first5.npz", x=x, y=y)
    dataset = data.load_from_path(path)
    empty = np.zeros((0, 32, 32, 3), np.uint8), np.zeros((0,), np.int32)
    assert_dataset_equal(dataset, (x, y.astype(np.int32), *empty))
    assert dataset.source == path


def _bad_npz_cases():
    """(name, write the file at a path, a phrase its one-line DataError holds)."""
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    y = np.array([0, 1, 2], np.int64)

    def savez(**arrays):
        return lambda path: np.savez(path, **arrays)

    def write_bytes(content):
        return lambda path: open(path, "wb").write(content)

    def save_npy(path):  # np.save would append .npy to the name
        with open(path, "wb") as f:
            np.save(f, x)

    return [
        ("wrong shape", savez(x=x[:, :, :16], y=y), "images must be uint8 of shape"),
        ("wrong dtype", savez(x=x.astype(np.float32), y=y), "got float32 (3, 32, 32,"),
        ("float labels", savez(x=x, y=y.astype(np.float64)), "y must hold integer"),
        ("label matrix", savez(x=x, y=np.zeros((3, 2), int)), "got shape (3, 2)"),
        ("missing y", savez(x=x), "lacks array y; an .npz of one split needs x"),
        ("missing x", savez(y=y), "lacks array x; an .npz of one split needs x"),
        ("mixed layouts", savez(x=x, y=y, x_test=x), "mixes two layouts (x_test, x,"),
        (
            "label 10",
            savez(x=x, y=np.array([0, 10, 2])),
            "(x, y): labels must be in 0..9",
        ),
        # Checked before the int32 cast, which would wrap 2**32 + 3 to 3.
        ("wrapping label", savez(x=x, y=y + 2**32), "found 4294967296..4294967298"),
        ("negative label", savez(x=x, y=-y - 1), "found -3..-1"),
        ("uneven lengths", savez(x=x, y=y[:2]), "expected 3 labels, got shape (2,)"),
        ("no images", savez(x=x[:0], y=y[:0]), "holds no images (x has shape (0,"),
        ("empty file", write_bytes(b""), "is empty (0 bytes)"),
        ("no arrays", savez(), "is an empty .npz (no arrays)"),
        ("truncated", write_bytes(b"PK\x03\x04garbage"), "is not a readable .npz"),
        ("a .npy", save_npy, "is a single .npy array, not an .npz"),
        # Never allow_pickle: an object array stays unread.
        ("objects", savez(x=x, y=np.array([0, "a", 2], object)), "without pickle"),
    ]


BAD_NPZ = _bad_npz_cases()


@pytest.mark.parametrize(
    "name, write, phrase", BAD_NPZ, ids=[case[0] for case in BAD_NPZ]
)
def test_bad_npz_gives_one_line_naming_the_file(tmp_path, name, write, phrase):
    path = str(tmp_path / "bad.npz")
    write(path)
    with pytest.raises(DataError) as raised:
        data.load_from_path(path)
    message = str(raised.value)
    assert phrase in message, (name, message)
    assert path in message and "\n" not in message, (name, message)


def test_two_split_npz_labels_checked_before_the_cast(tmp_path):
    x_train, y_train, x_test, y_test = _fake_splits()
    path = str(tmp_path / "wrap.npz")
    wrapping = y_test.astype(np.int64) + 2**32
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=wrapping)
    with pytest.raises(DataError, match=r"\(test\): labels must be in 0..9, found 42"):
        data.load_from_path(path)


# --- attack_split: the split in the test slot, the one experiments attack.


def _dataset(seed: int = 6, source: str = "/data/c.npz") -> data.Cifar10:
    return data.Cifar10(*_fake_splits(seed), source=source)


def test_attack_split_test_is_the_dataset_itself():
    dataset = _dataset()
    assert data.attack_split(dataset, "test") is dataset


def test_attack_split_train_moves_the_training_images_into_the_test_slot():
    dataset = _dataset()
    chosen = data.attack_split(dataset, "train")
    x_train, y_train, _, _ = _fake_splits(6)
    assert_dataset_equal(chosen, (x_train, y_train, x_train, y_train))
    assert chosen.split("test")[0] is dataset.x_train  # no copy
    assert chosen.source == "/data/c.npz [train split]"
    assert dataset.source == "/data/c.npz"  # the input is left alone


def test_attack_split_of_an_empty_split_says_what_to_pass(tmp_path):
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    path = _write_xy(tmp_path / "train_only.npz", x=x, y=np.arange(4))
    train_only = data.load_from_path(path)
    with pytest.raises(DataError) as raised:
        data.attack_split(train_only, "test")
    message = str(raised.value)
    assert message == (
        f"{path} has an empty test split: it holds training images only (e.g. an "
        ".npz of x, y); pass `split='train'`"
    )
    # The experiments name their flag.
    assert common.in_flag_terms(message).endswith("pass --data_split=train")
    np.testing.assert_array_equal(data.attack_split(train_only, "train").x_test, x)

    x_train, y_train, x_test, y_test = _fake_splits()
    test_only = data.Cifar10(x_train[:0], y_train[:0], x_test, y_test, source="t")
    with pytest.raises(DataError, match=r"empty train split: it holds test images"):
        data.attack_split(test_only, "train")
    nothing = data.Cifar10(x_train[:0], y_train[:0], x_test[:0], y_test[:0], "n")
    with pytest.raises(DataError, match=r"^n holds no images in either split$"):
        data.attack_split(nothing, "test")
    with pytest.raises(DataError, match=r"unknown split 'val'; use one of test, train"):
        data.attack_split(_dataset(), "val")


def _lossless_path(cifar10_path: str) -> str:
    """The lossless first 4,000 training images beside $CIFAR10_PATH's copy
    ($CIFAR10_LOSSLESS_PATH wins); skip where it is absent."""
    jpeg_root = os.path.abspath(cifar10_path)
    while os.path.basename(jpeg_root) in ("", data.BATCHES_DIR):
        jpeg_root = os.path.dirname(jpeg_root)
    path = os.environ.get("CIFAR10_LOSSLESS_PATH") or os.path.join(
        os.path.dirname(jpeg_root), "cifar10-lossless", "train_first4000.npz"
    )
    if not os.path.isfile(path):
        pytest.skip(f"{path} is absent: no lossless CIFAR-10 training images")
    return path


def test_real_lossless_first_4000_pair_with_the_jpeg_copy(cifar10_path):
    from propmaps_jax.results import provenance

    path = _lossless_path(cifar10_path)
    lossless = data.attack_split(data.load_cifar10(path), "train")
    jpeg = data.attack_split(data.load_cifar10(cifar10_path), "train")
    x, y = lossless.split("test")
    assert x.shape == (4000, 32, 32, 3) and x.dtype == np.uint8
    assert y.dtype == np.int32 and lossless.source.endswith("[train split]")
    # The same images in the same order: data_batch_1's first 4,000 labels, and the
    # JPEG copy's pixels about 5.8 away on the 0-255 scale (README of the copy).
    x_jpeg, y_jpeg = jpeg.split("test")
    np.testing.assert_array_equal(y, y_jpeg[:4000])
    difference = np.abs(x.astype(np.int16) - x_jpeg[:4000]).mean()
    assert 5.3 < difference < 6.3, difference
    # An attack's settings identify the images by content: the two encodings of
    # the same 4,000 images never share a run directory.
    assert provenance.dataset_sha256(x, y) != provenance.dataset_sha256(
        x_jpeg[:4000], y_jpeg[:4000]
    )
