"""FaceFusion's ONNX region parsers and occluders, recognised by their shapes.

The files here are tiny stand-ins exported with exactly the real files' inputs and outputs and
a behaviour simple enough to predict: which colour channel they look at shows that they are fed
what FaceFusion feeds them.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from gpen import CheckpointError
from gpen.archs.onnx import OCCLUDER, REGION_PARSER
from gpen.loader import describe_weights, load_parser
from tests.helpers import export_fake_scrfd

REPO = Path(__file__).resolve().parents[1]
SKIN, HAIR = 1, 17
MEAN_RED, STD_RED = 0.485, 0.229


class FakeRegionParser(torch.nn.Module):
    """Takes (N,3,512,512) ImageNet-normalised RGB; says skin where red is above ImageNet's mean red,
    hair where it is below (the skin logit is the normalised red, the hair logit 0, the rest -10)."""

    def forward(self, x):
        red = x[:, :1]
        others = torch.full_like(red, -10.0)
        logits = [red if c == SKIN else red * 0 if c == HAIR else others for c in range(19)]
        return torch.cat(logits, 1)


class FakeOccluder(torch.nn.Module):
    """Takes (N,256,256,3) channels last; says the face shows as much as its first channel (blue,
    in the BGR order FaceFusion feeds) is bright: (N,256,256,1), like the XSeg exports."""

    def forward(self, x):
        return x[..., :1]


class FakeOccluderChannelsFirst(torch.nn.Module):
    """The same as (N,1,256,256), and out of range: 2 * blue - 0.5, which must come back clipped."""

    def forward(self, x):
        return x[..., 0][:, None] * 2 - 0.5


def export(module, example, path, batch="fixed"):
    dynamic = {"input": {0: "batch"}, "output": {0: "batch"}} if batch == "dynamic" else None
    torch.onnx.export(module, (example,), path, input_names=["input"], output_names=["output"],
                      dynamic_axes=dynamic, dynamo=False)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("facefusion")
    parser_input, occluder_input = torch.zeros(1, 3, 512, 512), torch.zeros(1, 256, 256, 3)
    return {
        "parser": export(FakeRegionParser(), parser_input, folder / "bisenet_resnet_18.onnx"),
        "parser-dynamic": export(FakeRegionParser(), parser_input, folder / "bisenet_resnet_34.onnx", "dynamic"),
        "occluder": export(FakeOccluder(), occluder_input, folder / "xseg_1.onnx", "dynamic"),
        "occluder-fixed": export(FakeOccluder(), occluder_input, folder / "xseg_2.onnx"),
        "occluder-nchw": export(FakeOccluderChannelsFirst(), occluder_input, folder / "xseg_3.onnx"),
    }


def hair_over_skin(size: int) -> torch.Tensor:
    """A (size, size, 3) crop: dark red on the top half, bright red below; green and blue the other
    way round, so that a parser fed BGR would see it upside down."""
    crop = torch.empty(size, size, 3)
    top, bottom = slice(0, size // 2), slice(size // 2, size)
    crop[top, :, 0], crop[bottom, :, 0] = 0.2, 0.8
    crop[top, :, 1:], crop[bottom, :, 1:] = 0.8, 0.2
    return crop


class CountingSession:
    """Stands in for a parser's onnxruntime session, noting the batch size of every run."""

    def __init__(self, session):
        self.session, self.batches = session, []

    def run(self, names, feed):
        self.batches.append(len(next(iter(feed.values()))))
        return self.session.run(names, feed)


def count_runs(parser) -> list[int]:
    parser.network.session = CountingSession(parser.network.session)
    return parser.network.session.batches


