"""Adding a network is one file: a module with the network and its ArchSpec, registered. Here a toy
restorer and a toy face parser, each written as a user would write its file, are recognised from
their keys, and then used by restore_faces and by the ComfyUI nodes without any other edit."""

import importlib.util
import sys
import textwrap

import pytest
import torch

import gpen
from tests.test_nodes import load_pack

TOY_RESTORER = '''
"""A toy restorer: every face becomes its learnt colour (the bias), whatever it was."""
import torch
from torch import nn

from gpen.archs import register
from gpen.archs.spec import ArchSpec, Convention


class ToyRestorer(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.toy_paint = nn.Conv2d(3, 3, 1)
        self.register_buffer("toy_face_size", torch.zeros(size))

    def forward(self, x):  # NCHW RGB in -1..1, as its convention says
        return self.toy_paint(x)


def config(state):
    size = state["toy_face_size"].shape[0]
    if not 16 <= size <= 1024:
        raise ValueError(f"a toy face of {size} px (16 to 1024)")
    return {"size": size}


SPEC = register(ArchSpec("Toy restorer", "restorer", lambda state: "toy_paint.weight" in state, config, ToyRestorer,
                         convention=Convention(input="-1..1", output="image", template="gpen"),
                         face_size=lambda net: net.size, details=lambda net: {"size": net.size}))
'''

TOY_PARSER = '''
"""A toy face parser: a learnt map of class logits over the crop, whatever the crop shows."""
import torch
from torch import nn

from gpen.archs import register
from gpen.archs.spec import ArchSpec, Convention


class ToyParser(nn.Module):
    def __init__(self, size: int, classes: int = 19):
        super().__init__()
        self.size = size
        self.toy_map = nn.Parameter(torch.zeros(1, classes, size, size))

    def forward(self, x):  # NCHW RGB in 0..1 -> (N, classes, size, size)
        return self.toy_map.expand(len(x), -1, -1, -1) + 0 * x.mean()


SPEC = register(ArchSpec("Toy face-parser", "parser", lambda state: "toy_map" in state,
                         lambda state: {"size": state["toy_map"].shape[-1], "classes": state["toy_map"].shape[1]},
                         ToyParser, convention=Convention(input="0..1", output="logits"),
                         face_size=lambda net: net.size))
'''

SKIN, BACKGROUND = 1, 0


