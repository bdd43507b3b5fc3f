"""What the test modules share: the repository root, the MNIST test split bundled in its data/ folder, the README."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_DATA = os.path.join(ROOT, "data")


def readme_on_one_line():
    """Return README.md with every run of whitespace (line breaks included) as one space, for phrase checks."""
    with open(os.path.join(ROOT, "README.md")) as stream:
        return " ".join(stream.read().split())
