"""The example workflows: every node known, every link well typed, every widget of ours valid."""

import json
from pathlib import Path

import pytest

from tests.test_nodes import load_pack

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN")
# ComfyUI core nodes and listed third-party ones the workflows use: inputs, outputs, widget count.
KNOWN = {
    "LoadImage": ({}, ["IMAGE", "MASK"], 2),
    "SaveImage": ({"images": "IMAGE"}, [], 1),
    "PreviewImage": ({"images": "IMAGE"}, [], 0),
    "MaskToImage": ({"mask": "MASK"}, ["IMAGE"], 0),
    "CheckpointLoaderSimple": ({}, ["MODEL", "CLIP", "VAE"], 1),
    "CLIPTextEncode": ({"clip": "CLIP"}, ["CONDITIONING"], 1),
    "EmptyLatentImage": ({}, ["LATENT"], 3),
    "KSampler": ({"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING",
                  "latent_image": "LATENT"}, ["LATENT"], 7),
    "VAEDecode": ({"samples": "LATENT", "vae": "VAE"}, ["IMAGE"], 0),
    "LoadVideo": ({}, ["VIDEO"], 2),
    "GetVideoComponents": ({"video": "VIDEO"}, ["IMAGE", "AUDIO", "FLOAT"], 0),
    "CreateVideo": ({"images": "IMAGE", "audio": "AUDIO", "fps": "FLOAT"}, ["VIDEO"], 1),
    "SaveVideo": ({"video": "VIDEO"}, [], 3),
    # Gourieff/ComfyUI-ReActor
    "ReActorFaceSwap": ({"input_image": "IMAGE", "source_image": "IMAGE", "face_model": "FACE_MODEL",
                         "face_boost": "FACE_BOOST"}, ["IMAGE", "FACE_MODEL", "IMAGE"], 11),
}
REAL_FILES = {"model_name": ("GPEN-BFR-256.pth", "GPEN-BFR-512.pth", "GPEN-BFR-1024.pth", "GPEN-BFR-2048.pth",
                             "GPEN-BFR-512.onnx"),  # the last: what ReActor downloads
              "detector_name": ("detection_Resnet50_Final.pth", "detection_mobilenet0.25_Final.pth"),
              "parser_name": ("parsing_bisenet.pth", "parsing_parsenet.pth")}


def node_spec(pack, node_type):
    """(input types by name, output types, widget specs) of a node type."""
    if node_type in KNOWN:
        inputs, outputs, widgets = KNOWN[node_type]
        return inputs, outputs, widgets
    cls = pack.NODE_CLASS_MAPPINGS[node_type]
    declared = {**cls.INPUT_TYPES()["required"], **cls.INPUT_TYPES().get("optional", {})}
    inputs = {n: k for n, (k, *_) in declared.items() if isinstance(k, str) and k not in WIDGET_KINDS}
    widgets = [(n, k, (o or [{}])[0]) for n, (k, *o) in declared.items() if isinstance(k, list) or k in WIDGET_KINDS]
    return inputs, list(cls.RETURN_TYPES), widgets


def check_widget(name, kind, options, value):
    if name in REAL_FILES:
        assert value in REAL_FILES[name], f"{name}={value!r} is not a file users have"
    elif isinstance(kind, list):
        assert value in kind, f"{name}={value!r} not in {kind}"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), name
    elif kind == "STRING":
        assert isinstance(value, str), name
    else:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), name
        assert kind == "FLOAT" or isinstance(value, int), f"{name} must be an integer"
        assert options["min"] <= value <= options["max"], f"{name}={value} out of range"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_is_valid(path):
    pack = load_pack()
    workflow = json.loads(path.read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for node in nodes.values():
        assert node["type"] in KNOWN or node["type"] in pack.NODE_CLASS_MAPPINGS, f"unknown node {node['type']}"
        inputs, outputs, widgets = node_spec(pack, node["type"])
        assert [o["type"] for o in node["outputs"]] == outputs, node["type"]
        for slot in node["inputs"]:
            assert inputs.get(slot["name"], slot["type"]) == slot["type"], f"{node['type']}.{slot['name']}"
        if isinstance(widgets, int):
            assert len(node["widgets_values"]) == widgets, node["type"]
        else:
            assert len(node["widgets_values"]) == len(widgets), node["type"]
            for (name, kind, options), value in zip(widgets, node["widgets_values"]):
                check_widget(name, kind, options, value)
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        assert nodes[src]["outputs"][src_slot]["type"] == kind and link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["type"] == kind and nodes[dst]["inputs"][dst_slot]["link"] == link_id
    ours = {n["type"] for n in nodes.values()} & set(pack.NODE_CLASS_MAPPINGS)
    assert {"GPENLoadModel", "GPENLoadFaceDetector"} <= ours


def test_the_seven_example_workflows_are_there():
    assert [p.stem for p in WORKFLOWS] == [
        "gpen_after_reactor_swap", "gpen_after_txt2img", "gpen_large_portrait_2048",
        "gpen_modular_detect_restore_paste", "gpen_occlusion_aware", "gpen_restore_photo",
        "gpen_video_temporal_smoothing"]


def workflow(stem):
    return json.loads((WORKFLOWS[0].parent / f"{stem}.json").read_text())


def test_after_reactor_uses_the_gpen_file_reactor_downloads():
    (loader,) = [n for n in workflow("gpen_after_reactor_swap")["nodes"] if n["type"] == "GPENLoadModel"]
    assert loader["widgets_values"][0] == "GPEN-BFR-512.onnx"


def test_after_reactor_restores_only_the_faces_the_swap_changed():
    flow = workflow("gpen_after_reactor_swap")
    links = {link[0]: link for link in flow["links"]}
    nodes = {n["id"]: n for n in flow["nodes"]}
    (swap,) = [n for n in nodes.values() if n["type"] == "ReActorFaceSwap"]
    (restore,) = [n for n in nodes.values() if n["type"] == "GPENFaceRestore"]
    swap_input = links[next(s["link"] for s in swap["inputs"] if s["name"] == "input_image")]
    original = links[next(s["link"] for s in restore["inputs"] if s["name"] == "original_image")]
    assert original[1:3] == swap_input[1:3]  # the same image ReActor swapped into


def test_occlusion_aware_workflow_restores_through_a_parser_and_shows_its_mask():
    flow = workflow("gpen_occlusion_aware")
    nodes = {n["id"]: n for n in flow["nodes"]}
    links = {link[0]: link for link in flow["links"]}
    (restore,) = [n for n in nodes.values() if n["type"] == "GPENFaceRestore"]
    parser_link = links[next(s["link"] for s in restore["inputs"] if s["name"] == "face_parser")]
    assert nodes[parser_link[1]]["type"] == "GPENLoadFaceParser"
    assert nodes[parser_link[1]]["widgets_values"][0] == "parsing_bisenet.pth"
    mask_users = [nodes[links[link][3]]["type"] for link in restore["outputs"][1]["links"]]
    assert mask_users == ["MaskToImage"]
