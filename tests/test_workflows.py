"""The example workflows: every node known, every link well typed, every widget of ours valid; a Note
in each; a layout where no node hides another and the saved view shows the whole graph; and the
restore-and-upscale workflow run as saved."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from gpen.archs.retinaface import SPEC as RETINAFACE
from gpen.faces.paste import resize_frames
from gpen.faces.segs import segs_mask
from tests.helpers import random_gpen
from tests.test_nodes import load_pack

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN")
# The Impact Pack's FaceDetailer widgets in the order it saves them: "seed" saves two values (the seed and its
# control_after_generate, "fixed" or "randomize"); tiled_encode and tiled_decode are V8's, after the rest.
FACE_DETAILER_WIDGETS = (
    "guide_size", "guide_size_for", "max_size", "seed", "control_after_generate", "steps", "cfg", "sampler_name",
    "scheduler", "denoise", "feather", "noise_mask", "force_inpaint", "bbox_threshold", "bbox_dilation",
    "bbox_crop_factor", "sam_detection_hint", "sam_dilation", "sam_threshold", "sam_bbox_expansion",
    "sam_mask_hint_threshold", "sam_mask_hint_use_negative", "drop_size", "wildcard", "cycle", "inpaint_model",
    "noise_mask_feather", "tiled_encode", "tiled_decode")
BBOX_DETECTOR_SEGS_WIDGETS = ("threshold", "dilation", "crop_factor", "drop_size", "labels")
# ComfyUI core nodes and listed third-party ones the workflows use: inputs, outputs, widget count.
KNOWN = {
    "Note": ({}, [], 1),  # the frontend's own note (no server class; not sent to the server)
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
    "UpscaleModelLoader": ({}, ["UPSCALE_MODEL"], 1),
    "ImageUpscaleWithModel": ({"upscale_model": "UPSCALE_MODEL", "image": "IMAGE"}, ["IMAGE"], 0),
    "PreviewAny": ({"source": "*"}, [], 0),  # shows any value as text; its text box is not saved
    # Gourieff/ComfyUI-ReActor
    "ReActorFaceSwap": ({"input_image": "IMAGE", "source_image": "IMAGE", "face_model": "FACE_MODEL",
                         "face_boost": "FACE_BOOST"}, ["IMAGE", "FACE_MODEL", "IMAGE"], 11),
    # ltdrdata/ComfyUI-Impact-Pack
    "FaceDetailer": ({"image": "IMAGE", "model": "MODEL", "clip": "CLIP", "vae": "VAE", "positive": "CONDITIONING",
                      "negative": "CONDITIONING", "bbox_detector": "BBOX_DETECTOR", "sam_model_opt": "SAM_MODEL",
                      "segm_detector_opt": "SEGM_DETECTOR", "detailer_hook": "DETAILER_HOOK",
                      "scheduler_func_opt": "SCHEDULER_FUNC"},
                     ["IMAGE", "IMAGE", "IMAGE", "MASK", "DETAILER_PIPE", "IMAGE"], len(FACE_DETAILER_WIDGETS)),
    "BboxDetectorSEGS": ({"bbox_detector": "BBOX_DETECTOR", "image": "IMAGE", "detailer_hook": "DETAILER_HOOK"},
                         ["SEGS"], len(BBOX_DETECTOR_SEGS_WIDGETS)),
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
        target = nodes[dst]["inputs"][dst_slot]
        assert target["type"] in (kind, "*") and target["link"] == link_id  # "*": takes any type
    ours = {n["type"] for n in nodes.values()} & set(pack.NODE_CLASS_MAPPINGS)
    assert {"GPENLoadModel", "GPENLoadFaceDetector"} <= ours


def test_the_nine_example_workflows_are_there():
    assert [p.stem for p in WORKFLOWS] == [
        "gpen_after_reactor_swap", "gpen_after_txt2img", "gpen_inside_facedetailer", "gpen_large_portrait_2048",
        "gpen_modular_detect_restore_paste", "gpen_occlusion_aware", "gpen_restore_and_upscale",
        "gpen_restore_photo", "gpen_video_temporal_smoothing"]


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


def feeding(flow, node, name):
    """(the node, its output slot) feeding `node`'s input of that name."""
    link_id = next(s["link"] for s in node["inputs"] if s["name"] == name)
    _, src, slot, *_ = next(link for link in flow["links"] if link[0] == link_id)
    return next(n for n in flow["nodes"] if n["id"] == src), slot


