"""Batch-1 latency and file size of the exported models next to JAX and PyTorch, in one process.

    python benchmarks/deploy_latency.py                     # V1, V2, V3-Large/Small, V4-conv-small at 224
    python benchmarks/deploy_latency.py --arch v2,v3_small --runs 50 --json deploy.json

For each architecture it exports random-init weights (latency does not depend on
the values) to float32 and full-int8 ``.tflite`` files, then times one image at a
time: LiteRT with XNNPACK at 1 and 2 threads (float32 and int8), this project's JAX
model (jitted, inference mode), and PyTorch eager (torchvision's ``mobilenet_v2`` /
``mobilenet_v3_large`` / ``_small``, timm's ``mobilenetv4_conv_small`` or the design
notes' MobileNetV1, ``torch.inference_mode``). Candidates take turns
within every round so that machine noise hits all of them alike; the table gives
the median over ``--runs`` rounds (at least 30) and each file's size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mobilenet_jax import host  # noqa: E402

TORCH = host.import_torch_before_tensorflow()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mobilenet_jax import MobileNetV1, MobileNetV2, MobileNetV3, MobileNetV4  # noqa: E402
from mobilenet_jax.deployment import export  # noqa: E402

MODELS = {  # --arch name: (our model, its title)
    "v1": (MobileNetV1(), "MobileNetV1 1.0"),
    "v2": (MobileNetV2(), "MobileNetV2 1.0"),
    "v3_large": (MobileNetV3(variant="large"), "MobileNetV3-Large 1.0"),
    "v3_small": (MobileNetV3(variant="small"), "MobileNetV3-Small 1.0"),
    "v4_conv_small": (MobileNetV4(variant="conv_small"), "MobileNetV4-Conv-S"),
}


def candidates(arch: str, size: int, calibration: int) -> tuple[dict, dict]:
    """``({name: callable on one RGB image}, {file name: bytes})`` for one architecture."""
    model = MODELS[arch][0]
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3)))
    rng = np.random.default_rng(0)
    images = [rng.uniform(0, 255, (1, size, size, 3)).astype(np.float32) for _ in range(calibration)]
    files = {
        "float32": export.to_tflite(model, variables, size),
        "int8": export.to_tflite(model, variables, size, quantize="int8", calibration=images),
    }
    runs = {}
    for kind, data in files.items():
        for threads in (1, 2):
            runs[f"LiteRT XNNPACK {kind}, {threads} thread{'s' if threads > 1 else ''}"] = export.TFLiteModel(
                data, num_threads=threads
            )
    apply = jax.jit(lambda x: model.apply(variables, (x - export.MEAN_RGB) / export.STDDEV_RGB, train=False))
    runs[f"JAX (this project), {jax.default_backend()}"] = lambda x: apply(x).block_until_ready()
    if TORCH:
        runs.update(_torch_candidate(arch))
    return runs, files


def _torch_candidate(arch: str) -> dict:
    import torch
    import torchvision

    from mobilenet_jax.weights import torch_reference

    torch.set_num_threads(os.cpu_count() or 1)
    if arch == "v2" or arch.startswith("v3"):
        name = {"v2": "mobilenet_v2", "v3_large": "mobilenet_v3_large", "v3_small": "mobilenet_v3_small"}[arch]
        module, name = getattr(torchvision.models, name)(), f"torchvision {name}"
    elif arch == "v4_conv_small":
        import timm

        module, name = timm.create_model("mobilenetv4_conv_small"), "timm mobilenetv4_conv_small"
    else:
        stem, cfg = torch_reference.V1_NORMAL
        module, name = torch_reference.TorchMobileNetV1(1000, stem, cfg), "PyTorch MobileNetV1 (design notes)"
    module.eval()

    def run(x):
        with torch.inference_mode():
            module(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))

    return {f"{name}, eager, {torch.get_num_threads()} threads": run}


def measure(runs: dict, size: int, rounds: int) -> dict:
    image = np.random.default_rng(1).uniform(0, 255, (1, size, size, 3)).astype(np.float32)
    for fn in runs.values():  # compile / warm up
        for _ in range(3):
            fn(image)
    samples = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn(image)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median_ms": statistics.median(s), "samples_ms": s} for name, s in samples.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--runs", type=int, default=30, help="timed rounds (at least 30)")
    parser.add_argument("--calibration", type=int, default=16, help="random calibration images for int8")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.runs < 30:
        parser.error("--runs must be at least 30")
    unknown = [a for a in args.arch.split(",") if a and a not in MODELS]
    if unknown:
        parser.error(f"unknown --arch {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    host.keep_freed_memory()
    report = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "jax": jax.__version__,
        },
        "results": {},
    }
    for arch in [a for a in args.arch.split(",") if a]:
        runs, files = candidates(arch, args.resolution, args.calibration)
        timings = measure(runs, args.resolution, args.runs)
        sizes = {kind: len(data) for kind, data in files.items()}
        report["results"][arch] = {"latency": timings, "file_bytes": sizes}
        print(f"\n{MODELS[arch][1]}-{args.resolution}, batch 1, median of {args.runs} rounds")
        for name, t in timings.items():
            print(f"  {name:58s} {t['median_ms']:8.2f} ms")
        print("  files: " + ", ".join(f"{kind} {n / 1e6:.2f} MB" for kind, n in sizes.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
