"""MobileNetV1's pointwise matrix products at batch 32, 224 px: XLA's against PyTorch's and NumPy's.

    python benchmarks/matmul.py [--batch 32] [--reps 7] [--rounds 3]

The pointwise layers are 65-78% of V1 inference (``profile_step.py --mode infer``), and this
project leaves them to XLA, so whether V1 inference beats PyTorch's depends on these products
more than on the C++ kernels. Each library runs in its own process (an idle OpenBLAS or OpenMP
pool spins after a call and slows the next library's threads), on every core, with the output
written into a preallocated buffer where the library allows (PyTorch ``out=``, NumPy ``out=``;
XLA allocates its result, which the project's allocator settings keep from page-faulting).
The libraries take turns, a process each per round (``--rounds``). Prints milliseconds per
product (the median over rounds of each round's median) and the total over V1's layers, each shape counted
as often as it occurs (``512 -> 512`` five times).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mobilenet_jax.models.mobilenet_v1 import v1_architecture  # noqa: E402


def v1_pointwise_shapes(resolution: int = 224) -> tuple[tuple[int, int, int, int], ...]:
    """``(spatial side, input channels, output channels, how many layers)`` of V1's pointwise layers,
    from the model's own table (``v1_architecture``), in order of first appearance."""
    stem, blocks = v1_architecture()
    side, channels, counts = resolution // 2, stem, {}
    for out_channels, stride in blocks:
        side //= stride  # the depthwise conv strides; the pointwise one keeps the size
        counts[(side, channels, out_channels)] = counts.get((side, channels, out_channels), 0) + 1
        channels = out_channels
    return tuple((*shape, count) for shape, count in counts.items())


V1_POINTWISE = v1_pointwise_shapes()
LIBRARIES = ("xla", "torch", "numpy")


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _xla_product(dot, a, b):
    return dot(a, b).block_until_ready()


def measure(library: str, batch: int, reps: int) -> list[float]:
    """Milliseconds per product for each shape of ``V1_POINTWISE``, in this process."""
    import numpy as np  # noqa: PLC0415

    from mobilenet_jax import host  # noqa: PLC0415

    host.configure_cpu_allocator()  # as train.py and throughput.py run XLA
    rng = np.random.default_rng(0)
    if library == "xla":
        import jax  # noqa: PLC0415
        import jax.numpy as jnp  # noqa: PLC0415

        dot = jax.jit(jnp.dot)
    elif library == "torch":
        import torch  # noqa: PLC0415

        torch.set_num_threads(os.cpu_count() or 1)  # XLA and OpenBLAS use every core too
    results = []
    for side, k, n, _ in V1_POINTWISE:
        a = rng.standard_normal((batch * side * side, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        if library == "xla":
            product = functools.partial(_xla_product, dot, jnp.asarray(a), jnp.asarray(b))
        elif library == "torch":
            product = functools.partial(
                torch.mm, torch.from_numpy(a), torch.from_numpy(b), out=torch.empty(a.shape[0], n)
            )
        else:
            product = functools.partial(np.matmul, a, b, out=np.empty((a.shape[0], n), np.float32))
        results.append(_median_ms(product, reps))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument(
        "--rounds", type=int, default=3, help="a process per library per round, in turn; median over rounds"
    )
    parser.add_argument("--libraries", default=",".join(LIBRARIES), help="comma-separated: xla, torch, numpy")
    parser.add_argument("--worker", choices=LIBRARIES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.batch, args.reps)))
        return
    libraries = [name.strip() for name in args.libraries.split(",") if name.strip()]
    unknown = sorted(set(libraries) - set(LIBRARIES))
    if unknown:
        parser.error(f"--libraries takes xla, torch and numpy, not {', '.join(unknown)}.")
    samples = {name: [] for name in libraries}
    for _ in range(args.rounds):  # the libraries take turns, so that the machine's drift reaches each of them
        for library in libraries:
            command = [
                sys.executable,
                __file__,
                "--worker",
                library,
                "--batch",
                str(args.batch),
                "--reps",
                str(args.reps),
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"The {library} measurement failed:\n{done.stderr[-2000:]}")
            samples[library].append(json.loads(done.stdout.strip().splitlines()[-1]))
    columns = {
        name: [statistics.median(round_[i] for round_ in rounds) for i in range(len(V1_POINTWISE))]
        for name, rounds in samples.items()
    }
    print(f"V1 pointwise products, batch {args.batch}, ms (median of {args.rounds} rounds of {args.reps} calls)")
    print(f"{'shape (rows x K -> N)':<28}" + "".join(f"{name:>9}" for name in columns))
    for i, (side, k, n, count) in enumerate(V1_POINTWISE):
        label = f"{args.batch * side * side} x {k} -> {n}" + (f" (x{count})" if count > 1 else "")
        print(f"{label:<28}" + "".join(f"{column[i]:9.1f}" for column in columns.values()))
    totals = {
        name: sum(ms * shape[3] for ms, shape in zip(column, V1_POINTWISE, strict=True))
        for name, column in columns.items()
    }
    print(f"{'V1 total (weighted)':<28}" + "".join(f"{total:9.0f}" for total in totals.values()))


if __name__ == "__main__":
    main()
