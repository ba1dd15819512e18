"""The options as objects: every option on every surface (nodes, CLI, API), each checking itself.

faces/options.py declares each option once; the nodes' widgets and the CLI's flags are built from it.
These tests fail when an option is missing from a surface that takes its group, unless the exception
is listed below with its reason.
"""

import argparse
import dataclasses
import inspect
import math
import typing

import numpy as np
import pytest
import torch

import gpen
from gpen import MaskOptions, PasteOptions, SelectOptions
from gpen.apps import cli, jobs
from gpen.faces.options import SegmentOptions, declared, spec_of, surface_name
from gpen.files.images import read_image, write_image
from tests import test_cli
from tests.test_nodes import load_pack

gpen64 = test_cli.gpen64  # the fixture: a small random GPEN file, as the CLI tests use
restore = test_cli.restore

GROUPS = (SelectOptions, PasteOptions, MaskOptions)
# The node inputs that take each group's options.
NODE_GROUPS = {
    "GPENFaceRestore": (SelectOptions, PasteOptions, MaskOptions),
    "GPENDetectAndCropFaces": (SelectOptions,),
    "GPENPasteFacesBack": (PasteOptions, MaskOptions),
    "GPENFaceParsingMask": (MaskOptions,),
    "GPENFacesToSEGS": (SegmentOptions,),
}
# Options that are not widgets but inputs (nodes) or flags of another form (CLI).
NODE_INPUTS = {"changed_from": "original_image", "parser": "face_parser", "background": "background"}
CLI_FLAGS = {"changed_from": "changed_from", "parser": "parser", "upscaler": "upscaler"}
# Deliberate exceptions: (surface, option) -> why it is not there.
NOT_THERE = {
    ("GPENFaceRestore", "template"): "the all-in-one node restores with GPEN, trained on its own template",
    ("GPENFaceRestore", "change_threshold"): "the measured line between a swap and noise, not a taste",
    ("GPENDetectAndCropFaces", "change_threshold"): "the measured line between a swap and noise, not a taste",
    ("cli", "change_threshold"): "the measured line between a swap and noise, not a taste",
    ("GPENFaceRestore", "smooth_small_faces"): "GPEN's own softening; only the crops' coverage masks turn it off",
    ("GPENPasteFacesBack", "smooth_small_faces"): "GPEN's own softening; only the crops' coverage masks turn it off",
    ("cli", "smooth_small_faces"): "GPEN's own softening; only the crops' coverage masks turn it off",
    ("GPENPasteFacesBack", "temporal_sigma"): "saved workflows know no such widget; the chain steadies nothing",
    ("GPENPasteFacesBack", "background"): "its image input takes the larger frames themselves",
    ("GPENPasteFacesBack", "upscale_by"): "its image input takes the larger frames: upscale them before it",
    ("cli", "background"): "the CLI enlarges with --upscale; a background file per input is not a flag yet",
    ("GPENFaceRestore", "upscaler"): "ComfyUI's own Upscale Image (using Model) makes the background in the graph",
    ("GPENFaceRestore", "tile"): "ComfyUI's own Upscale Image (using Model) tiles its upscaling",
    ("GPENFaceRestore", "max_megapixels"): "ComfyUI's images are decoded already; upscale_by's output is bounded "
                                           "by the library's default, 200 MP",
    ("GPENPasteFacesBack", "upscaler"): "its image input takes the larger frames: upscale them before it",
    ("GPENPasteFacesBack", "tile"): "its image input takes the larger frames: upscale them before it",
    ("GPENPasteFacesBack", "max_megapixels"): "its image input takes the larger frames: nothing is enlarged",
    ("GPENFaceParsingMask", "source"): "it parses the crops it is given",
    ("GPENFaceParsingMask", "temporal_sigma"): "crops from any pack carry no tracks",
}


@pytest.fixture(scope="module")
def pack():
    return load_pack()


def node_inputs(pack, node_id: str) -> dict:
    inputs = pack.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
    return {**inputs["required"], **inputs.get("optional", {})}


def cli_flags() -> set[str]:
    parser = argparse.ArgumentParser()
    cli.add_restore_arguments(parser)
    return {action.dest for action in parser._actions}


@pytest.mark.parametrize("node_id", list(NODE_GROUPS))
def test_every_option_of_a_nodes_groups_is_one_of_its_inputs(pack, node_id):
    inputs = node_inputs(pack, node_id)
    for group in NODE_GROUPS[node_id]:
        for field in dataclasses.fields(group):
            if (node_id, field.name) in NOT_THERE:
                continue
            name = NODE_INPUTS.get(field.name) or surface_name(field)
            assert name in inputs, f"{node_id} has no input for {group.__name__}.{field.name} ({name})"


