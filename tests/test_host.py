"""Host settings: the allocator (page faults of freed-and-reallocated buffers) and the compilation cache."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mobilenet_jax import host

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAULTS = textwrap.dedent(
    """
    import ctypes, ctypes.util, json, resource, sys
    from mobilenet_jax import host
    applied = host.keep_freed_memory() if sys.argv[1] == "keep" else False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 * 2**20
    faults = []
    for _ in range(6):  # a 64 MB buffer, written, freed, allocated again: an activation of a CPU step
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffer = libc.malloc(size)
        ctypes.memset(buffer, 1, size)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        libc.free(buffer)
    print(json.dumps({"applied": applied, "faults": faults}))
    """
)

CACHE = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp
    from mobilenet_jax import MobileNetV1, host
    host.enable_compilation_cache(sys.argv[1])
    events = []
    jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
    model = MobileNetV1(num_classes=3, width=0.25)
    x = jnp.zeros((1, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    jax.jit(model.apply)(variables, x).block_until_ready()
    print(json.dumps({
        "hits": sum(e == "/jax/compilation_cache/cache_hits" for e in events),
        "misses": sum(e == "/jax/compilation_cache/cache_misses" for e in events),
    }))
    """
)


def run_python(source: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", source, *args], cwd=REPO, capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    default = run_python(FAULTS, "default")["faults"]
    kept = run_python(FAULTS, "keep")
    assert kept["applied"]
    # By default glibc maps and unmaps each 64 MB buffer, so every page faults in again
    # (16,384 faults with 4 KiB pages); kept, the freed memory is reused already mapped.
    assert min(default[1:]) >= 32
    assert max(kept["faults"][1:]) * 10 <= min(default[1:])


@pytest.mark.slow
def test_second_start_loads_every_executable_from_the_cache(tmp_path):
    cache = str(tmp_path / "xla_cache")
    first = run_python(CACHE, cache)
    files = sorted(os.listdir(cache))
    second = run_python(CACHE, cache)
    assert first["misses"] >= 2 and first["hits"] == 0
    assert second["misses"] == 0 and second["hits"] == first["misses"]
    assert sorted(os.listdir(cache)) == files


def test_cache_directory_errors_are_clear(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="Cannot create the compilation cache directory"):
        host.enable_compilation_cache(str(blocker / "cache"))
    assert host.enable_compilation_cache("") is None


def test_cpu_only_follows_jax_platforms(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host.cpu_only()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host.cpu_only()


def test_tensorflow_starts_quietly_on_a_cpu_machine():
    """TensorFlow only feeds data here: on Linux x86_64 the install takes tensorflow-cpu, which prints no
    'Could not find cuda drivers' / 'failed call to cuInit' lines (the full build prints three)."""
    import platform

    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip("tensorflow-cpu is the dependency on Linux x86_64 only")
    code = "import tensorflow as tf; print(tf.config.list_physical_devices('GPU'))"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # the default log level
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-2000:]
    assert "cuda" not in result.stderr.lower() and "cuInit" not in result.stderr, result.stderr[-2000:]


def test_native_output_is_held_and_shown_only_when_the_block_fails(capfd):
    """What native code writes to file descriptors 1 and 2 (os.write, and C stdio through libc) inside the
    block is dropped when the block succeeds and written to stderr when it raises; output outside passes."""
    import ctypes

    libc = ctypes.CDLL(None)
    os.write(2, b"before\n")
    with host.native_output_held():
        os.write(2, b"converter log line\n")
        os.write(1, b"fully_quantize: 0\n")
        libc.printf(b"buffered by C stdio\n")
    out, err = capfd.readouterr()
    assert err == "before\n" and out == ""
    with pytest.raises(RuntimeError, match="conversion failed"):
        with host.native_output_held():
            os.write(2, b"the reason it failed\n")
            raise RuntimeError("conversion failed")
    out, err = capfd.readouterr()
    assert err == "the reason it failed\n" and out == ""
    os.write(1, b"after\n")
    assert capfd.readouterr().out == "after\n"  # descriptors restored
