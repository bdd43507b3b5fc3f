"""Tests of evaluate.py: the Frechet distance math, the LeNet classifier, the sample figures and the command line.

The classifier is trained once per session (2 epochs: the fixture `trained` of tests/conftest.py) into a temporary
cache, on a temporary data directory that holds only the bundled 10,000-digit test split, so the tests never read or
write data/.
"""
import json
import math
import os
import subprocess
import sys

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from repo_paths import BUNDLED_DATA, ROOT
from support import data, runtime
from test_data import idx_bytes, write_file
from tools import evaluate

EVALUATE_COMMAND = [sys.executable, "-m", "tools.evaluate"]

small_floats = st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False)
positive_floats = st.floats(1e-3, 10.0, allow_nan=False, allow_infinity=False)
means = st.floats(-5.0, 5.0, allow_nan=False, allow_infinity=False)


@st.composite
def psd_matrices(draw, min_rank=1):
    """Draw A = B B^T with B (d, k), d in 1..6 and k in min_rank..6: symmetric PSD, singular when k < d."""
    size = draw(st.integers(1, 6))
    rank = draw(st.integers(min(min_rank, size), 6))
    factor = draw(hnp.arrays(np.float64, (size, rank), elements=small_floats))
    return factor @ factor.T


@st.composite
def gaussian_pairs(draw):
    """Draw (mu1, sigma1, mu2, sigma2) of one dimension d in 1..6 with covariances B B^T + 0.1 I (well conditioned)."""
    size = draw(st.integers(1, 6))
    mu1, mu2 = (draw(hnp.arrays(np.float64, size, elements=means)) for _ in range(2))
    factors = [draw(hnp.arrays(np.float64, (size, size), elements=small_floats)) for _ in range(2)]
    sigma1, sigma2 = (factor @ factor.T + 0.1 * np.eye(size) for factor in factors)
    return mu1, sigma1, mu2, sigma2


@st.composite
def commuting_covariances(draw):
    """Draw (a, b, Q): eigenvalues a, b > 0 of length d in 1..6 and an orthogonal Q, so Q diag(a) Q^T and
    Q diag(b) Q^T commute."""
    size = draw(st.integers(1, 6))
    a, b = (draw(hnp.arrays(np.float64, size, elements=positive_floats)) for _ in range(2))
    raw = draw(hnp.arrays(np.float64, (size, size), elements=small_floats))
    orthogonal, _ = np.linalg.qr(raw + 10.0 * np.eye(size))
    return a, b, orthogonal


class_counts = hnp.arrays(np.int64, st.integers(1, 12), elements=st.integers(0, 1000)).filter(
    lambda counts: counts.sum() > 0)

HELDOUT_ACCURACY_BAR = 0.95  # the session's 2-epoch classifier reaches 0.97 (tests/conftest.py)
SAMPLE_SIZE = 32
SET_SIZE = 2000
FIGURE_KEYS = {
    "n_samples", "image_size", "fid", "confidence", "real_confidence", "confident_fraction", "real_confident_fraction",
    "per_class_confidence", "class_histogram", "class_entropy_nats",
    "max_class_entropy_nats", "dark_mean", "real_dark_mean", "midtone_fraction", "real_midtone_fraction",
    "n_real", "classifier_version", "reference_split", "classifier_heldout_accuracy", "real_fid", "n_real_fid",
    "real_fid_low", "real_fid_high", "shipped_judge",
}


@pytest.fixture(scope="module")
def figures_by_set(trained, mnist_dir):
    """Figures of four 2,000-image sets at 32x32 against a reference of 5,000 other real digits, and of the reference.

    real: the other half of the digits; noise: uniform pixels; blurred: real digits under a 5x5 box blur;
    textured: real digits on a background of uniform noise in 0..99 (max(digit, noise), strokes intact);
    reference: the 5,000 reference digits themselves.
    """
    model, _, _ = trained
    digits, _ = data.load_mnist(mnist_dir)
    reference = evaluate.reference_statistics(model, digits[0::2], SAMPLE_SIZE)
    real = evaluate.real_digits_like_samples(digits[1::2][:SET_SIZE], SAMPLE_SIZE)
    rng = np.random.default_rng(0)
    blurred = F.avg_pool2d(torch.from_numpy(real).permute(0, 3, 1, 2).double(), 5, stride=1, padding=2)
    sets = {
        "real": real,
        "noise": rng.integers(0, 256, size=real.shape, dtype=np.uint8),
        "blurred": blurred.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy(),
        "textured": np.maximum(real, rng.integers(0, 100, size=real.shape, dtype=np.uint8)),
        "reference": evaluate.real_digits_like_samples(digits[0::2], SAMPLE_SIZE),
    }
    return {name: evaluate.sample_figures(images, model, reference) for name, images in sets.items()}


def write_npz(path, **arrays):
    """Return path as a string after saving arrays into it with np.savez."""
    np.savez(path, **arrays)
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------------------

@given(psd_matrices())
def test_sqrtm_psd_squares_back_to_the_matrix(matrix):
    """R = sqrtm_psd(A) satisfies R @ R = A for every symmetric PSD A, singular ones included."""
    root = evaluate.sqrtm_psd(matrix)
    scale = max(1.0, np.abs(matrix).max())
    np.testing.assert_allclose(root @ root, matrix, rtol=0, atol=1e-9 * scale)


