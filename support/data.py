"""Training data for the DDPM: MNIST digits and CIFAR-10 images, read from their original files, or your own images.

MNIST comes as IDX files. The official 10,000-digit test split is bundled in data/ (checked by data/MD5SUMS);
the 60,000-digit training split is downloaded on request and preferred when present. torchvision's layout
(DIR/MNIST/raw, files with or without .gz) is read too.
CIFAR-10 comes as the python tar.gz archive of pickled batches, read with an unpickler that only builds arrays.
Downloads are atomic: a file appears under its final name only after its MD5 matched.
Your own images: a folder of PNG files (--dataset folder:PATH) or a uint8 array in an .npz (--dataset npz:PATH).
"""
import gzip
import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
import zipfile
import zlib

import numpy as np
import torch

from support import files, images

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
MNIST_TRAIN_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
MNIST_TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
# Published MD5s of the .gz files as served by the mirrors (the same values torchvision checks).
MNIST_TRAIN_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
}
MNIST_IMAGE_SIZE = 28
TORCHVISION_MNIST_FOLDER = os.path.join("MNIST", "raw")  # where torchvision.datasets.MNIST(root) keeps the files
MNIST_CLASSES = 10
MNIST_TEST_DIGITS = 10_000
# The bundled test split's last 2,000 digits are never trained on: tools.evaluate judges samples against them.
HELD_OUT_TEST_DIGITS = 2_000

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FILE = "cifar-10-python.tar.gz"
CIFAR10_TRAIN_MEMBERS = tuple(f"cifar-10-batches-py/data_batch_{index}" for index in range(1, 6))
CIFAR10_IMAGE_SIZE = 32
CIFAR10_CLASSES = 10

MD5SUMS_FILE = "MD5SUMS"
DOWNLOAD_TIMEOUT_S = 30

# IDX type codes (third header byte) this reader understands; MNIST only uses 0x08.
IDX_DTYPES = {0x08: np.dtype(np.uint8)}

# The only globals a CIFAR-10 batch pickle refers to: numpy's array reconstruction.
# numpy >= 2 writes numpy._core, the archive (written by numpy 1.x under Python 2) says numpy.core.
PICKLE_ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
})

REPAIR_HINT = "delete it and run with --download, or restore it from git"


class DataError(Exception):
    """A data file is missing, damaged or could not be fetched; the message says what to do."""


def read_idx(path):
    """Return the array stored in an IDX file (gzip-compressed when the name ends in .gz).

    Format: 2 zero bytes, a dtype code byte (0x08 = uint8), a byte ndim, ndim big-endian uint32 sizes,
    then prod(sizes) items in C order. Any deviation (magic, dtype, short or overlong data) is a DataError.
    """
    raw = _read_file_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path} is truncated (expected at least a 4-byte IDX header, got {len(raw)} bytes): "
                        f"{REPAIR_HINT}")
    if raw[0:2] != b"\x00\x00":
        raise DataError(f"{path} is not an IDX file (bad magic {raw[:4].hex()}, expected 0000 then dtype and ndim): "
                        f"{REPAIR_HINT}")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code not in IDX_DTYPES:
        raise DataError(f"{path} has IDX dtype code 0x{dtype_code:02x}, only 0x08 (uint8) is supported: "
                        f"use a uint8 IDX file such as MNIST")
    header_bytes = 4 + 4 * ndim
    if len(raw) < header_bytes:
        raise DataError(f"{path} is truncated (expected a {header_bytes}-byte header for {ndim} dimensions, "
                        f"got {len(raw)} bytes): {REPAIR_HINT}")
    shape = tuple(int.from_bytes(raw[4 + 4 * axis:8 + 4 * axis], "big") for axis in range(ndim))
    dtype = IDX_DTYPES[dtype_code]
    expected = _element_count(shape) * dtype.itemsize
    found = len(raw) - header_bytes
    if found < expected:
        raise DataError(f"{path} is truncated (expected {expected} bytes of data for shape {shape}, got {found}): "
                        f"{REPAIR_HINT}")
    if found > expected:
        raise DataError(f"{path} has {found - expected} trailing bytes after the {expected} bytes of data "
                        f"for shape {shape}: {REPAIR_HINT}")
    return np.frombuffer(raw, dtype=dtype, offset=header_bytes).reshape(shape).copy()


