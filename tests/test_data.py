"""Tests of data.py (IDX, MNIST, downloads, CIFAR-10, model tensors) and images.py (pixels, grids, PNG).

No test touches the network: downloads go through file:// mirrors in tmp_path, and every archive or IDX
file a test needs is written by the test itself, except the bundled MNIST test split.
"""
import gzip
import hashlib
import io
import os
import pathlib
import pickle
import struct
import tarfile
import zlib

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from support import data, images

idx_arrays = hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5))
png_pixels = st.one_of(
    hnp.arrays(np.uint8, st.tuples(st.integers(1, 7), st.integers(1, 7))),
    hnp.arrays(np.uint8, st.tuples(st.integers(1, 7), st.integers(1, 7), st.sampled_from([1, 3]))),
)
# Few distinct values make the Paeth predictor's ties (left before up before up-left) common.
filterable_pixels = hnp.arrays(np.uint8, st.tuples(st.integers(1, 7), st.integers(1, 7), st.sampled_from([1, 3])),
                               elements=st.one_of(st.integers(0, 3), st.integers(0, 255)))
alpha_pixels = hnp.arrays(np.uint8, st.tuples(st.integers(1, 7), st.integers(1, 7), st.sampled_from([2, 4])),
                         elements=st.one_of(st.integers(0, 3), st.integers(0, 255)))
png_filter_types = st.lists(st.integers(0, 4), min_size=7, max_size=7)
grid_layouts = st.tuples(
    st.integers(1, 7),  # number of images
    st.integers(1, 4),  # nrow
    st.integers(0, 3),  # padding
    st.integers(1, 4),  # height
    st.integers(1, 4),  # width
    st.sampled_from([1, 3]),  # channels
)
square_grey_batches = st.tuples(st.integers(1, 3), st.integers(1, 6)).flatmap(
    lambda count_side: hnp.arrays(np.uint8, (count_side[0], count_side[1], count_side[1])))

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
# MD5s of the decompressed official MNIST test split (the payload inside the published .gz files).
OFFICIAL_TEST_PAYLOAD_MD5 = {
    "t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637",
}