@given(psd_matrices())
def test_sqrtm_psd_is_the_symmetric_psd_root(matrix):
    """R = sqrtm_psd(A) is symmetric with eigenvalues >= 0: the principal root, not one of the other 2^d."""
    root = evaluate.sqrtm_psd(matrix)
    scale = max(1.0, np.abs(matrix).max())
    np.testing.assert_allclose(root, root.T, rtol=0, atol=1e-12 * scale)
    assert np.linalg.eigvalsh(root).min() >= -1e-6 * math.sqrt(scale)


@given(psd_matrices(), hnp.arrays(np.float64, 6, elements=means))
def test_frechet_distance_of_identical_gaussians_is_zero(sigma, mu):
    """d^2(N(mu, S), N(mu, S)) = 0 + Tr(2 S - 2 (S^2)^(1/2)) = 0."""
    mu = mu[:sigma.shape[0]]
    assert evaluate.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6 * max(1.0, np.trace(sigma)))


@given(hnp.arrays(np.float64, 4, elements=positive_floats), hnp.arrays(np.float64, 4, elements=positive_floats),
       hnp.arrays(np.float64, 4, elements=means), hnp.arrays(np.float64, 4, elements=means))
def test_frechet_distance_of_diagonal_covariances(a, b, mu1, mu2):
    """With S1 = diag(a), S2 = diag(b): d^2 = ||mu1 - mu2||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert evaluate.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9, abs=1e-9)


@given(means, positive_floats, means, positive_floats)
def test_frechet_distance_in_one_dimension(mu1, variance1, mu2, variance2):
    """In 1-D: d^2 = (mu1 - mu2)^2 + (sigma1 - sigma2)^2 with sigma the standard deviations; scalars accepted."""
    expected = (mu1 - mu2) ** 2 + (math.sqrt(variance1) - math.sqrt(variance2)) ** 2
    assert evaluate.frechet_distance(mu1, variance1, mu2, variance2) == pytest.approx(expected, rel=1e-9, abs=1e-9)


@given(commuting_covariances(), hnp.arrays(np.float64, 6, elements=means))
def test_frechet_distance_of_commuting_covariances(covariances, mu):
    """S1 = Q diag(a) Q^T and S2 = Q diag(b) Q^T commute, so (S1 S2)^(1/2) = Q diag(sqrt(a b)) Q^T and
    d^2 (equal means) = sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    a, b, orthogonal = covariances
    mu = mu[:len(a)]
    sigma1, sigma2 = orthogonal @ np.diag(a) @ orthogonal.T, orthogonal @ np.diag(b) @ orthogonal.T
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert evaluate.frechet_distance(mu, sigma1, mu, sigma2) == pytest.approx(expected, rel=1e-7, abs=1e-8)


@given(gaussian_pairs())
def test_frechet_distance_is_symmetric(pair):
    """d^2(N1, N2) = d^2(N2, N1), although the formula takes the root of S1 only."""
    mu1, sigma1, mu2, sigma2 = pair
    forward = evaluate.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert evaluate.frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(forward, rel=1e-8, abs=1e-8)


@given(gaussian_pairs())
def test_frechet_distance_matches_the_eigenvalues_of_the_covariance_product(pair):
    """Tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(S1 S2)) (S1 S2 is similar to a PSD matrix), an independent route
    to d^2 for non-commuting covariances."""
    mu1, sigma1, mu2, sigma2 = pair
    product_eigenvalues = np.clip(np.linalg.eigvals(sigma1 @ sigma2).real, 0.0, None)
    expected = (np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
                - 2.0 * np.sum(np.sqrt(product_eigenvalues)))
    assert evaluate.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-7, abs=1e-7)


def test_frechet_distance_pinned_value():
    """mu (0, 0) vs (3, 4), diag(4, 9) vs I: d^2 = 25 + (2 - 1)^2 + (3 - 1)^2 = 30."""
    assert evaluate.frechet_distance([0, 0], np.diag([4.0, 9.0]), [3, 4], np.eye(2)) == pytest.approx(30.0)


def test_gaussian_fit_uses_the_unbiased_covariance():
    """Features [[0, 1], [2, 1]]: mu = (1, 1), sigma = sum (f - mu)(f - mu)^T / (N - 1) = [[2, 0], [0, 0]]."""
    mu, sigma = evaluate.gaussian_fit(np.array([[0.0, 1.0], [2.0, 1.0]]))
    np.testing.assert_allclose(mu, [1.0, 1.0])
    np.testing.assert_allclose(sigma, [[2.0, 0.0], [0.0, 0.0]])


# ---------------------------------------------------------------------------------------------------------
# The simple figures
# ---------------------------------------------------------------------------------------------------------

@given(class_counts)
def test_histogram_entropy_lies_between_zero_and_log_classes(counts):
    """0 <= H(q) <= ln K for any histogram of K bins."""
    entropy = evaluate.histogram_entropy(counts)
    assert -1e-12 <= entropy <= math.log(len(counts)) + 1e-12


def test_histogram_entropy_pinned_values():
    """Ten equal bins: ln 10; one full bin: 0; two equal bins among four: ln 2."""
    assert evaluate.histogram_entropy([7] * 10) == pytest.approx(math.log(10))
    assert evaluate.histogram_entropy([0, 0, 5, 0]) == 0.0
    assert evaluate.histogram_entropy([3, 0, 3, 0]) == pytest.approx(math.log(2))