def test_inside_facedetailer_finds_faces_with_our_detector_and_restores_what_facedetailer_drew():
    flow = workflow("gpen_inside_facedetailer")
    (detailer,) = [n for n in flow["nodes"] if n["type"] == "FaceDetailer"]
    (segs_detector,) = [n for n in flow["nodes"] if n["type"] == "BboxDetectorSEGS"]
    (restore,) = [n for n in flow["nodes"] if n["type"] == "GPENRestoreSEGS"]
    ours, _ = feeding(flow, detailer, "bbox_detector")
    assert ours["type"] == "GPENFaceDetectorForFaceDetailer"
    assert feeding(flow, ours, "face_detector")[0]["widgets_values"][0] == "detection_Resnet50_Final.pth"
    assert feeding(flow, segs_detector, "bbox_detector") == (ours, 0)  # the same faces found again
    assert feeding(flow, segs_detector, "image") == (detailer, 0) == feeding(flow, restore, "image")
    assert feeding(flow, restore, "segs") == (segs_detector, 0)
    assert feeding(flow, restore, "gpen_model")[0]["widgets_values"][0] == "GPEN-BFR-512.pth"
    assert feeding(flow, detailer, "image")[0]["type"] == "LoadImage"
    widgets = dict(zip(FACE_DETAILER_WIDGETS, detailer["widgets_values"]))
    assert widgets["control_after_generate"] in ("fixed", "increment", "decrement", "randomize")
    assert widgets["guide_size"] == 512 and 0.3 <= widgets["denoise"] <= 0.5 and widgets["bbox_crop_factor"] == 3
    (note,) = [n["widgets_values"][0] for n in flow["nodes"] if n["type"] == "Note"]
    assert "ComfyUI-Impact-Pack" in note and "SD 1.5" in note


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


# ----------------------------------------------------------------------------------------------- layout
# What the frontend (ComfyUI_frontend 1.27, LiteGraph) draws, in graph units: a node is its box
# pos..pos+size plus its title bar above pos (NODE_TITLE_HEIGHT). On loading, the frontend grows any
# node to at least its computeSize(): one 20 px row per input or output slot (the larger count), 24 px per
# widget, 8 px below the widgets and 6 px at the bottom. The sizes saved here must already be that large,
# or the boxes checked here are not the ones users see.
TITLE_HEIGHT = 30
SLOT_HEIGHT, WIDGET_ROW, WIDGETS_PADDING, BOTTOM_PADDING = 20, 24, 8, 6
# Other nodes' minimum heights, measured in frontend 1.27.10 (computeSize after loading). A video
# preview (Load Video; Save Video after a run) is as wide as the node, and its height is the video's at
# that width (4:3 here); the node does not grow for it, the video just spills over what lies below.
MIN_HEIGHT = {"LoadImage": 326, "SaveImage": 58, "PreviewImage": 26, "MaskToImage": 26, "Note": 88,
              "CheckpointLoaderSimple": 98, "CLIPTextEncode": 88, "EmptyLatentImage": 106, "KSampler": 262,
              "VAEDecode": 46, "GetVideoComponents": 66, "CreateVideo": 78, "ReActorFaceSwap": 358,
              "UpscaleModelLoader": 58, "ImageUpscaleWithModel": 46,  # by the rule above (one widget; two inputs)
              "PreviewAny": 88,  # one input row and its text box, at least 50 px tall (as Note's)
              # by the rule above, a multiline text box (wildcard, labels) 30 px taller than a widget row (as
              # CLIPTextEncode's): 11 input rows and 29 widgets; 3 input rows and 5 widgets
              "FaceDetailer": 11 * 20 + 29 * 24 + 30 + 8 + 6, "BboxDetectorSEGS": 3 * 20 + 5 * 24 + 30 + 8 + 6,
              "LoadVideo": lambda width: 86 + width * 3 / 4, "SaveVideo": lambda width: 110 + width * 3 / 4}
