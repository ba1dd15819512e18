"""BiSeNet face parser: facexlib's released key layout, parity with the reference on shared weights,
fp16 files and bf16 inference, and configurations refused before anything is built."""

import json

import pytest
import torch

from gpen.archs.bisenet import BiSeNet, bisenet_config, imagenet_normalise, is_bisenet
from gpen.files.registry import build
from gpen.files.weights import CheckpointError, read_state_dict


@pytest.fixture(scope="module")
def fp16_state(shared) -> dict:
    """Random-weight reference BiSeNet(19), stored in fp16 like a halved release."""
    return read_state_dict(shared / "fixtures" / "bisenet_random_fp16.pth")


@pytest.fixture(scope="module")
def bisenet_io(shared) -> dict:
    """input: (1,3,128,128) RGB 0..1; logits: the reference's first output on it (fp32 weights)."""
    return torch.load(shared / "fixtures" / "bisenet_random_fp16_io.pt", weights_only=True)


@pytest.fixture(scope="module")
def parser(fp16_state) -> BiSeNet:
    return build(fp16_state, "bisenet.pth", "parser")  # weights widened to fp32, as the reference ran them


def test_keys_and_shapes_are_those_of_the_released_file(shared):
    released = json.loads((shared / "fixtures" / "bisenet_19_keys.json").read_text())
    with torch.device("meta"):
        net = BiSeNet(19)
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == released["keys"]
    assert list(net.state_dict()) == list(released["keys"])  # the same order, too
    assert sum(p.numel() for p in net.parameters()) == released["parameters"] == 13300416


def test_config_is_read_from_the_shapes(fp16_state):
    assert is_bisenet(fp16_state)
    assert bisenet_config(fp16_state) == {"num_class": 19}
    with torch.device("meta"):
        eleven = BiSeNet(11).state_dict()
    assert bisenet_config(eleven) == {"num_class": 11}


def test_logits_match_the_reference(parser, bisenet_io):
    with torch.no_grad():
        logits = parser(imagenet_normalise(bisenet_io["input"]))
    reference = bisenet_io["logits"]
    assert logits.shape == reference.shape == (1, 19, 128, 128)
    assert (logits - reference).abs().max() <= 1e-3 * reference.abs().max()
    assert (logits.argmax(1) == reference.argmax(1)).float().mean() >= 0.999


def test_auxiliary_outputs_come_second_and_third_at_input_size(parser, bisenet_io):
    x = imagenet_normalise(bisenet_io["input"][..., :100, :90])  # odd feature sizes on the way down
    with torch.no_grad():
        main, out16, out32 = parser(x, auxiliary=True)
        assert torch.equal(main, parser(x))
    assert main.shape == out16.shape == out32.shape == (1, 19, 100, 90)


def test_parse_takes_plain_rgb_and_gives_classes(parser, bisenet_io):
    classes = parser.parse(bisenet_io["input"])
    assert classes.shape == (1, 128, 128) and classes.dtype == torch.long
    assert torch.equal(classes, bisenet_io["logits"].argmax(1))


def test_fp16_files_load_into_fp32_and_fp16_models(fp16_state, parser):
    weight = "conv_out.conv_out.weight"
    assert fp16_state[weight].dtype == torch.float16
    assert parser.state_dict()[weight].dtype == torch.float32
    assert torch.equal(parser.state_dict()[weight], fp16_state[weight].float())
    half = BiSeNet(19).half()
    half.load_state_dict(fp16_state, strict=True)
    assert torch.equal(half.state_dict()[weight], fp16_state[weight])


def test_bf16_inference_agrees_with_fp32(fp16_state, parser, bisenet_io):
    x = imagenet_normalise(bisenet_io["input"])
    bf16 = build(fp16_state, "bisenet.pth", "parser").to(torch.bfloat16)
    with torch.no_grad():
        full, low = parser(x), bf16(x.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16
    # Random weights give logits within 0.2 of each other, so near-ties are common: 99.1% agree here.
    assert (low.argmax(1) == full.argmax(1)).float().mean() >= 0.99


def test_other_networks_are_not_bisenet():
    gpen_like = {"generator.style.1.weight": torch.zeros(1), "ecd0.0.weight": torch.zeros(1)}
    assert not is_bisenet(gpen_like)
    with pytest.raises(ValueError, match="not a BiSeNet"):
        bisenet_config(gpen_like)


def test_classifiers_that_disagree_are_refused_before_building():
    with torch.device("meta"):
        state = BiSeNet(19).state_dict()
    state["conv_out16.conv_out.weight"] = torch.empty(5, 64, 1, 1, device="meta")
    with pytest.raises(ValueError, match="conv_out16.conv_out.weight is \\(5, 64, 1, 1\\)"):
        bisenet_config(state)
    with pytest.raises(CheckpointError) as refused:  # the reader's own words, after the file's name
        build(state, "odd.pth")
    assert str(refused.value).startswith("odd.pth: BiSeNet's conv_out16.conv_out.weight is (5, 64, 1, 1); expected")


def test_wrong_layouts_and_damaged_weights_are_refused(fp16_state):
    wrong = dict(fp16_state, **{"cp.arm16.conv.conv.weight": torch.zeros(128, 128, 3, 3)})
    with pytest.raises(CheckpointError, match="does not fit the BiSeNet face-parser layout: cp.arm16.conv.conv.weight"):
        build(wrong, "wrong.pth", "parser")
    missing = {k: v for k, v in fp16_state.items() if not k.startswith("cp.resnet.layer4.1.")}
    with pytest.raises(CheckpointError, match="missing cp.resnet.layer4.1"):
        build(missing, "missing.pth", "parser")
    nan = dict(fp16_state, **{"ffm.conv1.weight": torch.full((64, 256, 1, 1), float("nan"))})
    with pytest.raises(CheckpointError, match="ffm.conv1.weight holds NaN"):
        build(nan, "nan.pth", "parser")


@pytest.mark.parametrize("classes, refusal", [
    (0, "is a face parser with 0 classes: it can mark no face region"),
    (1000, "is a face parser giving 1000 classes at 512x512, 1000 MiB of logits a face"),
])
def test_class_counts_no_face_parser_has_are_refused_before_building(classes, refusal):
    with torch.device("meta"):
        state = BiSeNet(19).state_dict()
    for name, width in (("conv_out", 256), ("conv_out16", 64), ("conv_out32", 64)):
        state[f"{name}.conv_out.weight"] = torch.empty(classes, width, 1, 1, device="meta")
    with pytest.raises(CheckpointError) as refused:
        build(state, "parser.pth")
    assert str(refused.value).startswith(f"parser.pth: {refusal}")  # the reader's own words, after the file's name
