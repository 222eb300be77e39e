"""Where a training step's time goes: XLA ops grouped by layer type, pass and operation.

    python benchmarks/profile_step.py --arch v2 --batch 32 --resolution 224

Runs this project's train step (as benchmarks/throughput.py does) under
``jax.profiler``, then sums the traced durations of the compiled step's fusions by
(layer type, forward/backward, operation), using the op names XLA keeps from the
Flax module paths. Durations are summed over all threads, so on an N-core machine
they add up to about N times the wall time when the cores are busy.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import throughput  # noqa: E402

from mobilenet_jax import host  # noqa: E402


def layer_kind(op_name: str) -> str:
    if "conv_dw" in op_name:
        return "depthwise conv"
    if any(name in op_name for name in ("conv_pw", "conv_pwl", "last_conv")):
        return "pointwise conv"
    if "/bn" in op_name or "_bn/" in op_name:
        return "batchnorm"
    if "stem_conv" in op_name:
        return "stem conv"
    if "relu" in op_name:
        return "activation"
    return "other (activation backward, loss, optimizer, head)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("v1", "v2"), default="v2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mode", choices=("train", "infer"), default="train", help="a train step or inference")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--per_layer", action="store_true", help="group by each layer's op name, not by layer type")
    args = parser.parse_args(argv)

    host.keep_freed_memory()
    bench_args = throughput.parse_args(
        [f"--arch={args.arch}", f"--batch={args.batch}", f"--resolution={args.resolution}", "--frameworks=jax"]
    )
    candidate = throughput.JaxCandidate(bench_args)
    run = getattr(candidate, args.mode)
    for _ in range(5):  # compile, then let the allocator settle
        run()
    with tempfile.TemporaryDirectory() as trace_dir:
        start = time.perf_counter()
        jax.profiler.start_trace(trace_dir)
        for _ in range(args.steps):
            run()
        jax.profiler.stop_trace()
        wall = (time.perf_counter() - start) / args.steps
        (trace_file,) = glob.glob(os.path.join(trace_dir, "plugins/profile/*/*.trace.json.gz"))
        with gzip.open(trace_file) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    if args.mode == "train":
        hlo = candidate.step.lower(candidate.state, candidate.batch).compile().as_text()
    else:
        hlo = candidate.apply.lower(candidate.variables, candidate.images).compile().as_text()
    op_names = {}
    # A custom call's result type may be a tuple "(f32[...], f32[...])": hence the lazy ".*?".
    pattern = r"%(\S+) = [^\n]*? (?:fusion|dot|convolution|custom-call)\([^\n]*?op_name=\"([^\"]+)\""
    for match in re.finditer(pattern, hlo):
        op_names[match.group(1)] = match.group(2)

    totals = collections.Counter()
    for event in events:
        op_name = op_names.get(event["name"])
        if op_name is None:
            continue
        direction = "backward" if "transpose(" in op_name or "_bwd" in op_name else "forward"
        operation = op_name if args.per_layer else re.sub(r".*/", "", op_name)
        totals[(layer_kind(op_name), direction, operation)] += event["dur"] / 1e3 / args.steps
    kernel_ms = sum(totals.values())
    print(
        f"\n{args.arch.upper()} {'train step' if args.mode == 'train' else 'inference'},"
        f" batch {args.batch}, {args.resolution}px: {wall * 1e3:.0f} ms wall per step "
        f"(while profiled), {kernel_ms:.0f} ms of XLA ops summed over threads"
    )
    by_layer = collections.Counter()
    for (layer, _, _), ms in totals.items():
        by_layer[layer] += ms
    print(f"\n{'layer type':34s} {'ms/step':>8s} {'share':>6s}")
    for layer, ms in by_layer.most_common():
        print(f"{layer:34s} {ms:8.0f} {ms / kernel_ms:6.0%}")
    print(f"\n{'layer type, pass, operation':60s} {'ms/step':>8s} {'share':>6s}")
    for (layer, direction, operation), ms in totals.most_common(args.top):
        print(f"{layer + ', ' + direction + ', ' + operation:60s} {ms:8.0f} {ms / kernel_ms:6.0%}")


if __name__ == "__main__":
    main()
