"""Training on your own images: --dataset folder:PATH (PNG files) and --dataset npz:PATH (uint8 under arr_0), and
torchvision's MNIST/raw layout under --data-dir. Channels come from the files; a bad or mixed file gets one line
naming it; a run on a folder trains, samples and resumes like one on MNIST.
"""
import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import sample
import train
from support import checkpoints, data, images
from test_data import (cifar_archive_members, cifar_batch, idx_bytes, png_chunk, png_with_filters,
                       write_cifar_archive, write_file)

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--widths", "8,16", "--img-size", "16", "--timesteps", "20", "--batch-size", "8", "--grid-samples", "4",
        "--device", "cpu"]


def write_png(path, pixels):
    """Return path after writing uint8 pixels (H, W, C), C = 1..4, as a PNG (every row with the Paeth filter)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_with_filters(pixels, [4] * pixels.shape[0]))
    return path


def random_pixels(seed, height, width, channels):
    """Return uint8 (height, width, channels) random pixels."""
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, channels), dtype=np.uint8)


def load_folder(folder, img_size=16, max_images=0, log=None):
    """Return data.load_own_images of a folder of PNG files."""
    return data.load_own_images("folder", str(folder), img_size, max_images, log or (lambda message: None))


def one_line(error):
    """Return the message of a raised exception, asserting it is a single line."""
    message = str(error.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- a folder of PNG files


def test_folder_images_of_any_size_are_centre_cropped_and_resized_in_file_name_order(tmp_path):
    """Sorted by path (subfolders included): a 16x16 image is kept exact; a 16x32 one loses its left and right 8
    columns; a 40x40 one is resized (antialiased) to 16x16, a constant image staying constant."""
    exact = random_pixels(0, 16, 16, 1)
    wide = np.zeros((16, 32, 1), dtype=np.uint8)
    wide[:, 8:24] = 200
    write_png(tmp_path / "a.png", exact)
    write_png(tmp_path / "b" / "wide.png", wide)
    write_png(tmp_path / "c.PNG", np.full((40, 40, 1), 255, dtype=np.uint8))
    tensor = load_folder(tmp_path)
    assert tensor.shape == (3, 1, 16, 16) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor[0, 0], torch.from_numpy(exact[..., 0]).float() / 127.5 - 1, rtol=0, atol=1e-6)
    torch.testing.assert_close(tensor[1], torch.full((1, 16, 16), 200 / 127.5 - 1))
    torch.testing.assert_close(tensor[2], torch.ones(1, 16, 16))


def test_colour_folder_gives_three_channels_and_alpha_is_dropped(tmp_path):
    """RGB files give (N, 3, S, S); an RGBA file gives its RGB; a grey + alpha file among grey ones gives its grey."""
    rgb = random_pixels(1, 16, 16, 3)
    write_png(tmp_path / "colour" / "1.png", rgb)
    write_png(tmp_path / "colour" / "2.png", np.concatenate([rgb, random_pixels(2, 16, 16, 1)], axis=2))
    colour = load_folder(tmp_path / "colour")
    assert colour.shape == (2, 3, 16, 16)
    torch.testing.assert_close(colour[0], colour[1])
    grey = random_pixels(3, 16, 16, 1)
    write_png(tmp_path / "grey" / "1.png", grey)
    write_png(tmp_path / "grey" / "2.png", np.concatenate([grey, random_pixels(4, 16, 16, 1)], axis=2))
    greyscale = load_folder(tmp_path / "grey")
    assert greyscale.shape == (2, 1, 16, 16)
    torch.testing.assert_close(greyscale[0], greyscale[1])


def test_max_images_reads_only_the_first_files_and_other_files_are_counted_not_read(tmp_path):
    """--max-images 2 of 3 PNGs keeps the first two; a .txt is counted in the log line, hidden files are skipped."""
    for index in range(3):
        write_png(tmp_path / f"{index}.png", np.full((8, 8, 1), 10 * index, dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    write_png(tmp_path / ".hidden" / "x.png", np.zeros((8, 8, 3), dtype=np.uint8))  # would be colour: never read
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    lines = []
    tensor = load_folder(tmp_path, img_size=8, max_images=2, log=lines.append)
    torch.testing.assert_close(tensor[:, 0, 0, 0], torch.tensor([-1.0, 10 / 127.5 - 1]))
    assert lines == [f"data: 2 greyscale images from the PNG files in {tmp_path} (1 other files ignored), "
                     "centre-cropped and resized to 8x8"]


def test_a_folder_mixing_greyscale_and_colour_names_the_odd_file(tmp_path):
    """Grey a.png, then colour b.png: one line naming b.png and a.png and saying what to do."""
    write_png(tmp_path / "a.png", random_pixels(0, 8, 8, 1))
    write_png(tmp_path / "b.png", random_pixels(0, 8, 8, 3))
    with pytest.raises(data.DataError) as error:
        load_folder(tmp_path)
    message = one_line(error)
    assert message.startswith(f"{tmp_path / 'b.png'} is colour but {tmp_path / 'a.png'} is greyscale")
    assert "convert or remove" in message


def palette_png():
    """Return the bytes of a 1x1 palette PNG (colour type 3), which the decoder does not read."""
    header = b"\x00\x00\x00\x01\x00\x00\x00\x01\x08\x03\x00\x00\x00"
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b"")


@pytest.mark.parametrize("content, reason", [
    (lambda good: good[:len(good) // 2], "truncated"),
    (lambda good: good[:40] + bytes([good[40] ^ 0xFF]) + good[41:], "CRC"),
    (lambda good: b"GIF89a" + good[6:], "not a PNG file"),
    (lambda good: palette_png(), "colour type 3"),
])
def test_a_damaged_or_unsupported_png_is_one_line_naming_the_file(tmp_path, content, reason):
    """Truncated, corrupt, not a PNG, a palette PNG: DataError naming the file, the reason and what to do."""
    good = png_with_filters(random_pixels(0, 8, 8, 1), [0] * 8)
    write_png(tmp_path / "a.png", random_pixels(1, 8, 8, 1))
    (tmp_path / "b.png").write_bytes(content(good))
    with pytest.raises(data.DataError) as error:
        load_folder(tmp_path)
    message = one_line(error)
    assert message.startswith(str(tmp_path / "b.png")) and reason in message
    assert "save it as an 8-bit greyscale or RGB PNG, or remove it" in message


def test_a_folder_without_png_files_or_no_folder_at_all_is_one_line(tmp_path):
    """No .png files (only a .jpg): says so and what to do; a path that is not a folder: says so."""
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(data.DataError, match="holds no .png files \\(1 other files\\): save your images as PNG"):
        load_folder(tmp_path)
    with pytest.raises(data.DataError, match="is not a folder"):
        load_folder(tmp_path / "absent")


# ----------------------------------------------------------------------------- an .npz


@pytest.mark.parametrize("shape", [(3, 16, 16), (3, 16, 16, 1), (3, 16, 16, 3)])
def test_npz_of_uint8_images_loads_in_each_layout(tmp_path, shape):
    """arr_0 uint8 (N, H, W), (N, H, W, 1) or (N, H, W, 3) at img_size: exactly pixel / 127.5 - 1, channels first."""
    pixels = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    np.savez(tmp_path / "images.npz", pixels)
    tensor = data.load_own_images("npz", str(tmp_path / "images.npz"), 16, 0, lambda message: None)
    channels_last = pixels if pixels.ndim == 4 else pixels[..., None]
    expected = torch.from_numpy(channels_last).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)


def test_npz_images_are_centre_cropped_and_resized_and_max_images_applies(tmp_path):
    """(4, 20, 30) images: the first 2 kept, their central 20x20 resized to 8x8."""
    pixels = np.zeros((4, 20, 30), dtype=np.uint8)
    pixels[:, :, 5:25] = 255
    np.savez(tmp_path / "images.npz", arr_0=pixels)
    tensor = data.load_own_images("npz", str(tmp_path / "images.npz"), 8, 2, lambda message: None)
    torch.testing.assert_close(tensor, torch.ones(2, 1, 8, 8))


def write_npy(path):
    """Write a bare .npy array (not an .npz archive) to path."""
    with open(path, "wb") as stream:
        np.save(stream, np.zeros((2, 4, 4), dtype=np.uint8))


@pytest.mark.parametrize("write, expected", [
    (lambda path: np.savez(path, images=np.zeros((2, 4, 4), np.uint8)), "has no arr_0 (it holds images)"),
    (lambda path: np.savez(path, np.zeros((2, 4, 4), np.float32)), "arr_0 is float32 (2, 4, 4), expected uint8"),
    (lambda path: np.savez(path, np.zeros((2, 4, 4, 2), np.uint8)), "with C = 1 or 3"),
    (lambda path: np.savez(path, np.zeros((4, 4), np.uint8)), "expected uint8 (N, H, W)"),
    (lambda path: np.savez(path, np.zeros((0, 4, 4), np.uint8)), "N, H, W > 0"),
    (lambda path: np.savez(path, np.array([1, "a", None], dtype=object)), "not a readable .npz"),
    (lambda path: path.write_bytes(b"not a zip archive at all"), "not a readable .npz"),
    (write_npy, "a single array (an .npy file)"),
])
def test_a_bad_npz_is_one_line_naming_the_file(tmp_path, write, expected):
    """Wrong key, dtype, shape, an object array, not a zip, a bare .npy: one line with the path and what to do."""
    path = tmp_path / "bad.npz"
    write(path)
    with pytest.raises(data.DataError) as error:
        data.load_own_images("npz", str(path), 4, 0, lambda message: None)
    message = one_line(error)
    assert message.startswith(str(path)) and expected in message
    assert "np.savez" in message or ".astype(np.uint8)" in message


# ----------------------------------------------------------------------------- --dataset on the command line


@pytest.mark.parametrize("value, message", [
    ("imagenet", "expected cifar10, mnist, folder:PATH"),
    ("folder:", "expected cifar10, mnist, folder:PATH"),
    ("folder:/no/such/folder", "there is no folder /no/such/folder"),
    ("npz:/no/such/file.npz", "there is no file /no/such/file.npz"),
])
def test_a_bad_dataset_flag_is_an_argparse_error_before_any_work(tmp_path, capsys, value, message):
    """An unknown dataset or a missing path: exit 2 with a message, nothing written."""
    with pytest.raises(SystemExit) as stop:
        train.main([*TINY, "--dataset", value, "--out", str(tmp_path / "run")])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_dataset_paths_are_recorded_absolute(tmp_path, monkeypatch):
    """folder:images from the folder holding images/ is recorded as folder:/abs/images."""
    (tmp_path / "images").mkdir()
    monkeypatch.chdir(tmp_path)
    config, _ = train.parse_config(["--dataset", "folder:images"])
    assert config["dataset"] == f"folder:{tmp_path / 'images'}" and config["channels"] is None


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def colour_folder_run(tmp_path_factory):
    """A 1-epoch run on a folder of 16 generated colour PNGs of several sizes: (folder, out)."""
    base = tmp_path_factory.mktemp("own")
    folder = base / "pictures"
    for index in range(16):
        size = (12, 16, 24, 30)[index % 4]
        write_png(folder / f"set{index % 2}" / f"{index:02d}.png", random_pixels(index, size, size + index % 3, 3))
    out = base / "run"
    assert train.main([*TINY, "--dataset", f"folder:{folder}", "--epochs", "1", "--out", str(out)]) == 0
    return folder, out


def test_a_tiny_run_trains_on_a_folder_of_generated_pngs_and_samples_in_colour(colour_folder_run, tmp_path):
    """16 colour PNGs, batch 8: 2 steps; the checkpoint and config.json record the folder and 3 channels; the epoch
    grid and sample.py's grid are RGB at --img-size."""
    folder, out = colour_folder_run
    checkpoint = checkpoints.load_checkpoint(str(out / "checkpoint.pt"))
    assert checkpoint["step"] == 2 and checkpoint["config"]["channels"] == 3
    assert checkpoint["config"]["dataset"] == f"folder:{folder}"
    assert (out / "config.json").read_text().count(f'"dataset": "folder:{folder}"') == 1
    assert images.decode_png((out / "samples_epoch_001.png").read_bytes()).shape == (38, 38, 3)
    assert sample.main(["--checkpoint", str(out / "checkpoint.pt"), "--n", "2", "--sampler", "fast", "--steps", "3",
                        "--out", str(tmp_path / "s.png"), "--npz", str(tmp_path / "s.npz"), "--device", "cpu"]) == 0
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (2, 16, 16, 3)