def test_confidence_and_class_histogram_pinned_values():
    """Rows (0.9, 0.1), (0.3, 0.7), (0.6, 0.4): confidence = (0.9 + 0.7 + 0.6) / 3, argmax histogram = (2, 1)."""
    probabilities = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    assert evaluate.mean_confidence(probabilities) == pytest.approx(2.2 / 3)
    assert evaluate.predicted_class_histogram(probabilities).tolist() == [2, 1]


def test_background_noise_pinned_values():
    """Pixels 0, 51, 127, 128, 204, 255, 0, 0: dark (< 128) are 0, 51, 127, 0, 0 -> mean 178 / 5 / 255;
    mid-tones (51 <= p <= 204) are 51, 127, 128, 204 -> 4 of 8."""
    pixels = np.array([0, 51, 127, 128, 204, 255, 0, 0], dtype=np.uint8).reshape(1, 2, 4, 1)
    dark_mean, midtone_fraction = evaluate.background_noise(pixels)
    assert dark_mean == pytest.approx(178 / 5 / 255)
    assert midtone_fraction == pytest.approx(0.5)


def test_background_noise_of_an_all_white_image_has_no_dark_mean():
    """Without pixels below mid-grey the dark mean is undefined (NaN); all-white has no mid-tones."""
    dark_mean, midtone_fraction = evaluate.background_noise(np.full((1, 4, 4, 1), 255, dtype=np.uint8))
    assert math.isnan(dark_mean) and midtone_fraction == 0.0


# ---------------------------------------------------------------------------------------------------------
# One path to 28x28
# ---------------------------------------------------------------------------------------------------------

@given(hnp.arrays(np.uint8, (2, 28, 28, 1)))
def test_digits_at_classifier_size_keeps_28x28_pixels(pixels):
    """28x28 images are not resampled: output = pixel / 255, shape (N, 1, 28, 28)."""
    output = evaluate.digits_at_classifier_size(pixels)
    assert output.shape == (2, 1, 28, 28)
    torch.testing.assert_close(output, torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255)


@pytest.mark.parametrize("size", [16, 33, 20])
def test_digits_at_classifier_size_resizes_constant_images_to_the_same_constant(size):
    """Sizes that are not a padded 28x28 are resized: a bilinear antialiased resize averages with weights summing to
    1, so a constant image stays constant."""
    output = evaluate.digits_at_classifier_size(np.full((3, size, size, 1), 200, dtype=np.uint8))
    assert output.shape == (3, 1, 28, 28)
    torch.testing.assert_close(output, torch.full_like(output, 200 / 255))


@pytest.mark.parametrize("size", [28, 30, 32, 64])
def test_real_digits_come_back_to_the_classifier_exactly_as_it_was_trained_on_them(size):
    """Padding to S (train.py's preprocessing at S - 28 even), to uint8 and the classifier's path back to 28x28 is the
    identity on real digits: the classifier sees a padded sample at the scale of its training digits."""
    digits, _ = data.load_mnist(BUNDLED_DATA)
    digits = digits[:50]
    back = evaluate.digits_at_classifier_size(evaluate.real_digits_like_samples(digits, size))
    torch.testing.assert_close(back, evaluate.digits_at_classifier_size(digits[..., None]), rtol=0, atol=0)


def test_ink_in_a_padded_samples_border_is_not_resampled_into_the_digit():
    """A 32x32 image whose only ink is in its 2-pixel border reaches the classifier as a black 28x28 image: the crop
    drops the border instead of shrinking it into the digit (the background figures use the whole sample)."""
    image = np.zeros((1, 32, 32, 1), dtype=np.uint8)
    image[0, :2, :, 0] = 255
    image[0, :, -2:, 0] = 255
    assert evaluate.digits_at_classifier_size(image).abs().sum() == 0
    image[0, 2, 2, 0] = 255  # the first pixel inside the border is kept where it is
    assert evaluate.digits_at_classifier_size(image)[0, 0, 0, 0] == 1.0


def test_real_digits_like_samples_are_the_digits_at_28_and_padded_at_32():
    """At 28 the training preprocessing and back is the identity; at 32 it adds a 2-pixel black border."""
    digits, _ = data.load_mnist(BUNDLED_DATA)
    digits = digits[:50]
    np.testing.assert_array_equal(evaluate.real_digits_like_samples(digits, 28)[..., 0], digits)
    padded = evaluate.real_digits_like_samples(digits, 32)[..., 0]
    np.testing.assert_array_equal(padded[:, 2:30, 2:30], digits)
    assert padded.sum() == digits.astype(np.int64).sum()


# ---------------------------------------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------------------------------------

def test_training_is_deterministic_and_restores_the_torch_settings():
    """Two trainings with the same seed give bitwise equal weights; the caller's torch RNG state, thread count
    and determinism setting are as before."""
    digits, labels = data.load_mnist(BUNDLED_DATA)
    settings_before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    rng_before = torch.get_rng_state()
    first = evaluate.train_classifier(digits[:384], labels[:384], epochs=1)
    second = evaluate.train_classifier(digits[:384], labels[:384], epochs=1)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == settings_before
    for name, weight in first.state_dict().items():
        assert torch.equal(weight, second.state_dict()[name]), name


def test_classifier_reaches_the_heldout_accuracy_bar(trained):
    """Trained on the first 6,000 test digits, the LeNet classifies the held-out last 2,000 above 95 %."""
    _, cache, _ = trained
    assert cache["split"] == "test" and cache["train_digits"] == 6000 and cache["heldout_digits"] == 2000
    assert cache["heldout_accuracy"] > HELDOUT_ACCURACY_BAR