def idx_bytes(array, dtype_code=0x08):
    """Return an IDX file's bytes: 0, 0, dtype code, ndim, big-endian uint32 sizes, then the C-order data."""
    header = bytes([0, 0, dtype_code, array.ndim]) + b"".join(struct.pack(">I", size) for size in array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def write_file(path, payload):
    """Return path after writing payload bytes there, gzip-compressed when the name ends in .gz."""
    with open(path, "wb") as out:
        out.write(gzip.compress(payload) if str(path).endswith(".gz") else payload)
    return path


def md5_of_bytes(payload):
    """Return the hexadecimal MD5 of payload."""
    return hashlib.md5(payload).hexdigest()


def link_bundled_test_split(folder):
    """Return folder after linking the bundled MNIST test split files into it."""
    for name in data.MNIST_TEST_FILES:
        os.symlink(os.path.join(DATA_DIR, name), folder / name)
    return folder


def write_fake_training_split(folder, image_count, label_count, image_size=28):
    """Return (images, labels) after writing them as train-*-ubyte.gz IDX files into folder."""
    rng = np.random.default_rng(image_count)
    fake_images = rng.integers(0, 256, size=(image_count, image_size, image_size), dtype=np.uint8)
    fake_labels = rng.integers(0, 10, size=label_count, dtype=np.uint8)
    write_file(folder / "train-images-idx3-ubyte.gz", idx_bytes(fake_images))
    write_file(folder / "train-labels-idx1-ubyte.gz", idx_bytes(fake_labels))
    return fake_images, fake_labels


class Python2StylePickler(pickle._Pickler):
    """Pickler that writes bytes as Python 2 str opcodes, as the CIFAR-10 batches (pickled by Python 2) do.

    Python 3 writes bytes at protocol 2 through a call to _codecs.encode; the real files never do, and the
    restricted unpickler must be tested on the real format, so this uses the pure-Python pickler's dispatch.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj):
        """Return nothing; write obj as SHORT_BINSTRING (< 256 bytes) or BINSTRING, then memoize it."""
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def cifar_batch_pickle(batch):
    """Return batch pickled like the real archive: protocol 2, Python 2 strings, numpy.core global names."""
    stream = io.BytesIO()
    Python2StylePickler(stream, protocol=2).dump(batch)
    # The archive was pickled by numpy 1.x, whose array reconstructor lives at numpy.core.multiarray.
    return stream.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def cifar_batch(rng, count):
    """Return a CIFAR-10 batch dict with bytes keys: uint8 data (count, 3072) and a list of count labels."""
    return {
        b"batch_label": b"training batch",
        b"data": rng.integers(0, 256, size=(count, 3072), dtype=np.uint8),
        b"labels": [int(label) for label in rng.integers(0, 10, size=count)],
        b"filenames": [b"image_%d.png" % index for index in range(count)],
    }


def write_cifar_archive(path, member_payloads):
    """Return path after writing a tar.gz whose members cifar-10-batches-py/<name> hold the given bytes."""
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in member_payloads.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return path


def cifar_archive_members(batches):
    """Return {member name: pickle bytes} for data_batch_1..5 (the given batches) plus a test_batch."""
    members = {f"data_batch_{index}": cifar_batch_pickle(batch) for index, batch in enumerate(batches, start=1)}
    members["test_batch"] = cifar_batch_pickle(cifar_batch(np.random.default_rng(99), 2))
    return members


def png_with_filters(pixels, filter_types):
    """Return PNG bytes of uint8 (H, W, C) pixels (C = 1, 2, 3, 4: grey, grey + alpha, RGB, RGBA), row y filtered
    with filter_types[y] (PNG spec, section 9)."""
    height, width, channels = pixels.shape
    rows = pixels.reshape(height, width * channels).astype(np.int32)
    scanlines = []
    for y in range(height):
        raw = rows[y]
        above = rows[y - 1] if y > 0 else np.zeros_like(raw)
        left = np.concatenate([np.zeros(channels, dtype=np.int32), raw[:-channels]])
        up_left = np.concatenate([np.zeros(channels, dtype=np.int32), above[:-channels]])
        estimate = left + above - up_left
        to_left, to_above, to_up_left = abs(estimate - left), abs(estimate - above), abs(estimate - up_left)
        paeth = np.where((to_left <= to_above) & (to_left <= to_up_left), left,
                         np.where(to_above <= to_up_left, above, up_left))
        predictor = [0, left, above, (left + above) // 2, paeth][filter_types[y]]
        scanlines.append(bytes([filter_types[y]]) + ((raw - predictor) % 256).astype(np.uint8).tobytes())
    header = struct.pack(">IIBBBBB", width, height, 8, {1: 0, 2: 4, 3: 2, 4: 6}[channels], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(b"".join(scanlines))) + png_chunk(b"IEND", b""))


def png_chunk(kind, payload):
    """Return a PNG chunk: big-endian length, kind, payload, CRC32 of kind + payload."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


class FileCreatingPayload:
    """Object whose unpickling calls function(*arguments), which creates a file or folder."""

    def __init__(self, function, arguments):
        """Return nothing; keep the call that unpickling will make."""
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        """Return (function, arguments): pickle records this call and makes it at load time."""
        return self.function, self.arguments


# ---------------------------------------------------------------- IDX


@given(array=idx_arrays, compressed=st.booleans())
def test_read_idx_returns_the_array_it_was_written_from(tmp_path_factory, array, compressed):
    """read_idx(write(a)) == a, same shape and uint8 dtype, raw or gzip-compressed."""
    path = tmp_path_factory.mktemp("idx") / ("array.idx.gz" if compressed else "array.idx")
    loaded = data.read_idx(write_file(path, idx_bytes(array)))
    assert loaded.dtype == np.uint8 and loaded.shape == array.shape
    np.testing.assert_array_equal(loaded, array)


DAMAGED_IDX = {
    "wrong magic": ("digits.idx", lambda good: b"\x01" + good[1:], "not an IDX file"),
    "wrong dtype code": ("digits.idx", lambda good: good[:2] + b"\x0d" + good[3:], "dtype code 0x0d"),
    "truncated header": ("digits.idx", lambda good: good[:9], "truncated"),
    "truncated data": ("digits.idx", lambda good: good[:-1], "truncated"),
    "trailing bytes": ("digits.idx", lambda good: good + b"\x00\x00", "2 trailing bytes"),
    "not gzip": ("digits.idx.gz", lambda good: good, "corrupt gzip"),
    "truncated gzip": ("digits.idx.gz", lambda good: gzip.compress(good)[:-12], "corrupt gzip"),
    "corrupt gzip": ("digits.idx.gz",
                     lambda good: gzip.compress(good)[:20] + bytes([gzip.compress(good)[20] ^ 0xFF])
                     + gzip.compress(good)[21:], "corrupt gzip"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_IDX))
def test_read_idx_rejects_damaged_files_with_a_one_line_fix(tmp_path, case):
    """Each kind of damage raises DataError naming the file, the problem, and what to do, on one line."""
    name, damage, words = DAMAGED_IDX[case]
    good = idx_bytes(np.arange(60, dtype=np.uint8).reshape(3, 4, 5))
    path = tmp_path / name
    path.write_bytes(damage(good))
    with pytest.raises(data.DataError, match=words) as raised:
        data.read_idx(path)
    message = str(raised.value)
    assert str(path) in message and "\n" not in message
    assert "--download" in message or "uint8" in message


def test_read_idx_reports_a_missing_file(tmp_path):
    """A missing path raises DataError saying it is missing and how to get it back."""
    with pytest.raises(data.DataError, match="missing.*--download"):
        data.read_idx(tmp_path / "absent-idx3-ubyte.gz")


# ---------------------------------------------------------------- bundled MNIST test split


def test_bundled_test_split_loads_as_ten_thousand_labelled_digits(tmp_path):
    """The bundled split is 10,000 uint8 28x28 digits with pixels 0..255 and labels covering all of 0..9."""
    images_path, labels_path, split = data.mnist_files(link_bundled_test_split(tmp_path))
    digits, labels = data.load_mnist(tmp_path)
    assert split == "test" and os.path.basename(images_path) == "t10k-images-idx3-ubyte.gz"
    assert digits.shape == (10000, 28, 28) and digits.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    assert digits.min() == 0 and digits.max() == 255
    assert set(np.unique(labels).tolist()) == set(range(10))


def test_bundled_files_match_md5sums():
    """Every file listed in data/MD5SUMS has that MD5, and the list is exactly the bundled test split."""
    checked = data.verify_md5sums(DATA_DIR)
    assert sorted(os.path.basename(path) for path in checked) == sorted(data.MNIST_TEST_FILES)


def test_bundled_payloads_are_the_official_mnist_test_split():
    """The re-compressed .gz files decompress to the published MNIST test split byte for byte."""
    for name, payload_md5 in OFFICIAL_TEST_PAYLOAD_MD5.items():
        with gzip.open(os.path.join(DATA_DIR, name), "rb") as stream:
            assert md5_of_bytes(stream.read()) == payload_md5


def test_verify_md5sums_detects_a_changed_file(tmp_path):
    """One changed byte in a listed file makes verify_md5sums raise DataError naming the file."""
    for name in data.MNIST_TEST_FILES + (data.MD5SUMS_FILE,):
        (tmp_path / name).write_bytes(pathlib.Path(DATA_DIR, name).read_bytes())
    damaged = tmp_path / "t10k-labels-idx1-ubyte.gz"
    payload = bytearray(damaged.read_bytes())
    payload[-1] ^= 0x01
    damaged.write_bytes(bytes(payload))
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.gz has md5"):
        data.verify_md5sums(tmp_path)


# ---------------------------------------------------------------- split choice and consistency


def test_load_mnist_prefers_the_training_split_when_present(tmp_path):
    """With train-* files beside the test split, load_mnist returns the training files' contents."""
    link_bundled_test_split(tmp_path)
    fake_images, fake_labels = write_fake_training_split(tmp_path, image_count=5, label_count=5)
    assert data.mnist_files(tmp_path)[2] == "train"
    digits, labels = data.load_mnist(tmp_path)
    np.testing.assert_array_equal(digits, fake_images)
    np.testing.assert_array_equal(labels, fake_labels)


def test_training_never_reads_the_last_2000_test_digits_that_evaluate_judges_against(tmp_path):
    """On the bundled test split train.py reads its first 8,000 digits, exactly; the last 2,000 (none of which equals
    a training digit) are never read, and the split's name says so. With the training split present, all of it."""
    link_bundled_test_split(tmp_path)
    digits, _ = data.load_mnist(tmp_path)
    config = {"dataset": "mnist", "img_size": 28, "max_images": 0}
    trained = data.load_training_images(config, str(tmp_path), False, lambda message: None)
    assert torch.equal(trained, data.to_model_tensor(digits[:8000], 28))
    assert data.HELD_OUT_TEST_DIGITS == 2000 and len(digits) == data.MNIST_TEST_DIGITS
    training_digits = {digit.tobytes() for digit in digits[:8000]}
    assert not any(digit.tobytes() in training_digits for digit in digits[8000:])
    assert data.training_split(config, str(tmp_path)) == "MNIST test split (first 8,000)"
    fake_images, _ = write_fake_training_split(tmp_path, image_count=5, label_count=5)
    trained = data.load_training_images(config, str(tmp_path), False, lambda message: None)
    assert torch.equal(trained, data.to_model_tensor(fake_images, 28))
    assert data.training_split(config, str(tmp_path)) == "MNIST train split"


def test_a_test_split_too_small_to_hold_out_2000_digits_is_a_one_line_error(tmp_path):
    """A test split of 2,000 digits leaves nothing to train on once the held-out digits are set aside: DataError."""
    write_file(tmp_path / data.MNIST_TEST_FILES[0], idx_bytes(np.zeros((2000, 28, 28), dtype=np.uint8)))
    write_file(tmp_path / data.MNIST_TEST_FILES[1], idx_bytes(np.zeros(2000, dtype=np.uint8)))
    config = {"dataset": "mnist", "img_size": 28, "max_images": 0}
    with pytest.raises(data.DataError, match="holds 2000 digits, where it has 10,000") as error:
        data.load_training_images(config, str(tmp_path), False, lambda message: None)
    assert "\n" not in str(error.value)


def test_load_mnist_falls_back_to_the_test_split_when_the_training_pair_is_incomplete(tmp_path):
    """Training images without training labels are not a split: the bundled test split is used."""
    link_bundled_test_split(tmp_path)
    write_fake_training_split(tmp_path, image_count=5, label_count=5)
    os.remove(tmp_path / "train-labels-idx1-ubyte.gz")
    assert data.mnist_files(tmp_path)[2] == "test"
    assert data.load_mnist(tmp_path)[0].shape == (10000, 28, 28)


def test_load_mnist_rejects_image_and_label_count_mismatch(tmp_path):
    """5 images with 4 labels raises DataError giving both counts."""
    write_fake_training_split(tmp_path, image_count=5, label_count=4)
    with pytest.raises(data.DataError, match=r"5 images but .* \(4,\) labels"):
        data.load_mnist(tmp_path)


def test_load_mnist_rejects_images_that_are_not_28x28(tmp_path):
    """20x20 images in the MNIST files raise DataError saying 28x28 was expected."""
    write_fake_training_split(tmp_path, image_count=3, label_count=3, image_size=20)
    with pytest.raises(data.DataError, match="expected 28x28"):
        data.load_mnist(tmp_path)


# ---------------------------------------------------------------- downloads through file:// mirrors


@pytest.fixture
def mirror(tmp_path):
    """Return (mirror url, {name: payload}, {name: md5}): fake training files served from a folder."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    payloads = {name: gzip.compress(idx_bytes(np.full(7 + index, index, dtype=np.uint8)))
                for index, name in enumerate(data.MNIST_TRAIN_FILES)}
    for name, payload in payloads.items():
        (folder / name).write_bytes(payload)
    checksums = {name: md5_of_bytes(payload) for name, payload in payloads.items()}
    return folder.as_uri() + "/", payloads, checksums


def test_download_mnist_fetches_files_whose_md5_matches(tmp_path, mirror):
    """Each file arrives under its final name with the mirror's bytes, and no temporary file remains."""
    url, payloads, checksums = mirror
    target = tmp_path / "target"
    paths = data.download_mnist(target, mirrors=[url], checksums=checksums)
    assert [os.path.basename(path) for path in paths] == list(checksums)
    assert sorted(os.listdir(target)) == sorted(payloads)
    for name, payload in payloads.items():
        assert (target / name).read_bytes() == payload


def test_download_mnist_falls_back_to_the_next_mirror(tmp_path, mirror):
    """A first mirror without the files is skipped; the second mirror's files arrive intact."""
    url, payloads, checksums = mirror
    empty = tmp_path / "empty-mirror"
    empty.mkdir()
    data.download_mnist(tmp_path / "target", mirrors=[empty.as_uri() + "/", url], checksums=checksums)
    for name, payload in payloads.items():
        assert (tmp_path / "target" / name).read_bytes() == payload


@pytest.mark.parametrize("damage", ["wrong checksum", "truncated source"])
def test_failed_download_leaves_neither_final_nor_temporary_file(tmp_path, mirror, damage):
    """A download whose MD5 does not match raises DataError and leaves the target folder empty."""
    url, payloads, checksums = mirror
    name = data.MNIST_TRAIN_FILES[0]
    if damage == "wrong checksum":
        checksums = dict(checksums, **{name: "0" * 32})
    else:
        source = tmp_path / "mirror" / name
        source.write_bytes(payloads[name][: len(payloads[name]) // 2])
    target = tmp_path / "target"
    with pytest.raises(data.DataError) as raised:
        data.download_mnist(target, mirrors=[url], checksums=checksums)
    message = str(raised.value)
    assert f"could not download {name} from any mirror" in message and "does not match" in message
    assert "bundled 10,000-digit test split" in message and "\n" not in message
    assert os.listdir(target) == []


def test_download_mnist_keeps_a_present_valid_file_without_fetching(tmp_path, mirror):
    """A file already present with the right MD5 is not fetched again (the only mirror does not exist)."""
    _, payloads, checksums = mirror
    target = tmp_path / "target"
    target.mkdir()
    for name, payload in payloads.items():
        (target / name).write_bytes(payload)
    missing_mirror = (tmp_path / "no-such-mirror").as_uri() + "/"
    paths = data.download_mnist(target, mirrors=[missing_mirror], checksums=checksums)
    assert sorted(os.path.basename(path) for path in paths) == sorted(payloads)
    assert sorted(os.listdir(target)) == sorted(payloads)


def test_download_mnist_replaces_a_damaged_file(tmp_path, mirror):
    """A present file with the wrong MD5 is downloaded again and replaced by the mirror's bytes."""
    url, payloads, checksums = mirror
    target = tmp_path / "target"
    target.mkdir()
    name = data.MNIST_TRAIN_FILES[1]
    (target / name).write_bytes(b"half a file")
    data.download_mnist(target, mirrors=[url], checksums=checksums)
    assert (target / name).read_bytes() == payloads[name]


# ---------------------------------------------------------------- CIFAR-10


def test_load_cifar10_maps_channel_first_rows_to_nhwc_pixels(tmp_path):
    """images[i, y, x, c] = data[i, c * 1024 + y * 32 + x]; labels follow batch order 1..5."""
    rng = np.random.default_rng(0)
    batches = [cifar_batch(rng, 2) for _ in range(5)]
    batches[0][b"data"][0] = 0
    batches[0][b"data"][0, 1 * 1024 + 3 * 32 + 5] = 200  # green channel at row 3, column 5 of image 0
    write_cifar_archive(tmp_path / data.CIFAR10_FILE, cifar_archive_members(batches))
    pictures, labels = data.load_cifar10(tmp_path)
    assert pictures.shape == (10, 32, 32, 3) and pictures.dtype == np.uint8
    assert pictures[0, 3, 5, 1] == 200 and pictures[0].sum() == 200
    flat = np.concatenate([batch[b"data"] for batch in batches])
    image, row, column, channel = np.indices(pictures.shape)
    np.testing.assert_array_equal(pictures, flat[image, channel * 1024 + row * 32 + column])
    assert labels.dtype == np.uint8
    assert labels.tolist() == [label for batch in batches for label in batch[b"labels"]]


def test_download_cifar10_then_load_through_a_file_mirror(tmp_path):
    """download_cifar10 stores the archive under its final name (MD5 injected), and load_cifar10 reads it."""
    rng = np.random.default_rng(1)
    source = write_cifar_archive(tmp_path / "served.tar.gz", cifar_archive_members([cifar_batch(rng, 1)] * 5))
    target = tmp_path / "target"
    path = data.download_cifar10(target, url=source.as_uri(), md5=md5_of_bytes(source.read_bytes()))
    assert os.listdir(target) == [data.CIFAR10_FILE] and path == os.path.join(target, data.CIFAR10_FILE)
    assert data.load_cifar10(target)[0].shape == (5, 32, 32, 3)


PAYLOADS = {
    "builtins.exec": lambda marker: FileCreatingPayload(exec, (f"open({str(marker)!r}, 'w').close()",)),
    "builtins.eval": lambda marker: FileCreatingPayload(eval, (f"open({str(marker)!r}, 'w').close()",)),
    "os.mkdir": lambda marker: FileCreatingPayload(os.mkdir, (str(marker),)),
}


@pytest.mark.parametrize("payload_name", sorted(PAYLOADS))
def test_load_cifar10_refuses_pickled_calls_and_never_runs_them(tmp_path, payload_name):
    """A batch whose pickle calls anything but numpy's array reconstruction raises DataError before the call.

    Proof the payload is live: the same bytes through plain pickle.loads do create the marker.
    """
    marker = tmp_path / "payload-ran"
    batch = cifar_batch(np.random.default_rng(2), 2)
    batch[b"labels"] = PAYLOADS[payload_name](marker)
    rng = np.random.default_rng(3)
    members = cifar_archive_members([batch] + [cifar_batch(rng, 2) for _ in range(4)])
    write_cifar_archive(tmp_path / data.CIFAR10_FILE, members)
    with pytest.raises(data.DataError, match="refuses to unpickle") as raised:
        data.load_cifar10(tmp_path)
    assert "\n" not in str(raised.value)
    assert not marker.exists()
    pickle.loads(members["data_batch_1"], encoding="latin1")
    assert marker.exists()


def test_load_cifar10_rejects_rows_that_are_not_3072_pixels(tmp_path):
    """data of shape (n, 3000) raises DataError stating the expected (n, 3072)."""
    rng = np.random.default_rng(4)
    batches = [cifar_batch(rng, 2) for _ in range(5)]
    batches[2][b"data"] = batches[2][b"data"][:, :3000]
    write_cifar_archive(tmp_path / data.CIFAR10_FILE, cifar_archive_members(batches))
    with pytest.raises(data.DataError, match=r"data_batch_3 holds data .* expected uint8 \(n, 3072\)"):
        data.load_cifar10(tmp_path)


def test_load_cifar10_rejects_an_archive_without_the_training_batches(tmp_path):
    """An archive lacking data_batch_5 raises DataError naming the missing member."""
    rng = np.random.default_rng(5)
    members = cifar_archive_members([cifar_batch(rng, 1) for _ in range(4)])
    write_cifar_archive(tmp_path / data.CIFAR10_FILE, members)
    with pytest.raises(data.DataError, match="lacks cifar-10-batches-py/data_batch_5"):
        data.load_cifar10(tmp_path)


def test_load_cifar10_rejects_a_truncated_archive(tmp_path):
    """The first half of a valid archive raises DataError telling to download it again."""
    rng = np.random.default_rng(6)
    path = write_cifar_archive(tmp_path / data.CIFAR10_FILE,
                               cifar_archive_members([cifar_batch(rng, 20) for _ in range(5)]))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(data.DataError, match="corrupt archive.*--download"):
        data.load_cifar10(tmp_path)


def test_load_cifar10_reports_a_missing_archive(tmp_path):
    """No archive in data_dir raises DataError telling to run with --download."""
    with pytest.raises(data.DataError, match="missing.*--download"):
        data.load_cifar10(tmp_path)


# ---------------------------------------------------------------- model tensors


@given(pixels=square_grey_batches)
def test_to_model_tensor_scales_pixels_to_minus_one_one(pixels):
    """At the native size, x = pixel / 127.5 - 1 exactly, float32 (N, 1, H, W), inside [-1, 1]."""
    tensor = data.to_model_tensor(pixels, pixels.shape[1])
    assert tensor.dtype == torch.float32 and tensor.shape == (pixels.shape[0], 1) + pixels.shape[1:]
    expected = torch.from_numpy(pixels.astype(np.float32)).unsqueeze(1) / 127.5 - 1
    assert torch.equal(tensor, expected)
    assert tensor.min() >= -1 and tensor.max() <= 1


def test_to_model_tensor_maps_black_to_minus_one_and_white_to_one():
    """Pixel 0 -> -1.0 and pixel 255 -> 1.0 exactly."""
    tensor = data.to_model_tensor(np.array([[[0, 255], [255, 0]]], dtype=np.uint8), 2)
    assert tensor[0, 0].tolist() == [[-1.0, 1.0], [1.0, -1.0]]


def test_padding_28_to_32_keeps_every_mnist_pixel_exact():
    """28 -> 32 pads 2 pixels of -1 on each side; the centre 28x28 crop equals pixel / 127.5 - 1 exactly."""
    pixels = np.random.default_rng(7).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    tensor = data.to_model_tensor(pixels, 32)
    assert tensor.shape == (4, 1, 32, 32)
    centre = tensor[:, 0, 2:30, 2:30]
    assert torch.equal(centre, torch.from_numpy(pixels.astype(np.float32)) / 127.5 - 1)
    assert torch.equal(torch.round((centre + 1) * 127.5).to(torch.uint8), torch.from_numpy(pixels))
    border = tensor.clone()
    border[:, :, 2:30, 2:30] = -1
    assert torch.all(border == -1)


@pytest.mark.parametrize("img_size", [16, 33, 27])
def test_sizes_that_cannot_pad_evenly_are_resized_within_range(img_size):
    """Shrinking or odd growth resizes to (N, 1, img_size, img_size) within [-1, 1]; a constant image stays constant."""
    pixels = np.random.default_rng(8).integers(0, 256, size=(2, 28, 28), dtype=np.uint8)
    tensor = data.to_model_tensor(pixels, img_size)
    assert tensor.shape == (2, 1, img_size, img_size)
    assert tensor.min() >= -1 and tensor.max() <= 1
    constant = data.to_model_tensor(np.full((1, 28, 28), 200, dtype=np.uint8), img_size)
    torch.testing.assert_close(constant, torch.full_like(constant, 200 / 127.5 - 1))


def test_rgb_images_become_channels_first():
    """(N, H, W, 3) uint8 becomes (N, 3, H, W) with out[n, c, y, x] = pixels[n, y, x, c] / 127.5 - 1."""
    pixels = np.random.default_rng(9).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    tensor = data.to_model_tensor(pixels, 32)
    assert tensor.shape == (2, 3, 32, 32)
    expected = torch.from_numpy(pixels.astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1
    assert torch.equal(tensor, expected)
    assert torch.equal(data.to_model_tensor(pixels, 36)[:, :, 2:34, 2:34], expected)


@pytest.mark.parametrize("bad", [np.zeros((2, 28, 28), dtype=np.float32), np.zeros((2, 28, 28, 2), dtype=np.uint8)])
def test_to_model_tensor_rejects_non_uint8_or_unknown_layouts(bad):
    """Float input or a 2-channel last axis raises ValueError."""
    with pytest.raises(ValueError, match="to_model_tensor expects"):
        data.to_model_tensor(bad, 32)


# ---------------------------------------------------------------- pixels and grids


def test_to_uint8_rounds_clips_and_moves_channels_last():
    """pixel = round((x + 1) * 127.5) clipped to 0..255, NaN -> 0, (N, C, H, W) -> (N, H, W, C)."""
    values = torch.tensor([-1.0, 1.0, 0.0, -2.0, 3.0, float("nan")]).reshape(1, 1, 2, 3)
    assert images.to_uint8(values)[0, :, :, 0].tolist() == [[0, 255, 128], [0, 255, 0]]
    rgb = np.random.default_rng(10).uniform(-1, 1, size=(2, 3, 4, 5))
    pixels = images.to_uint8(rgb)
    assert pixels.shape == (2, 4, 5, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, np.rint((rgb.transpose(0, 2, 3, 1) + 1) * 127.5).astype(np.uint8))


@given(layout=grid_layouts)
def test_make_grid_places_image_k_in_its_cell(layout):
    """Grid is (rows (H + p) + p, cols (W + p) + p, C); image k sits at row k // cols, column k % cols."""
    count, nrow, padding, height, width, channels = layout
    pictures = np.random.default_rng(count).integers(0, 256, size=(count, height, width, channels), dtype=np.uint8)
    grid = images.make_grid(pictures, nrow, padding=padding, pad_value=7)
    columns = min(nrow, count)
    rows = -(-count // columns)
    assert grid.shape == (rows * (height + padding) + padding, columns * (width + padding) + padding, channels)
    covered = np.zeros(grid.shape[:2], dtype=bool)
    for index in range(count):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        np.testing.assert_array_equal(grid[top:top + height, left:left + width], pictures[index])
        covered[top:top + height, left:left + width] = True
    assert np.all(grid[~covered] == 7)


# ---------------------------------------------------------------- PNG


@given(pixels=png_pixels)
def test_png_decodes_to_the_pixels_it_encoded(pixels):
    """decode_png(encode_png(a)) == a for grey (H, W), (H, W, 1) and RGB (H, W, 3)."""
    decoded = images.decode_png(images.encode_png(pixels))
    expected = pixels[:, :, 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, expected)


@pytest.mark.parametrize("shape, colour_type", [((3, 5), 0), ((3, 5, 1), 0), ((3, 5, 3), 2)])
def test_png_starts_with_signature_and_ihdr_fields(shape, colour_type):
    """Bytes 0-7 are the PNG signature; IHDR holds width, height, depth 8, the colour type, zeros, and its CRC."""
    encoded = images.encode_png(np.zeros(shape, dtype=np.uint8))
    assert encoded[:8] == b"\x89PNG\r\n\x1a\n"
    assert encoded[8:16] == struct.pack(">I", 13) + b"IHDR"
    assert struct.unpack(">IIBBBBB", encoded[16:29]) == (5, 3, 8, colour_type, 0, 0, 0)
    assert struct.unpack(">I", encoded[29:33])[0] == zlib.crc32(encoded[12:29])
    assert encoded.endswith(struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))


@pytest.mark.parametrize("offset", [16, 20, 28, 41, -13])
def test_png_with_a_flipped_byte_fails_the_crc_check(offset):
    """Changing one byte inside a chunk's data (IHDR, IDAT) or its CRC makes decode_png raise ValueError."""
    encoded = bytearray(images.encode_png(np.arange(24, dtype=np.uint8).reshape(2, 4, 3)))
    encoded[offset] ^= 0x10
    with pytest.raises(ValueError, match="CRC"):
        images.decode_png(bytes(encoded))


def test_decode_png_rejects_a_bad_signature():
    """Bytes that do not start with the PNG signature raise ValueError."""
    with pytest.raises(ValueError, match="signature"):
        images.decode_png(b"GIF89a" + images.encode_png(np.zeros((1, 1), dtype=np.uint8))[6:])


# Paeth's ties, which 40 drawn examples rarely reach: at row 1, column 1, (left, up, up_left) = (0, 3, 1), where
# up and up_left are equally close to the estimate 2 (up wins); at column 3, (0, 3, 2), where left and up_left are
# equally close to the estimate 1 (left wins).
PAETH_TIES = np.array([[1, 3, 2, 3], [0, 7, 0, 9]], dtype=np.uint8)[:, :, None]


@example(pixels=PAETH_TIES, filter_types=[0, 4, 0, 0, 0, 0, 0])
@given(pixels=filterable_pixels, filter_types=png_filter_types)
def test_decode_png_undoes_every_row_filter(pixels, filter_types):
    """Rows filtered with None, Sub, Up, Average or Paeth (PNG spec, section 9) decode to the original pixels."""
    decoded = images.decode_png(png_with_filters(pixels, filter_types))
    np.testing.assert_array_equal(decoded.reshape(pixels.shape), pixels)


@given(pixels=alpha_pixels, filter_types=png_filter_types)
def test_decode_png_reads_grey_and_rgb_with_alpha_under_every_row_filter(pixels, filter_types):
    """Colour types 4 (grey + alpha) and 6 (RGBA) decode to (H, W, 2) and (H, W, 4), whatever the row filters."""
    np.testing.assert_array_equal(images.decode_png(png_with_filters(pixels, filter_types)), pixels)


def test_decode_png_refuses_palette_and_16_bit_images_with_one_line():
    """A palette image (colour type 3) or 16 bits per sample: ValueError naming the bit depth and colour type."""
    for bit_depth, colour_type in ((8, 3), (16, 2)):
        header = struct.pack(">IIBBBBB", 1, 1, bit_depth, colour_type, 0, 0, 0)
        png = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b"")
        with pytest.raises(ValueError, match=f"bit depth {bit_depth}, colour type {colour_type}"):
            images.decode_png(png)


@pytest.mark.parametrize("bad", [np.zeros((2, 2), dtype=np.float32), np.zeros((2, 2, 2), dtype=np.uint8),
                                 np.zeros((0, 2), dtype=np.uint8), np.zeros((2, 2, 2, 1), dtype=np.uint8)])
def test_encode_png_rejects_wrong_dtype_or_shape(bad):
    """Non-uint8 pixels, 2 channels, an empty image or a 4-d array raise ValueError."""
    with pytest.raises(ValueError, match="encode_png expects"):
        images.encode_png(bad)


def test_write_png_writes_a_decodable_file_and_nothing_else(tmp_path):
    """write_png leaves exactly the named file, which decodes to the pixels; a failed write keeps the old file."""
    pixels = np.random.default_rng(11).integers(0, 256, size=(6, 9, 3), dtype=np.uint8)
    path = images.write_png(str(tmp_path / "grid.png"), pixels)
    assert os.listdir(tmp_path) == ["grid.png"]
    np.testing.assert_array_equal(images.decode_png(pathlib.Path(path).read_bytes()), pixels)
    with pytest.raises(ValueError):
        images.write_png(path, pixels.astype(np.float32))
    assert os.listdir(tmp_path) == ["grid.png"]
    np.testing.assert_array_equal(images.decode_png(pathlib.Path(path).read_bytes()), pixels)
