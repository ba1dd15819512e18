"""The ComfyUI nodes, imported the way ComfyUI imports a custom node folder, run on real tensors."""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch

import gpen
from tests.helpers import SplitParser, random_gpen

REPO = Path(__file__).resolve().parents[1]


def load_pack():
    """As ComfyUI's nodes.load_custom_node does: the folder's __init__.py as a module named by its path."""
    name = str(REPO).replace(".", "_x_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pack():
    return load_pack()


@pytest.fixture
def models_dir(tmp_path, monkeypatch, pack, shared):
    """The pack's own models folder (used outside ComfyUI), filled like a user's."""
    host = sys.modules[pack.__name__ + ".nodes.host"]
    monkeypatch.setattr(host, "PACK_MODELS", tmp_path)
    (tmp_path / "facerestore_models").mkdir()
    torch.save(random_gpen(64, 1, 0.125).state_dict(), tmp_path / "facerestore_models" / "GPEN-random-64.pth")
    torch.save({"quantize.embedding.weight": torch.zeros(2, 2)}, tmp_path / "facerestore_models" / "codeformer.pth")
    (tmp_path / "facedetection").mkdir()
    shutil.copy(shared / "models" / "retinaface_mobilenet0.25.pth",
                tmp_path / "facedetection" / "detection_mobilenet0.25_Final.pth")
    return tmp_path


@pytest.fixture
def parsers_dir(models_dir, shared):
    """The models folder with face parsers where users keep them: facexlib's BiSeNet in facedetection
    under its own name, a ParseNet renamed in face_parsing, and a file that is no parser."""
    shutil.copy(shared / "fixtures" / "bisenet_random_fp16.pth", models_dir / "facedetection" / "parsing_bisenet.pth")
    (models_dir / "face_parsing").mkdir()
    shutil.copy(shared / "fixtures" / "parsenet_random_64.pth", models_dir / "face_parsing" / "my_parser.pth")
    (models_dir / "facedetection" / "xseg_1.onnx").write_bytes(b"not really an occluder")
    return models_dir


def half_face_parser(pack):
    host = sys.modules[pack.__name__ + ".nodes.host"]
    parser = SplitParser(1, 0)  # skin on the left, background on the right
    return parser, (host.Loaded(parser, torch.device("cpu")),)


def test_the_pack_exposes_twelve_nodes_under_one_menu(pack):
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS) == {
        "GPENLoadModel", "GPENLoadFaceDetector", "GPENLoadFaceParser", "GPENDetectAndCropFaces", "GPENRestoreFaces",
        "GPENPasteFacesBack", "GPENFaceRestore", "GPENFaceParsingMask",
        # the Impact Pack's SEGS world (tests/test_segs.py)
        "GPENFaceDetectorForFaceDetailer", "GPENRestoreSEGS", "GPENFacesToSEGS", "GPENSEGSToFaces"}
    assert {cls.CATEGORY for cls in pack.NODE_CLASS_MAPPINGS.values()} == {"GPEN"}


def test_every_node_declares_valid_inputs_and_outputs(pack):
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert cls.DESCRIPTION and callable(getattr(cls(), cls.FUNCTION)), name
        assert isinstance(cls.RETURN_TYPES, tuple) and len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
        assert len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)
        inputs = cls.INPUT_TYPES()
        assert set(inputs) <= {"required", "optional"}
        for section in inputs.values():
            for input_name, (kind, *options) in section.items():
                options = options[0] if options else {}
                assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"
                if isinstance(kind, list):
                    assert kind and options.get("default", kind[0]) in kind
                elif kind in ("INT", "FLOAT"):
                    assert options["min"] <= options["default"] <= options["max"], f"{name}.{input_name}"


def test_empty_model_folders_say_which_folder_to_fill(pack, tmp_path, monkeypatch):
    host = sys.modules[pack.__name__ + ".nodes.host"]
    monkeypatch.setattr(host, "PACK_MODELS", tmp_path)
    (choice,) = pack.NODE_CLASS_MAPPINGS["GPENLoadModel"].INPUT_TYPES()["required"]["model_name"][0]
    with pytest.raises(FileNotFoundError, match="facerestore_models"):
        pack.NODE_CLASS_MAPPINGS["GPENLoadModel"]().load(choice, "auto", "auto")
    (choice,) = pack.NODE_CLASS_MAPPINGS["GPENLoadFaceDetector"].INPUT_TYPES()["required"]["detector_name"][0]
    with pytest.raises(FileNotFoundError, match="facedetection"):
        pack.NODE_CLASS_MAPPINGS["GPENLoadFaceDetector"]().load(choice, "auto")
    (choice,) = pack.NODE_CLASS_MAPPINGS["GPENLoadFaceParser"].INPUT_TYPES()["required"]["parser_name"][0]
    assert choice == "(no face parser: put parsing_bisenet.pth in models/facedetection)"
    with pytest.raises(FileNotFoundError, match="parsing_bisenet.pth.*facedetection.* or .*face_parsing"):
        pack.NODE_CLASS_MAPPINGS["GPENLoadFaceParser"]().load(choice, "auto", "auto")


