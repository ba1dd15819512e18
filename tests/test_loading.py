"""Every file format users have loads to the same network; every bad file gets an error naming it."""

import argparse
import os
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file

import gpen
from gpen import CheckpointError
from gpen.devices import resolve_device
from gpen.faces.restore import as_restorer
from gpen.files.registry import build
from gpen.files.weights import read_state_dict
from gpen.loader import convert_checkpoint, describe_weights
from tests.helpers import export_fake_scrfd, random_gpen


def output_of(network, seed=1):
    torch.manual_seed(seed)
    with torch.inference_mode():
        return network(torch.rand(2, 3, network.size, network.size) * 2 - 1)


@pytest.fixture(scope="module")
def expected(small_checkpoint):
    return output_of(gpen.load_model(small_checkpoint, device="cpu").network)


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
    assert torch.equal(output_of(gpen.load_model(path, device="cpu").network), expected)


def test_safetensors_load_to_the_same_output(tmp_path, small_checkpoint, expected):
    path = tmp_path / "GPEN.safetensors"
    save_file(torch.load(small_checkpoint, weights_only=True), path)
    model = gpen.load_model(path, device="cpu")
    assert model.info.format == "safetensors"
    assert torch.equal(output_of(model.network), expected)


def test_float16_weights_load_and_run_in_float32(tmp_path, small_checkpoint):
    state = {k: v.half() for k, v in torch.load(small_checkpoint, weights_only=True).items()}
    path = tmp_path / "half.pth"
    torch.save(state, path)
    model = gpen.load_model(path, device="cpu")
    assert model.info.dtype == "float16" and model.network.ecd0[0][0].weight.dtype == torch.float32
    rounded = random_gpen()
    rounded.load_state_dict({k: v.float() for k, v in state.items()})
    assert torch.equal(output_of(model.network), output_of(rounded))


def test_descriptor_says_what_was_loaded(small_checkpoint):
    info = gpen.load_model(small_checkpoint, device="cpu").info
    assert (info.arch, info.format, info.size, info.channel_multiplier, info.narrow) == ("GPEN", "pth", 32, 1, 0.125)
    assert info.parameters > 0 and "GPEN-32" in str(info)


def export_onnx(model, path, batch: int = 1):
    size = model.size
    torch.onnx.export(model, (torch.zeros(batch, 3, size, size),), path, input_names=["input"],
                      output_names=["output"], dynamo=False)


def test_onnx_export_restores_like_the_torch_model(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    from gpen.archs.gpen import winograd

    # Neither the CPU workspace path nor Winograd (whose unfold has no ONNX export) is exported.
    monkeypatch.setattr(winograd, "ENABLED", True)
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "MIN_PIXELS", 1)
    model = random_gpen(64, narrow=0.0625)  # ONNX GPEN files are 64 to 4096 pixels
    path = tmp_path / "GPEN-64.onnx"
    export_onnx(model, path)
    onnx_model = gpen.load_model(path, device="cpu")
    assert onnx_model.size == 64 and onnx_model.info.format == "onnx"
    assert onnx_model.network.fixed_batch == 1 and "CPUExecutionProvider" in onnx_model.network.providers
    faces = torch.rand(3, 64, 64, 3)
    assert (onnx_model.restore(faces) - as_restorer(model).restore(faces)).abs().max() < 1e-4

    export_onnx(model, tmp_path / "GPEN-64-batch-2.onnx", batch=2)  # the last of 3 faces runs padded to 2
    pairs = gpen.load_model(tmp_path / "GPEN-64-batch-2.onnx", device="cpu")
    assert pairs.network.fixed_batch == 2
    assert (pairs.restore(faces, batch_size=3) - as_restorer(model).restore(faces)).abs().max() < 1e-4


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
    assert "is not a network ComfyUI-GPEN knows" in error_for(tmp_path / "other.pth")


def test_gpen_keys_with_the_wrong_shapes(tmp_path, small_checkpoint):
    state = torch.load(small_checkpoint, weights_only=True)
    state["generator.conv1.conv.weight"] = torch.zeros(1, 3, 3, 3, 3)
    torch.save(state, tmp_path / "bad.pth")
    assert "does not fit the GPEN layout: generator.conv1.conv.weight is (1, 3, 3, 3, 3) float32 " \
           "where the layout has (1, 64, 64, 3, 3) float32" in error_for(tmp_path / "bad.pth")


def test_extra_and_missing_keys_are_named(tmp_path, small_checkpoint):
    state = torch.load(small_checkpoint, weights_only=True)
    del state["generator.to_rgb1.bias"]
    state["generator.extra"] = torch.zeros(2)
    torch.save(state, tmp_path / "bad.pth")
    assert "missing generator.to_rgb1.bias; unexpected generator.extra" in error_for(tmp_path / "bad.pth")


