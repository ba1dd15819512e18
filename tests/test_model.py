"""The network: reference parity, the real checkpoints' layout, and the restore() contract."""

import json

import pytest
import torch

import gpen
from gpen.archs.gpen import infer_gpen_config
from gpen.faces.restore import as_restorer, restore_crops
from tests.helpers import random_gpen

REAL_SIZES = [256, 512, 1024, 2048]


def real_layout(shared, size):
    return json.loads((shared / "fixtures" / f"gpen_bfr_{size}_keys.json").read_text())


def test_reproduces_the_reference_outputs(shared, reference_io):
    model = gpen.load_model(shared / "fixtures" / "gpen_random_64.pth", device="cpu")
    with torch.inference_mode():
        out = model.network(reference_io["input"])
    assert (out - reference_io["output"]).abs().max() < 1e-4  # the contract is 2e-3


def test_batch_of_one_takes_the_folded_path_and_agrees(shared, reference_io):
    model = gpen.load_model(shared / "fixtures" / "gpen_random_64.pth", device="cpu")
    with torch.inference_mode():
        one_by_one = torch.cat([model.network(x[None]) for x in reference_io["input"]])
    assert (one_by_one - reference_io["output"]).abs().max() < 1e-4


@pytest.mark.parametrize("size", REAL_SIZES)
def test_state_dict_matches_the_released_checkpoints_key_for_key(shared, size):
    layout = real_layout(shared, size)
    with torch.device("meta"):
        model = gpen.GPEN(size, channel_multiplier=layout["channel_multiplier"], narrow=layout["narrow"])
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == layout["state_dict"]
    assert sum(t.numel() for t in model.state_dict().values()) == layout["num_params"]  # blur kernels included


@pytest.mark.parametrize("size", REAL_SIZES)
def test_configuration_is_read_from_tensor_shapes(shared, size):
    layout = real_layout(shared, size)
    state = {k: torch.empty(shape, device="meta") for k, shape in layout["state_dict"].items()}
    config = infer_gpen_config(state)
    assert (config["size"], config["channel_multiplier"], config["narrow"]) == (
        size, layout["channel_multiplier"], layout["narrow"])
    assert (config["style_dim"], config["n_mlp"]) == (512, 8)


def test_any_power_of_two_size_and_width():
    for size, cm, narrow in [(32, 1, 0.125), (64, 2, 0.25), (128, 1, 0.0625)]:
        model = random_gpen(size, cm, narrow)
        with torch.inference_mode():
            assert model(torch.zeros(2, 3, size, size)).shape == (2, 3, size, size)


def test_rejects_sizes_that_are_not_powers_of_two():
    with pytest.raises(ValueError, match="power of two"):
        gpen.GPEN(300)