def test_the_reference_is_the_2000_digits_train_py_never_reads_and_the_floor_2000_the_classifier_never_saw(mnist_dir):
    """Samples are judged against digits their DDPM never saw: the held-out digits are the test split's last 2,000
    (data.HELD_OUT_TEST_DIGITS, which train.py sets aside). Of the 8,000 the DDPM trains on, the classifier trains on
    the first 6,000; the next 2,000 are the real digits of real_fid, unseen by the classifier like the reference."""
    digits, labels = data.load_mnist(mnist_dir)
    split = evaluate.classifier_split(mnist_dir)
    assert split.name == "test" and data.HELD_OUT_TEST_DIGITS == 2000
    np.testing.assert_array_equal(split.heldout_images, digits[8000:])
    np.testing.assert_array_equal(split.heldout_labels, labels[8000:])
    np.testing.assert_array_equal(split.floor_images, digits[6000:8000])
    np.testing.assert_array_equal(split.train_images, digits[:6000])
    np.testing.assert_array_equal(split.train_labels, labels[:6000])


def test_with_the_training_split_the_reference_is_the_whole_test_split(tmp_path):
    """With train-* files present (the DDPM then trains on them): the classifier trains on all but their last 2,000,
    those 2,000 are the floor's, and the reference is all 10,000 test digits."""
    for name in data.MNIST_TEST_FILES:
        os.symlink(os.path.join(BUNDLED_DATA, name), tmp_path / name)
    test_digits, _ = data.load_mnist(tmp_path)
    fake = np.random.default_rng(0).integers(0, 256, size=(2500, 28, 28), dtype=np.uint8)
    fake_labels = np.arange(2500, dtype=np.uint8) % 10
    write_file(tmp_path / data.MNIST_TRAIN_FILES[0], idx_bytes(fake))
    write_file(tmp_path / data.MNIST_TRAIN_FILES[1], idx_bytes(fake_labels))
    split = evaluate.classifier_split(str(tmp_path))
    assert split.name == "train"
    np.testing.assert_array_equal(split.heldout_images, test_digits)
    np.testing.assert_array_equal(split.train_images, fake[:500])
    np.testing.assert_array_equal(split.train_labels, fake_labels[:500])
    np.testing.assert_array_equal(split.floor_images, fake[500:])


def test_fid_is_measured_in_the_classifiers_logits_and_confidence_in_their_softmax(trained):
    """classifier_outputs returns the logits model(pixels) (the 10-dim space of FID) and their softmax."""
    model, _, _ = trained
    digits, _ = data.load_mnist(BUNDLED_DATA)
    pixels = evaluate.digits_at_classifier_size(digits[:5, ..., None])
    logits, probabilities = evaluate.classifier_outputs(model, pixels)
    with torch.no_grad():
        expected = model(pixels).double()
    assert logits.shape == (5, 10)
    np.testing.assert_array_equal(logits, expected.numpy())
    np.testing.assert_allclose(probabilities, torch.softmax(expected, dim=1).numpy(), rtol=1e-12)


def test_cached_classifier_is_reloaded_not_retrained(trained, mnist_dir):
    """A second call finds the cache file and returns the same weights and the same recorded training."""
    model, cache, cache_dir = trained
    reloaded, reloaded_cache = evaluate.load_or_train_classifier(mnist_dir, cache_dir, epochs=cache["epochs"])
    assert reloaded_cache["train_seconds"] == cache["train_seconds"]
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, reloaded.state_dict()[name]), name


def test_unreadable_cache_is_a_one_line_error(tmp_path, mnist_dir):
    """A damaged cache file is reported (what and what to do), not retrained over or traced back."""
    (tmp_path / os.path.basename(evaluate.cache_path(str(tmp_path), "test"))).write_bytes(b"not a torch file")
    with pytest.raises(evaluate.EvaluationError, match="delete it"):
        evaluate.load_or_train_classifier(mnist_dir, str(tmp_path))


@pytest.mark.parametrize("content", ["tensor", "dict_of_other_things", "weights_of_another_network"])
def test_foreign_cache_file_is_a_one_line_error(tmp_path, mnist_dir, content):
    """A readable torch file under the cache's name that is not this tool's cache: reported, not traced back."""
    foreign = {"tensor": torch.zeros(3), "dict_of_other_things": {"weights": torch.zeros(3)},
               "weights_of_another_network": {"state_dict": {"conv1.weight": torch.zeros(2, 2)}, "split": "test",
                                              "references": {}}}[content]
    torch.save(foreign, evaluate.cache_path(str(tmp_path), "test"))
    with pytest.raises(evaluate.EvaluationError, match="delete it"):
        evaluate.load_or_train_classifier(mnist_dir, str(tmp_path))


# ---------------------------------------------------------------------------------------------------------
# The shipped judge: the same classifier on every machine
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped(mnist_dir):
    """(model, cache, split): the shipped judge as loaded from the file git holds, and the bundled split."""
    model, cache = evaluate.load_cache(evaluate.SHIPPED_JUDGE)
    return model, cache, evaluate.classifier_split(mnist_dir)


def test_the_shipped_judge_is_the_file_git_holds(shipped):
    """Its MD5 is the one recorded beside it: a damaged or retrained file cannot pass as the judge of docs/."""
    assert data.md5_of_file(evaluate.SHIPPED_JUDGE) == evaluate.SHIPPED_JUDGE_MD5
    _, cache, _ = shipped
    assert cache["epochs"] == evaluate.TRAIN_EPOCHS and cache["split"] == "test"


