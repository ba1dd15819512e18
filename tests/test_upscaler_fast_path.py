"""The upscalers' CPU fast path (channels_last maps, no concatenations, in-place sums and activations)
computes what their plain forward, the reference architecture, computes: on the fixtures' networks and
reference outputs, odd sizes, batches, 2x (pixel-unshuffled input) and 4x; and it runs only where it
is valid (CPU float32 without autograd or a trace). `python -m gpen bench --upscaler` times the two."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpen
from gpen.archs import cpu_fast, rrdbnet, srvgg

REPO = Path(__file__).resolve().parents[1]
FIXTURES = ("rrdbnet_x4", "rrdbnet_x2", "srvgg_x4")
FAST_FORWARD = {rrdbnet.RRDBNet: rrdbnet, srvgg.SRVGGNetCompact: srvgg}  # network class -> its module
# Odd sizes for each (multiples of 2 where the 2x model's pixel-unshuffle needs them), batch 2.
SIZES = {"rrdbnet_x4": (2, 3, 23, 37), "rrdbnet_x2": (2, 3, 26, 34), "srvgg_x4": (2, 3, 29, 17)}


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output - reference).abs().max() / (reference.max() - reference.min())).item()


@pytest.fixture(scope="module")
def networks(shared) -> dict:
    """The fixtures' networks, their PReLU slopes spread over -1..2 so that every branch of it counts."""
    loaded = {name: gpen.load_upscaler(shared / "fixtures" / f"{name}_random.pth", device="cpu").network
              for name in FIXTURES}
    slopes = loaded["srvgg_x4"].body[1::2]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for prelu in slopes:
            prelu.weight.copy_(torch.rand(prelu.weight.shape, generator=generator) * 3 - 1)
    return loaded


def fast_forward(network, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return FAST_FORWARD[type(network)].fast_forward(network, x)


@pytest.mark.parametrize("name", FIXTURES)
def test_the_fast_path_gives_the_reference_outputs(shared, name):
    reference = torch.load(shared / "fixtures" / f"{name}_random_io.pt", weights_only=True)
    network = gpen.load_upscaler(shared / "fixtures" / f"{name}_random.pth", device="cpu").network
    assert relative_error(fast_forward(network, reference["input"]), reference["output"]) < 1e-5


@pytest.mark.parametrize("fused", [True, False], ids=["onednn-in-place", "fallback"])
@pytest.mark.parametrize("name", FIXTURES)
def test_the_fast_path_equals_the_plain_forward_on_odd_sizes_and_batches(networks, monkeypatch, name, fused):
    if fused and not cpu_fast.fused_add_works(torch.float32):
        pytest.skip("this PyTorch build has no oneDNN in-place convolution")
    monkeypatch.setattr(cpu_fast, "fused_add_works", lambda dtype: fused)
    network = networks[name]
    x = torch.rand(SIZES[name], generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = network.plain_forward(x)
    fast = fast_forward(network, x)
    assert fast.shape == plain.shape == (2, 3, x.shape[2] * network.scale, x.shape[3] * network.scale)
    assert relative_error(fast, plain) < 1e-5
    assert fast.is_contiguous()
    assert torch.equal(fast[1:], fast_forward(network, x[1:]))  # each image its own, whatever the batch


@pytest.mark.parametrize("name", FIXTURES)
def test_forward_takes_the_fast_path_only_where_it_is_valid(networks, monkeypatch, name):
    network = networks[name]
    taken = []
    module = FAST_FORWARD[type(network)]
    original = module.fast_forward
    monkeypatch.setattr(module, "fast_forward", lambda net, x: taken.append(x.dtype) or original(net, x))
    x = torch.rand(SIZES[name][1:])[None]
    with torch.inference_mode():
        network(x)  # CPU float32, inference: the fast path
    assert taken == [torch.float32]
    with torch.no_grad():
        network(x)
        network.double()(x.double())  # other dtypes: the plain layers
        network.float()
    with torch.enable_grad():
        network(x.requires_grad_())  # recording autograd: in-place writes would break it
    with torch.no_grad():
        torch.jit.trace(network, x.detach(), check_trace=False)  # a trace sees the plain layers
    assert taken == [torch.float32, torch.float32]


def test_bench_upscaler_prints_ours_against_the_plain_forward(shared):
    files = [shared / "fixtures" / f"{name}_random.pth" for name in ("rrdbnet_x2", "srvgg_x4")]
    done = subprocess.run([sys.executable, "-m", "gpen", "bench", "--upscaler", *map(str, files), "--tile-size", "30",
                           "--rounds", "1", "--repeat", "1", "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [(row["upscaler"], row["tile"]) for row in rows] == [
        (f"RRDBNet 2x ({files[0]})", 30), (f"SRVGGNetCompact 4x ({files[1]})", 30)]
    for row in rows:
        assert row["ours_ms_per_tile"] > 0 and row["plain_ms_per_tile"] > 0
        assert row["plain_over_ours"] == round(row["plain_ms_per_tile"] / row["ours_ms_per_tile"], 2)
        assert row["ours_ms_per_input_megapixel"] == round(row["ours_ms_per_tile"] / (30 * 30 / 1e6))
        assert row["max_relative_difference"] < 1e-5
