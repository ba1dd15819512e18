"""Working memory: what a forward pass holds at once beyond its weights and input, counted on the meta device
(gpen/archs/working_memory.py), and what a node run asks ComfyUI for (gpen/faces/run_memory.py).

The meta count is shown to follow the real forward: the same counter on real CPU tensors, with the CPU fast
paths off (the path a GPU takes), gives the same bytes for GPEN, RetinaFace and both parsers."""

import math

import pytest
import torch

import gpen
from gpen.archs import bisenet, cpu_fast, parsenet, working_memory
from gpen.archs.bisenet import BiSeNet
from gpen.archs.gpen import winograd
from gpen.archs.gpen.network import GPEN
from gpen.archs.parsenet import ParseNet
from gpen.archs.retinaface import RetinaFace
from gpen.archs.working_memory import counted_peak, forward_bytes, meta_copy
from gpen.faces.options import MaskOptions
from gpen.faces.parse import ParserHandle
from gpen.faces.restore import as_restorer
from gpen.faces.run_memory import run_working_bytes
from tests.helpers import random_gpen

MiB = 2 ** 20


def small_parsenet() -> ParseNet:
    return ParseNet(in_size=64, out_size=64, min_feat_size=16, base_ch=8, res_depth=2, ch_range=(8, 32))


NETWORKS = {  # name: (network, input shape)
    "GPEN-64 batch 1": (lambda: random_gpen(64), (1, 3, 64, 64)),
    "GPEN-64 batch 3": (lambda: random_gpen(64), (3, 3, 64, 64)),
    "GPEN-256 wide layers": (lambda: GPEN(256, narrow=0.5), (1, 3, 256, 256)),  # Winograd's on the CPU
    "RetinaFace mobilenet0.25": (lambda: RetinaFace("mobilenet0.25"), (2, 3, 96, 160)),
    "RetinaFace resnet50": (lambda: RetinaFace("resnet50"), (1, 3, 64, 96)),
    "BiSeNet": (lambda: BiSeNet(19), (2, 3, 64, 64)),
    "ParseNet": (small_parsenet, (2, 3, 64, 64)),
}


@pytest.mark.parametrize("name", NETWORKS)
def test_the_meta_count_equals_the_count_of_the_real_forward_on_the_gpus_path(name):
    build, shape = NETWORKS[name]
    network = build().eval().requires_grad_(False)
    x = torch.rand(shape)
    counted = forward_bytes(network, shape)
    assert counted == counted_peak(lambda: network(x))  # real CPU tensors, cpu_fast.plain_layers on
    assert counted > math.prod(shape) * 4  # more than a copy of the input: every layer's maps


def test_on_the_meta_device_gpen_takes_the_path_a_gpu_takes():
    """GPEN's CPU fast paths (the workspace at batch 1, face by face at larger batches, Winograd) are for real
    CPU tensors only: on the meta device, as on CUDA, the plain batched layers run."""
    network = GPEN(256, narrow=0.5).eval().requires_grad_(False)
    weight = network.generator.convs[1].conv.weight[0]
    on_cpu, on_meta = torch.zeros(1, 256, 64, 64), torch.zeros(1, 256, 64, 64, device="meta")
    assert cpu_fast.usable(network, on_cpu) and winograd.worthwhile(on_cpu, weight) == winograd.ENABLED
    assert not cpu_fast.usable(network, on_meta) and not winograd.worthwhile(on_meta, weight)
    with cpu_fast.plain_layers():
        assert not cpu_fast.usable(network, on_cpu) and not winograd.worthwhile(on_cpu, weight)
    assert cpu_fast.usable(network, on_cpu)  # and on again after it


def test_views_and_in_place_results_add_nothing_and_dead_tensors_give_their_bytes_back():
    def forward():
        a = torch.zeros(1000)  # 4000 bytes
        b = a.view(10, 100)  # a view: the same storage
        a.add_(1)  # in place: the same storage
        del a  # b still holds the storage
        c = torch.ones(500)  # 2000 more: 6000 at once
        del b, c
        return torch.ones(250)  # 1000: the result, held as the count ends

    with torch.inference_mode():  # where views are not marked as views: storages tell them apart
        assert counted_peak(forward) == 6000