def test_a_folder_run_resumes_without_dataset_flags_and_refuses_changed_images(colour_folder_run, tmp_path, capsys):
    """--resume alone reads the recorded folder; once its images have turned greyscale, one line and exit 1."""
    folder, out = colour_folder_run
    resumed = tmp_path / "run"
    shutil.copytree(out, resumed)
    assert train.main([*TINY, "--epochs", "2", "--out", str(resumed), "--resume"]) == 0
    assert checkpoints.load_checkpoint(str(resumed / "checkpoint.pt"))["step"] == 4
    changed = tmp_path / "changed"
    shutil.copytree(out, changed)
    grey_folder = tmp_path / "grey"
    for index in range(16):
        write_png(grey_folder / f"{index}.png", random_pixels(index, 16, 16, 1))
    checkpoint = checkpoints.load_checkpoint(str(changed / "checkpoint.pt"))
    checkpoint["config"]["dataset"] = f"folder:{grey_folder}"  # as if the folder's files had been replaced
    checkpoints.save_checkpoint(str(changed / "checkpoint.pt"), checkpoint)
    capsys.readouterr()
    assert train.main([*TINY, "--epochs", "2", "--out", str(changed), "--resume"]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "now holds 1-channel images, but" in error and "was trained on 3-channel ones" in error


def test_sample_py_npz_output_trains_as_an_npz_dataset(colour_folder_run, tmp_path):
    """What sample.py --npz writes is a dataset: 16 colour samples train a 1-epoch colour run."""
    _, out = colour_folder_run
    npz = tmp_path / "samples.npz"
    assert sample.main(["--checkpoint", str(out / "checkpoint.pt"), "--n", "16", "--sampler", "ddim", "--steps", "2",
                        "--out", str(tmp_path / "s.png"), "--npz", str(npz), "--device", "cpu"]) == 0
    run = tmp_path / "run"
    assert train.main([*TINY, "--dataset", f"npz:{npz}", "--grid-samples", "0", "--epochs", "1",
                       "--out", str(run)]) == 0
    checkpoint = checkpoints.load_checkpoint(str(run / "checkpoint.pt"))
    assert checkpoint["config"]["channels"] == 3 and checkpoint["step"] == 2


def test_a_cifar10_run_resumes_without_repeating_dataset(tmp_path):
    """The channels are compared once the data is read, so --resume alone continues a CIFAR-10 run (it used to be
    refused: the default dataset's 1 channel was compared with the checkpoint's 3)."""
    rng = np.random.default_rng(0)
    write_cifar_archive(tmp_path / data.CIFAR10_FILE, cifar_archive_members([cifar_batch(rng, 8) for _ in range(5)]))
    flags = [*TINY, "--grid-samples", "0", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")]
    assert train.main([*flags, "--dataset", "cifar10", "--epochs", "1"]) == 0
    assert train.main([*flags, "--epochs", "2", "--resume"]) == 0
    assert checkpoints.load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))["step"] == 10