def test_the_shipped_judge_was_trained_and_scored_on_the_bundled_digits(shipped):
    """What the file records is true of the bundled digits: its digest is theirs, its held-out accuracy is its
    weights' accuracy on the 2,000 reference digits (a flipped borderline digit allowed: another CPU rounds the
    last bits of the logits differently), and its reference statistics at 32x32 are those digits' statistics."""
    model, cache, split = shipped
    assert cache["digits_md5"] == evaluate.digits_digest(split)
    assert abs(evaluate.classifier_accuracy(model, split.heldout_images, split.heldout_labels)
               - cache["heldout_accuracy"]) <= 1 / len(split.heldout_labels)
    recorded = cache["references"][str(SAMPLE_SIZE)]
    recomputed = evaluate.reference_statistics(model, split.heldout_images, SAMPLE_SIZE)
    assert torch.allclose(recorded["mu"], recomputed["mu"], atol=1e-3)
    assert torch.allclose(recorded["sigma"], recomputed["sigma"], atol=1e-3)
    assert recorded["n"] == recomputed["n"] == len(split.heldout_images)
    assert recorded["dark_mean"] == pytest.approx(recomputed["dark_mean"], abs=1e-9)


def test_evaluate_uses_the_shipped_judge_without_training(shipped, mnist_dir, tmp_path, monkeypatch):
    """Without a cache, the recipe's classifier of the bundled digits is the shipped one, copied into the cache:
    nothing is trained, and the weights are the shipped weights bit for bit."""
    model, _, _ = shipped
    monkeypatch.setattr(evaluate, "train_classifier", lambda *args, **kwargs: pytest.fail("trained a classifier"))
    loaded, cache = evaluate.load_or_train_classifier(mnist_dir, str(tmp_path))
    assert os.path.exists(evaluate.cache_path(str(tmp_path), "test"))
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, loaded.state_dict()[name]), name


def test_the_shipped_judge_is_not_used_for_other_digits_or_another_recipe(shipped):
    """Other digits (one label changed) or other epochs are not what it was trained on: a classifier is trained."""
    _, _, split = shipped
    changed = split.heldout_labels.copy()
    changed[0] = (changed[0] + 1) % 10
    assert evaluate.shipped_judge(split._replace(heldout_labels=changed)) is None
    assert evaluate.shipped_judge(split, epochs=evaluate.TRAIN_EPOCHS + 1) is None
    assert evaluate.shipped_judge(split) is not None


def test_a_written_judge_is_the_classifier_training_makes_and_is_found_for_its_digits(trained, shipped, mnist_dir,
                                                                                      tmp_path):
    """write_shipped_judge (how the shipped file was made) writes the weights train_classifier makes from those digits
    (bit for bit: training is deterministic on one machine) with their digest, and shipped_judge then returns it."""
    model, cache, _ = trained
    _, _, split = shipped
    path = str(tmp_path / "judge.pt")
    evaluate.write_shipped_judge(mnist_dir, path, epochs=cache["epochs"], image_size=SAMPLE_SIZE)
    found = evaluate.shipped_judge(split, epochs=cache["epochs"], path=path, md5=data.md5_of_file(path))
    assert found is not None
    found_model, found_cache = found
    assert found_cache["digits_md5"] == evaluate.digits_digest(split)
    assert str(SAMPLE_SIZE) in found_cache["references"]
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, found_cache["state_dict"][name]), name
        assert torch.equal(weight, found_model.state_dict()[name]), name


def test_a_damaged_shipped_judge_is_a_one_line_error(shipped, tmp_path):
    """A shipped file whose bytes changed is reported with what to do, not trusted and not traced back."""
    _, _, split = shipped
    damaged = tmp_path / "judge.pt"
    damaged.write_bytes(open(evaluate.SHIPPED_JUDGE, "rb").read()[:-1] + b"x")
    with pytest.raises(evaluate.EvaluationError, match="restore it from git"):
        evaluate.shipped_judge(split, path=str(damaged))