def shapes_of(**config) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return gpen.GPEN(**config).state_dict()


@pytest.mark.parametrize("config, says", [
    ({"size": 2048, "narrow": 16}, "narrow 16 is outside 0..2"),
    ({"size": 64, "channel_multiplier": 64, "narrow": 0.25}, "channel_multiplier 64 is outside 0..8"),
    ({"size": 32, "style_dim": 4096, "narrow": 0.125}, "style_dim 4096 is outside 0..1024"),
    ({"size": 32, "n_mlp": 64, "narrow": 0.125}, "n_mlp 64 is outside 0..16"),
    ({"size": 64, "channel_multiplier": 8, "narrow": 1}, "layer widths 512 to 2048 are outside 1..1024"),
])
def test_configurations_no_training_makes_are_refused_before_building(config, says):
    with pytest.raises(CheckpointError, match=says):
        build(shapes_of(**config), "claims.pth", "restorer")


def test_sizes_beyond_2048_are_refused_before_building():
    state = shapes_of(size=2048, narrow=0.125)
    state.update({f"ecd{i}.0.1.weight": torch.empty(1, device="meta") for i in range(11, 20)})
    with pytest.raises(CheckpointError, match="19 encoder layers .* GPEN sizes 16 to 2048 have 3 to 10"):
        build(state, "claims.pth", "restorer")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_that_are_not_finite(tmp_path, small_checkpoint, value):
    state = torch.load(small_checkpoint, weights_only=True)
    state["ecd1.0.1.weight"][0, 0, 0, 0] = value
    torch.save(state, tmp_path / "nan.pth")
    assert "ecd1.0.1.weight holds NaN or infinite values" in error_for(tmp_path / "nan.pth")


def test_float64_weights_that_overflow_float32(tmp_path, small_checkpoint):
    state = {k: v.double() for k, v in torch.load(small_checkpoint, weights_only=True).items()}
    state["final_linear.0.bias"][0] = 1e300
    torch.save(state, tmp_path / "overflow.pth")
    assert "final_linear.0.bias holds NaN or infinite values" in error_for(tmp_path / "overflow.pth")


def test_a_pickle_record_over_16_mb_is_refused_unread(tmp_path):
    torch.save({"w": torch.zeros(1), "junk": [0] * 9_000_000}, tmp_path / "big.pth")  # a 18 MB pickle
    assert "pickle record of 17 MB" in error_for(tmp_path / "big.pth")


def test_compressed_records_that_expand_far_beyond_the_file(tmp_path):
    torch.save({"w": torch.zeros(4)}, tmp_path / "small.pth")
    with zipfile.ZipFile(tmp_path / "small.pth") as src, zipfile.ZipFile(tmp_path / "zipped.pth", "w") as out:
        for record in src.infolist():
            out.writestr(record, src.read(record))
        out.writestr("small/extra", bytes(2**26), compress_type=zipfile.ZIP_DEFLATED)
    assert "has records that expand to 64 MB from a 0.06 MB file" in error_for(tmp_path / "zipped.pth")


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


def training_checkpoint(path, small_checkpoint):
    """What some training scripts save: the weights beside an argparse Namespace."""
    state = torch.load(small_checkpoint, weights_only=True)
    torch.save({"g_ema": state, "args": argparse.Namespace(size=32, lr=0.002)}, path)


def test_checkpoint_with_python_objects_says_how_to_convert_it(tmp_path, small_checkpoint):
    training_checkpoint(tmp_path / "train.pth", small_checkpoint)
    message = error_for(tmp_path / "train.pth")
    assert "refusing to unpickle" in message
    assert "python -m gpen convert FILE OUT.safetensors --trust (this runs the file's code)" in message


def test_convert_with_trust_keeps_only_the_tensors(tmp_path, small_checkpoint, expected):
    training_checkpoint(tmp_path / "train.pth", small_checkpoint)
    info = convert_checkpoint(tmp_path / "train.pth", tmp_path / "GPEN.safetensors", trust=True)
    assert (info.arch, info.format, info.size, info.dtype) == ("GPEN", "safetensors", 32, "float32")
    assert torch.equal(output_of(gpen.load_model(tmp_path / "GPEN.safetensors", device="cpu").network), expected)


def test_converted_files_follow_the_umask(tmp_path, small_checkpoint):
    for umask, mode in [(0o022, 0o644), (0o077, 0o600)]:
        previous = os.umask(umask)
        try:
            convert_checkpoint(small_checkpoint, tmp_path / f"{umask:o}.safetensors", half=True)
        finally:
            os.umask(previous)
        assert (tmp_path / f"{umask:o}.safetensors").stat().st_mode & 0o777 == mode
    assert read_state_dict(tmp_path / "22.safetensors")["ecd0.0.0.weight"].dtype == torch.float16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["22.safetensors", "77.safetensors"]  # no temporary left