def test_a_tensor_given_to_the_forward_is_not_counted_nor_its_views():
    given = torch.zeros(1000)
    assert counted_peak(lambda: (given[:10], given.view(10, 100), given.mul_(2))) == 0
    assert counted_peak(lambda: given * 2) == 4000


def test_the_meta_copy_holds_no_weights_and_leaves_the_network_as_it_was():
    network = random_gpen(64)
    before = {name: p.clone() for name, p in network.state_dict().items()}
    copy = meta_copy(network)
    assert {t.device.type for t in (*copy.parameters(), *copy.buffers())} == {"meta"}
    assert [t.stride() for t in copy.parameters()] == [t.stride() for t in network.parameters()]
    assert all(torch.equal(before[name], p) for name, p in network.state_dict().items())
    assert {t.device.type for t in network.parameters()} == {"cpu"}


def test_each_network_shape_and_dtype_is_counted_once(monkeypatch):
    network = random_gpen(64)
    copies = []
    monkeypatch.setattr(working_memory, "meta_copy", lambda net: copies.append(net) or meta_copy(net))
    first = forward_bytes(network, (2, 3, 64, 64))
    assert forward_bytes(network, (2, 3, 64, 64)) == first and len(copies) == 1
    assert forward_bytes(network, (4, 3, 64, 64)) > first and len(copies) == 2
    half = network.half()
    assert forward_bytes(half, (2, 3, 64, 64), torch.float16) < first and len(copies) == 3


def test_gpen_2048_in_fp16_counts_as_the_benchmarks_say():
    """BENCHMARKS.md's table (python scripts/working_memory_table.py): GPEN-2048 fp16 takes 1155 MiB of
    working memory at batch 1 and 5133 at batch 4; built on the meta device, it takes no memory to count."""
    with torch.device("meta"):
        network = GPEN(2048).half()
    assert round(forward_bytes(network, (1, 3, 2048, 2048), torch.float16) / MiB) == 1155
    assert round(forward_bytes(network, (4, 3, 2048, 2048), torch.float16) / MiB) == 5133


def test_a_restorer_handle_counts_its_input_and_its_forward():
    restorer = as_restorer(random_gpen(64))
    assert restorer.working_bytes(4) == 4 * 3 * 64 * 64 * 4 + forward_bytes(restorer.network, (4, 3, 64, 64))
    assert restorer.working_bytes(8) > restorer.working_bytes(4)


def test_a_parser_counts_its_answer_at_the_crops_size():
    parser = ParserHandle(small_parsenet().eval(), parsenet.SPEC, name="ParseNet")
    at_its_size = parser.working_bytes(4)
    assert at_its_size == 4 * 3 * 64 * 64 * 4 + forward_bytes(parser.network, (4, 3, 64, 64), run=parsenet.SPEC.run) \
        + 4 * 19 * 64 * 64 * 4
    assert parser.working_bytes(4, 512) == at_its_size + 4 * 19 * 512 * 512 * 4  # 19 logits a pixel


