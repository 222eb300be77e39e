"""The C++ CPU kernels (mobilenet_jax.kernels) against XLA's own operations, the independent reference.

Depthwise: ``lax.conv_general_dilated`` with ``feature_group_count`` ('xla'), differentiated by
JAX. BatchNorm: ``flax.linen.BatchNorm``'s own code. Shapes cover both strides, odd and even
sizes, every padding mode, batch 1, and channel counts that leave a remainder after the
kernels' vector blocks (8 or 16 channels).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.test_util import check_grads

from mobilenet_jax.kernels import batchnorm, build, depthwise
from mobilenet_jax.kernels import conv as conv_kernels
from mobilenet_jax.models import layers

pytestmark = pytest.mark.skipif(not build.register(), reason="no C++ compiler here: the kernels are not built")

# (batch, height, width, channels, kernel size, stride)
SHAPES = [(1, 9, 7, 19, 3, 2), (2, 8, 17, 35, 3, 1), (1, 6, 5, 3, 5, 1), (2, 7, 10, 16, 5, 2), (3, 1, 4, 5, 3, 1)]
# wide enough for the kernels' column blocks (6 for 3x3, 4 otherwise) and a remainder after them
SHAPES += [(1, 4, 21, 19, 3, 2), (1, 3, 18, 21, 5, 1)]
TOLERANCE = {jnp.float32: 2e-5, jnp.float64: 1e-12}  # measured 1e-6 and 1e-14 on O(1) values


def _depthwise_results(implementation, padding, dtype, shape):
    n, h, w, c, k, s = shape
    x = jax.random.normal(jax.random.key(0), (n, h, w, c), dtype)
    layer = layers.DepthwiseConv(kernel_size=k, strides=s, padding=padding, implementation=implementation)
    variables = jax.tree.map(lambda a: a.astype(dtype), layer.init(jax.random.key(1), x))
    weights = jnp.linspace(-1.0, 1.0, c, dtype=dtype)  # a different cotangent for every channel

    def loss(variables, x):
        return jnp.sum(jnp.sin(layer.apply(variables, x)) * weights)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables, x), layer.apply(variables, x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("padding", ["torch", "tf", "keras_v1"])
def test_depthwise_kernels_equal_the_grouped_convolution_in_value_and_gradient(padding, dtype):
    with jax.enable_x64(dtype == jnp.float64):
        for shape in SHAPES:
            (loss_ffi, grads_ffi), y_ffi = _depthwise_results("ffi", padding, dtype, shape)
            (loss_xla, grads_xla), y_xla = _depthwise_results("xla", padding, dtype, shape)
            assert y_ffi.dtype == dtype and y_ffi.shape == y_xla.shape
            scale = max(1.0, float(jnp.abs(y_xla).max()))
            np.testing.assert_allclose(y_ffi, y_xla, atol=TOLERANCE[dtype] * scale, err_msg=str(shape))
            for a, b in zip(jax.tree.leaves(grads_ffi), jax.tree.leaves(grads_xla), strict=True):
                np.testing.assert_allclose(a, b, atol=TOLERANCE[dtype] * max(1.0, float(jnp.abs(b).max())))


def test_depthwise_kernel_gradients_pass_numerical_differentiation_and_vmap_maps_them():
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (2, 7, 6, 5), jnp.float64)
        kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, 5), jnp.float64)
        for strides, padding in ((1, 1), (2, 1), (2, 0)):
            check_grads(
                lambda x, k, s=strides, p=padding: depthwise.depthwise_conv(x, k, s, p),
                (x, kernel),
                order=1,
                modes=("rev",),
            )
        batched = jax.random.normal(jax.random.key(2), (3, 2, 6, 6, 5), jnp.float64)
        mapped = jax.vmap(lambda x: depthwise.depthwise_conv(x, kernel, 2, 1))(batched)
        for i in range(3):
            reference = layers.depthwise_conv(batched[i], kernel, 2, 1, "xla")
            np.testing.assert_allclose(mapped[i], reference, atol=1e-12)


def test_stem_conv_kernel_equals_xla_convolution_in_value_and_both_gradients():
    """layers.Conv on the C++ stem kernel (few input channels) against flax's own convolution: values and the
    gradients of kernel and input in float32 and float64, for strides 1/2, symmetric and 'SAME'-style
    asymmetric padding, odd sizes, output-channel remainders; wider patches keep the matrix product."""
    cases = [  # (n, h, w, c_in, c_out, k, stride, padding)
        (2, 9, 8, 3, 16, 3, 2, ((1, 1), (1, 1))),
        (1, 10, 11, 3, 35, 3, 2, ((0, 1), (1, 1))),
        (3, 7, 6, 2, 5, 3, 1, ((1, 1), (1, 1))),
        (1, 12, 13, 1, 24, 5, 2, ((2, 2), (2, 1))),
        # Rows wide enough for whole forward register blocks inside the image (12 pixels on AVX2, 24 with
        # AVX-512) beside a border block and a short last one.
        (1, 4, 61, 3, 16, 3, 2, ((0, 1), (0, 1))),
        (1, 3, 53, 3, 8, 3, 1, ((1, 1), (1, 1))),
    ]
    with jax.enable_x64(True):
        for n, h, w, c_in, c_out, k, s, padding in cases:
            for dtype in (jnp.float32, jnp.float64):
                x = jax.random.normal(jax.random.key(h), (n, h, w, c_in), dtype)
                results = []
                for impl in ("ffi", "xla"):
                    layer = layers.Conv(c_out, (k, k), strides=s, padding=padding, use_bias=False, implementation=impl)
                    variables = jax.tree.map(lambda a, t=dtype: a.astype(t), layer.init(jax.random.key(1), x))
                    weights = jnp.cos(jnp.arange(c_out, dtype=dtype))

                    def loss(variables, x, layer=layer, weights=weights):
                        return jnp.sum(jnp.sin(layer.apply(variables, x)) * weights)

                    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
                    results.append((jax.jit(layer.apply)(variables, x), step(variables, x)))
                    hlo = step.lower(variables, x).as_text()
                    calls = (hlo.count(f"@{conv_kernels.FORWARD}("), hlo.count(f"@{conv_kernels.KERNEL_GRADIENT}("))
                    assert calls == ((1, 1) if impl == "ffi" else (0, 0))
                for a, b in zip(*map(jax.tree.leaves, results), strict=True):
                    np.testing.assert_allclose(a, b, atol=TOLERANCE[dtype] * max(1.0, float(jnp.abs(b).max())))
        wide = layers.Conv(8, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, implementation="ffi")
        x = jnp.ones((1, 6, 6, 4))  # 36 taps: the patches' matrix product
        hlo = jax.jit(wide.apply).lower(wide.init(jax.random.key(0), x), x).as_text()
        assert f"@{conv_kernels.FORWARD}(" not in hlo and "dot_general" in hlo


@pytest.mark.parametrize(
    "dtype, activation", [(jnp.float32, None), (jnp.float64, None), (jnp.float32, "relu6"), (jnp.float64, "relu")]
)
def test_batchnorm_kernel_equals_flax_batchnorm_in_training(dtype, activation):
    # With an activation, the kernel path's backward recomputes its mask from the BatchNorm input.
    with jax.enable_x64(dtype == jnp.float64):
        # Channels with a large mean (the case where sums of x * dy lose digits) and odd counts.
        x = jax.random.normal(jax.random.key(0), (3, 5, 7, 19), dtype) * 2.0 + jnp.arange(19, dtype=dtype)
        ours = layers.BatchNorm(
            use_running_average=False, momentum=0.9, epsilon=1e-3, implementation="ffi", activation=activation
        )
        flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-3)
        act = {None: lambda y: y, "relu": nn.relu, "relu6": nn.relu6}[activation]
        reference = nn.Sequential([flax_bn, act])
        variables = flax_bn.init(jax.random.key(1), x)
        variables = {
            "params": {"scale": jnp.linspace(0.5, 2.0, 19, dtype=dtype), "bias": jnp.linspace(-1, 1, 19, dtype=dtype)},
            "batch_stats": variables["batch_stats"],
        }
        assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, variables)
        weights = jnp.cos(jnp.arange(19, dtype=dtype))

        def loss(module, params, x, wrap=lambda tree: tree):
            y, updated = module.apply(wrap({**variables, "params": params}), x, mutable=["batch_stats"])
            return jnp.sum(jnp.tanh(y) * weights), (y, updated["batch_stats"])

        def in_sequential(tree):  # nn.Sequential names its first layer layers_0
            return {kind: {"layers_0": leaves} for kind, leaves in tree.items()}

        def unwrap(stats):
            return stats.get("layers_0", stats)

        results = {
            name: jax.jit(
                jax.value_and_grad(lambda p, x, m=module, w=wrap: loss(m, p, x, w), argnums=(0, 1), has_aux=True)
            )(variables["params"], x)
            for name, module, wrap in (("ffi", ours, lambda t: t), ("flax", reference, in_sequential))
        }
        (loss_ffi, (y_ffi, stats_ffi)), grads_ffi = results["ffi"]
        (loss_flax, (y_flax, stats_flax)), grads_flax = results["flax"]
        tolerance = TOLERANCE[dtype] * 10
        np.testing.assert_allclose(y_ffi, y_flax, atol=tolerance)
        for a, b in zip(jax.tree.leaves(stats_ffi), jax.tree.leaves(unwrap(stats_flax)), strict=True):
            np.testing.assert_allclose(a, b, rtol=tolerance)
        for a, b in zip(jax.tree.leaves(grads_ffi), jax.tree.leaves(grads_flax), strict=True):
            np.testing.assert_allclose(a, b, atol=tolerance * max(1.0, float(jnp.abs(b).max())))
        # Inference mode is flax's own code: identical.
        evaluate = [m.clone(use_running_average=True).apply(variables, x) for m in (ours, flax_bn)]
        np.testing.assert_array_equal(evaluate[0], act(evaluate[1]))
        if activation is not None:  # the mask is in use: outputs clipped on both sides
            assert 0.05 < float(jnp.mean(y_ffi == 0)) < 0.95


def test_channel_sums_are_exact_to_the_input_precision_on_a_million_rows():
    # float32 sums of 2^20 rows: accumulated in blocks and in double, the result is the float64 sum
    # rounded once, where a running float32 sum would be off by ~1e-4 relative.
    a = jax.random.uniform(jax.random.key(0), (1024, 1024, 3), jnp.float32)
    b = jax.random.uniform(jax.random.key(1), (1024, 1024, 3), jnp.float32)
    center = jnp.array([0.5, 0.0, -1.0], jnp.float32)
    sum_a, sum_ab = jax.jit(batchnorm.channel_sums)(a, b, center)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(sum_a, a64.sum((0, 1)), rtol=2e-7)
    np.testing.assert_allclose(sum_ab, (a64 * (b64 - np.asarray(center, np.float64))).sum((0, 1)), rtol=2e-7)


def test_without_a_compiler_one_warning_and_the_xla_implementation(monkeypatch, tmp_path):
    monkeypatch.setenv("MOBILENET_JAX_KERNEL_CACHE", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on it
    build.shared_library.cache_clear()
    try:
        with pytest.warns(UserWarning, match=r"No C\+\+ compiler found") as caught:
            assert build.shared_library() is None
            assert build.shared_library() is None  # cached: no second warning
        assert len(caught) == 1
        monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
        monkeypatch.setenv("PATH", "/usr/bin:/bin")
        build.shared_library.cache_clear()
        with pytest.warns(UserWarning, match="Building the CPU kernels with .* failed"):
            assert build.shared_library() is None
        assert list(tmp_path.glob("*.so")) == []  # nothing half-written is left to be loaded later
    finally:
        build.shared_library.cache_clear()
    monkeypatch.setattr(depthwise, "available", lambda: False)
    assert layers.resolve_depthwise_impl("auto", "cpu") == "shift"
    with pytest.raises(ValueError, match="could not be built"):
        layers.depthwise_conv(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 1, 2)), 1, 1, "ffi")
    # The BatchNorm epilogue's path asks for the kernels too (in a fresh process that call registers them).
    x, variables = jnp.ones((1, 4, 4, 2)), {"params": {"kernel": jnp.ones((3, 3, 1, 2))}}
    with pytest.raises(ValueError, match="could not be built"):
        layers.DepthwiseConv(implementation="ffi").apply(variables, x, batchnorm=(*jnp.ones((3, 2)), None))
    with pytest.raises(ValueError, match="CPU only"):
        layers.resolve_depthwise_impl("ffi", "gpu")


@pytest.mark.parametrize(
    ("maps", "activation"), [("epilogue", "relu"), ("prologue", "relu6"), ("prologue", None), ("both", "relu6")]
)
def test_depthwise_with_batchnorm_maps_equals_xla_on_the_mapped_input_and_output(maps, activation):
    """One custom call for post(conv(pre(x))) with pre/post = act((v - mean) * scale + bias): values in float32 and
    float64, with the padding around the mapped input (zeros, as padding pre(x)), and the gradients of all eight
    inputs (the prologue recomputed row by row in the backward call) against JAX differentiating the composition
    of XLA's grouped convolution."""
    act = {None: lambda y: y, "relu": nn.relu, "relu6": nn.relu6}[activation]
    with jax.enable_x64(True):
        for (n, h, w, c, k, s), padding in ((SHAPES[1], 1), (SHAPES[5], 1), (SHAPES[3], 2)):
            for dtype in (jnp.float32, jnp.float64):
                keys = jax.random.split(jax.random.key(k * s + c), 8)
                x = jax.random.normal(keys[0], (n, h, w, c), dtype) * 3.0
                kernel = jax.random.normal(keys[1], (k, k, 1, c), dtype)
                pre, post = (
                    (jax.random.normal(a, (c,), dtype), jax.random.uniform(b, (c,), dtype, 0.2, 2.0),
                     jax.random.normal(d, (c,), dtype) * 2.0)
                    for a, b, d in (keys[2:5], keys[5:8])
                )  # fmt: skip

                def mapped(v, center, scale, offset):
                    return act((v - center) * scale + offset)

                def reference(x, kernel, pre, post, s=s, padding=padding):
                    x = mapped(x, *pre) if maps in ("prologue", "both") else x
                    y = layers.depthwise_conv(x, kernel, s, padding, "xla")
                    return mapped(y, *post) if maps in ("epilogue", "both") else y

                def fused(x, kernel, pre, post, s=s, padding=padding):
                    prologue = (*pre, activation) if maps in ("prologue", "both") else None
                    epilogue = (*post, activation) if maps in ("epilogue", "both") else None
                    return depthwise.depthwise_conv_affine(x, kernel, s, padding, prologue, epilogue)

                inputs = (x, kernel, pre, post)
                want, got = reference(*inputs), jax.jit(fused)(*inputs)
                assert got.dtype == dtype
                np.testing.assert_allclose(got, want, atol=TOLERANCE[dtype] * max(1.0, float(jnp.abs(want).max())))
                if activation == "relu6" and maps == "epilogue":  # clipped on both sides
                    assert float(jnp.mean(want == 0)) > 0.05 and float(jnp.mean(want == 6)) > 0.05
                if dtype == jnp.float64:
                    weights = jnp.cos(jnp.arange(c, dtype=dtype))
                    losses = [lambda *a, f=f, w=weights: jnp.sum(jnp.sin(f(*a)) * w) for f in (fused, reference)]
                    grads = [jax.jit(jax.grad(loss, argnums=range(4)))(*inputs) for loss in losses]
                    for a, b in zip(*map(jax.tree.leaves, grads), strict=True):
                        np.testing.assert_allclose(a, b, atol=1e-12 * max(1.0, float(jnp.abs(b).max())))


