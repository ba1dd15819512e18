"""Upscalers: RRDBNet (ESRGAN, Real-ESRGAN x4plus / x2plus) and SRVGGNetCompact (realesr-general-x4v3,
realesr-animevideov3) reproduce their references on shared random weights, the released key layouts
(and ESRGAN's older ones) are recognised with the right configuration, hostile or wrong files are
refused before anything is allocated, and tiling gives what the whole image gives."""

import json

import pytest
import torch

import gpen
from gpen.archs import rrdbnet
from gpen.files.registry import identify, skeleton
from gpen.files.weights import CheckpointError, check_layout, read_state_dict

FIXTURES = ("rrdbnet_x4", "rrdbnet_x2", "srvgg_x4")
RELEASED = {  # key-layout file -> (architecture, scale)
    "realesrgan_x4plus": ("RRDBNet (ESRGAN)", 4),
    "realesrgan_x2plus": ("RRDBNet (ESRGAN)", 2),
    "realesr_general_x4v3": ("SRVGGNetCompact (Real-ESRGAN)", 4),
    "realesr_animevideov3": ("SRVGGNetCompact (Real-ESRGAN)", 4),
}
# Tiles for each fixture's network with context wider than what it sees (RRDBNet x4, 2 blocks: about
# 34 px; x2, 1 block at half resolution: about 37 px; SRVGG, 6 convs: 6 px), on odd-sized images.
TILINGS = {"rrdbnet_x4": (144, 36, 151, 157), "rrdbnet_x2": (160, 40, 171, 163), "srvgg_x4": (32, 8, 45, 37)}
WHOLE = 1024  # the largest tile, bigger than any image here: the network sees the image in one piece


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output - reference).abs().max() / (reference.max() - reference.min())).item()


