"""Every file format users have loads to the same network; every bad file gets an error naming it."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

import gpen
from gpen import CheckpointError
from tests.helpers import random_gpen


def output_of(model, seed=1):
    torch.manual_seed(seed)
    with torch.inference_mode():
        return model(torch.rand(2, 3, model.size, model.size) * 2 - 1)


@pytest.fixture(scope="module")
def expected(small_checkpoint):
    return output_of(gpen.load_model(small_checkpoint, device="cpu"))


@pytest.mark.parametrize("wrap", [
    lambda sd: {"g_ema": sd},
    lambda sd: {"params_ema": sd, "params": {}},
    lambda sd: {"params": sd},
    lambda sd: {"state_dict": sd, "epoch": 3},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},
], ids=["g_ema", "params_ema", "params", "state_dict", "module-prefix"])
def test_wrapped_checkpoints_load_to_the_same_output(tmp_path, small_checkpoint, expected, wrap):
    path = tmp_path / "wrapped.pth"
    torch.save(wrap(torch.load(small_checkpoint, weights_only=True)), path)
    assert torch.equal(output_of(gpen.load_model(path, device="cpu")), expected)


def test_safetensors_load_to_the_same_output(tmp_path, small_checkpoint, expected):
    path = tmp_path / "GPEN.safetensors"
    save_file(torch.load(small_checkpoint, weights_only=True), path)
    model = gpen.load_model(path, device="cpu")
    assert model.info.format == "safetensors"
    assert torch.equal(output_of(model), expected)


def test_float16_weights_load_and_run_in_float32(tmp_path, small_checkpoint):
    state = {k: v.half() for k, v in torch.load(small_checkpoint, weights_only=True).items()}
    path = tmp_path / "half.pth"
    torch.save(state, path)
    model = gpen.load_model(path, device="cpu")
    assert model.info.dtype == "float16" and model.ecd0[0][0].weight.dtype == torch.float32
    rounded = random_gpen()
    rounded.load_state_dict({k: v.float() for k, v in state.items()})
    assert torch.equal(output_of(model), output_of(rounded))


def test_descriptor_says_what_was_loaded(small_checkpoint):
    info = gpen.load_model(small_checkpoint, device="cpu").info
    assert (info.kind, info.format, info.size, info.channel_multiplier, info.narrow) == ("GPEN", "pth", 32, 1, 0.125)
    assert info.parameters > 0 and "GPEN-32" in str(info)


def test_onnx_export_restores_like_the_torch_model(tmp_path, small_checkpoint):
    pytest.importorskip("onnx")
    model = gpen.load_model(small_checkpoint, device="cpu")
    path = tmp_path / "GPEN-32.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), path, input_names=["input"], output_names=["output"],
                      dynamo=False)
    onnx_model = gpen.load_model(path, device="cpu")
    assert onnx_model.size == 32 and onnx_model.info.format == "onnx"
    assert onnx_model.fixed_batch == 1 and "CPUExecutionProvider" in onnx_model.providers
    faces = torch.rand(3, 32, 32, 3)
    assert (onnx_model.restore(faces) - model.restore(faces)).abs().max() < 1e-4


def error_for(path) -> str:
    with pytest.raises((CheckpointError, FileNotFoundError)) as info:
        gpen.load_model(path, device="cpu")
    assert str(path) in str(info.value)
    return str(info.value)


def test_missing_file(tmp_path):
    assert "no such file" in error_for(tmp_path / "GPEN-BFR-512.pth")


def test_empty_file(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "is empty" in error_for(tmp_path / "empty.pth")


def test_truncated_file(tmp_path, small_checkpoint):
    data = small_checkpoint.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in error_for(tmp_path / "cut.pth")


def test_truncated_safetensors(tmp_path, small_checkpoint):
    save_file(torch.load(small_checkpoint, weights_only=True), tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in error_for(tmp_path / "cut.safetensors")


@pytest.mark.parametrize("text, says", [
    ("<!DOCTYPE html><html><body>Not Found</body></html>", "text file"),
    ("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 284753920\n", "Git LFS pointer"),
])
def test_text_file(tmp_path, text, says):
    (tmp_path / "GPEN-BFR-512.pth").write_text(text)
    assert says in error_for(tmp_path / "GPEN-BFR-512.pth")


def test_face_detector_weights(shared):
    assert "RetinaFace" in error_for(shared / "models" / "retinaface_mobilenet0.25.pth")


@pytest.mark.parametrize("key, network", [
    ("conv_body_first.weight", "GFPGAN"),
    ("quantize.embedding.weight", "CodeFormer"),
])
def test_other_restorers_weights(tmp_path, key, network):
    torch.save({"params_ema": {key: torch.zeros(1)}}, tmp_path / "restorer.pth")
    assert network in error_for(tmp_path / "restorer.pth")


def test_unknown_weights(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    assert "not a GPEN checkpoint" in error_for(tmp_path / "other.pth")


def test_gpen_keys_with_the_wrong_shapes(tmp_path, small_checkpoint):
    state = torch.load(small_checkpoint, weights_only=True)
    state["generator.conv1.conv.weight"] = torch.zeros(1, 3, 3, 3, 3)
    torch.save(state, tmp_path / "bad.pth")
    assert "does not fit" in error_for(tmp_path / "bad.pth")


class RunsCode:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['GPEN_TEST_MARKER'], 'w').write('ran')",))


def test_pickle_with_code_is_refused_without_running_it(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv("GPEN_TEST_MARKER", str(marker))
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"generator.style.1.weight": RunsCode()}, f)
    torch.save({"payload": RunsCode()}, tmp_path / "evil-zip.pth")
    for p in (path, tmp_path / "evil-zip.pth"):
        assert "refusing to unpickle" in error_for(p)
    assert not marker.exists()