@pytest.mark.parametrize("node_id", list(NODE_GROUPS))
def test_option_widgets_are_the_declared_ones(pack, node_id):
    """Default, range, choices and tooltip of each option widget are what faces/options.py declares."""
    inputs, seen = node_inputs(pack, node_id), set()
    for group in NODE_GROUPS[node_id]:
        for field in declared(group):
            if surface_name(field) not in inputs or surface_name(field) in seen:  # one widget for shared names
                continue
            seen.add(surface_name(field))
            kind, settings = inputs[surface_name(field)]
            spec = spec_of(field)
            assert settings["tooltip"] == spec.help and settings["default"] == pytest.approx(field.default, abs=1e-4)
            if spec.choices or spec.presets:
                assert kind == list(spec.choices or spec.presets)
            if spec.slider is not None:
                assert (settings["min"], settings["max"]) == spec.slider[:2]


def test_every_option_is_a_cli_flag():
    flags = cli_flags()
    for group in GROUPS:
        for field in dataclasses.fields(group):
            if ("cli", field.name) in NOT_THERE:
                continue
            name = CLI_FLAGS.get(field.name) or surface_name(field)
            assert name in flags, f"the CLI has no flag for {group.__name__}.{field.name} (--{name.replace('_', '-')})"


def test_the_exceptions_are_still_exceptions(pack):
    """An exception listed for an option that its surface now has is stale: drop it from NOT_THERE."""
    flags = cli_flags()
    names = {f.name: surface_name(f) for group in GROUPS for f in dataclasses.fields(group)}
    for surface, option in NOT_THERE:
        shown = flags if surface == "cli" else node_inputs(pack, surface)
        assert names[option] not in shown, f"{surface} has {option} now"


def test_the_api_takes_each_group_as_one_object():
    hints = typing.get_type_hints(gpen.restore_faces)
    assert (hints["select"], hints["paste"], hints["masks"]) == GROUPS
    assert typing.get_type_hints(gpen.paste_faces)["options"] is PasteOptions
    assert typing.get_type_hints(gpen.paste_restored)["masks"] is MaskOptions
    for function in (gpen.restore_frames, gpen.restore_video):
        hints = typing.get_type_hints(function)
        assert (hints["select"], hints["paste"], hints["masks"]) == GROUPS


def test_parameter_counts_and_no_hidden_keywords():
    assert len(inspect.signature(gpen.restore_faces).parameters) <= 10
    assert len(inspect.signature(gpen.paste_faces).parameters) <= 8
    for function in (gpen.restore_faces, gpen.paste_faces, gpen.paste_restored, gpen.locate_faces,
                     gpen.faces.pipeline.detect_faces, gpen.select_faces, gpen.restore_frames, gpen.restore_video):
        kinds = {p.kind for p in inspect.signature(function).parameters.values()}
        assert inspect.Parameter.VAR_KEYWORD not in kinds, function.__name__


NUMBERS = [(group, field) for group in GROUPS for field in declared(group)
           if isinstance(field.default, (int, float)) and not isinstance(field.default, bool)]


@pytest.mark.parametrize("group, field", NUMBERS, ids=[f"{g.__name__}.{f.name}" for g, f in NUMBERS])
def test_nan_is_refused_with_the_option_named(group, field):
    with pytest.raises(ValueError, match=surface_name(field)):
        group(**{field.name: math.nan})


def test_values_out_of_range_or_choices_are_refused_by_name():
    with pytest.raises(ValueError, match="order must be one of largest, left-right, top-bottom, confidence"):
        SelectOptions(order="random")
    with pytest.raises(ValueError, match="max_faces must be 0 or more, got -1"):
        SelectOptions(max_faces=-1)
    with pytest.raises(ValueError, match="template must be one of gpen, ffhq"):
        SelectOptions(template="arcface")
    with pytest.raises(ValueError, match="strength must be between 0 and 1, got 1.5"):
        PasteOptions(strength=1.5)
    with pytest.raises(ValueError, match=r"erode must be in \[0, 0.5\) and feather >= 0, got 0.5"):
        PasteOptions(erode=0.5)
    with pytest.raises(ValueError, match="mask shape must be one of box, ellipse"):
        PasteOptions(mask_shape="star")
    with pytest.raises(ValueError, match="unknown face region 'beard'"):
        MaskOptions(regions="skin, beard")
    assert MaskOptions(regions="skin, nose").regions == "skin, nose" and SelectOptions(threshold=2).threshold == 2


def test_options_hold_the_defaults_the_surfaces_show():
    assert SelectOptions() == SelectOptions(threshold=0, min_size=0, max_faces=0, order="largest", indices="",
                                            temporal_sigma=0, template="gpen")
    assert PasteOptions().erode == 26 / 512 and PasteOptions().smooth_small_faces
    assert (MaskOptions().regions, MaskOptions().source, MaskOptions().feather) == ("face", "original", 0.01)


