"""python -m mobilenet_jax.kernels [--require]: builds the C++ kernels now and prints the library's path."""

import sys

from mobilenet_jax.kernels import build

if __name__ == "__main__":
    path = build.shared_library()
    print(path if path else "not built (see the warning above)")
    sys.exit(1 if path is None and "--require" in sys.argv[1:] else 0)