# The saved view (extra.ds: screen = (graph + offset) * scale, in canvas pixels) in the smallest window
# we design for, a 1280x720 browser viewport: the canvas is 1240x680 (a 40 px side bar on the left,
# the 40 px menu bar above); below 1536 px the workflow tabs sit on a second row over the canvas's top
# 37 px; the minimap and zoom controls cover its bottom-right 330x270. Every node, title bar included,
# must be on the canvas and clear of those. Below a zoom of 8/14 (the frontend's level-of-detail
# threshold: 8 px text at 14 px font size) nodes are drawn without their widgets, so the view must zoom
# to 0.6 or more; above 1.0 it would only blow the graph up.
CANVAS = (1240, 680)
TABS_HEIGHT = 37
CORNER = (CANVAS[0] - 330, CANVAS[1] - 270)
MIN_SCALE, MAX_SCALE = 0.6, 1.0


def min_height(pack, node):
    if node["type"] in MIN_HEIGHT:
        rule = MIN_HEIGHT[node["type"]]
        return rule(node["size"][0]) if callable(rule) else rule
    inputs, outputs, widgets = node_spec(pack, node["type"])
    rows = max(len(inputs), len(outputs), 1)
    return rows * SLOT_HEIGHT + len(widgets) * WIDGET_ROW + (WIDGETS_PADDING if widgets else 0) + BOTTOM_PADDING


def boxes(workflow):
    """(x0, y0, x1, y1) of each node as drawn: its title bar on top of pos..pos+size."""
    out = {}
    for node in workflow["nodes"]:
        (x, y), (w, h) = node["pos"], node["size"]
        out[f"{node['id']} {node.get('title') or node['type']}"] = (x, y - TITLE_HEIGHT, x + w, y + h)
    return out


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_nodes_are_saved_at_the_size_the_frontend_draws(path):
    pack = load_pack()
    for node in json.loads(path.read_text())["nodes"]:
        need = min_height(pack, node)
        assert node["size"][1] >= need, f"{node['id']} {node['type']}: height {node['size'][1]} < {need}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_no_node_covers_another(path):
    drawn = sorted(boxes(json.loads(path.read_text())).items())
    for i, (a, (ax0, ay0, ax1, ay1)) in enumerate(drawn):
        for b, (bx0, by0, bx1, by1) in drawn[i + 1:]:
            assert not (ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1), f"{a} and {b} overlap"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_the_saved_view_shows_the_whole_graph(path):
    workflow = json.loads(path.read_text())
    ds = workflow["extra"]["ds"]
    scale, (dx, dy) = ds["scale"], ds["offset"]
    assert MIN_SCALE <= scale <= MAX_SCALE, f"zoom {scale}"
    for name, (x0, y0, x1, y1) in boxes(workflow).items():
        sx0, sy0, sx1, sy1 = (x0 + dx) * scale, (y0 + dy) * scale, (x1 + dx) * scale, (y1 + dy) * scale
        assert sx0 >= 0 and sx1 <= CANVAS[0] and sy1 <= CANVAS[1], f"{name} is off the canvas: {sx0, sy0, sx1, sy1}"
        assert sy0 >= TABS_HEIGHT, f"{name}'s title bar is under the workflow tabs (screen y {sy0:.0f})"
        assert not (sx1 > CORNER[0] and sy1 > CORNER[1]), f"{name} is under the minimap ({sx1:.0f}, {sy1:.0f})"


# ----------------------------------------------------------------------------------------------- notes
LOADER_FILES = {"GPENLoadModel", "GPENLoadFaceDetector", "GPENLoadFaceParser", "CheckpointLoaderSimple",
                "UpscaleModelLoader"}