def _read_file_bytes(path):
    """Return the bytes of a file, decompressed when its name ends in .gz; DataError if missing or corrupt."""
    try:
        if str(path).endswith(".gz"):
            with gzip.open(path, "rb") as stream:
                return stream.read()
        with open(path, "rb") as stream:
            return stream.read()
    except FileNotFoundError:
        raise DataError(f"{path} is missing: run with --download for the training split, "
                        f"or restore the bundled test split with git") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise DataError(f"{path} is a corrupt gzip file ({error}): {REPAIR_HINT}") from None
    except OSError as error:  # a folder under the file's name, no permission, a read error
        raise DataError(f"{path} cannot be read ({error.strerror or error}): it must be the data file itself; "
                        f"{REPAIR_HINT}") from None


def _element_count(shape):
    """Return prod(shape) as an exact Python int (numpy's product can overflow on hostile headers)."""
    count = 1
    for size in shape:
        count *= size
    return count


def mnist_files(data_dir="data"):
    """Return (images_path, labels_path, split_name) of the MNIST split load_mnist reads.

    split_name is "train" (60,000 digits) when both training files are found, otherwise "test" (the bundled
    10,000 digits). Each pair is looked for in data_dir, then in data_dir/MNIST/raw (torchvision's layout), each
    file gzip-compressed (NAME.gz, as downloaded) or not (NAME, as torchvision extracts it).
    """
    for names, split in ((MNIST_TRAIN_FILES, "train"), (MNIST_TEST_FILES, "test")):
        for folder in (data_dir, os.path.join(data_dir, TORCHVISION_MNIST_FOLDER)):
            paths = [_existing_idx_file(folder, name) for name in names]
            if all(paths):
                return paths[0], paths[1], split
    test_paths = [os.path.join(data_dir, name) for name in MNIST_TEST_FILES]
    return test_paths[0], test_paths[1], "test"


def _existing_idx_file(folder, gz_name):
    """Return the path of folder/NAME.gz, else of folder/NAME (uncompressed), else None."""
    for name in (gz_name, gz_name[:-len(".gz")]):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def load_mnist(data_dir="data"):
    """Return (images, labels): uint8 (N, 28, 28) digits with ink 255 on black 0, uint8 (N,) classes 0..9.

    Reads the training split when present in data_dir, else the bundled test split (see mnist_files).
    """
    images_path, labels_path, _ = mnist_files(data_dir)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (MNIST_IMAGE_SIZE, MNIST_IMAGE_SIZE):
        raise DataError(f"{images_path} holds images of shape {images.shape[1:]}, expected 28x28 digits: "
                        f"{REPAIR_HINT}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape} labels: "
                        f"the pair is mismatched, {REPAIR_HINT}")
    if labels.size and labels.max() >= MNIST_CLASSES:
        raise DataError(f"{labels_path} holds label {labels.max()}, expected digits 0..9: {REPAIR_HINT}")
    return images, labels


