"""Fixtures shared by the modules under tests/: the bundled digits in a folder of their own, and evaluate.py's
classifier trained once per session into a temporary cache (test_evaluate scores with it; test_experiments hands
a copy to its tiny run, which would otherwise train the full classifier itself)."""
import os

import pytest

from repo_paths import BUNDLED_DATA
from support import data
from tools import evaluate

# Two epochs instead of the default ten keep the suite fast; at lr 2e-3 they reach 0.97 on the held-out
# 2,000 digits (ten epochs on 6,000 digits: 0.986), so test_evaluate's 0.95 bar has a margin of two points.
TEST_EPOCHS = 2


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    """A data directory holding only (links to) the bundled MNIST test split, whatever data/ also holds."""
    directory = tmp_path_factory.mktemp("mnist")
    for name in data.MNIST_TEST_FILES:
        os.symlink(os.path.join(BUNDLED_DATA, name), directory / name)
    return str(directory)


@pytest.fixture(scope="session")
def trained(mnist_dir, tmp_path_factory):
    """(model, cache, cache_dir): the classifier trained once (TEST_EPOCHS epochs) into a temporary cache."""
    cache_dir = str(tmp_path_factory.mktemp("eval_cache"))
    model, cache = evaluate.load_or_train_classifier(mnist_dir, cache_dir, epochs=TEST_EPOCHS)
    return model, cache, cache_dir