def test_an_onnx_parser_counts_nothing(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    path = tmp_path / "xseg_1.onnx"
    torch.onnx.export(Occluder(), (torch.zeros(1, 256, 256, 3),), path, input_names=["input"],
                      output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                      dynamo=False)
    assert gpen.load_parser(path, device="cpu").working_bytes(4, 512) == 0  # onnxruntime keeps its own


class Occluder(torch.nn.Module):
    def forward(self, x):
        return x[..., :1]


@pytest.fixture(scope="module")
def detector(shared):
    return gpen.load_detector(shared / "models" / "retinaface_mobilenet0.25.pth", device="cpu")


@pytest.mark.parametrize("height, width", [(260, 360), (1080, 1920)])
def test_the_detectors_count_equals_a_real_detection_on_the_gpus_path(detector, height, width):
    """Its largest pass (1600 px on the long side for a 1080p frame): the input at that scale and the forward.
    A real detection, counted on CPU tensors, takes the same at its peak."""
    frames = torch.rand(1, height, width, 3)
    assert detector.working_bytes(height, width) == counted_peak(lambda: detector.detect(frames))


def test_a_detector_looking_at_turned_frames_counts_the_largest_turned_canvas(shared):
    turning = gpen.load_detector(shared / "models" / "retinaface_mobilenet0.25.pth", device="cpu", rotations="all")
    upright = turning.upright
    assert turning.working_bytes(200, 300) == upright.working_bytes(354, 354)  # (200 + 300) / sqrt(2) at 45 degrees
    assert turning.working_bytes(200, 300) > upright.working_bytes(200, 300)


def test_a_run_asks_for_its_largest_stage_and_a_frame_beside_it(detector):
    """GPEN-2048 in fp16 on a 1080p frame, 4 faces a batch: restoring is the largest stage (its forward, the
    batch's crops in and out in float32), detection and a face parser's stage are smaller."""
    with torch.device("meta"):
        restorer = as_restorer(GPEN(2048).half())
    parser = ParserHandle(BiSeNet(19).eval(), bisenet.SPEC, name="BiSeNet")
    frame = 1080 * 1920 * (3 + 1) * 4  # the frame and its paste mask, float32
    crops = 4 * 3 * 2048 ** 2 * 4
    need = run_working_bytes((1, 1080, 1920, 3), restorer, detector, [parser], face_batch=4)
    assert need == restorer.working_bytes(4) + 2 * crops + frame
    assert detector.working_bytes(1080, 1920) < parser.working_bytes(4, 2048) + crops < need - frame
    assert 5.5e9 < need < 6.5e9
    assert run_working_bytes((1, 1080, 1920, 3), restorer, detector, face_batch=1) < need


@pytest.mark.parametrize("parse", [False, True], ids=["no parser", "BiSeNet"])
def test_what_a_run_asks_for_covers_what_restore_faces_holds(solvay, detector, parse):
    """What a node asks ComfyUI for (run_working_bytes) against the most bytes of tensors restore_faces holds at
    once on the GPU's path, counted on real tensors: the 29 Solvay faces go through a face batch at a time, so
    the request covers the run but for the few copies of a face region that pasting makes (when every face's
    crops were held it fell 10 MiB short). On the CPU GPEN takes faces one at a time: batch 1."""
    restorer = as_restorer(GPEN(256, channel_multiplier=1, narrow=0.5).eval())
    parser = ParserHandle(BiSeNet(19).eval(), bisenet.SPEC, name="BiSeNet") if parse else None
    asked = run_working_bytes(tuple(solvay.shape), restorer, detector, [parser] if parse else [], face_batch=1)

    held = counted_peak(lambda: gpen.restore_faces(solvay, restorer, detector, masks=MaskOptions(parser=parser),
                                                   face_batch=1))

    assert 0.9 * asked <= held <= asked + MiB


def test_a_callers_own_restorer_counts_its_crops_and_the_frame_not_its_forward():
    class CallerRestorer:
        size = 512

        def restore(self, faces, batch_size=4, on_batch=None):
            return faces

    assert run_working_bytes((2, 720, 1280, 3), CallerRestorer(), face_batch=4) == 2 * 4 * 3 * 512 ** 2 * 4 \
        + 720 * 1280 * 4 * 4
    assert run_working_bytes(crop_size=512) == 0


class ReadsItsInput(torch.nn.Module):
    """A network that decides by its data (as a caller's own may): the meta device has none to read."""

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.gain if float(x.mean()) > 0 else x


def test_a_network_the_meta_device_cannot_run_counts_nothing_and_says_so(caplog):
    network = ReadsItsInput()
    x = torch.rand(2, 3, 8, 8)
    assert counted_peak(lambda: network(x)) == x.numel() * 4  # on real tensors it runs, and is counted
    with caplog.at_level("WARNING", logger="gpen"):
        assert forward_bytes(network, (2, 3, 8, 8)) == 0
    assert "ReadsItsInput's working memory is not counted" in caplog.text and ".item()" in caplog.text


class ReadsItsPixels(torch.nn.Module):
    """A network that takes its input to NumPy (a TypeError on the meta device), and has no weights."""

    def forward(self, x):
        return torch.from_numpy(x.numpy() * 2)


def test_any_failure_to_count_counts_nothing_rather_than_stopping_the_run(caplog):
    with caplog.at_level("WARNING", logger="gpen"):
        assert forward_bytes(ReadsItsPixels(), (1, 3, 8, 8)) == 0
    assert "ReadsItsPixels's working memory is not counted" in caplog.text