def test_each_depthwise_call_applies_the_batchnorms_next_to_it_in_inference_and_training():
    """A MobileNetV2 on the kernels' path, where every depthwise call applies the BatchNorm + ReLU6 before it (stem,
    expansion: a prologue, in both modes) and, in inference, its own (an epilogue): logits, gradients and the
    running averages' updates equal XLA's grouped convolution with flax's BatchNorm. BatchNorm statistics far
    from their initial values, so that the affine maps and the clipping matter."""
    from mobilenet_jax import MobileNetV2
    from mobilenet_jax.compression import quantization

    blocks = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 1, 2))
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (2, 19, 17, 3), jnp.float64)
        settings = dict(num_classes=5, width=0.35, block_table=blocks, dtype=jnp.float64, dropout_rate=0.0)
        models = {impl: MobileNetV2(**settings, depthwise_impl=impl) for impl in ("xla", "ffi")}
        variables = jax.tree.map(lambda a: a.astype(jnp.float64), models["xla"].init(jax.random.key(1), x))
        leaves, treedef = jax.tree.flatten(variables["batch_stats"])
        keys = jax.random.split(jax.random.key(2), len(leaves))
        stats = [  # the leaves alternate mean and var: mean ~ N(0, 1), var in [0.2, 2]
            jax.random.uniform(key, a.shape, a.dtype, 0.2, 2) if i % 2 else jax.random.normal(key, a.shape, a.dtype)
            for i, (key, a) in enumerate(zip(keys, leaves, strict=True))
        ]
        variables = {**variables, "batch_stats": jax.tree.unflatten(treedef, stats)}

        def loss(params, model, train):
            out = model.apply({**variables, "params": params}, x, train=train, mutable=["batch_stats"] if train else [])
            return jnp.sum(jnp.sin(out[0])), out

        depthwise_layers = len([c for c in models["ffi"].network().convs() if c.kind == "depthwise"])
        for train in (False, True):
            step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(1, 2))
            results = {impl: step(variables["params"], m, train) for impl, m in models.items()}
            assert float(jnp.abs(results["xla"][0][1][0]).max()) > 0.1
            for a, b in zip(*(jax.tree.leaves(results[impl]) for impl in ("ffi", "xla")), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)  # logits, updates and gradients

            def custom_calls(model, train=train, step=step):
                forward = jax.jit(loss, static_argnums=(1, 2)).lower(variables["params"], model, train).as_text()
                backward = step.lower(variables["params"], model, train).as_text()
                calls = [forward.count(f"@{name}(") for name in (depthwise.FORWARD_AFFINE, depthwise.FORWARD)]
                return (*calls, backward.count(f"@{depthwise.BACKWARD_PROLOGUE}("))

            assert custom_calls(models["ffi"]) == (depthwise_layers, 0, depthwise_layers)
            assert custom_calls(models["ffi"].clone(fuse_batchnorm=False)) == (0, depthwise_layers, 0)
        # Code that records BatchNorm inputs (synthetic calibration) still sees every BatchNorm called.
        _, seen = quantization.batchnorm_inputs(models["ffi"], variables, x)
        assert len(seen) == len(list(models["ffi"].network().convs()))