def test_restore_takes_and_returns_comfyui_crops():
    model = random_gpen()
    faces = torch.rand(5, 32, 32, 3)
    restored = as_restorer(model).restore(faces, batch_size=2)
    assert restored.shape == faces.shape and restored.dtype == torch.float32
    assert 0 <= restored.min() and restored.max() <= 1
    with torch.inference_mode():
        direct = ((model(faces.permute(0, 3, 1, 2) * 2 - 1).clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    assert (restored - direct).abs().max() < 1e-5


def test_restore_resizes_crops_of_another_size_and_back():
    restorer = as_restorer(random_gpen())
    restored = restorer.restore(torch.rand(2, 48, 48, 3))
    assert restored.shape == (2, 48, 48, 3)


def test_restore_reports_each_batch_and_can_be_cancelled():
    model = as_restorer(random_gpen())
    seen = []
    model.restore(torch.rand(5, 32, 32, 3), batch_size=2, on_batch=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]  # on the CPU a face at a time, whatever batch_size

    def cancel(done, total):
        raise InterruptedError("cancelled")

    with pytest.raises(InterruptedError):
        model.restore(torch.rand(5, 32, 32, 3), batch_size=2, on_batch=cancel)


def test_restore_rejects_images_that_are_not_rgb_crops():
    with pytest.raises(ValueError, match="faces must be"):
        as_restorer(random_gpen()).restore(torch.rand(2, 32, 32, 4))


def test_empty_batch_restores_to_empty():
    assert as_restorer(random_gpen()).restore(torch.rand(0, 32, 32, 3)).shape == (0, 32, 32, 3)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_stays_within_2e_2_of_float32(shared, reference_io, dtype):
    path = shared / "fixtures" / "gpen_random_64.pth"
    full = gpen.load_model(path, device="cpu")
    half = gpen.load_model(path, device="cpu", dtype=dtype)
    with torch.inference_mode():
        for x in (reference_io["input"], reference_io["input"][:1]):
            assert (half.network(x).float() - full.network(x)).abs().max() < 2e-2


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"),
                                   RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")],
                         ids=["allocator", "cublas", "cudnn"])
def test_a_batch_out_of_memory_is_retried_in_halves(error):
    model = random_gpen()
    calls = []

    def forward(x):
        calls.append(len(x))
        if len(x) > 2:
            raise error
        return model(x)

    faces = torch.rand(7, 32, 32, 3)
    restored = restore_crops(forward, 32, faces, batch_size=8)
    assert calls == [7, 4, 2, 2, 2, 1] and torch.allclose(restored, as_restorer(model).restore(faces), atol=1e-5)


def test_another_runtime_error_is_not_taken_for_out_of_memory():
    def forward(x):
        raise RuntimeError("Given groups=1, weight of size [64, 3, 3, 3], expected input to have 3 channels")

    with pytest.raises(RuntimeError, match="expected input"):
        restore_crops(forward, 32, torch.rand(4, 32, 32, 3), batch_size=4)


def test_winograd_convolution_equals_direct_convolution(monkeypatch):
    from gpen.archs.gpen import winograd

    monkeypatch.setattr(winograd, "ENABLED", True)  # as on CPUs without AVX-512
    torch.manual_seed(0)
    x = torch.randn(2, 256, 64, 72).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(40, 256, 3, 3) / 48
    assert winograd.worthwhile(x, weight) and not winograd.worthwhile(x.half(), weight.half())
    assert not winograd.worthwhile(x[:, :, :32, :32], weight)  # on small maps the direct one is faster
    direct = torch.nn.functional.conv2d(x, weight, padding=1)
    fast = winograd.conv3x3(x, weight, part_bytes=2 ** 20)  # in several bands of rows
    assert (fast - direct).abs().max() < 1e-4 * direct.abs().max()
    assert fast.is_contiguous(memory_format=torch.channels_last)
    # Channels given in two maps (a concatenation never made), the result added into a map.
    out = torch.ones_like(direct)
    winograd.conv3x3((x[:, :100], x[:, 100:]), weight, out, part_bytes=2 ** 20)
    assert (out - 1 - direct).abs().max() < 1e-4 * direct.abs().max()


@pytest.mark.parametrize("fused", [True, False], ids=["onednn-in-place", "fallback"])
def test_the_cpu_workspace_path_gives_the_plain_forward(monkeypatch, fused):
    """On the CPU, large layers write into memory the model keeps (gpen/archs/gpen/workspace.py), through
    oneDNN's in-place convolution where this PyTorch has it, else an ordinary one added in."""
    from gpen.archs import cpu_fast
    from gpen.archs.gpen import workspace

    if fused and not cpu_fast.fused_add_works(torch.float32):
        pytest.skip("this PyTorch build has no oneDNN in-place convolution")
    monkeypatch.setattr(cpu_fast, "fused_add_works", lambda dtype: fused)
    model = random_gpen(128, 1, 0.5)
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    with torch.inference_mode():
        with monkeypatch.context() as plain_layers:  # as when tracing
            plain_layers.setattr(cpu_fast, "usable", lambda model, x: False)
            plain = model(x)
        assert workspace.workspace(model).bytes == 0
        first = model(x)
        held = workspace.workspace(model).bytes
        again = model(x)
    assert held > 0 and workspace.workspace(model).bytes == held  # reused, not grown
    assert (first - plain).abs().max() < 1e-4 and torch.equal(first, again)
    assert torch.equal(first[1:], model(x[1:]))  # a batch goes face by face on the CPU
    model.release_workspace()
    assert workspace.workspace(model).bytes == 0


def test_a_trace_takes_any_batch_size():
    model = random_gpen()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        traced = torch.jit.trace(model, x[:2], check_trace=False)
        assert torch.allclose(traced(x), model(x), atol=1e-5)


def test_threads_sharing_a_model_keep_their_own_workspace():
    from concurrent.futures import ThreadPoolExecutor

    model = random_gpen(64, 1, 0.25)
    inputs = [torch.rand(1, 3, 64, 64) * 2 - 1 for _ in range(4)]
    with torch.inference_mode():
        alone = [model(x) for x in inputs]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda x: model(x), inputs * 3))
    assert all(torch.equal(a, b) for a, b in zip(alone * 3, together))