def test_a_failed_convert_leaves_the_target_untouched(tmp_path, small_checkpoint):
    target = tmp_path / "GPEN.safetensors"
    convert_checkpoint(small_checkpoint, target)
    before = target.read_bytes()
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="is not a network ComfyUI-GPEN knows"):
        convert_checkpoint(tmp_path / "other.pth", target)
    assert target.read_bytes() == before and len(list(tmp_path.iterdir())) == 2


def test_convert_keeps_the_stored_float_type_unless_told(tmp_path, small_checkpoint, expected):
    half = tmp_path / "half.safetensors"
    convert_checkpoint(small_checkpoint, half, half=True)
    assert convert_checkpoint(half, tmp_path / "kept.safetensors").dtype == "float16"
    assert convert_checkpoint(half, tmp_path / "bf16.safetensors", dtype="bf16").dtype == "bfloat16"
    assert convert_checkpoint(half, tmp_path / "wide.safetensors", dtype="fp32").dtype == "float32"
    assert read_state_dict(tmp_path / "kept.safetensors")["ecd0.0.0.weight"].dtype == torch.float16
    assert torch.equal(output_of(gpen.load_model(tmp_path / "kept.safetensors", device="cpu").network),
                       output_of(gpen.load_model(half, device="cpu").network))


def test_convert_never_writes_over_its_source_and_keeps_a_target_when_told(tmp_path, small_checkpoint):
    source = tmp_path / "GPEN.safetensors"
    convert_checkpoint(small_checkpoint, source, half=True)
    before = source.read_bytes()
    with pytest.raises(ValueError, match="is the input; results never replace inputs"):
        convert_checkpoint(source, tmp_path / "." / "GPEN.safetensors", dtype="fp32")
    with pytest.raises(FileExistsError, match="exists, not replaced"):
        convert_checkpoint(small_checkpoint, source, overwrite=False)
    assert source.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_a_file_of_another_role_is_refused_before_it_is_built(shared, small_checkpoint):
    from gpen.loader import check_weights

    assert check_weights(small_checkpoint, "restorer").size == 32
    detector = shared / "models" / "retinaface_mobilenet0.25.pth"
    with pytest.raises(CheckpointError, match="holds RetinaFace face-detector weights, not a restorer$"):
        check_weights(detector, "restorer")
    with pytest.raises(CheckpointError, match="holds GPEN weights, not a detector; face detectors are "):
        check_weights(small_checkpoint, "detector")


def test_describe_gpen_without_building_it(small_checkpoint):
    info = describe_weights(small_checkpoint)
    assert info == gpen.load_model(small_checkpoint, device="cpu").info
    assert str(info) == "GPEN-32 (pth, float32), channel_multiplier 1, narrow 0.125, 3.9M parameters"


def test_describe_face_detectors_and_parsers(shared, tmp_path):
    retinaface = describe_weights(shared / "models" / "retinaface_mobilenet0.25.pth")
    assert str(retinaface) == "RetinaFace face-detector (pth, float32), mobilenet0.25 backbone, 0.4M parameters"
    parsenet = describe_weights(shared / "fixtures" / "parsenet_random_64.pth")
    assert parsenet.arch == "ParseNet face-parser" and parsenet.parameters > 0
    bisenet = describe_weights(shared / "fixtures" / "bisenet_random_fp16.pth")
    assert (bisenet.arch, bisenet.dtype) == ("BiSeNet face-parser", "float16")


def test_describe_other_restorers(tmp_path):
    torch.save({"params_ema": {"conv_body_first.weight": torch.zeros(4, 3, 1, 1)}}, tmp_path / "GFPGANv1.4.pth")
    assert str(describe_weights(tmp_path / "GFPGANv1.4.pth")) == "GFPGAN (pth, float32), 0.0M parameters"


def test_describe_onnx_files(tmp_path):
    pytest.importorskip("onnx")
    export_fake_scrfd(tmp_path / "det_10g.onnx")
    assert str(describe_weights(tmp_path / "det_10g.onnx")) == "SCRFD face-detector (onnx, float32), with landmarks"
    export_onnx(random_gpen(64, narrow=0.0625), tmp_path / "GPEN-64.onnx")
    assert str(describe_weights(tmp_path / "GPEN-64.onnx")) == "GPEN-64 (onnx, float32)"


def test_cuda_asked_of_a_torch_without_it_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    with pytest.raises(ValueError) as info:
        resolve_device("cuda")
    message = str(info.value)
    assert "\n" not in message and torch.__version__ in message and "built without CUDA" in message
    assert "https://pytorch.org/get-started/locally/" in message
    with pytest.raises(ValueError, match="unknown device 'cdua'"):
        resolve_device("cdua")
