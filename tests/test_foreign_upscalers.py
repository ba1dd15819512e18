"""Upscalers of other architectures, through spandrel where it is installed (as in every ComfyUI).

spandrel needs torchvision, which has no CPU build here, so these tests stand a small module in for it
with the parts of its API the loader uses: ModelLoader(device).load_from_state_dict, ImageModelDescriptor
(architecture.name, purpose, scale, input/output channels, model, __call__) and UnsupportedModelError.
"""

import sys
import types

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gpen
from gpen.files.weights import CheckpointError
from gpen.loader import describe_weights


class TinySR(nn.Module):
    """A 2x network of a kind ComfyUI-GPEN has no spec for: one conv to 12 channels, a pixel shuffle."""

    def __init__(self):
        super().__init__()
        self.tiny = nn.Conv2d(3, 12, 3, padding=1)

    def forward(self, x):
        return F.pixel_shuffle(self.tiny(x), 2)


def fake_spandrel(purpose: str = "SR") -> types.ModuleType:
    spandrel = types.ModuleType("spandrel")

    class UnsupportedModelError(Exception):
        pass

    class ImageModelDescriptor:
        def __init__(self, model):
            self.model, self.purpose, self.scale = model, purpose, 2
            self.input_channels = self.output_channels = 3
            self.architecture = types.SimpleNamespace(name="TinySR")

        def __call__(self, image):
            assert image.shape[0] == 1  # spandrel takes one image at a time
            return self.model(image).clamp(0, 1)

    class ModelLoader:
        def __init__(self, device):
            pass

        def load_from_state_dict(self, state):
            if "tiny.weight" not in state:
                raise UnsupportedModelError()
            model = TinySR()
            model.load_state_dict(state)
            return ImageModelDescriptor(model)

    spandrel.ModelLoader, spandrel.ImageModelDescriptor = ModelLoader, ImageModelDescriptor
    spandrel.UnsupportedModelError = UnsupportedModelError
    return spandrel


@pytest.fixture
def tiny_file(tmp_path):
    torch.manual_seed(0)
    network = TinySR()
    path = tmp_path / "4x-Tiny.pth"
    torch.save(network.state_dict(), path)
    return path, network


def test_an_architecture_spandrel_knows_loads_as_an_upscaler(tiny_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "spandrel", fake_spandrel())
    path, network = tiny_file
    upscaler = gpen.load_upscaler(path, device="cpu")
    assert upscaler.scale == 2 and upscaler.info.arch == "TinySR (spandrel)"
    images = torch.rand(2, 40, 52, 3)
    expected = network(images.permute(0, 3, 1, 2)).clamp(0, 1).permute(0, 2, 3, 1)
    assert torch.allclose(upscaler.upscale(images), expected, atol=1e-6)
    assert torch.allclose(upscaler.upscale(images, tile=32, overlap=4), expected, atol=1e-6)  # one conv: 1 px of context
    described = describe_weights(path)
    assert (described.arch, described.role, described.scale) == ("TinySR (spandrel)", "upscaler", 2)


def test_without_spandrel_an_unknown_upscaler_is_refused_saying_what_would_load_it(tiny_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "spandrel", None)  # import spandrel raises ImportError
    path, _ = tiny_file
    with pytest.raises(CheckpointError) as refused:
        gpen.load_upscaler(path)
    assert str(refused.value) == (f"{path}: is not an upscaler ComfyUI-GPEN knows (RRDBNet/ESRGAN, SRVGGNetCompact); "
                                  "with spandrel installed (as in ComfyUI) any architecture it knows loads too; it "
                                  "starts with tiny.weight, tiny.bias")


def test_what_spandrel_knows_as_a_face_network_or_not_at_all_is_refused(tiny_file, tmp_path, monkeypatch):
    path, _ = tiny_file
    monkeypatch.setitem(sys.modules, "spandrel", fake_spandrel(purpose="FaceSR"))
    with pytest.raises(CheckpointError, match=r"holds TinySR weights \(FaceSR\), not an upscaler$"):
        gpen.load_upscaler(path)
    other = tmp_path / "other.pth"
    torch.save({"head.weight": torch.zeros(3, 3, 1, 1)}, other)
    with pytest.raises(CheckpointError, match="is not an upscaler ComfyUI-GPEN or spandrel knows; it starts with head"):
        gpen.load_upscaler(other)


def test_known_files_never_go_to_spandrel(shared, monkeypatch):
    monkeypatch.setitem(sys.modules, "spandrel", fake_spandrel())
    upscaler = gpen.load_upscaler(shared / "fixtures" / "srvgg_x4_random.pth")
    assert upscaler.info.arch == "SRVGGNetCompact (Real-ESRGAN)"
