"""Paths the test modules share: the repository root and the MNIST test split bundled in its data/ folder."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_DATA = os.path.join(ROOT, "data")