def meta_state(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """A state dict of these shapes that holds no data."""
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


@pytest.fixture(scope="module")
def upscalers(shared) -> dict:
    return {name: gpen.load_upscaler(shared / "fixtures" / f"{name}_random.pth", device="cpu") for name in FIXTURES}


def io(shared, name: str) -> dict:
    return torch.load(shared / "fixtures" / f"{name}_random_io.pt", weights_only=True)


@pytest.mark.parametrize("name", FIXTURES)
def test_each_upscaler_reproduces_its_reference(shared, upscalers, name):
    reference = io(shared, name)
    upscaler = upscalers[name]
    assert upscaler.scale == reference["config"].get("scale", reference["config"].get("upscale"))
    assert relative_error(upscaler.network(reference["input"]), reference["output"]) < 1e-5
    # Through the handle, as ComfyUI images: the same, clamped to the image range.
    image = reference["input"].permute(0, 2, 3, 1)
    expected = reference["output"].clamp(0, 1).permute(0, 2, 3, 1)
    assert relative_error(upscaler.upscale(image, tile=WHOLE, overlap=0), expected) < 1e-5


def old_esrgan_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BasicSR's names -> the oldest ESRGAN layout's (4x-UltraSharp's): one nn.Sequential."""
    blocks = len({key.split(".")[1] for key in state if key.startswith("body.")})
    tail = {"conv_first": "model.0", "conv_body": f"model.1.sub.{blocks}", "conv_up1": "model.3",
            "conv_up2": "model.6", "conv_hr": "model.8", "conv_last": "model.10"}
    renamed = {}
    for key, t in state.items():
        parts = key.split(".")
        if parts[0] == "body":  # body.B.rdbR.convC.weight -> model.1.sub.B.RDBR.convC.0.weight
            renamed[f"model.1.sub.{parts[1]}.RDB{parts[2][3:]}.{parts[3]}.0.{parts[4]}"] = t
        else:
            renamed[f"{tail[parts[0]]}.{parts[1]}"] = t
    return renamed


def trunk_esrgan_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BasicSR's names -> the later ESRGAN repository's (RRDB_trunk, trunk_conv, upconv1, HRconv)."""
    tail = {"conv_body": "trunk_conv", "conv_up1": "upconv1", "conv_up2": "upconv2", "conv_hr": "HRconv"}
    renamed = {}
    for key, t in state.items():
        parts = key.split(".")
        if parts[0] == "body":
            renamed[f"RRDB_trunk.{parts[1]}.RDB{parts[2][3:]}.{'.'.join(parts[3:])}"] = t
        else:
            renamed[f"{tail.get(parts[0], parts[0])}.{parts[1]}"] = t
    return renamed


@pytest.mark.parametrize("rename", [old_esrgan_names, trunk_esrgan_names])
def test_older_esrgan_layouts_load_as_the_same_network(shared, tmp_path, rename):
    state = read_state_dict(shared / "fixtures" / "rrdbnet_x4_random.pth")
    path = tmp_path / "4x-old-layout.pth"
    torch.save(rename(state), path)
    reference = io(shared, "rrdbnet_x4")
    upscaler = gpen.load_upscaler(path, device="cpu")
    assert relative_error(upscaler.network(reference["input"]), reference["output"]) < 1e-5


def test_an_old_layout_esrgan_of_another_scale_is_refused_by_name(shared, tmp_path):
    state = old_esrgan_names(read_state_dict(shared / "fixtures" / "rrdbnet_x4_random.pth"))
    state["model.13.weight"], state["model.13.bias"] = state.pop("model.10.weight"), state.pop("model.10.bias")
    state["model.10.weight"], state["model.10.bias"] = state["model.8.weight"], state["model.8.bias"]  # 8x
    path = tmp_path / "8x-old.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="8x-old.pth: an ESRGAN of the oldest layout with 3 upsampling steps"):
        gpen.load_upscaler(path, device="cpu")


@pytest.mark.parametrize("name", RELEASED)
def test_released_key_layouts_are_recognised_with_their_configuration(shared, name):
    released = json.loads((shared / "fixtures" / f"{name}_keys.json").read_text())
    state = meta_state(released["keys"])
    spec = identify(state, f"{name}.pth", "upscaler")
    config = spec.config(state)
    assert (spec.name, config.get("scale", config.get("upscale"))) == RELEASED[name]
    assert config == released["config"]
    with torch.device("meta"):
        network = spec.build(**config)
    check_layout(state, network, f"{name}.pth", spec.name)
    assert sum(p.numel() for p in network.parameters()) == released["parameters"]


def test_a_file_claiming_a_huge_network_is_refused_before_anything_is_built(tmp_path):
    # Small tensors whose shapes ask for 4096 features: refused from the shapes, naming what is too big.
    path = tmp_path / "huge-esrgan.pth"
    torch.save({"conv_first.weight": torch.zeros(4096, 3, 3, 3), "body.0.rdb1.conv1.weight": torch.zeros(1, 4096, 3, 3),
                "conv_body.weight": torch.zeros(1), "conv_last.weight": torch.zeros(3, 4096, 3, 3)}, path)
    with pytest.raises(CheckpointError, match="huge-esrgan.pth: RRDBNet with num_feat 4096; 1 to 1024"):
        gpen.load_upscaler(path, device="cpu")
    # Shapes alone (no data at all) asking for 5000 convs: refused before the skeleton is built.
    shapes = {"body.0.weight": [64, 3, 3, 3], "body.1.weight": [64]}
    shapes.update({f"body.{i}.weight": [64, 64, 3, 3] for i in range(2, 10003)})
    with pytest.raises(CheckpointError, match="SRVGGNetCompact with num_conv 5000; 1 to 256"):
        skeleton(meta_state(shapes), "huge-srvgg.pth", "upscaler")


def test_files_of_other_roles_are_refused_in_one_line_saying_what_they_hold(shared, small_checkpoint):
    upscaler_file = shared / "fixtures" / "rrdbnet_x4_random.pth"
    with pytest.raises(CheckpointError) as refused:
        gpen.load_model(upscaler_file, device="cpu")
    assert str(refused.value) == f"{upscaler_file}: holds RRDBNet (ESRGAN) weights, not a restorer"
    with pytest.raises(CheckpointError) as refused:
        gpen.load_upscaler(small_checkpoint, device="cpu")
    assert str(refused.value) == f"{small_checkpoint}: holds GPEN weights, not an upscaler"


def as_network_input(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """ComfyUI images as the network takes them, cut to its multiple."""
    height, width = images.shape[1] // multiple * multiple, images.shape[2] // multiple * multiple
    return images[:, :height, :width].permute(0, 3, 1, 2)


@pytest.mark.parametrize("name", FIXTURES)
def test_tiles_give_what_the_whole_image_gives_with_memory_bounded_by_the_tile(upscalers, name):
    tile, overlap, height, width = TILINGS[name]
    upscaler = upscalers[name]
    images = torch.rand(2, height, width, 3, generator=torch.Generator().manual_seed(0))
    seen, progress = [], []
    # Random weights give outputs mostly outside 0..1, clamped away: brought into it, they all count.
    raw = upscaler.network(as_network_input(images, upscaler.multiple))
    low, high = raw.min(), raw.max()
    spread = upscaler.network.register_forward_hook(lambda module, args, out: (out - low) / (high - low))
    try:
        whole = upscaler.upscale(images, tile=WHOLE, overlap=0)
        sizes = upscaler.network.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-2:]))
        tiled = upscaler.upscale(images, tile=tile, overlap=overlap, progress=lambda *done: progress.append(done))
    finally:
        spread.remove()
        sizes.remove()
    assert 0.2 < whole.mean() < 0.8
    assert tiled.shape == (2, height * upscaler.scale, width * upscaler.scale, 3)
    assert (tiled - whole).abs().max() < 1e-5
    assert len(seen) > 2 * 4 and max(max(side) for side in seen) <= tile
    assert progress == [(i, len(seen)) for i in range(1, len(seen) + 1)]


def test_cancel_stops_between_tiles(upscalers):
    calls = []

    def cancel():
        calls.append(1)
        if len(calls) == 3:
            raise gpen.Cancelled()

    with pytest.raises(gpen.Cancelled):
        upscalers["srvgg_x4"].upscale(torch.rand(1, 64, 64, 3), tile=32, overlap=8, cancel=cancel)
    assert len(calls) == 3


def test_gray_and_alpha_images_keep_their_channels(upscalers):
    upscaler = upscalers["srvgg_x4"]
    rgb = torch.rand(1, 20, 24, 3, generator=torch.Generator().manual_seed(1))
    gray, alpha = rgb[..., :1], rgb[..., 1:2]
    upscaled_gray = upscaler.upscale(gray)
    luma = (upscaler.upscale(gray.expand(-1, -1, -1, 3)) * torch.tensor([0.299, 0.587, 0.114])).sum(-1, keepdim=True)
    assert upscaled_gray.shape == (1, 80, 96, 1) and torch.allclose(upscaled_gray, luma)
    rgba = upscaler.upscale(torch.cat([rgb, alpha], -1))
    assert rgba.shape == (1, 80, 96, 4) and torch.equal(rgba[..., :3], upscaler.upscale(rgb))
    assert abs(rgba[..., 3].mean() - alpha.mean()) < 0.01


@pytest.mark.parametrize("options, named", [({"tile": 8}, "tile"), ({"tile": 10**6}, "tile"),
                                            ({"tile": 64, "overlap": 40}, "overlap"), ({"overlap": -1}, "overlap")])
def test_absurd_tiling_is_refused_naming_the_parameter(upscalers, options, named):
    with pytest.raises(ValueError, match=f"^{named} must be") as refused:
        upscalers["srvgg_x4"].upscale(torch.rand(1, 20, 20, 3), **options)
    assert "\n" not in str(refused.value)


def test_images_too_big_to_upscale_are_refused_before_anything_is_allocated(upscalers):
    huge = torch.zeros(1, 1, 1, 3).expand(1, 20000, 9000, 3)  # no memory of its own
    with pytest.raises(ValueError, match="^images of 9000x20000 would be 36000x80000 upscaled; at most 65536"):
        upscalers["srvgg_x4"].upscale(huge)
