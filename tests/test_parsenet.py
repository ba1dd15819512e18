"""ParseNet: facexlib's released key layout, parity with the reference on shared random weights,
configuration read from tensor shapes, limits on what a file can make us build, half precision."""

import json

import pytest
import torch

from gpen.archs.parsenet import ParseNet, is_parsenet, parsenet_config
from gpen.files.weights import check_layout, read_state_dict
from tests.helpers import random_gpen


def meta_state(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """A state dict of these shapes that holds no data: enough to read a configuration from."""
    return {key: torch.empty(shape, device="meta", dtype=torch.int64 if key.endswith("num_batches_tracked") else None)
            for key, shape in shapes.items()}


def shapes_of(model: torch.nn.Module) -> dict[str, list[int]]:
    return {key: list(t.shape) for key, t in model.state_dict().items()}


def top_two_margin(logits: torch.Tensor) -> torch.Tensor:
    best = logits.topk(2, dim=1).values
    return best[:, 0] - best[:, 1]


@pytest.fixture(scope="module")
def released(shared) -> dict:
    return json.loads((shared / "fixtures" / "parsenet_512_keys.json").read_text())


@pytest.fixture(scope="module")
def parsenet_io(shared) -> dict:
    return torch.load(shared / "fixtures" / "parsenet_random_64_io.pt", weights_only=True)


@pytest.fixture(scope="module")
def parsenet_64(shared, parsenet_io) -> ParseNet:
    """The shared random-weight ParseNet, built from what its file says and loaded strictly."""
    state = read_state_dict(shared / "fixtures" / "parsenet_random_64.pth")
    model = ParseNet(**parsenet_config(state, in_size=64))
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def test_the_released_layout_is_read_from_its_shapes(released):
    state = meta_state(released["keys"])
    assert is_parsenet(state)
    config = parsenet_config(state)
    assert (config["in_size"], config["out_size"], config["parsing_ch"]) == (512, 512, 19)
    assert (config["base_ch"], config["res_depth"], config["min_feat_size"]) == (64, 10, 32)

    with torch.device("meta"):
        inferred, default = ParseNet(**config), ParseNet()
    for model in (inferred, default):
        assert shapes_of(model) == released["keys"]
        assert list(model.state_dict()) == list(released["keys"])  # the same order, too
        assert sum(p.numel() for p in model.parameters()) == released["parameters"] == 21303254
    check_layout(state, inferred, "parsing_parsenet.pth", "ParseNet")


def test_facexlib_channel_range_builds_the_same_network(released):
    # The file cannot tell facexlib's ch_range [32, 256] from [64, 256]: nothing is narrower than 64.
    with torch.device("meta"):
        facexlib = ParseNet(in_size=512, out_size=512, parsing_ch=19, ch_range=[32, 256])
    assert parsenet_config(meta_state(released["keys"]))["ch_range"] == [64, 256]
    assert shapes_of(facexlib) == released["keys"]


def test_logits_and_image_match_the_reference(shared, parsenet_64, parsenet_io):
    state = read_state_dict(shared / "fixtures" / "parsenet_random_64.pth")
    assert parsenet_config(state, in_size=64) == {**parsenet_io["config"], "parsing_ch": 19}

    x = parsenet_io["input"] * 2 - 1  # facexlib feeds RGB in [-1, 1]
    logits, image = parsenet_64(x)
    reference = parsenet_io["logits"]
    assert logits.shape == reference.shape == (1, 19, 64, 64)
    assert (logits - reference).abs().max() <= 1e-3 * reference.abs().max()
    assert (logits.argmax(1) == reference.argmax(1)).float().mean() >= 0.999
    assert (image - parsenet_io["image"]).abs().max() <= 1e-3 * parsenet_io["image"].abs().max()


def test_parse_gives_the_logits_without_the_image_head(parsenet_64, parsenet_io):
    x = parsenet_io["input"] * 2 - 1
    assert torch.equal(parsenet_64.parse(x), parsenet_64(x)[0])


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.02), (torch.float16, 0.01)])
def test_half_precision_keeps_the_classes(parsenet_64, parsenet_io, dtype, tolerance):
    x = parsenet_io["input"] * 2 - 1
    full = parsenet_64(x)[0]
    half_model = ParseNet(**parsenet_config(parsenet_64.state_dict(), in_size=64))
    half_model.load_state_dict(parsenet_64.state_dict())
    half_model = half_model.eval().requires_grad_(False).to(dtype)
    try:
        half = half_model(x)[0]
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"this CPU build of torch cannot run ParseNet in {dtype}: {e}")
    assert half.dtype == dtype
    half = half.float()
    scale = full.abs().max()
    assert (half - full).abs().max() <= tolerance * scale
    # Random weights leave many near-ties (1% of these pixels have their two best classes within
    # 0.1% of the largest logit, finer than bfloat16's 0.4% steps), so some of those may swap;
    # any pixel with a clear winner keeps it.
    same = half.argmax(1) == full.argmax(1)
    clear = top_two_margin(full) > 2 * tolerance * scale
    assert same[clear].all()
    assert same.float().mean() >= (0.985 if dtype == torch.bfloat16 else 0.99)