@pytest.mark.parametrize("weights", ["shipped", "trained_elsewhere"])
def test_a_cached_classifier_that_is_not_the_shipped_judge_is_reported(shipped, mnist_dir, tmp_path, capsys, weights):
    """A cache of the bundled digits' recipe is scored as it is, but the JSON line says whether it is the shipped
    judge, and a cache with other weights (one changed here: what another CPU's training gives) warns in one line
    that its figures are not the README's, and what to do."""
    _, cache, _ = shipped
    cache = {**cache, "state_dict": dict(cache["state_dict"])}
    if weights == "trained_elsewhere":
        del cache["made_with"]
        name = next(iter(cache["state_dict"]))
        cache["state_dict"][name] = cache["state_dict"][name] + 1e-6
    torch.save(cache, evaluate.cache_path(str(tmp_path), "test"))
    digits, _ = data.load_mnist(mnist_dir)
    path = write_npz(tmp_path / "samples.npz", arr_0=evaluate.real_digits_like_samples(digits[6000:6064], SAMPLE_SIZE))
    assert evaluate.main([path, "--data-dir", mnist_dir, "--cache", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    figures = json.loads(out.strip().splitlines()[-1])
    warnings = [line for line in err.splitlines() if "not the shipped judge" in line]
    if weights == "shipped":
        assert figures["shipped_judge"] is True and warnings == []
    else:
        assert figures["shipped_judge"] is False
        assert len(warnings) == 1 and "delete it" in warnings[0] and str(tmp_path) in warnings[0]


# ---------------------------------------------------------------------------------------------------------
# Figures of real and degraded digits
# ---------------------------------------------------------------------------------------------------------

def test_real_digits_score_near_the_fid_floor(figures_by_set):
    """Two disjoint sets of real digits differ only by sampling: FID of 2,000 vs 5,000 in the 10 logits stays below
    3 (1.04 here; the finite-N bias of the covariance keeps it above 0)."""
    assert 0 < figures_by_set["real"]["fid"] < 3.0


@pytest.fixture(scope="module")
def floor_setup(trained, mnist_dir):
    """(model, floor digits, reference): the split's 2,000 floor digits and its reference at SAMPLE_SIZE."""
    model, _, _ = trained
    split = evaluate.classifier_split(mnist_dir)
    return model, split.floor_images, evaluate.reference_statistics(model, split.heldout_images, SAMPLE_SIZE)


def test_real_fid_subset_k_is_the_first_n_of_the_kth_seeded_permutation(floor_setup):
    """real_digits_fids' k-th FID is the FID of the first n digits of the k-th permutation drawn by
    default_rng(seed), computed here digit set by digit set; the same seed repeats, another seed differs."""
    model, floor, reference = floor_setup
    fids = evaluate.real_digits_fids(model, floor, 100, reference, SAMPLE_SIZE, subsets=3, seed=5)
    rng = np.random.default_rng(5)
    for fid in fids:
        subset = floor[rng.permutation(len(floor))[:100]]
        mu, sigma, _ = evaluate.logit_gaussian(model, evaluate.real_digits_like_samples(subset, SAMPLE_SIZE))
        assert fid == pytest.approx(evaluate.fid_to_reference(mu, sigma, reference), rel=1e-9)
    np.testing.assert_array_equal(fids, evaluate.real_digits_fids(model, floor, 100, reference, SAMPLE_SIZE,
                                                                  subsets=3, seed=5))
    assert not np.array_equal(fids, evaluate.real_digits_fids(model, floor, 100, reference, SAMPLE_SIZE,
                                                               subsets=3, seed=6))


def test_real_fid_of_all_the_floor_digits_is_one_fid_of_them_all(floor_setup):
    """With n >= the 2,000 floor digits there is one subset, all of them, whatever the count asked for."""
    model, floor, reference = floor_setup
    mu, sigma, _ = evaluate.logit_gaussian(model, evaluate.real_digits_like_samples(floor, SAMPLE_SIZE))
    for n in (len(floor), len(floor) + 1):
        fids = evaluate.real_digits_fids(model, floor, n, reference, SAMPLE_SIZE, subsets=7)
        assert fids.shape == (1,) and fids[0] == pytest.approx(evaluate.fid_to_reference(mu, sigma, reference))


def test_real_fid_falls_with_n_and_its_spread_brackets_its_mean(floor_setup):
    """FID's finite-N bias (the covariance of n digits is noisy, which adds about trace terms / n) makes the mean
    over 100 random subsets fall as n grows, by more than 1.5x from 100 digits to 400 and from 400 to 1,000
    (measured with the session's classifier: 5.2, 1.4, 0.80; the rest is the floor digits' true distance from the
    reference); the 5th and 95th percentiles bracket the mean and the spread narrows with n."""
    model, floor, reference = floor_setup
    figures = [evaluate.real_fid_figures(evaluate.real_digits_fids(model, floor, n, reference, SAMPLE_SIZE))
               for n in (100, 400, 1000)]
    for small, large in zip(figures, figures[1:]):
        assert small["real_fid"] > 1.5 * large["real_fid"]
        assert small["real_fid_high"] - small["real_fid_low"] > large["real_fid_high"] - large["real_fid_low"]
    for each in figures:
        assert each["real_fid_low"] < each["real_fid"] < each["real_fid_high"]


def test_degraded_digits_score_clearly_worse_with_noise_worst(figures_by_set):
    """FID orders the sets: real << textured, blurred << noise; each degraded set is at least 10x the floor
    (measured: textured 20x, blurred 55x, noise 200x)."""
    fids = {name: figures["fid"] for name, figures in figures_by_set.items()}
    assert fids["textured"] > 10 * fids["real"] and fids["blurred"] > 10 * fids["real"]
    assert fids["noise"] > 1.5 * max(fids["textured"], fids["blurred"])


def test_real_digits_are_confident_and_balanced_noise_is_not(figures_by_set):
    """Real digits: confidence > 0.85 and class entropy within 0.05 of ln 10; noise: lower on both.

    Real 32x32 digits come out at 0.94 with the tests' 2 epochs of classifier training (0.99 with the default 10):
    the crop back to 28x28 gives the classifier the digits at the scale it was trained on."""
    real, noise = figures_by_set["real"], figures_by_set["noise"]
    assert real["confidence"] > 0.85 and real["class_entropy_nats"] > math.log(10) - 0.05
    assert noise["confidence"] < real["confidence"] and noise["class_entropy_nats"] < real["class_entropy_nats"] - 1
    assert sum(real["class_histogram"]) == SET_SIZE


def test_confident_fraction_and_per_class_confidence_by_hand():
    """Three samples with top probabilities 0.95 (class 0), 0.5 (class 0) and 0.91 (class 2): 2 of 3 are above 0.9;
    class 0's mean top probability is 0.725, class 2's 0.91, and every other class has no samples (None)."""
    probabilities = np.zeros((3, 10))
    probabilities[0, 0], probabilities[0, 1] = 0.95, 0.05
    probabilities[1, 0], probabilities[1, 1] = 0.5, 0.3
    probabilities[1, 2] = 0.2
    probabilities[2, 2], probabilities[2, 3] = 0.91, 0.09
    assert evaluate.confident_fraction(probabilities) == pytest.approx(2 / 3)
    per_class = evaluate.per_class_confidence(probabilities)
    assert per_class[0] == pytest.approx(0.725) and per_class[2] == pytest.approx(0.91)
    assert [k for k, value in enumerate(per_class) if value is None] == [1, 3, 4, 5, 6, 7, 8, 9]
    assert evaluate.confident_fraction(probabilities, threshold=0.95) == 0.0  # strictly above the threshold


def test_real_digits_are_mostly_recognized_and_noise_is_not(figures_by_set):
    """The reader's figure: most real digits are recognized above 0.9 (more than 70% at the test's short classifier
    training), far more than the textured or noise sets; every class of the real set has a confidence."""
    real = figures_by_set["real"]
    assert real["confident_fraction"] > 0.7
    assert figures_by_set["noise"]["confident_fraction"] < real["confident_fraction"] - 0.3
    assert all(value is not None and value > 0.5 for value in real["per_class_confidence"])


def test_real_confidence_figures_are_the_reference_digits_own_and_the_same_for_every_set(figures_by_set):
    """real_confidence and real_confident_fraction are what sample_figures gives the reference digits themselves
    (exactly); every set judged against one reference carries the same ones; and another 2,000 real digits come
    within 0.04 of them (about 4 standard errors of the difference of two recognized fractions near 0.8 at 2,000 and
    5,000 digits), where the noise set does not."""
    itself = figures_by_set["reference"]
    assert itself["real_confidence"] == itself["confidence"] and 0.5 < itself["confidence"] < 1
    assert itself["real_confident_fraction"] == itself["confident_fraction"] > 0.5
    for figures in figures_by_set.values():
        assert figures["real_confidence"] == itself["confidence"]
        assert figures["real_confident_fraction"] == itself["confident_fraction"]
    real, noise = figures_by_set["real"], figures_by_set["noise"]
    assert abs(real["confident_fraction"] - real["real_confident_fraction"]) < 0.04
    assert noise["confident_fraction"] < noise["real_confident_fraction"] - 0.3


def test_a_cached_reference_without_the_real_confidence_is_recomputed_and_a_complete_one_is_reused(trained,
                                                                                                  mnist_dir, tmp_path):
    """A cache written before real_confidence existed holds references without it: the entry is computed again and
    saved with every REFERENCE_KEYS entry; an entry that has them all is returned as it is, never recomputed."""
    model, _, _ = trained
    digits, _ = data.load_mnist(mnist_dir)
    real = digits[:500]
    complete = evaluate.reference_statistics(model, real, SAMPLE_SIZE)
    old_entry = {key: value for key, value in complete.items() if key not in ("confidence", "confident_fraction")}
    path = str(tmp_path / "cache.pt")
    cache = {"references": {str(SAMPLE_SIZE): old_entry}}
    refreshed = evaluate.cached_reference_statistics(model, cache, path, real, SAMPLE_SIZE)
    assert set(refreshed) == set(evaluate.REFERENCE_KEYS)
    assert refreshed["confident_fraction"] == complete["confident_fraction"]
    assert set(torch.load(path, weights_only=True)["references"][str(SAMPLE_SIZE)]) == set(evaluate.REFERENCE_KEYS)
    marked = {**complete, "confidence": -1.0}  # a value reference_statistics never gives: reused, not recomputed
    cache = {"references": {str(SAMPLE_SIZE): marked}}
    assert evaluate.cached_reference_statistics(model, cache, str(tmp_path / "unused.pt"), real,
                                                SAMPLE_SIZE)["confidence"] == -1.0
    assert not (tmp_path / "unused.pt").exists()


def test_background_noise_real_digits_are_clean_textured_ones_are_not(figures_by_set):
    """Real digits match the real reference (dark mean within 0.005, mid-tones within 0.01, dark mean < 0.03);
    the textured background raises the dark mean above 5x and the mid-tone fraction above 3x the real one."""
    real, textured = figures_by_set["real"], figures_by_set["textured"]
    assert real["dark_mean"] < 0.03
    assert abs(real["dark_mean"] - real["real_dark_mean"]) < 0.005
    assert abs(real["midtone_fraction"] - real["real_midtone_fraction"]) < 0.01
    assert textured["dark_mean"] > 5 * textured["real_dark_mean"]
    assert textured["midtone_fraction"] > 3 * textured["real_midtone_fraction"]


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def test_cli_prints_every_figure_as_json_on_the_last_line(trained, floor_setup, mnist_dir, tmp_path):
    """`python -m tools.evaluate samples.npz` exits 0; its last stdout line is JSON with every figure; N < 1000 warns."""
    _, cache, cache_dir = trained
    model, floor, reference = floor_setup
    digits, _ = data.load_mnist(mnist_dir)
    path = write_npz(tmp_path / "samples.npz", arr_0=evaluate.real_digits_like_samples(digits[6000:6064], SAMPLE_SIZE))
    result = subprocess.run([*EVALUATE_COMMAND, path, "--data-dir", mnist_dir, "--cache", cache_dir], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(figures) == FIGURE_KEYS
    assert figures["n_samples"] == 64 and figures["image_size"] == SAMPLE_SIZE and figures["n_real"] == 2000
    # real_fid and its spread are those of 64-subsets of the 2,000 floor digits, the samples' N, against the
    # reference: what real_digits_fids gives in this process, to 1e-4 (the child may sum the float32 logits with
    # other threads, and FID's cancellations magnify that rounding). The old real_fid, the first 64 floor digits, the
    # samples themselves, scored 23.8 against a mean of 7.9.
    expected = evaluate.real_fid_figures(evaluate.real_digits_fids(model, floor, 64, reference, SAMPLE_SIZE))
    assert figures["n_real_fid"] == 64 and 0 < figures["real_fid_low"] < figures["real_fid"] < figures["real_fid_high"]
    for key, value in expected.items():
        assert figures[key] == pytest.approx(value, rel=1e-4), key
    assert figures["classifier_heldout_accuracy"] == cache["heldout_accuracy"]
    assert figures["shipped_judge"] is None  # trained for TEST_EPOCHS: the shipped judge is not this recipe's
    assert "N=64" in result.stderr and "Traceback" not in result.stderr


def test_cli_json_line_is_strict_json_with_null_for_an_undefined_figure(trained, mnist_dir, tmp_path, capsys):
    """All-white samples have no dark pixels: their dark mean is undefined, null in the JSON line (which a strict
    parser, one that refuses NaN, reads), and NaN in the words above it."""
    _, _, cache_dir = trained
    path = write_npz(tmp_path / "white.npz", arr_0=np.full((4, SAMPLE_SIZE, SAMPLE_SIZE, 1), 255, dtype=np.uint8))
    assert evaluate.main([path, "--data-dir", mnist_dir, "--cache", cache_dir]) == 0

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1], parse_constant=refuse)
    assert figures["dark_mean"] is None and figures["midtone_fraction"] == 0.0


def bad_inputs(tmp_path):
    """Return {case: path} of sample files that evaluate.py must refuse, written into tmp_path."""
    grey = np.zeros((4, 32, 32, 1), dtype=np.uint8)
    (tmp_path / "text.npz").write_text("these are not samples\n")
    np.save(tmp_path / "single.npy", grey)
    return {
        "missing": str(tmp_path / "absent.npz"),
        "not_npz": str(tmp_path / "text.npz"),
        "npy_not_npz": str(tmp_path / "single.npy"),
        "no_arr_0": write_npz(tmp_path / "no_key.npz", samples=grey),
        "float_dtype": write_npz(tmp_path / "float.npz", arr_0=grey.astype(np.float32)),
        "no_channel_axis": write_npz(tmp_path / "hw.npz", arr_0=grey[..., 0]),
        "rgb": write_npz(tmp_path / "rgb.npz", arr_0=np.zeros((4, 32, 32, 3), dtype=np.uint8)),
        "not_square": write_npz(tmp_path / "wide.npz", arr_0=np.zeros((4, 32, 28, 1), dtype=np.uint8)),
        "one_sample": write_npz(tmp_path / "one.npz", arr_0=grey[:1]),
        "too_large": write_npz(tmp_path / "large.npz", arr_0=np.zeros((2, 600, 600, 1), dtype=np.uint8)),
    }


BAD_INPUT_MESSAGES = {
    "missing": "not found", "not_npz": "not an .npz", "npy_not_npz": "not an .npz", "no_arr_0": "no 'arr_0'",
    "float_dtype": "dtype float32", "no_channel_axis": "shape (4, 32, 32)", "rgb": "shape (4, 32, 32, 3)",
    "not_square": "shape (4, 32, 28, 1)", "one_sample": "at least 2", "too_large": "600x600",
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT_MESSAGES))
def test_cli_refuses_bad_samples_with_one_line(case, tmp_path, capsys):
    """Each bad samples file: exit status 1, nothing on stdout, one line on stderr naming the problem.

    The check runs before the classifier is needed (the cache directory stays empty)."""
    cache_dir = tmp_path / "cache"
    status = evaluate.main([bad_inputs(tmp_path)[case], "--cache", str(cache_dir)])
    captured = capsys.readouterr()
    assert status == 1 and captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and BAD_INPUT_MESSAGES[case] in captured.err
    assert not cache_dir.exists()


def test_cli_bad_samples_exit_without_traceback_in_a_real_process(tmp_path):
    """A real `python -m tools.evaluate` on a float array exits non-zero with a single stderr line, no traceback."""
    path = bad_inputs(tmp_path)["float_dtype"]
    result = subprocess.run([*EVALUATE_COMMAND, path, "--cache", str(tmp_path / "cache")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_cli_refuses_an_unknown_device_with_one_line(tmp_path, capsys):
    """--device with a name the scripts do not know: argparse's exit status 2 and one line naming the choices."""
    path = write_npz(tmp_path / "ok.npz", arr_0=np.zeros((4, 32, 32, 1), dtype=np.uint8))
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([path, "--device", "abacus", "--cache", str(tmp_path / "cache")])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and "--device" in captured.err and "'auto'" in captured.err


def test_cli_device_auto_is_the_default_and_resolves_like_the_other_scripts():
    """evaluate's --device takes auto like train.py and sample.py, defaults to it, and resolves it the same way."""
    assert evaluate.parse_args(["samples.npz"]).device == "auto"
    assert evaluate.parse_args(["samples.npz", "--device", "cpu"]).device == "cpu"
    assert runtime.resolve_device("auto").type in runtime.available_devices()