def test_model_list_shows_every_weight_file_and_loading_says_what_it_is(pack, models_dir):
    shutil.copy(models_dir / "facerestore_models" / "GPEN-random-64.pth", models_dir / "facerestore_models" / "mine.pth")
    loader = pack.NODE_CLASS_MAPPINGS["GPENLoadModel"]
    assert loader.INPUT_TYPES()["required"]["model_name"][0] == ["GPEN-random-64.pth", "codeformer.pth", "mine.pth"]
    (renamed,) = loader().load("mine.pth", "auto", "cpu")
    assert renamed.model.size == 64
    with pytest.raises(ValueError, match="codeformer.pth: holds CodeFormer weights"):
        loader().load("codeformer.pth", "auto", "cpu")


def load_models(pack):
    nodes = pack.NODE_CLASS_MAPPINGS
    (model,) = nodes["GPENLoadModel"]().load("GPEN-random-64.pth", "auto", "cpu")
    (detector,) = nodes["GPENLoadFaceDetector"]().load("detection_mobilenet0.25_Final.pth", "auto")
    return model, detector


def test_all_in_one_node_restores_a_photo(pack, models_dir, solvay):
    model, detector = load_models(pack)
    image, mask, _ = pack.NODE_CLASS_MAPPINGS["GPENFaceRestore"]().restore(
        solvay, model, detector, face_batch=8, threshold=0.5, min_size=0, max_faces=3, order="largest",
        indices="", temporal_smoothing=0.0, strength=1.0, mask_shape="ellipse", feather=0.02, erode=0.05,
        color_correction=True)
    assert image.shape == solvay.shape and mask.shape == solvay.shape[:3]
    assert 0 < mask.mean() < 0.2 and (image - solvay).abs().amax() > 0.05


def test_modular_chain_detect_restore_paste(pack, models_dir, solvay):
    nodes = pack.NODE_CLASS_MAPPINGS
    model, detector = load_models(pack)
    frames = torch.cat([solvay, solvay.flip(2)])
    crops, info, face_mask, _ = nodes["GPENDetectAndCropFaces"]().detect(
        frames, detector, crop_size=256, template="gpen", threshold=0.5, min_size=0, max_faces=2,
        order="left-right", indices="", temporal_smoothing=0.0, gpen_model=model)
    assert crops.shape == (4, 64, 64, 3) and info.frames.tolist() == [0, 0, 1, 1] and info.crop_size == 64
    assert face_mask.shape == frames.shape[:3] and face_mask.amax() > 0.9
    restored, summary = nodes["GPENRestoreFaces"]().restore(model, crops, strength=0.5, face_batch=3)
    assert restored.shape == crops.shape and summary == "GPEN ran on 4 crop(s)"
    image, mask, _ = nodes["GPENPasteFacesBack"]().paste(frames, restored, info, strength=1.0, mask_shape="box",
                                                      feather=0.011, erode=0.05, color_correction=False)
    assert image.shape == frames.shape and (mask - face_mask).abs().max() < 0.05


def test_restore_node_accepts_crops_of_other_packs_at_any_size(pack, models_dir):
    model, _ = load_models(pack)
    restored, _ = pack.NODE_CLASS_MAPPINGS["GPENRestoreFaces"]().restore(model, torch.rand(2, 512, 512, 3), 1.0, 4)
    assert restored.shape == (2, 512, 512, 3)


def test_paste_refuses_faces_from_other_frames(pack, models_dir, solvay):
    nodes = pack.NODE_CLASS_MAPPINGS
    _, detector = load_models(pack)
    crops, info, *_ = nodes["GPENDetectAndCropFaces"]().detect(solvay, detector, 128, "gpen", 0.5, 0, 1, "largest", "",
                                                               0.0)
    with pytest.raises(ValueError, match="frames"):
        nodes["GPENPasteFacesBack"]().paste(solvay[:, :100], crops, info, 1.0, "box", 0.01, 0.05, False)