# ----------------------------------------------------------------------------- torchvision's MNIST/raw


def write_torchvision_root(root, names, images_array, labels_array, compressed):
    """Write an MNIST pair under root/MNIST/raw as torchvision leaves it: NAME (extracted), or NAME.gz."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, array in zip(names, (images_array, labels_array)):
        write_file(raw / (name if compressed else name[:-3]), idx_bytes(array))
    return raw


@pytest.mark.parametrize("compressed", [False, True])
def test_data_dir_reads_torchvisions_mnist_raw_layout(tmp_path, compressed):
    """--data-dir ROOT (holding MNIST/raw) and --data-dir ROOT/MNIST/raw both read the training split there."""
    fake_images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    fake_labels = np.arange(5, dtype=np.uint8)
    raw = write_torchvision_root(tmp_path, data.MNIST_TRAIN_FILES, fake_images, fake_labels, compressed)
    for data_dir in (tmp_path, raw):
        images_path, labels_path, split = data.mnist_files(str(data_dir))
        assert split == "train" and os.path.dirname(images_path) == str(raw)
        loaded_images, loaded_labels = data.load_mnist(str(data_dir))
        np.testing.assert_array_equal(loaded_images, fake_images)
        np.testing.assert_array_equal(loaded_labels, fake_labels)


def test_torchvision_test_split_is_read_when_it_is_all_there_is(tmp_path):
    """Only t10k-* extracted under MNIST/raw: the test split is read from there (10,000 digits)."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in data.MNIST_TEST_FILES:
        (raw / name[:-3]).write_bytes(gzip.decompress((ROOT / "data" / name).read_bytes()))
    images_path, _, split = data.mnist_files(str(tmp_path))
    assert split == "test" and images_path == str(raw / "t10k-images-idx3-ubyte")
    assert data.load_mnist(str(tmp_path))[0].shape == (10_000, 28, 28)