@pytest.mark.parametrize("config", [
    {"in_size": 64, "out_size": 64, "min_feat_size": 16, "base_ch": 8, "res_depth": 2, "ch_range": [8, 32]},
    # channels clipped at both ends
    {"in_size": 32, "out_size": 64, "min_feat_size": 8, "base_ch": 8, "res_depth": 0, "ch_range": [8, 16]},
    # upscales 4x
    {"in_size": 32, "out_size": 128, "min_feat_size": 8, "base_ch": 16, "res_depth": 1, "ch_range": [4, 64]},
    # no halving at all
    {"in_size": 16, "out_size": 16, "min_feat_size": 16, "base_ch": 8, "res_depth": 3, "ch_range": [8, 8]},
])
def test_any_configuration_is_read_back_from_its_shapes(config):
    with torch.device("meta"):
        model = ParseNet(**config, parsing_ch=11)
    inferred = parsenet_config(model.state_dict(), in_size=config["in_size"])
    assert inferred["out_size"] == config["out_size"] and inferred["parsing_ch"] == 11
    with torch.device("meta"):
        rebuilt = ParseNet(**inferred)
    assert shapes_of(rebuilt) == shapes_of(model)


def test_the_output_has_the_input_size():
    torch.manual_seed(0)
    model = ParseNet(in_size=32, out_size=32, min_feat_size=8, base_ch=4, res_depth=1, ch_range=[4, 16]).eval()
    with torch.no_grad():
        logits, image = model(torch.rand(2, 3, 48, 40) * 2 - 1)  # any multiple of 4 runs
    assert logits.shape == (2, 19, 48, 40) and image.shape == (2, 3, 48, 40)


def test_other_networks_are_not_parsenet():
    gpen_state = random_gpen().state_dict()
    assert not is_parsenet(gpen_state)
    assert parsenet_config(gpen_state) is None
    assert parsenet_config({"out_mask_conv.conv2d.weight": torch.empty(19, 64, 3, 3)}) is None


@pytest.fixture
def small_state() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = ParseNet(in_size=64, out_size=64, min_feat_size=16, base_ch=8, res_depth=2, ch_range=[8, 32])
    return dict(model.state_dict())