@pytest.mark.parametrize("strength", [5.0, -0.5, float("nan")])
def test_restore_node_refuses_a_strength_outside_0_to_1(pack, models_dir, strength):
    model, _ = load_models(pack)
    with pytest.raises(ValueError, match="strength must be between 0 and 1"):
        pack.NODE_CLASS_MAPPINGS["GPENRestoreFaces"]().restore(model, torch.rand(1, 64, 64, 3), strength, 4)


def test_detect_node_on_an_empty_image_gives_no_crops(pack, models_dir):
    nodes = pack.NODE_CLASS_MAPPINGS
    _, detector = load_models(pack)
    crops, info, mask, _ = nodes["GPENDetectAndCropFaces"]().detect(
        torch.zeros(1, 0, 0, 3), detector, 128, "gpen", 0.5, 0, 0, "largest", "", 0.0)
    assert crops.shape == (0, 128, 128, 3) and len(info) == 0 and mask.shape == (1, 0, 0)


def test_detector_loader_takes_a_detect_size(pack, models_dir, solvay):
    load = pack.NODE_CLASS_MAPPINGS["GPENLoadFaceDetector"]().load
    (auto,) = load("detection_mobilenet0.25_Final.pth", "cpu", "auto")
    (fixed,) = load("detection_mobilenet0.25_Final.pth", "cpu", "1024")
    assert auto.model.detect_size == "auto" and fixed.model.detect_size == 1024
    with pytest.raises(ValueError, match="detect_size"):
        load("detection_mobilenet0.25_Final.pth", "cpu", "huge")


def test_parser_list_shows_parsers_of_both_folders_and_leaves_the_detectors_out(pack, parsers_dir):
    nodes = pack.NODE_CLASS_MAPPINGS
    assert nodes["GPENLoadFaceParser"].INPUT_TYPES()["required"]["parser_name"][0] == [
        "my_parser.pth", "parsing_bisenet.pth", "xseg_1.onnx"]
    assert nodes["GPENLoadFaceDetector"].INPUT_TYPES()["required"]["detector_name"][0] == [
        "detection_mobilenet0.25_Final.pth"]


def test_face_parsers_load_and_chain(pack, parsers_dir):
    load = pack.NODE_CLASS_MAPPINGS["GPENLoadFaceParser"]().load
    (bisenet,) = load("parsing_bisenet.pth", "auto", "cpu")
    (both,) = load("my_parser.pth", "fp32", "cpu", and_parser=bisenet)
    assert len(bisenet) == 1 and [p.model.info.arch for p in both] == ["BiSeNet face-parser", "ParseNet face-parser"]
    assert both[0] is bisenet[0] and both[1].size_bytes > 0
    with pytest.raises(ValueError, match="xseg_1.onnx"):
        load("xseg_1.onnx", "auto", "cpu")


def test_face_parsing_mask_gives_one_mask_per_crop(pack, parsers_dir):
    (chain,) = pack.NODE_CLASS_MAPPINGS["GPENLoadFaceParser"]().load("parsing_bisenet.pth", "auto", "cpu")
    crops = torch.rand(3, 96, 96, 3)
    (mask,) = pack.NODE_CLASS_MAPPINGS["GPENFaceParsingMask"]().parse(crops, chain, "face and hair", 0.01)
    assert mask.shape == (3, 96, 96) and mask.dtype == torch.float32 and 0 <= mask.min() <= mask.max() <= 1
    _, half = half_face_parser(pack)
    (mask,) = pack.NODE_CLASS_MAPPINGS["GPENFaceParsingMask"]().parse(crops, half, "face", 0.0)
    assert mask[:, :, :48].eq(1).all() and mask[:, :, 48:].eq(0).all()


def crop_points_in_image(info, x, y):
    """Where the crop point (x, y), given as fractions of the crop, lies in each face's frame (row, column)."""
    from gpen.faces.align import invert_affine

    point = torch.tensor([x, y], dtype=torch.float64) * (info.crop_size - 1)
    inverse = invert_affine(info.affines.double())
    xy = torch.einsum("nij,j->ni", inverse[:, :, :2], point) + inverse[:, :, 2]
    return xy.round().long().flip(1)