def test_the_cli_refuses_bad_option_values_before_any_work(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "keep_freed_memory", lambda: None)  # a choice for the CLI's process, not the tests'
    write_image(tmp_path / "a.png", np.random.rand(32, 32, 3))
    assert cli.main(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--parse-feather", "nan"]) == 1
    assert capsys.readouterr().err == "error: parse_feather must be 0 or more, got nan\n"
    assert cli.main(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--mask-regions", "beard"]) == 1
    assert "unknown face region 'beard'" in capsys.readouterr().err
    assert cli.main(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--aligned",
                     "--parser", "x"]) == 1
    assert "aligned crops (--aligned) have none" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_face_parsing_restores_only_the_regions_asked_for(shared, gpen64, tmp_path):
    """The random-weight BiSeNet of the shared fixtures calls these crops mostly necklace, some of them
    neck (classes 15, 14), and never skin or nose; the random ParseNet calls none of them neck."""
    photo = tmp_path / "photo.png"
    write_image(photo, read_image(shared / "images" / "solvay_1927.png")[0][:300, :700, :3])
    bisenet, parsenet = shared / "fixtures" / "bisenet_random_fp16.pth", shared / "fixtures" / "parsenet_random_64.pth"
    runs = {"plain": [], "neck": ["--parser", bisenet, "--mask-regions", "neck"],
            "restored": ["--parser", bisenet, "--mask-regions", "neck", "--parse-source", "restored",
                         "--parse-feather", 0],
            "skin": ["--parser", bisenet, "--mask-regions", "skin, nose"],
            "both": ["--parser", bisenet, "--parser", parsenet, "--mask-regions", "neck"]}
    changed, lines = {}, {}
    for name, args in runs.items():
        done = restore(shared, gpen64, photo, "-o", tmp_path / name, "--max-faces", 2, *args)
        assert done.returncode == 0, done.stderr
        lines[name] = done.stdout
        changed[name] = np.abs(read_image(tmp_path / name / "photo.png")[0] - read_image(photo)[0]).max(-1) > 0
    assert "restored 2 face(s)" in lines["plain"] and "restored 2 face(s)" in lines["neck"]
    assert changed["neck"].sum() < changed["plain"].sum() / 2 and not (changed["neck"] & ~changed["plain"]).any()
    assert (changed["restored"] != changed["neck"]).any()  # another crop parsed, another mask
    for name in ("skin", "both"):  # no face shows those regions to every parser: every face is left as it was
        assert "2 face(s) left as they were: the face parser found none of mask_regions" in lines[name]
        assert not changed[name].any()


def swapped_photo(solvay, detector, faces: list[int]) -> torch.Tensor:
    """The photo with `faces` replaced by face 0, pasted in an oval as a face swap would."""
    crops, info = gpen.locate_faces(solvay, detector, 512)
    pasted, _ = gpen.paste_faces(solvay, crops[0].expand(len(faces), -1, -1, -1), info.affines[faces],
                                 info.frames[faces], PasteOptions(mask_shape="ellipse", erode=0.2))
    return pasted


def test_cli_changed_from_restores_only_the_swapped_faces(shared, gpen64, solvay, detector, tmp_path):
    before, after = solvay[0].numpy(), swapped_photo(solvay, detector, [3, 11])[0].numpy()
    write_image(tmp_path / "one" / "after.png", after)
    write_image(tmp_path / "one" / "before.png", before)
    done = restore(shared, gpen64, tmp_path / "one" / "after.png", "-o", tmp_path / "out.png",
                   "--changed-from", tmp_path / "one" / "before.png")
    assert done.returncode == 0, done.stderr
    assert "after.png: 2 of 29 faces changed; restored 2 face(s) in 1 image(s)" in done.stdout
    # inputs in several folders, and a folder of the originals at the same paths below their common folder
    for folder, (x, y) in (("swapped", (after, before)), ("originals", (before, before))):
        write_image(tmp_path / folder / "a" / "x.png", x)
        write_image(tmp_path / folder / "b" / "y.png", y)
    done = restore(shared, gpen64, tmp_path / "swapped" / "a" / "x.png", tmp_path / "swapped" / "b" / "y.png",
                   "-o", tmp_path / "out", "--changed-from", tmp_path / "originals")
    assert done.returncode == 0, done.stderr
    assert "x.png: 2 of 29 faces changed; restored 2 face(s) in 1 image(s)" in done.stdout
    assert "y.png: 0 of 29 faces changed; no face restored; images returned unchanged" in done.stdout


def test_cli_changed_from_refuses_video_files_by_name(shared, gpen64, tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"not looked at")
    write_image(tmp_path / "before.png", np.zeros((8, 8, 3)))
    done = restore(shared, gpen64, tmp_path / "clip.mp4", "-o", tmp_path / "out", "--changed-from",
                   tmp_path / "before.png")
    assert done.returncode == 1
    assert "clip.mp4: failed: " in done.stderr
    assert "--changed-from compares images; it does not take video files" in done.stderr