def md5_of_file(path):
    """Return the hexadecimal MD5 digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5sums(data_dir="data"):
    """Return the paths listed in data_dir/MD5SUMS after checking each file's MD5 against it.

    MD5SUMS is in md5sum format ("<hex digest>  <file name>" per line), so `md5sum -c MD5SUMS` agrees.
    """
    sums_path = os.path.join(data_dir, MD5SUMS_FILE)
    try:
        with open(sums_path, encoding="utf-8") as stream:
            lines = [line.split() for line in stream if line.strip()]
    except FileNotFoundError:
        raise DataError(f"{sums_path} is missing: restore it from git") from None
    checked = []
    for expected_md5, name in lines:
        path = os.path.join(data_dir, name.lstrip("*"))
        if not os.path.exists(path):
            raise DataError(f"{path} is missing: restore it from git")
        found_md5 = md5_of_file(path)
        if found_md5 != expected_md5:
            raise DataError(f"{path} has md5 {found_md5}, {sums_path} expects {expected_md5}: restore it from git")
        checked.append(path)
    return checked


def download_file(urls, dest, md5, timeout=DOWNLOAD_TIMEOUT_S):
    """Return dest after fetching it from the first of urls whose bytes have the given MD5.

    Each try streams into a temporary file next to dest, checks the MD5, fsyncs, then renames it onto dest,
    so dest never holds a partial or unverified download. Raises DataError when every url fails.
    """
    reasons = []
    for url in urls:
        try:
            _fetch_verified(url, dest, md5, timeout)
            return dest
        # Network failures come from several hierarchies (URLError, http.client errors, timeouts, bad URLs);
        # any of them only means: try the next mirror.
        except Exception as error:
            reasons.append(f"{url}: {error}")
    raise DataError(f"could not download {os.path.basename(dest)} from any mirror (no network?): "
                    f"{'; '.join(reasons)}")


def _fetch_verified(url, dest, md5, timeout):
    """Return nothing; fetch url into a temporary file beside dest and rename it onto dest if its MD5 matches."""
    def write(out):
        digest = hashlib.md5()
        with urllib.request.urlopen(url, timeout=timeout) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise DataError(f"md5 {digest.hexdigest()} does not match the published {md5}")

    files.write_atomically(dest, write)


def _has_md5(path, md5):
    """Return True when path exists and its bytes have the given MD5."""
    return os.path.exists(path) and md5_of_file(path) == md5


def download_mnist(data_dir="data", mirrors=MNIST_MIRRORS, timeout=DOWNLOAD_TIMEOUT_S, checksums=MNIST_TRAIN_MD5):
    """Return the paths of the MNIST training files in data_dir, downloading those missing or damaged.

    Each file name in checksums is fetched from mirror + name, mirrors tried in order; files already present
    with the right MD5 are left alone.
    """
    os.makedirs(data_dir, exist_ok=True)
    paths = []
    for name, md5 in checksums.items():
        dest = os.path.join(data_dir, name)
        if not _has_md5(dest, md5):
            try:
                download_file([mirror.rstrip("/") + "/" + name for mirror in mirrors], dest, md5, timeout)
            except DataError as error:
                raise DataError(f"{error}; training continues to work on the bundled 10,000-digit test split") \
                    from None
        paths.append(dest)
    return paths


def download_cifar10(data_dir="data", url=CIFAR10_URL, md5=CIFAR10_MD5, timeout=DOWNLOAD_TIMEOUT_S):
    """Return the path of cifar-10-python.tar.gz in data_dir, downloading it unless present with the right MD5."""
    os.makedirs(data_dir, exist_ok=True)
    dest = os.path.join(data_dir, CIFAR10_FILE)
    if not _has_md5(dest, md5):
        download_file([url], dest, md5, timeout)
    return dest


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that builds only numpy arrays and plain containers: any other global is refused.

    A pickle can name any importable callable (os.system, builtins.eval) and have it called while loading;
    find_class is where every such name is resolved, so refusing there stops the call before it happens.
    """

    def __init__(self, stream, source, **kwargs):
        """Return nothing; remember source (where the pickle came from) to name it in error messages."""
        super().__init__(stream, **kwargs)
        self.source = source

    def find_class(self, module, name):
        """Return the numpy global (module, name) if it is on PICKLE_ALLOWED_GLOBALS, else raise DataError."""
        if (module, name) not in PICKLE_ALLOWED_GLOBALS:
            raise DataError(f"{self.source}: refuses to unpickle {module}.{name} (a CIFAR-10 batch holds only "
                            f"numpy arrays, so this is not the real archive): delete it and run with --download")
        return super().find_class(module, name)


def load_cifar10(data_dir="data"):
    """Return (images, labels): the 50,000 CIFAR-10 training images uint8 (N, 32, 32, 3) RGB and uint8 (N,) classes.

    Reads data_batch_1..5 from cifar-10-python.tar.gz without extracting. Each batch is a pickled dict with
    "data": uint8 (n, 3072), each row 1024 red then 1024 green then 1024 blue values of a 32x32 image in
    row-major order, and "labels": n ints in 0..9.
    """
    path = os.path.join(data_dir, CIFAR10_FILE)
    if not os.path.exists(path):
        raise DataError(f"{path} is missing: run with --download to fetch CIFAR-10 (163 MB)")
    images, labels = [], []
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in CIFAR10_TRAIN_MEMBERS:
                batch_images, batch_labels = _cifar10_batch(_unpickle_member(archive, member), f"{path}:{member}")
                images.append(batch_images)
                labels.append(batch_labels)
    except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise DataError(f"{path} is a corrupt archive ({error}): delete it and run with --download") from None
    except OSError as error:  # a folder under the archive's name, no permission, a read error
        raise DataError(f"{path} cannot be read ({error.strerror or error}): delete it and run with --download") \
            from None
    return np.concatenate(images), np.concatenate(labels)