@pytest.mark.parametrize("size", [512, 300])
def test_region_parser_masks_the_chosen_classes(models, size):
    parser = load_parser(models["parser"], device="cpu")
    assert (parser.info.arch, parser.size) == ("FaceFusion region parser", 512)
    crops = hair_over_skin(size)[None]

    skin = parser.masks(crops, regions={SKIN})
    assert skin.shape == (1, size, size) and skin.dtype == torch.float32
    margin = 2  # rows where the two halves meet are blended by the resizing
    assert (skin[0, :size // 2 - margin] == 0).all() and (skin[0, size // 2 + margin:] == 1).all()
    hair = parser.masks(crops, regions=[HAIR, 18])
    assert torch.equal(hair[:, :size // 2 - margin], 1 - skin[:, :size // 2 - margin])
    assert parser.masks(crops, regions=set()).sum() == 0

    logits = parser.logits(crops)
    assert logits.shape == (1, 19, size, size) and logits.dtype == torch.float32
    # The skin logit is the red channel normalised with ImageNet's mean and deviation.
    expected = (torch.tensor([0.2, 0.8]) - MEAN_RED) / STD_RED
    assert torch.allclose(logits[0, SKIN, [0, -1], size // 2], expected, atol=1e-5)


def test_region_parser_batches_faces_one_at_a_time_when_its_batch_is_fixed(models):
    crops = torch.stack([hair_over_skin(128), hair_over_skin(128).flip(0), torch.full((128, 128, 3), 0.9)])
    fixed, dynamic = load_parser(models["parser"]), load_parser(models["parser-dynamic"])
    fixed_runs, dynamic_runs = count_runs(fixed), count_runs(dynamic)

    skin = fixed.masks(crops, regions={SKIN})
    assert fixed_runs == [1, 1, 1]
    assert skin.shape == (3, 128, 128)
    assert skin[0, -1].all() and not skin[0, 0].any()  # skin below
    assert skin[1, 0].all() and not skin[1, -1].any()  # skin above: each face gets its own answer
    assert skin[2].all()

    assert torch.equal(dynamic.masks(crops, regions={SKIN}), skin)
    assert dynamic_runs == [3]
    assert fixed.logits(crops[:0]).shape == (0, 19, 128, 128)


def blue_ramp(size: int) -> torch.Tensor:
    """A (size, size, 3) crop whose blue rises from 0 on the left to 1 on the right; red falls."""
    ramp = torch.linspace(0, 1, size).expand(size, size)
    return torch.stack([1 - ramp, torch.full_like(ramp, 0.5), ramp], -1)


@pytest.mark.parametrize("model", ["occluder", "occluder-fixed"])
def test_occluder_sees_bgr_channels_last(models, model):
    occluder = load_parser(models[model], device="cpu")
    assert (occluder.info.arch, occluder.size) == ("FaceFusion occluder", 256)

    # At the occluder's own size its answer is exactly the crops' blue channel.
    crops = torch.stack([blue_ramp(256), blue_ramp(256).flip(1)])
    with pytest.raises(TypeError, match="not class logits"):
        occluder.logits(crops)
    visible = occluder.masks(crops)
    assert visible.shape == (2, 256, 256) and visible.dtype == torch.float32
    assert torch.allclose(visible, crops[..., 2], atol=1e-6)

    # Other sizes are resized there and back: the ramp survives, up to its ends.
    for size in (512, 100):
        crops = blue_ramp(size)[None]
        visible = occluder.masks(crops, regions={SKIN})  # regions mean nothing to an occluder
        assert visible.shape == (1, size, size)
        assert (visible[0, :, 2:-2] - crops[0, :, 2:-2, 2]).abs().max() < 0.01


def test_occluder_output_channels_first_is_read_and_clipped(models):
    occluder = load_parser(models["occluder-nchw"])
    crops = blue_ramp(256)[None]
    visible = occluder.masks(crops)
    assert visible.shape == (1, 256, 256)
    assert visible.min() == 0 and visible.max() == 1
    assert torch.allclose(visible, (crops[..., 2] * 2 - 0.5).clamp(0, 1), atol=1e-6)


def test_results_come_back_where_the_crops_are(models):
    parser, occluder = load_parser(models["parser"]), load_parser(models["occluder"])
    assert parser.device == torch.device("cpu") and occluder.device == torch.device("cpu")
    crops = hair_over_skin(64)[None].to(parser.device)
    assert parser.masks(crops, {SKIN}).device == crops.device
    assert occluder.masks(crops).device == crops.device
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        parser.masks(crops.permute(0, 3, 1, 2), {SKIN})


def test_names_and_info(models):
    parser, occluder = load_parser(models["parser"]), load_parser(models["occluder"])
    assert parser.name == "FaceFusion region parser bisenet_resnet_18.onnx"
    assert occluder.name == "FaceFusion occluder xseg_1.onnx"
    assert str(parser.info) == "FaceFusion region parser (onnx, float32), 19 face regions at 512x512"
    assert str(occluder.info) == "FaceFusion occluder (onnx, float32), visible-face probability at 256x256"
    assert parser.info.format == occluder.info.format == "onnx"


def test_recognised_by_shapes_not_names(models, tmp_path):
    shutil.copy(models["parser"], tmp_path / "xseg_1.onnx")
    shutil.copy(models["occluder"], tmp_path / "bisenet_resnet_18.onnx")
    shutil.copy(models["occluder-nchw"], tmp_path / "GPEN-BFR-512.onnx")
    assert load_parser(tmp_path / "xseg_1.onnx").info.arch == "FaceFusion region parser"
    assert load_parser(tmp_path / "bisenet_resnet_18.onnx").info.arch == "FaceFusion occluder"
    assert load_parser(tmp_path / "GPEN-BFR-512.onnx").info.arch == "FaceFusion occluder"


def test_other_onnx_files_are_refused_with_what_they_hold(tmp_path):
    class FakeGPEN(torch.nn.Module):
        def forward(self, x):
            return x.tanh()

    gpen_file = export(FakeGPEN(), torch.zeros(1, 3, 64, 64), tmp_path / "bisenet_resnet_34.onnx")
    with pytest.raises(CheckpointError) as refused:
        load_parser(gpen_file)
    assert str(refused.value).startswith(f"{gpen_file}: holds a GPEN restorer, not a face parser or occluder (a GPEN-")

    export_fake_scrfd(tmp_path / "xseg_2.onnx")
    with pytest.raises(CheckpointError, match="holds an SCRFD face detector, not a face parser or occluder"):
        load_parser(tmp_path / "xseg_2.onnx")

    unrelated = export(torch.nn.Linear(10, 2), torch.zeros(1, 10), tmp_path / "xseg_3.onnx")
    with pytest.raises(CheckpointError) as refused:
        load_parser(unrelated)
    message = str(refused.value)
    assert message.startswith(f"{unrelated}: is an ONNX model with inputs input [1, 10]; outputs output [1, 2]")
    assert "not a face parser or occluder" in message and "\n" not in message

    # A 19-channel output is not enough: a parser's input is 512x512 RGB.
    small = export(FakeRegionParser(), torch.zeros(1, 3, 256, 256), tmp_path / "bisenet_256.onnx")
    with pytest.raises(CheckpointError, match=r"input \[1, 3, 256, 256\]"):
        load_parser(small)
    session = onnxruntime.InferenceSession(str(small))
    assert not REGION_PARSER.recognise(session) and not OCCLUDER.recognise(session)


def test_info_names_them(models):
    assert str(describe_weights(models["parser"])) == "FaceFusion region parser (onnx, float32), 19 face regions at 512x512"
    assert str(describe_weights(models["occluder-nchw"])).startswith("FaceFusion occluder (onnx, float32)")
    for model, kind in (("parser-dynamic", "FaceFusion region parser"), ("occluder", "FaceFusion occluder")):
        done = subprocess.run([sys.executable, "-m", "gpen", "info", str(models[model])], cwd=REPO, check=False,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"{kind} (onnx, float32)")
        assert "format: onnx" in done.stdout


def tiny_parser(path: Path, nodes, constants: dict, declared=(1, 19, 512, 512)) -> Path:
    """A region parser written node by node, as small as a hostile file is: input (1,3,512,512) named
    "input", output named "output" and declared `declared`, whatever its graph really makes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes, "parser", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 512, 512])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, list(declared))],
        initializer=[numpy_helper.from_array(np.asarray(value), name) for name, value in constants.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def logits_then(node_maker):
    """19 logits from a 1x1 convolution, then what `node_maker` does with them."""
    from onnx import helper

    return [helper.make_node("Conv", ["input", "weight"], ["logits"]), *node_maker(helper)]


def test_a_parser_whose_output_size_follows_the_image_is_refused_before_it_runs(tmp_path):
    """The issue's 768-byte file: it declares 19x512x512 and resizes its logits by 16 x the image's
    brightest value, 19x8192x8192 floats (5 GB) on a white face, allocated inside onnxruntime's run."""
    scaled = tiny_parser(tmp_path / "bisenet_resnet_18.onnx", logits_then(lambda h: [
        h.make_node("ReduceMax", ["input"], ["brightest"], keepdims=0),
        h.make_node("Mul", ["brightest", "sixteen"], ["factor"]),
        h.make_node("Concat", ["ones", "factor", "factor"], ["scales"], axis=0),
        h.make_node("Resize", ["logits", "", "scales"], ["output"], mode="nearest")]),
        {"weight": np.zeros((19, 3, 1, 1), np.float32), "ones": np.ones(2, np.float32), "sixteen": np.float32([16])})
    assert scaled.stat().st_size < 1024
    assert REGION_PARSER.recognise(onnxruntime.InferenceSession(str(scaled)))
    with pytest.raises(CheckpointError, match="Resize output 'output' has a size that depends on the image's values"):
        load_parser(scaled)


def test_a_parser_that_declares_19_classes_and_makes_1000_is_refused(tmp_path):
    widened = tiny_parser(tmp_path / "bisenet_resnet_34.onnx", logits_then(lambda h: [
        h.make_node("ReduceMax", ["input"], ["brightest"], keepdims=0),
        h.make_node("Mul", ["brightest", "thousands"], ["classes"]),
        h.make_node("Cast", ["classes"], ["count"], to=7),
        h.make_node("Concat", ["one", "count", "side", "side"], ["shape"], axis=0),
        h.make_node("Expand", ["logits", "shape"], ["output"])]),
        {"weight": np.zeros((1, 3, 1, 1), np.float32), "thousands": np.float32([2000]), "one": np.int64([1]),
         "side": np.int64([512])})
    with pytest.raises(CheckpointError, match="Expand output 'output' has a size that depends on the image's values"):
        load_parser(widened)


def test_a_parser_whose_fixed_tensors_are_larger_than_a_face_needs_is_refused(tmp_path):
    huge = tiny_parser(tmp_path / "bisenet_resnet_18.onnx", logits_then(lambda h: [
        h.make_node("Resize", ["logits", "", "scales"], ["big"], mode="nearest"),
        h.make_node("MaxPool", ["big"], ["output"], kernel_shape=[16, 16], strides=[16, 16])]),
        {"weight": np.zeros((19, 3, 1, 1), np.float32), "scales": np.float32([1, 1, 16, 16])})
    with pytest.raises(CheckpointError, match=r"making a 1x19x8192x8192 tensor \('big'\), 4864 MiB a face"):
        load_parser(huge)


def test_a_real_parser_graph_passes_the_checks(tmp_path):
    """facexlib's BiSeNet exported as FaceFusion's bisenet_resnet_18.onnx is: every size fixed by the input's."""
    from gpen.archs.bisenet import BiSeNet

    torch.manual_seed(0)
    network = BiSeNet(19).eval()
    parser = load_parser(export(network, torch.zeros(1, 3, 512, 512), tmp_path / "bisenet_resnet_18.onnx"))
    crops = torch.rand(2, 64, 64, 3)
    assert parser.logits(crops).shape == (2, 19, 64, 64)