def import_file(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def toys(tmp_path):
    """The two files, imported (which registers them), and weights for each: a restorer that paints
    faces mid grey, a parser that calls the left half of a crop skin and the right half background."""
    (tmp_path / "toy_restorer.py").write_text(textwrap.dedent(TOY_RESTORER))
    (tmp_path / "toy_parser.py").write_text(textwrap.dedent(TOY_PARSER))
    restorer = import_file(tmp_path / "toy_restorer.py", "toy_restorer")
    parser = import_file(tmp_path / "toy_parser.py", "toy_parser")
    painter = restorer.ToyRestorer(64)
    torch.nn.init.zeros_(painter.toy_paint.weight)
    torch.nn.init.zeros_(painter.toy_paint.bias)  # 0 in -1..1: grey
    torch.save(painter.state_dict(), tmp_path / "toy_restorer.pth")
    halves = parser.ToyParser(32)
    with torch.no_grad():
        halves.toy_map[:, SKIN, :, :16] = 5
        halves.toy_map[:, BACKGROUND, :, 16:] = 5
    torch.save(halves.state_dict(), tmp_path / "toy_parser.pth")
    yield tmp_path, restorer.SPEC, parser.SPEC
    gpen.archs.SPECS[:] = [s for s in gpen.archs.SPECS if s not in (restorer.SPEC, parser.SPEC)]


def test_registered_networks_are_recognised_by_their_keys(toys):
    folder, _, _ = toys
    restorer = gpen.load_model(folder / "toy_restorer.pth", device="cpu")
    parser = gpen.load_parser(folder / "toy_parser.pth", device="cpu")
    assert (restorer.info.arch, restorer.info.role, restorer.size) == ("Toy restorer", "restorer", 64)
    assert (parser.info.arch, parser.info.role, parser.size) == ("Toy face-parser", "parser", 32)
    assert str(gpen.load(folder / "toy_restorer.pth").info).startswith("Toy restorer-64 (pth, float32)")
    with pytest.raises(gpen.CheckpointError, match="holds Toy face-parser weights, not a restorer"):
        gpen.load_model(folder / "toy_parser.pth")


def test_restore_faces_uses_them(toys, solvay, detector):
    folder, _, _ = toys
    restorer = gpen.load_model(folder / "toy_restorer.pth", device="cpu")
    parser = gpen.load_parser(folder / "toy_parser.pth", device="cpu")
    whole = gpen.restore_faces(solvay, restorer, detector, select=gpen.SelectOptions(max_faces=3))
    inside = whole.masks > 0.99
    assert whole.face_count == 3 and (whole.images[inside] - 0.5).abs().max() < 1e-2  # painted grey
    halves = gpen.restore_faces(solvay, restorer, detector, select=gpen.SelectOptions(max_faces=3),
                                masks=gpen.MaskOptions(parser=parser))
    assert (halves.masks <= whole.masks + 1e-6).all() and 0.3 < halves.masks.sum() / whole.masks.sum() < 0.7
    outside = halves.masks == 0
    assert torch.equal(halves.images[outside], solvay[outside])


def test_the_nodes_list_load_and_run_them(toys, solvay, monkeypatch, shared, request):
    folder, restorer_spec, parser_spec = toys
    pack = load_pack()
    # The pack is imported the way ComfyUI imports it, as a package of its own: a file that lived in
    # the pack would register with that copy of gpen, as the test does here.
    pack_archs = sys.modules[pack.__name__ + ".gpen.archs"]
    request.addfinalizer(lambda built_in=list(pack_archs.SPECS): pack_archs.SPECS.__setitem__(slice(None), built_in))
    pack_archs.register(restorer_spec)
    pack_archs.register(parser_spec)
    host = sys.modules[pack.__name__ + ".nodes.host"]
    monkeypatch.setattr(host, "PACK_MODELS", folder)
    for sub, name in (("facerestore_models", "toy_restorer.pth"), ("face_parsing", "toy_parser.pth"),
                      ("facedetection", "detection_mobilenet0.25_Final.pth")):
        (folder / sub).mkdir()
        source = shared / "models" / "retinaface_mobilenet0.25.pth" if sub == "facedetection" else folder / name
        (folder / sub / name).write_bytes(source.read_bytes())
    nodes = pack.NODE_CLASS_MAPPINGS
    assert nodes["GPENLoadModel"].INPUT_TYPES()["required"]["model_name"][0] == ["toy_restorer.pth"]
    assert nodes["GPENLoadFaceParser"].INPUT_TYPES()["required"]["parser_name"][0] == ["toy_parser.pth"]
    (model,) = nodes["GPENLoadModel"]().load("toy_restorer.pth", "auto", "cpu")
    (detector,) = nodes["GPENLoadFaceDetector"]().load("detection_mobilenet0.25_Final.pth", "auto")
    (chain,) = nodes["GPENLoadFaceParser"]().load("toy_parser.pth", "auto", "cpu")
    assert model.model.info.arch == "Toy restorer" and chain[0].model.info.arch == "Toy face-parser"
    options = {"face_batch": 4, "threshold": 0.5, "min_size": 0, "max_faces": 3, "order": "largest", "indices": "",
               "temporal_smoothing": 0.0, "strength": 1.0, "mask_shape": "box", "feather": 0.011, "erode": 0.05,
               "color_correction": False}
    image, plain, _ = nodes["GPENFaceRestore"]().restore(solvay, model, detector, **options)
    assert ((image - 0.5).abs()[plain > 0.99] < 1e-2).all()
    image, mask, _ = nodes["GPENFaceRestore"]().restore(solvay, model, detector, **options, face_parser=chain,
                                                     mask_regions="face", parse_source="original", parse_feather=0.01)
    assert (mask <= plain + 1e-6).all() and 0.3 < mask.sum() / plain.sum() < 0.7
    assert torch.equal(image[mask == 0], solvay[mask == 0])


def test_a_restorer_spec_must_say_its_face_size():
    from gpen.archs.spec import ArchSpec, Convention

    with pytest.raises(ValueError, match="Sizeless: a restorer says the face size it takes"):
        ArchSpec("Sizeless", "restorer", lambda state: False, lambda state: {}, torch.nn.Identity,
                 convention=Convention())


def test_a_recognise_that_fails_on_other_tensors_only_says_no(small_checkpoint):
    from gpen.archs import SPECS, register
    from gpen.archs.spec import ArchSpec, Convention

    clumsy = ArchSpec("Clumsy", "restorer", lambda state: state["clumsy.weight"].ndim == 4, lambda state: {},
                      torch.nn.Identity, convention=Convention(size=64))
    before = list(SPECS)
    register(clumsy)
    try:
        assert gpen.load_model(small_checkpoint).info.arch == "GPEN"  # tried against Clumsy too: KeyError inside
    finally:
        SPECS[:] = before


def test_restore_faces_says_when_faces_are_cut_to_another_template_than_the_restorer_was_trained_on(caplog):
    from gpen.faces.restore import as_restorer
    from tests.helpers import random_gpen

    restorer = as_restorer(random_gpen())  # GPEN's spec: trained on the gpen template
    image = torch.rand(1, 64, 64, 3)
    face = gpen.Faces(torch.tensor([[8.0, 8, 56, 56]]), torch.tensor([0.9]),
                      torch.tensor([[[24.0, 28], [40, 28], [32, 36], [26, 46], [38, 46]]]))
    with caplog.at_level("WARNING", logger="gpen"):
        gpen.restore_faces(image, restorer, None, faces=[face])
    assert not caplog.records
    with caplog.at_level("WARNING", logger="gpen"):
        gpen.restore_faces(image, restorer, None, faces=[face], select=gpen.SelectOptions(template="ffhq"))
    assert "trained on faces aligned to the gpen template; cutting them to ffhq" in caplog.text