def test_all_in_one_node_restores_only_where_the_parser_shows_the_face(pack, models_dir, solvay):
    nodes = pack.NODE_CLASS_MAPPINGS
    model, detector = load_models(pack)
    options = {"face_batch": 4, "threshold": 0.5, "min_size": 0, "max_faces": 3, "order": "largest", "indices": "",
               "temporal_smoothing": 0.0, "strength": 1.0, "mask_shape": "box", "feather": 0.011, "erode": 0.05,
               "color_correction": False}
    _, plain, _ = nodes["GPENFaceRestore"]().restore(solvay, model, detector, **options)
    parser, chain = half_face_parser(pack)
    image, mask, _ = nodes["GPENFaceRestore"]().restore(solvay, model, detector, **options, face_parser=chain,
                                                     mask_regions="face", parse_source="original", parse_feather=0.01)
    assert len(parser.seen) == 1 and parser.seen[0].shape == (3, 64, 64, 3)
    assert (mask <= plain + 1e-6).all() and 0.3 < mask.sum() / plain.sum() < 0.7  # the parse only takes away
    assert torch.equal(image[0][mask[0] == 0], solvay[0][mask[0] == 0])  # not-face pixels: the original, bit for bit
    _, info, _, _ = nodes["GPENDetectAndCropFaces"]().detect(solvay, detector, 512, "gpen", 0.5, 0, 3, "largest", "",
                                                          0.0, gpen_model=model)
    for (row, col), (row_r, col_r) in zip(crop_points_in_image(info, 0.3, 0.5), crop_points_in_image(info, 0.75, 0.5)):
        assert mask[0, row, col] > 0.9 and plain[0, row, col] > 0.9  # the half the parser calls face
        assert mask[0, row_r, col_r] == 0 and plain[0, row_r, col_r] > 0.9  # the half it does not


@pytest.mark.parametrize("parse_source", ["original", "restored"])
def test_paste_node_with_a_parser_parses_the_crops_asked_for(pack, models_dir, solvay, parse_source):
    nodes = pack.NODE_CLASS_MAPPINGS
    model, detector = load_models(pack)
    crops, info, *_ = nodes["GPENDetectAndCropFaces"]().detect(solvay, detector, 256, "gpen", 0.5, 0, 2, "largest", "",
                                                               0.0, gpen_model=model)
    restored, _ = nodes["GPENRestoreFaces"]().restore(model, crops, strength=1.0, face_batch=4)
    paste = nodes["GPENPasteFacesBack"]().paste
    _, plain, _ = paste(solvay, restored, info, 1.0, "box", 0.011, 0.05, False)
    parser, chain = half_face_parser(pack)
    image, mask, _ = paste(solvay, restored, info, 1.0, "box", 0.011, 0.05, False, face_parser=chain,
                        mask_regions="face", parse_source=parse_source, parse_feather=0.01)
    (seen,) = parser.seen
    wanted = crops if parse_source == "original" else restored
    assert seen.shape == wanted.shape and (seen - wanted).abs().max() < 1e-3
    assert (mask <= plain + 1e-6).all() and 0.3 < mask.sum() / plain.sum() < 0.7  # the parse only takes away
    assert torch.equal(image[0][mask[0] == 0], solvay[0][mask[0] == 0])
    for row, col in crop_points_in_image(info, 0.75, 0.5):
        assert mask[0, row, col] == 0 and plain[0, row, col] > 0.9


def test_all_in_one_node_after_a_swap_restores_only_the_changed_faces(pack, models_dir, solvay, caplog):
    import logging

    model, detector = load_models(pack)
    crops, info = gpen.locate_faces(solvay, detector.model, 256)
    swapped, _ = gpen.paste_faces(solvay, crops[:1].expand(2, -1, -1, -1), info.affines[[4, 9]], info.frames[[4, 9]],
                                  gpen.PasteOptions(mask_shape="ellipse", erode=0.2))
    with caplog.at_level(logging.INFO):
        image, mask, _ = pack.NODE_CLASS_MAPPINGS["GPENFaceRestore"]().restore(
            swapped, model, detector, face_batch=8, threshold=0.5, min_size=0, max_faces=0, order="largest",
            indices="", temporal_smoothing=0.0, strength=1.0, mask_shape="box", feather=0.011, erode=0.05,
            color_correction=False, original_image=solvay)
    assert "2 of 29 faces changed; restored 2 face(s) in 1 image(s)" in caplog.text
    assert torch.equal(image[mask == 0], swapped[mask == 0])
