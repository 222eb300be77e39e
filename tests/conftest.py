"""Test set-up shared by all tests.

torch must be imported before TensorFlow: the other order crashes the process with
the wheels pinned here, and both are imported in one test session.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

try:
    import torch  # noqa: F401
except ImportError:
    pass