def test_absurd_sizes_are_refused_before_building(small_state):
    with pytest.raises(ValueError, match="in_size 4096"):
        parsenet_config(small_state, in_size=4096)
    with pytest.raises(ValueError, match="in_size 62 does not halve 2 times"):
        parsenet_config(small_state, in_size=62)
    with pytest.raises(ValueError, match="in_size 4096"):
        ParseNet(in_size=4096, out_size=4096)

    wide = {**small_state, "encoder.0.conv2d.weight": torch.empty(100_000, 3, 3, 3, device="meta")}
    with pytest.raises(ValueError, match="base_ch 100000"):
        parsenet_config(wide)

    deep = dict(small_state)
    for i in range(2, 1000):
        deep[f"body.{i}.conv1.conv2d.weight"] = torch.empty(32, 32, 3, 3, device="meta")
    with pytest.raises(ValueError, match="1000 bottleneck blocks"):
        parsenet_config(deep)

    for i in range(3, 20):
        small_state[f"encoder.{i}.conv1.conv2d.weight"] = torch.empty(32, 32, 3, 3, device="meta")
    with pytest.raises(ValueError, match="19 halvings"):
        parsenet_config(small_state)


def test_broken_layouts_are_named(small_state):
    gap = {k: v for k, v in small_state.items() if not k.startswith("body.0.")}
    with pytest.raises(ValueError, match="body blocks are numbered 1, not 0 onwards"):
        parsenet_config(gap)
    flat = {**small_state, "out_mask_conv.conv2d.weight": torch.empty(19, 8, device="meta")}
    with pytest.raises(ValueError, match="out_mask_conv.conv2d.weight has shape"):
        parsenet_config(flat)
    grey = {**small_state, "encoder.0.conv2d.weight": torch.empty(8, 1, 3, 3, device="meta")}
    with pytest.raises(ValueError, match="takes 1 channels, not RGB"):
        parsenet_config(grey)


def test_parsers_asking_more_memory_than_a_face_needs_are_refused(tmp_path):
    """The issue's 167 KB file: four-channel layers within every size bound, and a head of 1024 classes that,
    with two more doublings than halvings, gives 1024x2048x2048 logits: 17 GB a face."""
    from gpen import CheckpointError
    from gpen.loader import load_parser

    torch.manual_seed(0)
    state = ParseNet(in_size=64, out_size=256, min_feat_size=16, base_ch=4, res_depth=0, ch_range=[4, 4]).state_dict()
    state["out_mask_conv.conv2d.weight"] = torch.randn(1024, 4, 3, 3)
    state["out_mask_conv.conv2d.bias"] = torch.randn(1024)
    torch.save(state, tmp_path / "parsing_parsenet.pth")
    assert (tmp_path / "parsing_parsenet.pth").stat().st_size < 200_000
    with pytest.raises(CheckpointError, match="is a face parser giving 1024 classes at 2048x2048, 16384 MiB of logits"):
        load_parser(tmp_path / "parsing_parsenet.pth")

    with torch.device("meta"):
        wide = ParseNet(in_size=64, out_size=64, min_feat_size=16, base_ch=512, res_depth=0, ch_range=[512, 512])
        none = ParseNet(in_size=64, out_size=64, min_feat_size=16, base_ch=8, res_depth=0, ch_range=[8, 8])
    with pytest.raises(ValueError, match="making 512 channels at 512x512 in one layer, 512 MiB a face"):
        parsenet_config(wide.state_dict())
    empty_head = dict(none.state_dict(), **{"out_mask_conv.conv2d.weight": torch.empty(0, 8, 3, 3, device="meta")})
    with pytest.raises(ValueError, match="is a face parser with 0 classes: it can mark no face region"):
        parsenet_config(empty_head)


def test_the_released_parser_is_within_the_bounds_with_room(released):
    from gpen.archs.parsenet import largest_features
    from gpen.archs.spec import MAX_PARSER_FEATURES, MAX_PARSER_LOGITS

    config = parsenet_config(meta_state(released["keys"]))
    channels, side = largest_features(config["in_size"], config["out_size"], config["min_feat_size"],
                                      config["base_ch"], config["ch_range"])
    assert (channels, side) == (128, 512) and 2 * channels * side ** 2 <= MAX_PARSER_FEATURES
    assert 4 * config["parsing_ch"] * config["out_size"] ** 2 <= MAX_PARSER_LOGITS  # 19 classes at 1024 would pass