def _unpickle_member(archive, member):
    """Return the object pickled in one archive member, read into memory and loaded by RestrictedUnpickler."""
    try:
        stream = archive.extractfile(member)
    except KeyError:
        raise DataError(f"{archive.name} lacks {member}: it is not the CIFAR-10 python archive, "
                        f"delete it and run with --download") from None
    if stream is None:
        raise DataError(f"{archive.name}:{member} is not a regular file: delete it and run with --download")
    source = f"{archive.name}:{member}"
    # latin1 is how numpy arrays pickled under Python 2 (the archive's origin) must be decoded.
    unpickler = RestrictedUnpickler(io.BytesIO(stream.read()), source, encoding="latin1")
    try:
        return unpickler.load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise DataError(f"{source} is not a valid pickle ({error}): delete the archive and run with --download") \
            from None


def _cifar10_batch(batch, where):
    """Return (images uint8 (n, 32, 32, 3), labels uint8 (n,)) from one unpickled CIFAR-10 batch dict.

    images[i, y, x, c] = data[i, c * 1024 + y * 32 + x].
    """
    data, labels = _batch_field(batch, "data", where), _batch_field(batch, "labels", where)
    pixels = CIFAR10_IMAGE_SIZE * CIFAR10_IMAGE_SIZE * 3
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        raise DataError(f"{where} holds data of type {type(data).__name__} {getattr(data, 'shape', '')}, "
                        f"expected uint8 (n, {pixels}): delete the archive and run with --download")
    labels = np.asarray(labels)
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer) \
            or (labels.size and (labels.min() < 0 or labels.max() >= CIFAR10_CLASSES)):
        raise DataError(f"{where} holds labels {labels.shape} {labels.dtype}, expected {data.shape[0]} ints "
                        f"in 0..9: delete the archive and run with --download")
    images = data.reshape(-1, 3, CIFAR10_IMAGE_SIZE, CIFAR10_IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.uint8)


def _batch_field(batch, key, where):
    """Return batch[key], accepting the str key latin1 decoding gives and the bytes key of Python 3 pickles."""
    if not isinstance(batch, dict):
        raise DataError(f"{where} holds a {type(batch).__name__}, expected a dict: "
                        f"delete the archive and run with --download")
    for candidate in (key, key.encode("ascii")):
        if candidate in batch:
            return batch[candidate]
    raise DataError(f"{where} has no '{key}' entry: delete the archive and run with --download")


