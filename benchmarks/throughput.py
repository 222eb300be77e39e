"""Training and inference speed of this project's MobileNets next to PyTorch's, in one process.

    python benchmarks/throughput.py --arch v2 --batch 32 --resolution 224 --dtype float32
    python benchmarks/throughput.py --arch v1 --json v1.json
    python benchmarks/throughput.py --pipeline_only   # input pipeline images/s per core
    python benchmarks/throughput.py --arch v2 --torch_channels_last --peak_rss   # also peak memory while training

For each candidate (this project's model; torchvision's ``mobilenet_v2`` or the
design notes' PyTorch MobileNetV1 when torch is installed) it measures, on one
device:
  * train: images/s of a full training step (forward, backward, optimizer update).
    For JAX this is ``steps.make_train_step``, the step ``train.py`` runs (RMSprop,
    weight decay, EMA, BN statistics); for PyTorch, forward + cross-entropy +
    backward + ``torch.optim.RMSprop``.
  * infer: images/s of the forward pass in inference mode (BN with running statistics).
  * latency: milliseconds for one image (batch 1), inference mode.
  * first step: seconds from the first call to its result (JAX: tracing and XLA
    compilation; PyTorch: its eager warm-up).
  * peak RSS (``--peak_rss``): the peak resident memory of a fresh process that builds
    one candidate and trains it (first step, then ``--seconds`` of steps), one process per
    candidate, so that each figure is that framework's alone.
Candidates take turns within every repetition so that machine noise hits all of
them alike; the table reports medians over repetitions and each JAX figure's ratio
to the PyTorch figure measured beside it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mobilenet_jax import host  # noqa: E402

if host.import_torch_before_tensorflow():
    import torch
    import torchvision
else:
    torch = None

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("v1", "v2"), default="v2")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--modes", default="train,infer,latency", help="comma-separated: train, infer, latency")
    parser.add_argument("--frameworks", default="jax,torch", help="comma-separated: jax, torch")
    parser.add_argument("--depthwise_impl", default="auto", choices=("auto", "xla", "shift", "ffi"))
    parser.add_argument(
        "--fuse_batchnorm",
        choices=("on", "off", "both"),
        default="on",
        help="the models' fuse_batchnorm (BatchNorms inside the depthwise kernel calls); both: side by side",
    )
    parser.add_argument("--reps", type=int, default=5, help="repetitions; every candidate runs once per repetition")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum seconds per measurement")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--torch_channels_last", action="store_true", help="also time PyTorch in channels_last")
    parser.add_argument("--channels_last_only", action="store_true", help="PyTorch in channels_last only")
    parser.add_argument("--peak_rss", action="store_true", help="also the peak RSS of training, a process each")
    parser.add_argument("--print_peak_rss", action="store_true", help=argparse.SUPPRESS)  # a --peak_rss child
    parser.add_argument(
        "--malloc", choices=("keep", "default"), default="keep", help="glibc allocator settings (see host.py)"
    )
    parser.add_argument("--pipeline", action="store_true", help="also measure the input pipeline")
    parser.add_argument("--pipeline_only", action="store_true", help="only measure the input pipeline")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    args.frameworks = [f for f in args.frameworks.split(",") if f]
    unknown = set(args.modes) - {"train", "infer", "latency"} | set(args.frameworks) - {"jax", "torch"}
    if unknown:
        parser.error(f"unknown mode or framework {sorted(unknown)}")
    if args.batch < 1 or args.resolution < 32:
        parser.error("--batch must be >= 1 and --resolution >= 32")
    return args


# ----------------------------------------------------------------------------- candidates


class Candidate:
    """A model under test: ``train()``, ``infer()`` and ``latency()`` each run once and block."""

    name: str
    framework: str
    first_step_s: float


class JaxCandidate(Candidate):
    framework = "jax"

    def __init__(self, args, fuse_batchnorm: bool = True):
        import optax

        from configs import v1, v2
        from mobilenet_jax.training import distributed, optim, steps

        dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
        self.name = f"mobilenet_jax {args.arch.upper()} (depthwise {args.depthwise_impl})"
        config = (v1 if args.arch == "v1" else v2).get_config()
        config.model.width = args.width
        config.model.depthwise_impl = args.depthwise_impl
        config.model.fuse_batchnorm = fuse_batchnorm
        if args.fuse_batchnorm == "both":
            self.name += ", BatchNorm " + ("fused" if fuse_batchnorm else "unfused")
        config.half_precision = args.dtype == "bfloat16"
        config.label_smoothing = 0.1
        model = steps.create_model(config, num_classes=1000)
        lr = optax.constant_schedule(0.01)
        tx = optim.create_optimizer(config, lr)
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (distributed.BATCH_AXIS,))  # one device
        state = optim.create_train_state(jax.random.key(0), model, tx, args.resolution)
        # Placed as train.py places it (training/loop.py): with the step's replicated sharding, the
        # step compiles once; an uncommitted state compiled it a second time on the second call.
        self.state = jax.device_put(state, distributed.replicated(mesh))
        self.step = steps.make_train_step(config, model, mesh, tx, lr)
        rng = np.random.default_rng(0)
        self.batch = distributed.global_batch(
            {
                "image": rng.standard_normal((args.batch, args.resolution, args.resolution, 3), np.float32),
                "label": rng.integers(0, 1000, args.batch).astype(np.int32),
                "mask": np.ones(args.batch, np.float32),
            },
            mesh,
        )
        self.apply = jax.jit(functools.partial(model.apply, train=False))
        self.images = self.batch["image"].astype(dtype)
        self.one_image = self.images[:1]

    def train(self):
        self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready(metrics)

    @property
    def variables(self) -> dict:
        return {"params": self.state.params, "batch_stats": self.state.batch_stats}  # the train step donates the state

    def infer(self):
        self.apply(self.variables, self.images).block_until_ready()

    def latency(self):
        self.apply(self.variables, self.one_image).block_until_ready()


class TorchCandidate(Candidate):
    framework = "torch"

    def __init__(self, args, channels_last: bool = False):
        torch.manual_seed(0)
        torch.set_num_threads(args.threads)
        if args.arch == "v2":
            model = torchvision.models.mobilenet_v2(width_mult=args.width)
            self.name = "torchvision mobilenet_v2, eager"
        else:
            from mobilenet_jax.weights import torch_reference

            stem, cfg = torch_reference.V1_NORMAL
            scale = lambda c: max(8, int(c * args.width))  # noqa: E731  (the design notes' width rule)
            cfg = [scale(c) if isinstance(c, int) else (scale(c[0]), c[1]) for c in cfg]
            model = torch_reference.TorchMobileNetV1(1000, scale(stem), cfg)
            self.name = "PyTorch MobileNetV1 (design notes), eager"
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.name += ", channels_last"
        self.autocast = args.dtype == "bfloat16"
        if self.autocast:
            self.name += ", bf16 autocast"
        self.model = model.to(memory_format=memory_format)
        self.optimizer = torch.optim.RMSprop(
            model.parameters(), lr=0.01, alpha=0.9, eps=1.0, momentum=0.9, weight_decay=4e-5
        )
        generator = torch.Generator().manual_seed(0)
        shape = (args.batch, 3, args.resolution, args.resolution)
        self.images = torch.randn(shape, generator=generator).contiguous(memory_format=memory_format)
        self.labels = torch.randint(0, 1000, (args.batch,), generator=generator)
        self.one_image = self.images[:1].contiguous(memory_format=memory_format)

    def _autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast)

    def train(self):
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = torch.nn.functional.cross_entropy(self.model(self.images), self.labels, label_smoothing=0.1)
        loss.backward()
        self.optimizer.step()

    def infer(self):
        self.model.eval()
        with torch.inference_mode(), self._autocast():
            self.model(self.images)

    def latency(self):
        self.model.eval()
        with torch.inference_mode(), self._autocast():
            self.model(self.one_image)


# ----------------------------------------------------------------------------- measuring


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(fn, min_seconds: float) -> float:
    """Mean seconds per call over at least ``min_seconds`` (and at least 2 calls)."""
    calls, elapsed = 0, 0.0
    while calls < 2 or elapsed < min_seconds:
        elapsed += timed(fn)
        calls += 1
    return elapsed / calls


def run(args) -> dict:
    candidates = []
    if "jax" in args.frameworks:
        fuse = {"on": (True,), "off": (False,), "both": (True, False)}[args.fuse_batchnorm]
        candidates.extend(JaxCandidate(args, fuse_batchnorm) for fuse_batchnorm in fuse)
    if "torch" in args.frameworks:
        if torch is None:
            print("torch is not installed: measuring JAX only (pip install -e '.[torch]').", file=sys.stderr)
        else:
            if not args.channels_last_only:
                candidates.append(TorchCandidate(args))
            if args.torch_channels_last or args.channels_last_only:
                candidates.append(TorchCandidate(args, channels_last=True))

    first = {}
    for c in candidates:  # the first call of every mode: compilation (JAX) or warm-up (PyTorch)
        for mode in args.modes:
            first.setdefault(c.name, {})[mode] = timed(getattr(c, mode))
    if args.print_peak_rss:  # the peak so far includes compiling the step; then the steps' own peak
        print(f"first_call_peak_rss_gb {peak_rss_of_this_process_gb():.3f}", flush=True)
        reset_peak_rss()
    for c in candidates:  # then a discarded round, until the allocator has the steps' working sets
        for mode in args.modes:
            measure(getattr(c, mode), args.seconds)

    samples = {c.name: {m: [] for m in args.modes} for c in candidates}
    for rep in range(args.reps):
        for c in candidates:
            for mode in args.modes:
                samples[c.name][mode].append(measure(getattr(c, mode), args.seconds))
        print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr, flush=True)

    results = {}
    for c in candidates:
        row = {"framework": c.framework, "first_call_s": first[c.name]}
        for mode in args.modes:
            seconds = statistics.median(samples[c.name][mode])
            if mode == "latency":
                row["latency_ms"] = seconds * 1e3
            else:
                row[f"{mode}_images_per_s"] = args.batch / seconds
            row[f"{mode}_samples_s"] = samples[c.name][mode]
        results[c.name] = row
    return results


def ratios(results: dict) -> dict:
    """Each JAX figure over the best PyTorch figure (>1: JAX is faster)."""
    torch_rows = [r for r in results.values() if r["framework"] == "torch"]
    out = {}
    for name, row in results.items():
        if row["framework"] != "jax" or not torch_rows:
            continue
        out[name] = {}
        for key in ("train_images_per_s", "infer_images_per_s"):
            if key in row:
                out[name][key.split("_")[0]] = row[key] / max(r[key] for r in torch_rows)
        if "latency_ms" in row:
            out[name]["latency"] = min(r["latency_ms"] for r in torch_rows) / row["latency_ms"]
    return out


def reset_peak_rss() -> None:
    """Starts VmHWM again from the current RSS (Linux: ``5`` to ``/proc/self/clear_refs``); elsewhere a no-op."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_of_this_process_gb() -> float:
    """VmHWM: this process's own peak. (``ru_maxrss`` would include the parent's peak: Linux carries it
    across the exec of a child that a large process started.)"""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_rss(args) -> dict:
    """GB of peak resident memory of a process training each candidate alone."""
    fuse = ("on", "off") if args.fuse_batchnorm == "both" else (args.fuse_batchnorm,)
    runs = {
        "jax" + (f" (BatchNorm fusion {f})" if len(fuse) > 1 else ""): ["--frameworks=jax", f"--fuse_batchnorm={f}"]
        for f in fuse
    }
    runs["torch"] = ["--frameworks=torch"]
    if args.torch_channels_last:
        runs["torch channels_last"] = ["--frameworks=torch", "--channels_last_only"]
    common = [
        f"--arch={args.arch}",
        f"--width={args.width}",
        f"--batch={args.batch}",
        f"--resolution={args.resolution}",
        f"--dtype={args.dtype}",
        f"--depthwise_impl={args.depthwise_impl}",
        f"--malloc={args.malloc}",
        "--modes=train",
        "--reps=1",
        f"--seconds={args.seconds}",
        "--print_peak_rss",
    ]
    out = {}
    for name, extra in runs.items():
        result = subprocess.run([sys.executable, __file__, *common, *extra], capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"the {name} peak-RSS process failed: {result.stderr.strip().splitlines()[-1:]}")
        values = dict(line.split() for line in result.stdout.splitlines() if line.startswith(("peak_rss", "first_")))
        out[name] = float(values["peak_rss_gb"])  # while training, after the first step
        out[name + ", first step (compilation)"] = float(values["first_call_peak_rss_gb"])
    return out


