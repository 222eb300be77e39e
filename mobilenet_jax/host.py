"""Host settings that decide CPU speed and start-up time: the allocator and the compilation cache; and
:func:`native_output_held`, which keeps native libraries' log lines out of a command's output.

The settings are process-wide, so the library never applies them on import; ``train.py``,
``python -m mobilenet_jax.evaluate`` and the benchmarks call them at start-up.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
import tempfile
from collections.abc import Iterator

from absl import logging

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def cpu_only() -> bool:
    """Whether JAX will run on the CPU: ``JAX_PLATFORMS`` says so, or no GPU/TPU plugin is installed.

    Decided without initialising JAX, so that the allocator can be set before
    XLA starts its threads.
    """
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if importlib.util.find_spec("libtpu") is not None:
        return False
    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    try:
        import jax_plugins  # noqa: PLC0415  (namespace package of the CUDA/ROCm plugins)
    except ImportError:
        return True
    return not list(pkgutil.iter_modules(jax_plugins.__path__))


def keep_freed_memory() -> bool:
    """Makes glibc's malloc reuse freed memory instead of handing it back to the kernel.

    XLA:CPU and PyTorch allocate every activation of a MobileNet step afresh (tens
    of MB each at 224 px). glibc serves allocations over 32 MB with a new ``mmap``
    and returns them with ``munmap``, so each step page-faults its whole working set
    in again: measured on a 2-core VM, writing a fresh 58 MB buffer took 24.7 ms of
    which 19 ms were page faults. With ``mmap`` off, trimming off and one arena,
    freed memory is reused (5.2 ms). The price is that the process keeps its peak
    heap until it exits. Returns whether the settings were applied (glibc only).
    """
    if not sys.platform.startswith("linux"):
        return False
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    try:
        libc = ctypes.CDLL(libc_name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    ok = mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, -1) and mallopt(_M_ARENA_MAX, 1)
    if not ok:
        logging.warning("mallopt refused the allocator settings; CPU steps will page-fault their buffers in.")
    return bool(ok)


def import_torch_before_tensorflow() -> bool:
    """Imports torch and torchvision, if installed, before anything imports TensorFlow.

    With the wheels pinned here, importing torch after TensorFlow crashes the process;
    every entry point that may use both calls this first. Returns whether torch is there.
    """
    try:
        import torch  # noqa: F401, PLC0415
        import torchvision  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def configure_cpu_allocator() -> bool:
    """:func:`keep_freed_memory` when JAX will run on the CPU only (call before JAX starts)."""
    return keep_freed_memory() if cpu_only() else False


def enable_compilation_cache(cache_dir: str | None) -> str | None:
    """Turns on JAX's persistent compilation cache in ``cache_dir`` (created if missing).

    A second start of the same configuration then loads the compiled train and eval
    steps instead of compiling them. ``None`` or ``''`` leaves the cache off. Returns
    the absolute directory in use.
    """
    if not cache_dir:
        return None
    import jax  # noqa: PLC0415  (imported late so that keep_freed_memory() can run before JAX starts)

    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"Cannot create the compilation cache directory {cache_dir!r}: {e.strerror}.") from e
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # Cache every executable: the CPU steps compile in seconds, which is what the cache should save.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache_dir


@contextlib.contextmanager
def native_output_held() -> Iterator[None]:
    """Holds what is written to the process's stdout and stderr (file descriptors 1 and 2) while the block
    runs, and writes it to stderr only if the block raises.

    For native libraries that log as they work (the LiteRT converter: "Ignored output_format",
    "fully_quantize: 0, ...", absl's "before InitializeLog" warning; the interpreter's "Created
    TensorFlow Lite XNNPACK delegate"): a command prints its own result, and the libraries' lines
    appear when they explain a failure. Keep the block to the native call: Python output inside it
    is held the same way.
    """
    try:
        libc = ctypes.CDLL(None)
    except OSError:  # no C library handle by that name (Windows)
        libc = None
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile() as sink:
        for fd in saved:
            os.dup2(sink.fileno(), fd)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            if libc is not None:
                libc.fflush(None)  # C stdio buffers, written to the held descriptors
            for fd, original in saved.items():
                os.dup2(original, fd)
                os.close(original)
            if failed:
                sink.seek(0)
                sys.stderr.write(sink.read().decode(errors="replace"))
                sys.stderr.flush()