FOLDERS = {"GPENLoadModel": "models/facerestore_models", "GPENLoadFaceDetector": "models/facedetection",
           "GPENLoadFaceParser": "models/facedetection", "CheckpointLoaderSimple": "models/checkpoints",
           "UpscaleModelLoader": "models/upscale_models"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_one_note_says_what_the_workflow_does_and_which_files_go_where(path):
    workflow = json.loads(path.read_text())
    notes = [n for n in workflow["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    assert len(text.splitlines()[0]) > 10  # a first line that says what it is
    for node in workflow["nodes"]:
        if node["type"] in LOADER_FILES:
            assert node["widgets_values"][0] in text, f"the note does not name {node['widgets_values'][0]}"
            assert FOLDERS[node["type"]] in text, f"the note does not say where {node['widgets_values'][0]} goes"


def test_the_2048_workflow_picks_the_confident_large_face_and_says_what_input_it_expects():
    flow = workflow("gpen_large_portrait_2048")
    (restore,) = [n for n in flow["nodes"] if n["type"] == "GPENFaceRestore"]
    threshold, min_size, max_faces, order = restore["widgets_values"][1:5]
    # One face wanted: a weak detection (a torso at 0.64 once beat the face at 0.999 by size) must
    # not pass the threshold, and the largest confident face is the portrait's.
    assert max_faces == 1 and order == "largest" and (threshold or RETINAFACE.threshold) >= 0.8  # 0: the detector's
    (note,) = [n["widgets_values"][0] for n in flow["nodes"] if n["type"] == "Note"]
    assert "2048 px" in note and f"min_size {min_size}" in note


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_every_workflow_shows_what_its_gpen_node_did_in_a_preview_any(path):
    flow = json.loads(path.read_text())
    nodes = {n["id"]: n for n in flow["nodes"]}
    shown = {(nodes[src]["type"], nodes[src]["outputs"][slot]["name"])
             for _, src, slot, dst, _, _ in flow["links"] if nodes[dst]["type"] == "PreviewAny"}
    # the node that makes the picture: the modular chain's last, else the one restoring node
    last = next(t for t in ("GPENPasteFacesBack", "GPENRestoreSEGS", "GPENFaceRestore")
                if t in {n["type"] for n in nodes.values()})
    assert shown == {(last, "summary")}


def test_restore_and_upscale_finds_faces_in_the_original_and_pastes_them_into_the_upscaled_picture():
    flow = workflow("gpen_restore_and_upscale")
    nodes = {n["id"]: n for n in flow["nodes"]}
    links = {link[0]: link for link in flow["links"]}

    def source(node, name):
        """The node feeding node's input of that name."""
        return nodes[links[next(s["link"] for s in node["inputs"] if s["name"] == name)][1]]

    (restore,) = [n for n in nodes.values() if n["type"] == "GPENFaceRestore"]
    upscaler = source(restore, "background")
    assert upscaler["type"] == "ImageUpscaleWithModel"
    assert source(upscaler, "upscale_model")["widgets_values"] == ["RealESRGAN_x4plus.pth"]
    assert source(restore, "image") is source(upscaler, "image")  # the original, not the upscaler's pixels
    assert source(restore, "image")["type"] == "LoadImage"
    assert source(restore, "gpen_model")["widgets_values"][0] == "GPEN-BFR-2048.pth"
    assert restore["widgets_values"][-1] == 1  # upscale_by: the background already sets the output's size
    (note,) = [n["widgets_values"][0] for n in flow["nodes"] if n["type"] == "Note"]
    for size in (256, 512, 1024, 2048):
        assert f"GPEN-BFR-{size}" in note
    assert "upscale_by" in note and "1.5x" in note


def run_workflow(flow, pack, core):
    """Run a UI workflow in-process, as ComfyUI would run its API form: each node called with its widget
    values by name and its linked inputs, in dependency order; a node taking lists (INPUT_IS_LIST) gets each
    input as a list, and a list output (OUTPUT_IS_LIST) of one value reaches other nodes as that value.
    `core` stands in for ComfyUI's own nodes: node type -> function(inputs, widget values) -> outputs.
    Returns every node's outputs by id, list outputs as lists."""
    links = {link[0]: link for link in flow["links"]}
    todo = {n["id"]: n for n in flow["nodes"] if n["type"] != "Note"}
    done, listed = {}, set()  # listed: (node id, output slot) of list outputs
    while todo:
        ready = [n for n in todo.values() if all(links[s["link"]][1] in done for s in n["inputs"] if s["link"])]
        for node in ready:
            cls = pack.NODE_CLASS_MAPPINGS.get(node["type"])
            takes_lists = getattr(cls, "INPUT_IS_LIST", False)
            linked = {}
            for slot in (s for s in node["inputs"] if s["link"]):
                _, source, output, *_ = links[slot["link"]]
                value, is_list = done[source][output], (source, output) in listed
                if is_list and not takes_lists:
                    assert len(value) == 1, "a list of several values would run the node once each: not modelled"
                    value = value[0]
                linked[slot["name"]] = value if is_list or not takes_lists else [value]
            if node["type"] in core:
                done[node["id"]] = core[node["type"]](linked, node["widgets_values"])
            else:
                widgets = [name for name, *_ in node_spec(pack, node["type"])[2]]
                values = [[v] if takes_lists else v for v in node["widgets_values"]]
                done[node["id"]] = getattr(cls(), cls.FUNCTION)(**dict(zip(widgets, values)), **linked)
                listed |= {(node["id"], k) for k, is_list in enumerate(getattr(cls, "OUTPUT_IS_LIST", ())) if is_list}
            del todo[node["id"]]
    return done


@pytest.fixture
def user_models(tmp_path, monkeypatch, shared):
    """The files the restore-and-upscale and FaceDetailer notes name, where they say, as small stand-ins: a
    random GPEN-64 as GPEN-BFR-2048.pth and GPEN-BFR-512.pth and the mobilenet RetinaFace as
    detection_Resnet50_Final.pth (each file is recognised from its tensors, not its name)."""
    monkeypatch.setattr(sys.modules[load_pack().__name__ + ".nodes.host"], "PACK_MODELS", tmp_path)
    (tmp_path / "facerestore_models").mkdir()
    gpen = random_gpen(64, 1, 0.125).state_dict()
    for name in ("GPEN-BFR-2048.pth", "GPEN-BFR-512.pth"):
        torch.save(gpen, tmp_path / "facerestore_models" / name)
    (tmp_path / "facedetection").mkdir()
    shutil.copy(shared / "models" / "retinaface_mobilenet0.25.pth",
                tmp_path / "facedetection" / "detection_Resnet50_Final.pth")


def test_restore_and_upscale_runs_as_saved_and_gives_the_upscaled_picture_with_restored_faces(user_models, solvay):
    original = solvay[:, 110:330, 560:880]  # 320x220, a few sitters
    saved = {}
    # ComfyUI's upscale-model nodes need spandrel (and so torchvision): a Lanczos 4x stands in for the
    # model here, as Upscale Image By would; the GPEN nodes run as saved.
    def upscale_with_model(inputs, widgets):
        image, scale = inputs["image"], inputs["upscale_model"]
        return (resize_frames(image, (image.shape[1] * scale, image.shape[2] * scale)),)

    core = {"LoadImage": lambda inputs, widgets: (original, None),
            "UpscaleModelLoader": lambda inputs, widgets: (4,),  # the stand-in model: its scale
            "ImageUpscaleWithModel": upscale_with_model,
            "SaveImage": lambda inputs, widgets: saved.setdefault("images", inputs["images"]),
            "PreviewAny": lambda inputs, widgets: saved.setdefault("summary", inputs["source"])}
    flow = workflow("gpen_restore_and_upscale")
    outputs = run_workflow(flow, load_pack(), core)
    ids = {n["type"]: n["id"] for n in flow["nodes"]}
    background = outputs[ids["ImageUpscaleWithModel"]][0]
    image, mask, _ = outputs[ids["GPENFaceRestore"]]
    assert saved["images"].shape == (1, 880, 1280, 3) == background.shape
    assert mask.shape == (1, 880, 1280) and 0.05 < mask.mean() < 0.8  # faces restored
    outside = mask == 0
    assert torch.equal(image[outside], background[outside])  # the upscaler's pixels, bit for bit
    assert saved["summary"].startswith("restored ") and "\nimage: " in saved["summary"]  # the faces, listed


def test_inside_facedetailer_runs_as_saved_and_restores_the_faces_facedetailer_redrew(user_models, solvay):
    original = solvay[:, 110:330, 560:880]  # 320x220, a few sitters
    saved, detailed = {}, {}

    # The Impact Pack's nodes as they call a BBOX_DETECTOR (FaceDetailer.enhance_face, BboxDetectorForEach.doit);
    # the re-drawing stand-in softens each segment's crop region under its mask, as a low denoise might.
    def face_detailer(inputs, widgets):
        options = dict(zip(FACE_DETAILER_WIDGETS, widgets))
        detector, image = inputs["bbox_detector"], inputs["image"]
        detector.setAux("face")
        segs = detector.detect(image, options["bbox_threshold"], options["bbox_dilation"],
                               options["bbox_crop_factor"], options["drop_size"])
        detector.setAux(None)
        redrawn = image.clone()
        for seg in segs[1]:
            x0, y0, x1, y1 = seg.crop_region
            crop = redrawn[0, y0:y1, x0:x1]
            mask = torch.as_tensor(seg.cropped_mask)[..., None]
            crop += (resize_frames(resize_frames(crop[None], (crop.shape[0] // 2, crop.shape[1] // 2)),
                                   crop.shape[:2])[0] - crop) * mask
        detailed.update(segs=segs, image=redrawn)
        return redrawn, [], [], segs_mask(segs)[None], None, []

    def bbox_detector_segs(inputs, widgets):
        options = dict(zip(BBOX_DETECTOR_SEGS_WIDGETS, widgets))
        assert options["labels"] == "all"  # Impact's label filter keeps every segment as it is
        return (inputs["bbox_detector"].detect(inputs["image"], options["threshold"], options["dilation"],
                                               options["crop_factor"], options["drop_size"]),)

    core = {"LoadImage": lambda inputs, widgets: (original, None),
            "CheckpointLoaderSimple": lambda inputs, widgets: ("model", "clip", "vae"),
            "CLIPTextEncode": lambda inputs, widgets: (widgets[0],),
            "FaceDetailer": face_detailer, "BboxDetectorSEGS": bbox_detector_segs,
            "PreviewImage": lambda inputs, widgets: None,
            "SaveImage": lambda inputs, widgets: saved.setdefault("images", inputs["images"]),
            "PreviewAny": lambda inputs, widgets: saved.setdefault("summary", inputs["source"])}
    flow = workflow("gpen_inside_facedetailer")
    outputs = run_workflow(flow, load_pack(), core)
    ids = {n["type"]: n["id"] for n in flow["nodes"]}
    (image,), (segs,), (mask,), (summary,) = outputs[ids["GPENRestoreSEGS"]]  # list outputs (OUTPUT_IS_LIST)
    faces = len(detailed["segs"][1])
    assert faces >= 2 and len(outputs[ids["BboxDetectorSEGS"]][0][1]) == faces  # found again after re-drawing
    assert summary.startswith(f"restored {faces} face(s) in {faces} segment(s)") and saved["summary"] == summary
    assert saved["images"] is image and image.shape == original.shape
    where = segs_mask(segs)[None] > 0
    assert mask[~where].eq(0).all() and (mask > 0.5).sum() > 0.5 * where.sum()  # GPEN pasted under the segments
    assert torch.equal(image[~where], detailed["image"][~where])  # FaceDetailer's pixels elsewhere, bit for bit
    assert not torch.equal(detailed["image"], original)  # (the stand-in did re-draw)
