"""What happened, where the user looks: each face restored (index, score, size) and each skipped with
why, in Restoration.report, the nodes' summary output, the CLI's line, and the nodes' help pages."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import gpen
from gpen import MaskOptions, SelectOptions
from gpen.apps.jobs import Job, Report
from gpen.faces.detect import Faces
from gpen.faces.pipeline import Selection, detect_faces
from tests.helpers import IdentityRestorer, SplitParser
from tests.test_nodes import load_pack

REPO = Path(__file__).resolve().parents[1]


class PlantedDetector:
    """Finds the same faces in every frame, as a detector does: those scoring over the threshold asked."""

    def __init__(self, faces: list[tuple[float, float, float, float]]):  # (x, y, side, score) each
        self.faces = faces

    def detect(self, images, threshold=0.5, nms_threshold=0.4, top_k=5000):
        boxes = torch.tensor([[x, y, x + side, y + side] for x, y, side, _ in self.faces])
        eyes_nose_mouth = torch.tensor([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]])
        landmarks = boxes[:, None, :2] + eyes_nose_mouth[None] * (boxes[:, None, 2:] - boxes[:, None, :2])
        faces = Faces(boxes, torch.tensor([score for *_, score in self.faces]), landmarks)
        return [faces[faces.scores > threshold] for _ in range(len(images))]


# Two faces restored (max_faces 2, largest first), one more not selected, one too small, one below the
# threshold, and one under the floor the report looks down to, which is not listed at all.
PLANTED = [(20, 20, 100, 0.99), (140, 20, 90, 0.98), (250, 20, 80, 0.97), (350, 20, 20, 0.99),
           (400, 100, 60, 0.45), (300, 150, 50, 0.2)]
SELECT = SelectOptions(threshold=0.5, min_size=32, max_faces=2)


def test_the_report_lists_each_restored_face_and_each_skipped_one_with_why():
    image = torch.rand(1, 256, 512, 3)
    result = gpen.restore_faces(image, IdentityRestorer(128), PlantedDetector(PLANTED), select=SELECT)
    headline, line = result.report.splitlines()
    assert headline == result.summary and headline.startswith("restored 2 face(s) in 1 image(s)")
    assert line == ("image: 2 restored: face 0 0.990 100px, face 1 0.980 90px; "
                    "1 below threshold 0.5: 0.450 60px; "
                    "1 too small (min_size 32): 0.990 20px; "
                    "1 not selected (max_faces 2): 0.970 80px")


def test_faces_left_as_they_were_are_listed_with_why():
    image = torch.rand(1, 256, 512, 3)
    select = SelectOptions(threshold=0.5, min_size=32)
    result = gpen.restore_faces(image, IdentityRestorer(128), PlantedDetector(PLANTED), select=select,
                                masks=MaskOptions(parser=SplitParser(0, 0)))  # background everywhere
    assert "3 masked out (parser): face 0 0.990 100px, face 1 0.980 90px, face 2 0.970 80px" in result.report
    crops, info = gpen.locate_faces(image, PlantedDetector(PLANTED), 128, select)
    broken = crops.clone()
    broken[1] = float("nan")
    result = gpen.paste_restored(image, broken, info)
    assert "image: 2 restored: face 0 0.990 100px, face 2 0.970 80px;" in result.report
    assert result.report.endswith("; 1 left unrestored (not finite): face 1 0.980 90px")


def test_faces_a_swap_did_not_change_are_listed_as_not_changed():
    image = torch.rand(1, 256, 512, 3)
    select = SelectOptions(threshold=0.5, min_size=32, changed_from=image)
    result = gpen.restore_faces(image, IdentityRestorer(128), PlantedDetector(PLANTED), select=select)
    assert result.summary.startswith("0 of 3 faces changed; no face restored")
    assert "3 not changed (changed_from): 0.990 100px, 0.980 90px, 0.970 80px" in result.report


def test_a_batch_gets_totals_and_a_line_for_its_first_frames_only():
    frames = torch.rand(12, 256, 512, 3)
    result = gpen.restore_faces(frames, IdentityRestorer(128), PlantedDetector(PLANTED), select=SELECT)
    lines = result.report.splitlines()
    assert lines[1] == ("12 frames: 24 restored, 12 below threshold 0.5, 12 too small (min_size 32), "
                        "12 not selected (max_faces 2)")
    assert lines[2].startswith("frame 0: 2 restored: face 0 0.990 100px, face 1 0.980 90px;")
    assert lines[9].startswith("frame 7: 2 restored: face 14 ") and lines[10] == "... and 4 more frame(s) with faces"
    assert len(lines) == 11


def test_long_lists_are_cut_short():
    many = [(20 + 24 * i, 20, 20, 0.99) for i in range(20)]
    result = gpen.restore_faces(torch.rand(1, 64, 512, 3), IdentityRestorer(64), PlantedDetector(many),
                                select=SelectOptions(min_size=32))
    assert result.report.endswith("20 too small (min_size 32): " + ", ".join(["0.990 20px"] * 6) + ", ... and 14 more")


def test_detecting_down_to_the_floor_keeps_the_same_faces_over_the_threshold(solvay, detector):
    """The report names faces under the threshold: detection looks down to 0.3, and what passes the
    threshold is what detecting at the threshold finds."""
    selection = Selection()
    (faces,) = detect_faces(solvay, detector, SelectOptions(threshold=0.999), selection=selection)
    (plain,) = detector.detect(solvay, threshold=0.999)
    assert torch.equal(by_position(faces.boxes), by_position(plain.boxes))  # (selection sorts them largest first)
    below = selection.skipped_counts["below threshold"]
    assert below == 29 - len(plain) and below > 0  # the Solvay sitters scoring 0.98-0.999
    assert all(0.3 < r.score <= 0.999 for r in selection.skipped)


def by_position(boxes):
    return boxes[boxes[:, 0].argsort()]


def test_a_selection_keeps_its_records_through_a_ray_segments_json():
    selection = Selection()
    gpen.select_faces(PlantedDetector(PLANTED).detect(torch.zeros(1, 8, 8, 3), 0.5)[0], SELECT, selection)
    again = Selection(**json.loads(json.dumps(dataclasses.asdict(selection))))
    assert again.skipped == selection.skipped and again.skipped_counts == selection.skipped_counts
    total = Selection()
    total.add(selection)
    total.add(again)
    assert [r.frame for r in total.skipped] == [0, 0, 1, 1]  # the second segment's frames follow the first's


def test_the_cli_prints_the_summary_line_then_the_faces_indented(capsys, tmp_path):
    job = Job(1, tmp_path / "photo.png", tmp_path / "out" / "photo.png")
    Report(2).done(job, "restored 2 face(s) in 1 image(s)\nimage: 2 restored: face 0 0.990 100px")
    assert capsys.readouterr().out == (f"[1/2] photo.png: restored 2 face(s) in 1 image(s) -> {job.target}\n"
                                       "    image: 2 restored: face 0 0.990 100px\n")


@pytest.fixture(scope="module")
def pack():
    return load_pack()


@pytest.mark.parametrize("node_id", ["GPENFaceRestore", "GPENDetectAndCropFaces", "GPENRestoreFaces",
                                     "GPENPasteFacesBack"])
def test_the_restoring_nodes_give_the_summary_as_their_last_output(pack, node_id):
    cls = pack.NODE_CLASS_MAPPINGS[node_id]
    assert cls.RETURN_TYPES[-1] == "STRING" and cls.RETURN_NAMES[-1] == "summary"


def test_the_nodes_summary_outputs_say_what_the_library_says(pack):
    nodes, image, detector = pack.NODE_CLASS_MAPPINGS, torch.rand(1, 256, 512, 3), PlantedDetector(PLANTED)
    host = __import__(pack.__name__ + ".nodes.host", fromlist=["Loaded"])
    model = host.Loaded(IdentityRestorer(128), torch.device("cpu"))
    detector_handle = host.Loaded(detector, torch.device("cpu"))
    select = dict(threshold=0.5, min_size=32, max_faces=2, order="largest", indices="", temporal_smoothing=0.0)
    paste = dict(strength=1.0, mask_shape="box", feather=0.011, erode=0.05, color_correction=False)
    *_, summary = nodes["GPENFaceRestore"]().restore(image, model, detector_handle, face_batch=4, **select, **paste)
    expected = gpen.restore_faces(image, IdentityRestorer(128), detector, select=SELECT).report
    assert summary == expected
    crops, info, _, cropped = nodes["GPENDetectAndCropFaces"]().detect(image, detector_handle, 128, "gpen", **select)
    headline, *faces = cropped.splitlines()
    assert headline.startswith("2 face(s) cropped; 1 face(s) found smaller than min_size 32")
    assert faces == [line.replace("2 restored:", "2 cropped:") for line in expected.splitlines()[1:]]
    *_, pasted = nodes["GPENPasteFacesBack"]().paste(image, crops, info, **paste)
    assert pasted == expected


def test_every_node_has_a_help_page_that_names_its_inputs_and_outputs(pack):
    """ComfyUI's node help panel reads <WEB_DIRECTORY>/docs/<node id>.md of a custom node pack."""
    pages = REPO / pack.WEB_DIRECTORY / "docs"
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        page = (pages / f"{node_id}.md").read_text()
        assert page.startswith(f"# {pack.NODE_DISPLAY_NAME_MAPPINGS[node_id]}\n"), node_id
        for name in [n for section in cls.INPUT_TYPES().values() for n in section]:
            assert f"**{name}**" in page, f"{node_id}'s page does not explain {name}"
        for name in getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES):
            assert f"**{name}**" in page, f"{node_id}'s page does not explain its output {name}"
        for heading in ("## Inputs", "## Outputs", "## Usual mistakes"):
            assert heading in page, f"{node_id}'s page has no {heading}"