# ----------------------------------------------------------------------------- input pipeline


def pipeline_throughput(resolution: int, seconds: float) -> dict:
    """JPEG decode + random-resized crop + flip + normalise, images/s on 1 and on all cores."""
    import tensorflow as tf

    from mobilenet_jax.data import input_pipeline

    tf.config.experimental.set_visible_devices([], "GPU")
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(64):  # ImageNet-like: ~400x350 JPEGs of smooth, textured content
        h, w = rng.integers(300, 500, 2)
        small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        image = tf.image.resize(small, (h, w), method="bicubic") + rng.normal(0, 8, (h, w, 3))
        encoded.append(tf.io.encode_jpeg(tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8), quality=90).numpy())

    def images_per_s(parallel: int) -> float:
        options = tf.data.Options()
        options.threading.private_threadpool_size = parallel
        options.threading.max_intra_op_parallelism = 1
        ds = tf.data.Dataset.from_tensor_slices((encoded, np.zeros(len(encoded), np.int64))).repeat()
        ds = ds.enumerate().map(
            lambda i, example: input_pipeline.preprocess_train(
                example[0], example[1], tf.stack([i, 0]), resolution, (0.08, 1.0)
            ),
            num_parallel_calls=parallel,
            deterministic=False,
        )
        it = iter(ds.with_options(options).prefetch(64))
        for _ in range(32):
            next(it)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            next(it)
            count += 1
        return count / (time.perf_counter() - start)

    cores = os.cpu_count() or 1
    one = images_per_s(1)
    result = {"cores": cores, "images_per_s_1_core": one}
    if cores > 1:
        result[f"images_per_s_{cores}_cores"] = images_per_s(cores)
    result["images_per_s_per_core"] = (
        result[f"images_per_s_{cores}_cores" if cores > 1 else "images_per_s_1_core"] / cores
    )
    return result


