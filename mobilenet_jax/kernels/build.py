"""Compiles the C++ kernels of this package on first use, with the machine's compiler, and registers them.

The sources (``depthwise.cc``, ``batchnorm.cc`` and their headers) ship with the package;
nothing prebuilt is downloaded. The
shared library is cached under ``$MOBILENET_JAX_KERNEL_CACHE`` (default
``~/.cache/mobilenet_jax/kernels``), keyed by the source, the compiler, its flags, the
jaxlib version and the CPU, so a new jaxlib or another machine rebuilds it. Concurrent
first uses (test workers, data-parallel processes) take a file lock and build it once.

Where no compiler is found or the build fails, :func:`shared_library` warns once, in one
sentence, and returns None: the callers then keep the pure-XLA implementation.

    python -m mobilenet_jax.kernels             # build now, print the library's path
    python -m mobilenet_jax.kernels --require   # the same, exit status 1 if it cannot be built (CI)
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jaxlib

HERE = Path(__file__).parent
SOURCES = (HERE / "depthwise.cc", HERE / "batchnorm.cc", HERE / "conv.cc")
HEADERS = (HERE / "dtypes.h", HERE / "parallel.h", HERE / "vec.h")
# XLA custom-call target -> the handler symbol the library exports.
TARGETS = {
    "mobilenet_depthwise_forward": "MobilenetDepthwiseForward",
    "mobilenet_depthwise_forward_affine": "MobilenetDepthwiseForwardAffine",
    "mobilenet_depthwise_backward": "MobilenetDepthwiseBackward",
    "mobilenet_depthwise_backward_prologue": "MobilenetDepthwiseBackwardPrologue",
    "mobilenet_conv_forward": "MobilenetConvForward",
    "mobilenet_conv_kernel_gradient": "MobilenetConvKernelGradient",
    "mobilenet_channel_sums": "MobilenetChannelSums",
    "mobilenet_masked_channel_sums": "MobilenetMaskedChannelSums",
}
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
NATIVE = ("-march=native",)  # vector width of this CPU (AVX2 or AVX-512); dropped if the compiler refuses it


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mobilenet_jax" / "kernels"
    return Path(os.environ.get("MOBILENET_JAX_KERNEL_CACHE", default))


def find_compiler() -> str | None:
    """``$CXX`` if set, else the first of c++, g++, clang++ on the PATH."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return next((path for name in ("c++", "g++", "clang++") if (path := shutil.which(name))), None)


def _cpu_signature() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    flags = next((line for line in cpuinfo.splitlines() if line.startswith(("flags", "Features"))), "")
    return platform.machine() + flags


def _compile(compiler: str, output: Path) -> str | None:
    """Builds the library at ``output``; returns None, or the compiler's last error line."""
    include = ["-isystem", jax.ffi.include_dir()]
    for native in (NATIVE, ()):
        with tempfile.NamedTemporaryFile(dir=output.parent, suffix=".so", delete=False) as tmp:
            pass
        command = [compiler, *FLAGS, *native, *include, *map(str, SOURCES), "-o", tmp.name]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode == 0:
            os.replace(tmp.name, output)  # atomic: a reader sees the whole library or none
            return None
        os.unlink(tmp.name)
    lines = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines() or [""]
    return lines[-1].strip()


@functools.cache
def shared_library() -> Path | None:
    """The compiled kernel library, built now if needed; None (with one warning) if it cannot be built."""
    compiler = find_compiler()
    if compiler is None:
        warnings.warn(
            "No C++ compiler found (set CXX or install g++), so depthwise convolutions and BatchNorm on "
            "CPU use the slower pure-XLA implementation.",
            stacklevel=2,
        )
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    sources = [path.read_text() for path in SOURCES + HEADERS]
    key = hashlib.sha256(
        "\n".join([*sources, version, " ".join(FLAGS + NATIVE), jaxlib.__version__, _cpu_signature()]).encode()
    ).hexdigest()[:16]
    directory = cache_dir()
    library = directory / f"libmobilenet_kernels-{key}.so"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / f"{library.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same file
            error = None if library.exists() else _compile(compiler, library)
    except OSError as e:
        error = f"{directory}: {e.strerror}; set MOBILENET_JAX_KERNEL_CACHE to a writable folder"
    if error is not None:
        warnings.warn(
            f"Building the CPU kernels with {compiler} failed ({error}), so depthwise convolutions "
            "and BatchNorm on CPU use the slower pure-XLA implementation.",
            stacklevel=2,
        )
        return None
    return library


@functools.cache
def register() -> bool:
    """Builds the library if needed and registers its custom calls with XLA:CPU; False if it cannot be built."""
    library = shared_library()
    if library is None:
        return False
    handle = ctypes.cdll.LoadLibrary(str(library))
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, symbol)), platform="cpu")
    return True
