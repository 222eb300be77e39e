"""The C++ kernels' row functions on one core, without JAX: microseconds per image.

    python benchmarks/kernels_one_core.py

Compiles the drivers in ``benchmarks/one_core/`` (each includes one kernel source, so its
internal functions are called directly on a small batch held in cache) with the compiler and
flags the package's build uses, then runs them. These are the figures BENCHMARKS.md quotes as
"one core"; the JAX-level ones of ``benchmarks/kernels.py`` include XLA's call overhead and both
cores, and vary more on a shared VM.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from mobilenet_jax.kernels import build  # noqa: E402

DRIVERS = ("depthwise_driver.cc", "conv_driver.cc")


def main() -> None:
    compiler = build.find_compiler()
    if compiler is None:
        sys.exit("No C++ compiler found (set CXX or install g++).")
    flags = [f for f in build.FLAGS if f not in ("-shared", "-fPIC")] + list(build.NATIVE) + ["-w"]
    include = ["-I", str(build.HERE), "-isystem", jax.ffi.include_dir()]
    with tempfile.TemporaryDirectory() as tmp:
        for driver in DRIVERS:
            binary = os.path.join(tmp, driver.removesuffix(".cc"))
            source = str(REPO / "benchmarks" / "one_core" / driver)
            subprocess.run([compiler, *flags, *include, source, "-o", binary, "-lpthread"], check=True)
            subprocess.run([binary], check=True)


if __name__ == "__main__":
    main()
