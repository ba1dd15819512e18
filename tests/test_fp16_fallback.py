"""fp16 that never pastes garbage: a face whose half-precision output is not finite is run again in float32
by the restorer handle, counted, and said in the summaries; only a face not finite in float32 either is
left as it was. Run on the CPU, whose float16 and bfloat16 kernels torch has for the ops used here."""

import dataclasses
import json
import logging
import sys

import pytest
import torch
from torch import nn

import gpen
from gpen.apps import cli, jobs
from gpen.apps.segments import read_summary
from gpen.apps.video import VideoSummary
from gpen.archs.spec import ArchSpec
from gpen.devices import resolve_dtype
from gpen.faces.restore import as_restorer, restore_aligned, restore_crops
from gpen.faces.segs import faces_to_segs, restore_segs
from gpen.files.images import write_image
from tests.helpers import random_gpen
from tests.test_nodes import load_pack
from tests.test_summary import PlantedDetector

SIZE = 32


class Fragile(nn.Module):
    """A restorer (NCHW RGB in -1..1 -> about the same) that half precision breaks on some faces, as it can
    break GPEN: x * gain * gain passes fp16's largest value, 65504, where |x| > 0.73 (crop values over
    0.86 or under 0.14); and bf16's 8-bit significand rounds 2 + |x| to 2 where |x| < 2**-7, so that a
    division by (2 + |x|) - 2 meets 0 on a face with a pixel within 0.004 of mid grey. A pixel exactly
    mid grey (x = 0) gives 0 / 0 in float32 too."""

    def __init__(self, size: int = SIZE):
        super().__init__()
        self.fragile_gain = nn.Parameter(torch.tensor([300.0]))
        self.fragile_offset = nn.Parameter(torch.tensor([2.0]))
        self.register_buffer("fragile_face_size", torch.zeros(size))

    @property
    def size(self) -> int:
        return len(self.fragile_face_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gain, offset = self.fragile_gain, self.fragile_offset
        loud = x * gain * gain / gain / gain
        kept = (x.abs() + offset) - offset
        return loud * (x.abs() / kept)


def fragile_spec(archs) -> ArchSpec:
    """Fragile as a restorer `archs` (gpen.archs, or the ComfyUI pack's copy of it) recognises by its keys."""
    spec = archs.spec  # the module
    return archs.register(spec.ArchSpec("Fragile restorer", "restorer", lambda state: "fragile_gain" in state,
                                        lambda state: {"size": len(state["fragile_face_size"])}, Fragile,
                                        convention=spec.Convention(input="-1..1", output="image", template="gpen"),
                                        face_size=lambda net: net.size))


@pytest.fixture
def fragile_file(tmp_path):
    """A saved Fragile network, recognised by its keys as a registered restorer."""
    spec = fragile_spec(gpen.archs)
    path = tmp_path / "fragile.pth"
    torch.save(Fragile().state_dict(), path)
    yield path
    gpen.archs.SPECS[:] = [s for s in gpen.archs.SPECS if s is not spec]


def flat_faces(*values: float) -> torch.Tensor:
    """Aligned crops (N, SIZE, SIZE, 3), each of one value."""
    return torch.tensor(values).view(-1, 1, 1, 1).expand(-1, SIZE, SIZE, 3).contiguous()


BRIGHT, MID, NEAR_GREY, GREY = 0.95, 0.7, 0.502, 0.5  # fp16 overflows; none breaks; bf16 breaks; all break


def without_rerun(handle, faces: torch.Tensor) -> torch.Tensor:
    """The handle's network run as it is, in its own dtype, and nothing run again."""
    return restore_crops(lambda x: handle.spec.forward(handle.network, x), handle.size, faces,
                         convention=handle.spec.convention, dtype=handle.dtype)


@pytest.mark.parametrize("dtype, rerun", [("fp16", [BRIGHT]), ("bf16", [NEAR_GREY])])
def test_faces_half_precision_breaks_are_restored_in_fp32_and_the_others_in_half(fragile_file, dtype, rerun):
    values = (BRIGHT, MID, NEAR_GREY, GREY)
    faces = flat_faces(*values)
    in_fp32 = gpen.load_model(fragile_file, device="cpu", dtype="fp32").restore(faces)
    model = gpen.load_model(fragile_file, device="cpu", dtype=dtype)
    weights = {name: p.clone() for name, p in model.network.state_dict().items()}
    in_half = without_rerun(model, faces)
    counted = []
    restored = model.restore(faces, on_rerun=counted.append)

    assert counted == [len(rerun) + 1]  # and the grey face, not finite in fp32 either
    for k, value in enumerate(values):
        if value == GREY:
            assert in_fp32[k].isnan().all() and restored[k].isnan().all()  # left for the pipeline to keep
        elif value in rerun:
            assert not in_half[k].isfinite().all()
            torch.testing.assert_close(restored[k], in_fp32[k], rtol=0, atol=1e-6)
        else:
            assert torch.equal(restored[k], in_half[k])
            assert (restored[k] - in_fp32[k]).abs().max() > 1e-5  # half precision's own result, not fp32's
    assert model.dtype == resolve_dtype(dtype)  # the weights went back to half, bit for bit
    assert all(torch.equal(p, weights[name]) for name, p in model.network.state_dict().items())


def test_a_network_in_fp32_or_without_broken_faces_runs_once(fragile_file):
    counted = []
    model = gpen.load_model(fragile_file, device="cpu", dtype="fp16")
    model.restore(flat_faces(MID, NEAR_GREY), on_rerun=counted.append)
    gpen.load_model(fragile_file, device="cpu", dtype="fp32").restore(flat_faces(GREY), on_rerun=counted.append)
    assert counted == []


def test_a_cancel_during_the_fp32_rerun_leaves_the_weights_in_half_precision(fragile_file):
    model = gpen.load_model(fragile_file, device="cpu", dtype="fp16")
    seen = []

    def cancel():
        seen.append(model.dtype)
        if model.dtype == torch.float32:
            raise gpen.Cancelled("stop")

    with pytest.raises(gpen.Cancelled):
        model.restore(flat_faces(BRIGHT, BRIGHT), batch_size=1, cancel=cancel)
    assert torch.float32 in seen and model.dtype == torch.float16


def test_faces_whose_fp32_rerun_runs_out_of_memory_are_left_unrestored(fragile_file, monkeypatch):
    model = gpen.load_model(fragile_file, device="cpu", dtype="fp16")
    forward = model.network.forward

    def on_a_small_gpu(x):
        if x.dtype == torch.float32:
            raise torch.OutOfMemoryError("CUDA out of memory (as raised on a GPU)")
        return forward(x)

    monkeypatch.setattr(model.network, "forward", on_a_small_gpu)
    counted = []
    restored = model.restore(flat_faces(BRIGHT, MID), on_rerun=counted.append)
    assert restored[0].isnan().all() and restored[1].isfinite().all() and counted == []
    assert model.dtype == torch.float16


def test_a_gpen_whose_fp16_overflows_gives_the_fp32_result_and_its_weights_back():
    network = random_gpen(SIZE)
    with torch.no_grad():
        for to_rgb in network.generator.to_rgbs[-2:]:  # their sum, the output, passes 65504
            to_rgb.bias.fill_(40000)
    faces = torch.rand(2, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    in_fp32 = as_restorer(network).restore(faces)
    model = as_restorer(network.half())
    weights = [p.clone() for p in network.parameters()]
    assert not without_rerun(model, faces).isfinite().any()
    counted = []
    restored = model.restore(faces, on_rerun=counted.append)
    assert counted == [2] and in_fp32.isfinite().all()
    torch.testing.assert_close(restored, in_fp32, rtol=0, atol=1e-5)
    assert all(p.dtype == torch.float16 and torch.equal(p, w) for p, w in zip(network.parameters(), weights))


# Two faces side by side, each alone on its own flat half of the frame: the left one bright, the right one mid.
FACES = [(226, 226, 60, 0.99), (738, 226, 60, 0.98)]


def two_faces() -> torch.Tensor:
    image = torch.full((1, 512, 1024, 3), MID)
    image[:, :, :512] = BRIGHT
    return image


def test_restore_faces_says_how_many_faces_were_rerun_and_pastes_their_fp32_result(fragile_file, caplog):
    detector = PlantedDetector(FACES)
    in_fp32 = gpen.restore_faces(two_faces(), gpen.load_model(fragile_file, device="cpu", dtype="fp32"), detector)
    with caplog.at_level(logging.INFO, logger="gpen"):
        result = gpen.restore_faces(two_faces(), gpen.load_model(fragile_file, device="cpu", dtype="fp16"), detector)
    assert result.rerun_fp32 == 1 and result.face_count == 2 and in_fp32.rerun_fp32 == 0
    assert result.summary.startswith("restored 2 face(s) in 1 image(s); "
                                     "1 face(s) re-run in fp32: half precision (fp16/bf16) overflowed")
    assert "1 face(s) re-run in fp32" in caplog.text
    left = (slice(None), slice(None), slice(None, 512))
    torch.testing.assert_close(result.images[left], in_fp32.images[left], rtol=0, atol=1e-6)
    assert (result.images - in_fp32.images).abs().max() < 1e-3  # the right face: fp16's own, close


def test_a_face_not_finite_in_fp32_either_is_left_as_it_was(fragile_file):
    image = two_faces()
    image[:, :, 512:] = GREY
    result = gpen.restore_faces(image, gpen.load_model(fragile_file, device="cpu", dtype="fp16"),
                                PlantedDetector(FACES))
    assert (result.rerun_fp32, result.unrestored, result.face_count) == (2, 1, 1)
    assert "2 face(s) re-run in fp32" in result.summary and "1 face(s) left unrestored" in result.summary
    assert torch.equal(result.images[:, :, 512:], image[:, :, 512:])


def test_restore_frames_and_video_summaries_count_the_faces_rerun(fragile_file):
    model = gpen.load_model(fragile_file, device="cpu", dtype="fp16")
    results = list(gpen.restore_frames(iter([two_faces()[0]] * 3), model, PlantedDetector(FACES), chunk=2))
    assert [r.rerun_fp32 for r in results] == [2, 1]  # two chunks: 2 frames, then 1
    summary = VideoSummary("in.mp4", "out.mp4", frames=2, faces=4, rerun_fp32=2)
    summary.add(VideoSummary("in.mp4", "out.mp4", frames=1, faces=2, rerun_fp32=1))  # a Ray segment's
    assert "3 face(s) re-run in fp32: half precision (fp16/bf16) overflowed" in str(summary)
    record = json.loads(json.dumps(dataclasses.asdict(summary), default=str))  # as a Ray segment records it
    assert read_summary(record).rerun_fp32 == 3


def test_restore_video_counts_the_faces_rerun(fragile_file, tmp_path):
    pytest.importorskip("av")
    from tests.test_video import make_clip

    picture = (two_faces()[0, ::4, ::4] * 255).round().to(torch.uint8).numpy()  # 256x128, a face on each half
    make_clip(tmp_path / "clip.mp4", picture, frames=3, size=(256, 128), audio=None, step=0)
    faces = [(x / 4, y / 4, side / 4, score) for x, y, side, score in FACES]
    summary = gpen.restore_video(tmp_path / "clip.mp4", tmp_path / "out.mp4",
                                 gpen.load_model(fragile_file, device="cpu", dtype="fp16"),
                                 PlantedDetector(faces), progress=False)
    assert (summary.frames, summary.faces, summary.rerun_fp32) == (3, 6, 3)  # the bright face of each frame
    assert "3 face(s) re-run in fp32" in str(summary)


def test_restore_segs_says_how_many_faces_were_rerun(fragile_file):
    image = two_faces()
    segs = faces_to_segs(PlantedDetector(FACES).detect(image)[0], tuple(image.shape[1:3]))
    result = restore_segs(image, segs, gpen.load_model(fragile_file, device="cpu", dtype="fp16"), face_batch=1)
    assert result.restored == 2
    assert result.summary.startswith("restored 2 face(s) in 2 segment(s) of 1 image; "
                                     "1 face(s) re-run in fp32: half precision (fp16/bf16) overflowed")
    assert result.summary.count("re-run") == 1  # one note for the run, however many batches


def test_aligned_crops_say_how_many_faces_were_rerun_and_which_were_left(fragile_file):
    notes = []
    crops = flat_faces(BRIGHT, MID, GREY)
    restored = restore_aligned(gpen.load_model(fragile_file, device="cpu", dtype="fp16"), crops, notes=notes)
    assert notes == ["2 face(s) re-run in fp32: half precision (fp16/bf16) overflowed",
                     "1 face(s) left unrestored: the restorer's output was not finite (NaN or Inf)"]
    assert restored[:2].isfinite().all() and torch.equal(restored[2], crops[2])  # the grey one as it was


def test_the_restore_faces_node_says_so_in_its_summary(fragile_file):
    pack = load_pack()
    archs = sys.modules[pack.__name__ + ".gpen.archs"]  # the pack's own copy of the library, as ComfyUI loads it
    spec = fragile_spec(archs)
    try:
        handle = sys.modules[pack.__name__ + ".gpen"].load_model(fragile_file, device="cpu", dtype="fp16")
    finally:
        archs.SPECS.remove(spec)
    model = pack.nodes.host.Loaded(handle, torch.device("cpu"))
    _, summary = pack.NODE_CLASS_MAPPINGS["GPENRestoreFaces"]().restore(model, flat_faces(BRIGHT, MID), 1.0, 4)
    assert summary == "GPEN ran on 2 crop(s); 1 face(s) re-run in fp32: half precision (fp16/bf16) overflowed"


def test_the_cli_on_an_aligned_crop_says_so(fragile_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(jobs, "keep_freed_memory", lambda: None)  # the test process keeps its own allocator
    write_image(tmp_path / "face.png", flat_faces(BRIGHT)[0].numpy())
    assert cli.main(["restore", str(tmp_path / "face.png"), "-o", str(tmp_path / "out.png"), "--aligned",
                     "--model", str(fragile_file), "--device", "cpu", "--dtype", "fp16"]) == 0
    assert "restored as one aligned face; 1 face(s) re-run in fp32" in capsys.readouterr().out


def test_a_callers_own_restorer_is_called_as_before():
    class Own:
        size = SIZE

        def restore(self, faces, batch_size=4, on_batch=None):
            return faces * float("nan")

    result = gpen.restore_faces(two_faces(), Own(), PlantedDetector(FACES))
    assert (result.rerun_fp32, result.unrestored) == (0, 2)


def test_bf16_is_refused_on_a_cuda_device_without_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert resolve_dtype("bf16", torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    with pytest.raises(ValueError, match="cuda has no native bfloat16 .* use fp16 or fp32"):
        resolve_dtype("bf16", torch.device("cuda"))
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16  # the CPU has it


@pytest.mark.parametrize("capability, hip, expected", [
    ((9, 0), None, torch.float16),  # H100/H200
    ((7, 0), None, torch.float16),  # V100: the first tensor cores
    ((6, 1), None, torch.float32),  # GTX 1080: fp16 at 1/64 of fp32
    ((6, 0), None, torch.float32),  # P100: fast fp16 but no tensor cores, one rule
    ((6, 0), "6.2", torch.float16),  # ROCm: its capability is a gfx version, and every such GPU has fp16
])
def test_auto_precision_is_fp16_on_a_gpu_with_tensor_cores_and_fp32_before(monkeypatch, capability, hip, expected):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    monkeypatch.setattr(torch.version, "hip", hip)
    assert resolve_dtype("auto", torch.device("cuda:1")) == expected
    assert asked == ([] if hip else [torch.device("cuda:1")])  # the device asked about, not the current one
    assert resolve_dtype("auto", torch.device("cpu")) == resolve_dtype("auto") == torch.float32