def test_auto_takes_the_kernels_on_cpu_at_any_size_and_only_for_what_they_compute():
    """``uses_kernels`` (which decides the BatchNorm maps) says what ``__call__`` runs: 'auto' on the CPU and 'ffi'
    at any size, never in a bfloat16 computation (the layer's dtype) nor with 'xla' or a bias (the folded form);
    and flax's BatchNorm takes the kernels in training with 'auto' too."""
    shape = jax.ShapeDtypeStruct
    small, large = shape((1, 4, 4, 8), jnp.float32), shape((8, 64, 64, 64), jnp.float32)
    for x in (small, large):
        assert layers.DepthwiseConv(implementation="auto").uses_kernels(x)
        assert layers.DepthwiseConv(implementation="ffi", padding="tf", strides=2).uses_kernels(x)
        assert not layers.DepthwiseConv(implementation="ffi", dtype=jnp.bfloat16).uses_kernels(x)
        assert not layers.DepthwiseConv(implementation="xla").uses_kernels(x)
        assert not layers.DepthwiseConv(implementation="ffi", use_bias=True).uses_kernels(x)
    norm = layers.BatchNorm(use_running_average=False, implementation="auto")
    x = jnp.arange(2 * 3 * 3 * 5, dtype=jnp.float32).reshape(2, 3, 3, 5)
    hlo = jax.jit(lambda v: norm.apply(v, x, mutable=["batch_stats"])).lower(norm.init(jax.random.key(0), x)).as_text()
    assert f"@{batchnorm.SUMS}(" in hlo
    # A BatchNorm's map is applied inside the call only where the call pads (zeros around the mapped input):
    # not where 'tf' pads an even size (0, 1) before the call, nor where the parameters promote the input.
    even, odd = shape((1, 4, 4, 8), jnp.float32), shape((1, 5, 5, 8), jnp.float32)
    assert layers.DepthwiseConv(implementation="ffi", padding="tf", strides=2).takes_deferred(odd)
    assert not layers.DepthwiseConv(implementation="ffi", padding="tf", strides=2).takes_deferred(even)
    with jax.enable_x64(True):
        assert not layers.DepthwiseConv(implementation="ffi", param_dtype=jnp.float64).takes_deferred(odd)
    assert not layers.DepthwiseConv(implementation="xla").takes_deferred(odd)
