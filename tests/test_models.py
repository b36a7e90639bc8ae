"""Tests of the network definitions: iResNet (arcface_torch layout), MobileFaceNet and the student split."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lvlrfr.models import (
    IRESNET_LAYERS,
    MobileFaceNet,
    Student,
    StudentBackbone,
    StudentHead,
    build_recognizer_network,
    build_student,
    iresnet,
    iresnet50,
)
from lvlrfr.models.iresnet import describe_iresnet_state_dict

torch.manual_seed(0)


@pytest.mark.parametrize("name", sorted(IRESNET_LAYERS))
@pytest.mark.parametrize("input_size", [32, 112])
def test_iresnet_forward_shape(name, input_size):
    net = iresnet(name, width=0.125, input_size=input_size, num_features=24).eval()
    last = math.ceil(input_size / 16)

    out = net(torch.randn(2, 3, input_size, input_size))

    assert out.shape == (2, 24)
    assert net.fc.in_features == 64 * last * last
    for stage, blocks in enumerate(IRESNET_LAYERS[name], start=1):
        assert len(getattr(net, f"layer{stage}")) == blocks


def test_iresnet50_state_dict_keys():
    state = iresnet50().state_dict()
    expected_shapes = {
        "conv1.weight": (64, 3, 3, 3),
        "bn1.running_mean": (64,),
        "prelu.weight": (64,),
        "layer1.0.bn1.weight": (64,),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer1.0.bn2.weight": (64,),
        "layer1.0.prelu.weight": (64,),
        "layer1.0.conv2.weight": (64, 64, 3, 3),
        "layer1.0.bn3.weight": (64,),
        "layer1.0.downsample.0.weight": (64, 64, 1, 1),
        "layer1.0.downsample.1.running_var": (64,),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer3.13.conv2.weight": (256, 256, 3, 3),
        "layer4.2.bn3.bias": (512,),
        "bn2.weight": (512,),
        "fc.weight": (512, 512 * 7 * 7),
        "fc.bias": (512,),
        "features.weight": (512,),
        "features.running_var": (512,),
    }
    for key, shape in expected_shapes.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    assert "layer3.14.conv1.weight" not in state
    assert "layer1.1.downsample.0.weight" not in state


def test_iresnet_stride_on_second_conv():
    net = iresnet("iresnet18", width=0.125, input_size=32)

    assert net.layer1[0].conv1.stride == (1, 1)
    assert net.layer1[0].conv2.stride == (2, 2)
    assert net.layer1[0].downsample[0].stride == (2, 2)


def test_iresnet_features_scale_frozen():
    net = iresnet("iresnet18", width=0.125, input_size=32)

    assert not net.features.weight.requires_grad
    assert net.features.bias.requires_grad
    assert torch.equal(net.features.weight, torch.ones_like(net.features.weight))


def test_iresnet_describe_state_dict():
    net = iresnet("iresnet34", width=0.25, input_size=64, num_features=40)

    description = describe_iresnet_state_dict(net.state_dict())

    assert description["name"] == "iresnet34"
    assert description["layers"] == [3, 4, 6, 3]
    assert description["width"] == 0.25
    assert description["last_map_size"] == 4
    assert description["num_features"] == 40
    assert describe_iresnet_state_dict(MobileFaceNet(width=0.25).state_dict()) is None


@pytest.mark.parametrize("input_size", [32, 112])
def test_mobilefacenet_forward_shape(input_size):
    net = MobileFaceNet(embedding_size=128, input_size=input_size, width=0.25).eval()
    last = math.ceil(input_size / 16)

    out = net(torch.randn(2, 3, input_size, input_size))

    assert out.shape == (2, 128)
    assert net.gdc[0].kernel_size == (last, last)
    assert net.gdc[0].groups == net.gdc[0].in_channels


def test_mobilefacenet_bottleneck_counts():
    net = MobileFaceNet(width=0.25, depths=(4, 6, 2))

    assert [len(net.body.stage1), len(net.body.stage2), len(net.body.stage3)] == [5, 7, 3]
    assert not net.body.stage1[0].residual
    assert net.body.stage1[1].residual


def test_recognizer_network_unknown_name():
    with pytest.raises(ValueError, match="iresnet50"):
        build_recognizer_network("resnet50", 112, 512)


STUDENT_CASES = [
    ("iresnet", {"widths": (8, 16, 32), "depths": (1, 1, 1)}, [2, 4, 8]),
    ("mobilefacenet", {"width": 0.25, "depths": (1, 1, 1)}, [2, 4, 8, 16]),
    ("timm:resnet10t", {}, [2, 4, 8, 16, 32]),
    ("timm:mobilenetv3_small_050", {"out_indices": (1, 2, 3)}, [4, 8, 16]),
]


@pytest.mark.parametrize("arch, kwargs, strides", STUDENT_CASES, ids=[case[0] for case in STUDENT_CASES])
@pytest.mark.parametrize("input_size", [16, 32])
def test_student_shapes(arch, kwargs, strides, input_size):
    backbone, head = build_student(arch, input_size, 48, **kwargs)

    maps = backbone(torch.randn(3, 3, input_size, input_size))

    assert backbone.feature_strides == strides
    assert [m.shape[1] for m in maps] == backbone.feature_channels
    assert [tuple(m.shape[1:]) for m in maps] == backbone.feature_shapes
    if not arch.startswith("timm:"):
        for feature_map, stride in zip(maps, strides):
            assert feature_map.shape[-1] == math.ceil(input_size / stride)
    assert head(maps[-1]).shape == (3, 48)


def test_student_iresnet_default_widths():
    backbone = StudentBackbone("iresnet", 32)

    assert backbone.feature_channels == [32, 64, 128]
    assert backbone.feature_shapes == [(32, 16, 16), (64, 8, 8), (128, 4, 4)]


def test_student_construction_keeps_bn_statistics():
    backbone = StudentBackbone("iresnet", 16, widths=(8, 16), depths=(1, 1))

    for module in backbone.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.running_mean, torch.zeros_like(module.running_mean))
            assert int(module.num_batches_tracked) == 0
    assert backbone.training


@pytest.mark.parametrize("kind", ["flatten", "gdc"])
def test_student_head_kinds(kind):
    head = StudentHead(32, 4, 4, embedding_size=20, kind=kind)

    assert head(torch.randn(2, 32, 4, 4)).shape == (2, 20)
    expected_inputs = 32 * 4 * 4 if kind == "flatten" else 32
    assert head.fc.in_features == expected_inputs


def test_student_head_wrong_map_shape():
    head = StudentHead(32, 4, 4, embedding_size=20)

    with pytest.raises(ValueError, match="input_size"):
        head(torch.randn(2, 32, 2, 2))


def test_student_unknown_arch():
    with pytest.raises(ValueError, match="mobilefacenet"):
        build_student("vgg", 16, 32)


def test_student_gradients_reach_all_parameters():
    student = Student(*build_student("iresnet", 16, 16, widths=(8, 16), depths=(1, 1)))

    student(torch.randn(4, 3, 16, 16)).pow(2).sum().backward()

    for name, parameter in student.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name