# ----------------------------------------------------------------------------- report


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read().splitlines()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in cpuinfo if line.startswith(("flags", "Features")))
        # The widest vector extension: the kernels' and XLA's code differ by it (AVX-512 or AVX2 machines).
        info["vector_extension"] = next((name for name in ("avx512f", "avx2", "avx", "asimd") if name in flags), "")
        # A VM's model name may be just "AMD EPYC"; family and model tell the generation
        # (x86: AMD family 25 is Zen 3/4, 26 Zen 5; Intel family 6 model 207 Emerald Rapids).
        for key in ("cpu family", "model"):
            value = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.split(":")[0].strip() == key), None)
            if value is not None:
                info[key.replace(" ", "_")] = value
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if torch is not None:
        info["torch"] = torch.__version__
        info["torchvision"] = torchvision.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info


def print_table(args, results: dict, ratio: dict) -> None:
    print(
        f"\n{args.arch.upper()} width {args.width}, batch {args.batch}, {args.resolution}x{args.resolution}, "
        f"{args.dtype}, {args.reps} repetitions (median)"
    )
    header = f"{'':58s} {'train img/s':>12s} {'infer img/s':>12s} {'batch-1 ms':>11s} {'first step s':>13s}"
    print(header)
    for name, row in results.items():
        cells = [
            f"{row['train_images_per_s']:12.1f}" if "train_images_per_s" in row else f"{'-':>12s}",
            f"{row['infer_images_per_s']:12.1f}" if "infer_images_per_s" in row else f"{'-':>12s}",
            f"{row['latency_ms']:11.2f}" if "latency_ms" in row else f"{'-':>11s}",
            f"{row['first_call_s'].get('train', float('nan')):13.1f}",
        ]
        print(f"{name:58s} {' '.join(cells)}")
    for name, r in ratio.items():
        print(f"{'ratio ' + name + ' / PyTorch':58s} " + "  ".join(f"{k} {v:.2f}x" for k, v in r.items()))


def main(argv=None):
    args = parse_args(argv)
    malloc = host.keep_freed_memory() if args.malloc == "keep" else False
    report = {"args": {k: v for k, v in vars(args).items()}, "machine": machine(), "malloc_tuned": malloc}
    if not args.pipeline_only:
        results = run(args)
        report["results"] = results
        report["ratios"] = ratios(results)
        print_table(args, results, report["ratios"])
        if args.print_peak_rss:
            print(f"peak_rss_gb {peak_rss_of_this_process_gb():.3f}")
    if args.peak_rss:
        report["peak_rss_gb"] = peak_rss(args)
        print(
            "peak RSS (a process each; while training after the first step, and during the first step): "
            + ", ".join(f"{k} {v:.2f} GB" for k, v in report["peak_rss_gb"].items())
        )
    if args.pipeline or args.pipeline_only:
        report["input_pipeline"] = pipeline_throughput(args.resolution, args.seconds)
        p = report["input_pipeline"]
        print(
            f"\ninput pipeline (JPEG decode + random-resized crop to {args.resolution}): "
            f"{p['images_per_s_1_core']:.0f} images/s on 1 core, {p['images_per_s_per_core']:.0f} images/s per core "
            f"with all {p['cores']} cores"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
