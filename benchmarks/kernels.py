"""One depthwise layer on the C++ CPU kernels against the pure-JAX shifted multiply-adds.

    python benchmarks/kernels.py                        # MobileNetV2's depthwise layer shapes, batch 32
    python benchmarks/kernels.py --batch 8 --impls ffi  # the kernels only

For each shape (batch x height x width x channels, stride) it times the forward
call and the forward + backward (input and kernel gradients of a sum of squares)
under ``jit``, as the best of ``--repeats`` runs of ``--calls`` calls each, in
milliseconds per call. ``xla`` (the grouped convolution) can be added with
``--impls``; on CPU it is one to two orders of magnitude slower.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mobilenet_jax import host  # noqa: E402
from mobilenet_jax.models import layers  # noqa: E402

# MobileNetV2 1.0 at 224 px: (height = width, channels, stride) of its depthwise layers.
V2_SHAPES = ((112, 32, 1), (112, 96, 2), (56, 144, 1), (28, 192, 1), (14, 576, 1), (7, 960, 1))


def best_ms(function, *args, calls: int, repeats: int) -> float:
    jax.block_until_ready(function(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            result = function(*args)
        jax.block_until_ready(result)
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--impls", default="ffi,shift", help="comma-separated: ffi, shift, xla")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    host.keep_freed_memory()  # as train.py: freed buffers are reused, not page-faulted in again
    impls = args.impls.split(",")
    if "ffi" in impls:
        layers.require_kernels()
    rng = np.random.default_rng(0)
    print(f"{'shape':<24}{'impl':<7}{'forward ms':>12}{'fwd+bwd ms':>12}")
    for size, channels, stride in V2_SHAPES:
        x = jnp.asarray(rng.standard_normal((args.batch, size, size, channels), np.float32))
        kernel = jnp.asarray(rng.standard_normal((3, 3, 1, channels), np.float32))
        for impl in impls:

            def forward(x, kernel, impl=impl, stride=stride):
                return layers.depthwise_conv(x, kernel, stride, 1, impl)

            gradients = jax.jit(jax.grad(lambda x, kernel, f=forward: jnp.sum(f(x, kernel) ** 2), argnums=(0, 1)))
            functions = (jax.jit(forward), gradients)
            timing = [best_ms(f, x, kernel, calls=args.calls, repeats=args.repeats) for f in functions]
            shape = f"{args.batch}x{size}x{size}x{channels} s{stride}"
            print(f"{shape:<24}{impl:<7}{timing[0]:>12.2f}{timing[1]:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
