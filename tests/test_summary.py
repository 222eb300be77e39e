"""Parameter and multiply-add counts against the papers' tables and torchvision."""

import subprocess
import sys

import pytest

from mobilenet_jax import MobileNetV1, MobileNetV2, MobileNetV3, MobileNetV4, summarize


@pytest.mark.parametrize(
    "width, size, paper_params_m, paper_macs_m",
    [
        # MobileNetV1 paper, Table 6 (width multiplier) and Table 7 (resolution).
        (1.0, 224, 4.2, 569),
        (0.75, 224, 2.6, 325),
        (0.5, 224, 1.3, 149),
        (0.25, 224, 0.5, 41),
        (1.0, 192, 4.2, 418),
        (1.0, 160, 4.2, 290),
        (1.0, 128, 4.2, 186),
    ],
)
def test_mobilenet_v1_paper_tables(width, size, paper_params_m, paper_macs_m):
    result = summarize(MobileNetV1(width=width), size)
    assert round(result.params_excluding_bn / 1e6, 1) == paper_params_m
    assert abs(result.macs / 1e6 - paper_macs_m) <= 1.0


def test_mobilenet_v2_paper_and_torchvision():
    result = summarize(MobileNetV2(width=1.0), 224)
    assert result.params == 3_504_872  # torchvision's published mobilenet_v2 parameter count
    assert int(result.params_excluding_bn / 1e5) / 10 == 3.4  # paper: 3.4M
    assert abs(result.macs / 1e6 - 300) <= 3  # paper: 300M
    wide = summarize(MobileNetV2(width=1.4), 224)
    assert abs(wide.macs / 1e6 - 585) / 585 < 0.01  # paper: 585M
    # The paper's 6.9M is not reproducible from its own table; TF-slim's released
    # mobilenet_v2_1.4_224 lists 6.06M parameters and 582M MACs.
    assert round(wide.params_excluding_bn / 1e6, 2) == 6.06
    assert round(wide.macs / 1e6) == 582


@pytest.mark.parametrize(
    "variant, width, minimal, rounding, torchvision_params, paper_params_m, paper_macs_m",
    [
        # MobileNetV3 paper, Table 3; torchvision's published parameter counts. The paper's 0.75 models are
        # TF-slim's (Keras's rounding: stem and the dense head layer keep their widths).
        ("large", 1.0, False, "torchvision", 5_483_032, 5.4, 219),
        ("small", 1.0, False, "torchvision", 2_542_856, 2.5, 56),
        ("large", 0.75, False, "keras", None, 4.0, 155),
        ("small", 0.75, False, "keras", None, 2.0, 44),
        ("large", 1.0, True, "keras", None, 3.9, 209),
    ],
)
def test_mobilenet_v3_paper_and_torchvision(
    variant, width, minimal, rounding, torchvision_params, paper_params_m, paper_macs_m
):
    result = summarize(MobileNetV3(variant=variant, width=width, minimal=minimal, rounding=rounding), 224)
    if torchvision_params:
        assert result.params == torchvision_params
    assert abs(result.params / 1e6 - paper_params_m) < 0.1  # the paper gives one decimal (5.483 as 5.4)
    # Within 1.5% of the paper (216.6M for its 219M, 43.4M for 44M): papers count the squeeze-excitation and
    # the head differently; torchvision lists 0.22 and 0.06 GFLOPS.
    assert abs(result.macs / 1e6 - paper_macs_m) <= 0.015 * paper_macs_m


def test_mobilenet_v4_paper_and_timm():
    small, medium = (
        summarize(MobileNetV4(variant="conv_small"), 224),
        summarize(MobileNetV4(variant="conv_medium"), 256),
    )
    assert (small.params, medium.params) == (3_774_024, 9_715_512)  # timm's mobilenetv4_conv_small/_medium
    # The paper: 3.8M and 0.2G MACs at 224; 9.7M and 1.0G at 256 (timm lists 0.19 and 1.1 GMACs there).
    assert 180 < small.macs / 1e6 < 200 and 1000 < medium.macs / 1e6 < 1100


def test_counts_follow_the_architecture_not_a_table():
    assert summarize(MobileNetV1(profile="0.5flops"), 224).macs < 0.55 * summarize(MobileNetV1(), 224).macs
    small = summarize(MobileNetV1(num_classes=10, profile=(8, [16])), 8)
    # stem 3x3x3->8 on 4x4, dw 3x3x8 on 4x4, pw 8->16 on 4x4, classifier 16->10
    assert small.macs == 4 * 4 * 8 * 27 + 4 * 4 * 8 * 9 + 4 * 4 * 16 * 8 + 16 * 10


@pytest.mark.slow
def test_cli_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "mobilenet_jax.summary"], capture_output=True, text=True, check=True)
    assert "MobileNetV1 0.25-224" in out.stdout and "MobileNetV2 1.4-224" in out.stdout
    assert "568.7" in out.stdout and "RuntimeWarning" not in out.stderr