def to_model_tensor(images, img_size):
    """Return float32 (N, C, img_size, img_size) in [-1, 1] from uint8 images (N, H, W) grey or (N, H, W, 3) RGB.

    x = pixel / 127.5 - 1, so 0 -> -1 and 255 -> 1.
    Size: when img_size - H and img_size - W are both >= 0 and even, the image is zero-padded symmetrically with
    the background value -1 (black); MNIST 28 -> 32 adds 2 pixels each side and keeps every pixel exact, which is
    why padding is preferred. Otherwise (e.g. 28 -> 64 works by padding, 28 -> 16 or 28 -> 33 do not) it is
    resized with bilinear interpolation (antialias=True, align_corners=False), as the lecture resized to 32.
    """
    array = np.asarray(images)
    if array.dtype != np.uint8:
        raise ValueError(f"to_model_tensor expects uint8 images, got {array.dtype}")
    if array.ndim == 3:
        channels_first = torch.from_numpy(array).unsqueeze(1)
    elif array.ndim == 4 and array.shape[-1] == 3:
        channels_first = torch.from_numpy(array).permute(0, 3, 1, 2)
    else:
        raise ValueError(f"to_model_tensor expects (N, H, W) or (N, H, W, 3) images, got shape {array.shape}")
    scaled = channels_first.to(torch.float32) / 127.5 - 1.0
    pad_height, pad_width = img_size - array.shape[1], img_size - array.shape[2]
    if pad_height >= 0 and pad_width >= 0 and pad_height % 2 == 0 and pad_width % 2 == 0:
        return torch.nn.functional.pad(
            scaled, (pad_width // 2, pad_width // 2, pad_height // 2, pad_height // 2), value=-1.0).contiguous()
    resized = torch.nn.functional.interpolate(
        scaled, size=(img_size, img_size), mode="bilinear", antialias=True, align_corners=False)
    # The filter weights are a convex combination, but float rounding can step just outside [-1, 1].
    return resized.clamp(-1.0, 1.0).contiguous()


def training_split(config, data_dir):
    """Return the name of the data load_training_images reads: 'MNIST train split', 'MNIST test split (first 8,000)',
    CIFAR-10's, or the --dataset value itself for your own images ('folder:PATH', 'npz:PATH')."""
    if config["dataset"].partition(":")[0] in FILE_DATASETS:
        return config["dataset"]
    if config["dataset"] == "cifar10":
        return "CIFAR-10 training set"
    split = mnist_files(data_dir)[2]
    if split == "test":
        return f"MNIST test split (first {MNIST_TEST_DIGITS - HELD_OUT_TEST_DIGITS:,})"
    return f"MNIST {split} split"


def held_out_for_judging(pixels, split):
    """Return the digits of an MNIST split that training may read: the test split less its last HELD_OUT_TEST_DIGITS.

    tools.evaluate judges samples against those held-out digits, which no DDPM trained by train.py has seen;
    the 60,000-digit training split is returned whole (evaluate then judges against the whole test split).
    """
    if split != "test":
        return pixels
    if len(pixels) <= HELD_OUT_TEST_DIGITS:
        raise DataError(f"the MNIST test split holds {len(pixels)} digits, where it has {MNIST_TEST_DIGITS:,}: "
                        f"{REPAIR_HINT}")
    return pixels[:-HELD_OUT_TEST_DIGITS]


def load_training_images(config, data_dir, download, log):
    """Return the training images as one float32 tensor (N, C, img_size, img_size) in [-1, 1]."""
    kind, _, path = config["dataset"].partition(":")
    if kind in FILE_DATASETS:
        return load_own_images(kind, path, config["img_size"], config["max_images"], log)
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir} is a file, not a folder: pass the folder that holds the data files")
    if config["dataset"] == "cifar10":
        if download:
            download_cifar10(data_dir)
        pixels, _ = load_cifar10(data_dir)
    else:
        if download:
            try:
                download_mnist(data_dir)
            except DataError as error:
                log(f"warning: {error}")
        pixels, _ = load_mnist(data_dir)
        pixels = held_out_for_judging(pixels, mnist_files(data_dir)[2])
    if config["max_images"]:
        pixels = pixels[: config["max_images"]]
    log(f"data: {len(pixels)} images from the {training_split(config, data_dir)} in {data_dir}/")
    return to_model_tensor(pixels, config["img_size"])


# ----------------------------------------------------------------------------- your own images

FILE_DATASETS = ("folder", "npz")  # --dataset folder:PATH, --dataset npz:PATH
NPZ_KEY = "arr_0"  # the key np.savez gives its first array, and the one sample.py --npz writes


def load_own_images(kind, path, img_size, max_images, log):
    """Return float32 (N, C, img_size, img_size) in [-1, 1] from a folder of PNG files or an .npz (kind 'folder'/'npz').

    Channels come from the files: 1 for greyscale, 3 for colour. max_images > 0 keeps the first max_images.
    """
    if kind == "folder":
        paths, others = png_files(path)
        paths = paths[:max_images] if max_images else paths
        tensor = torch.cat([square_images(pixels[np.newaxis], img_size) for pixels in read_png_folder(paths)])
        source = f"PNG files in {path}" + (f" ({others} other files ignored)" if others else "")
    else:
        pixels = read_npz_images(path)
        tensor = square_images(pixels[:max_images] if max_images else pixels, img_size)
        source = f"{NPZ_KEY} of {path}"
    log(f"data: {len(tensor)} {'colour' if tensor.shape[1] == 3 else 'greyscale'} images from the {source}, "
        f"centre-cropped and resized to {img_size}x{img_size}")
    return tensor


def png_files(folder):
    """Return (paths, others): the .png files under folder and its subfolders, sorted, and the count of other files.

    Hidden files and folders (names starting with '.') are skipped.
    """
    if not os.path.isdir(folder):
        raise DataError(f"{folder} is not a folder: --dataset folder:PATH needs a folder of PNG files")
    paths, others = [], 0
    for root, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in names:
            if name.lower().endswith(".png"):
                paths.append(os.path.join(root, name))
            elif not name.startswith("."):
                others += 1
    if not paths:
        raise DataError(f"{folder} holds no .png files ({others} other files): save your images as PNG there")
    return sorted(paths), others


def read_png_folder(paths):
    """Yield the uint8 (H, W, C) pixels of each PNG file in paths; DataError naming a file whose channels differ."""
    first_path, first_channels = None, None
    for path in paths:
        pixels = read_png_image(path)
        if first_path is None:
            first_path, first_channels = path, pixels.shape[2]
        elif pixels.shape[2] != first_channels:
            kinds = {1: "greyscale", 3: "colour"}
            raise DataError(f"{path} is {kinds[pixels.shape[2]]} but {first_path} is {kinds[first_channels]}: "
                            f"the images of a folder must be all greyscale or all colour; convert or remove {path}")
        yield pixels


def read_png_image(path):
    """Return the uint8 (H, W, C) pixels of a PNG file, C = 1 (greyscale) or 3 (colour): an alpha channel is dropped."""
    try:
        with open(path, "rb") as stream:
            pixels = images.decode_png(stream.read())
    except OSError as error:
        raise DataError(f"{path} cannot be read ({error.strerror}): fix its permissions or remove it") from None
    except ValueError as error:
        raise DataError(f"{path}: {error}; save it as an 8-bit greyscale or RGB PNG, or remove it") from None
    if pixels.ndim == 2:
        return pixels[:, :, np.newaxis]
    return pixels[:, :, :1] if pixels.shape[2] == 2 else pixels[:, :, :3]


def read_npz_images(path):
    """Return uint8 (N, H, W, C), C = 1 or 3, from arr_0 of an .npz: uint8 (N, H, W) greyscale or (N, H, W, C)."""
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing: --dataset npz:PATH needs an .npz file")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array (an .npy file)")
        with archive:
            keys = archive.files
            array = archive[NPZ_KEY] if NPZ_KEY in keys else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise DataError(f"{path} is not a readable .npz of uint8 images ({reason}): write it with "
                        f"np.savez(PATH, images)") from None
    if array is None:
        raise DataError(f"{path} has no {NPZ_KEY} (it holds {', '.join(keys) or 'nothing'}): "
                        f"write the images with np.savez(PATH, images), which stores them under {NPZ_KEY}")
    pixels = array[..., np.newaxis] if array.ndim == 3 else array
    if array.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[3] not in (1, 3) or 0 in pixels.shape:
        raise DataError(f"{path}: {NPZ_KEY} is {array.dtype} {array.shape}, expected uint8 (N, H, W) or "
                        f"(N, H, W, C) with C = 1 or 3 and N, H, W > 0: convert it with .astype(np.uint8)")
    return pixels


def square_images(pixels, img_size):
    """Return float32 (N, C, img_size, img_size) in [-1, 1] from uint8 (N, H, W, C): centre square, resized.

    x = pixel / 127.5 - 1. The crop keeps the central min(H, W) x min(H, W) square; the resize is bilinear and
    antialiased (as in to_model_tensor), and is skipped when that square already has img_size pixels a side.
    """
    scaled = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
    height, width = scaled.shape[2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = scaled[:, :, top:top + side, left:left + side]
    if side != img_size:
        square = torch.nn.functional.interpolate(
            square, size=(img_size, img_size), mode="bilinear", antialias=True, align_corners=False).clamp(-1.0, 1.0)
    return square.contiguous()
