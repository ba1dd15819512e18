"""max_faces, indices and order on video frames choose face tracks: the same people in every frame.

The clip is a pan over the Solvay photo, 3 px a frame for 24 frames, with a dozen faces of about the same
size: chosen frame by frame, "the three largest" changes from frame to frame; chosen by track, it does not.
"""

import numpy as np
import pytest
import torch

import gpen
from gpen import SelectOptions
from gpen.faces.pipeline import detect_faces, select_tracks
from gpen.faces.stream import restore_frames
from tests.helpers import GreyRestorer, IdentityRestorer
from tests.test_video import fast_detector, picture  # noqa: F401 (fixtures)

FRAMES, STEP, TOP, HEIGHT, WIDTH = 24, 3, 10, 240, 400
SURE = 0.9  # every face here scores over it, and nothing else does


def pan(picture, hide=None, frames=range(FRAMES)) -> torch.Tensor:
    """(24,240,400,3) float frames panning over the photo; `hide` (box in photo pixels) is painted over in
    `frames`, as if someone walked in front of that face."""
    picture = picture.copy()
    clips = []
    for t in range(FRAMES):
        shown = picture
        if hide is not None and t in frames:
            shown = picture.copy()
            x0, y0, x1, y1 = hide
            shown[y0:y1, x0:x1] = shown[y0:y1, x0:x1].reshape(-1, 3).mean(0).astype(np.uint8)
        clips.append(torch.from_numpy(np.ascontiguousarray(shown[TOP:TOP + HEIGHT, STEP * t:STEP * t + WIDTH])))
    return torch.stack(clips).float() / 255


@pytest.fixture(scope="module")
def people(picture, fast_detector):
    """The faces the pan passes over, found once in the strip it covers: centres in photo pixels."""
    strip = torch.from_numpy(np.ascontiguousarray(picture[TOP:TOP + HEIGHT, :WIDTH + STEP * FRAMES])).float() / 255
    boxes = fast_detector.detect(strip[None], threshold=SURE)[0].boxes
    return (boxes[:, :2] + boxes[:, 2:]) / 2 + torch.tensor([0, TOP])


def who(faces, t, people) -> list[int]:
    """Which of `people` each face of frame `t` is, by the nearest centre."""
    centres = (faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2 + torch.tensor([STEP * t, TOP])
    return torch.cdist(centres, people).argmin(1).tolist()


def restored_people(results, people) -> list[set]:
    faces = [f for result in results for f in result.faces]
    return [set(who(f, t, people)) for t, f in enumerate(faces)]


@pytest.fixture(scope="module")
def found(picture, fast_detector):
    """Every face of every frame of the pan, as detect_faces keeps them without max_faces and indices."""
    return detect_faces(pan(picture), fast_detector, SelectOptions(threshold=SURE))


def test_a_pan_restores_the_same_three_people_in_every_frame(picture, fast_detector, people, found):
    three = SelectOptions(threshold=SURE, max_faces=3)
    result = gpen.restore_faces(pan(picture), IdentityRestorer(64), fast_detector, select=three)
    chosen = restored_people([result], people)
    assert len(chosen[0]) == 3 and all(c == chosen[0] for c in chosen)
    assert result.face_count == 3 * FRAMES
    frame_by_frame = [set(who(gpen.select_faces(f, three), t, people)) for t, f in enumerate(found)]
    assert len(set().union(*frame_by_frame)) > 3  # the problem: each frame alone picks its own three

    streamed = restore_frames(iter(pan(picture)), IdentityRestorer(64), fast_detector, chunk=5, select=three)
    assert restored_people(streamed, people) == chosen
    segments = [result for span in (range(0, 9), range(9, 24))
                for result in restore_frames(iter(pan(picture)), IdentityRestorer(64), fast_detector, chunk=5,
                                             select=three, span=span)]
    assert restored_people(segments, people) == chosen


def test_restore_video_greys_the_same_three_faces_in_every_frame(tmp_path, picture, fast_detector, people):
    av = pytest.importorskip("av", reason="video needs PyAV (pip install av)")
    from tests.test_video import make_clip

    source = make_clip(tmp_path / "pan.mp4", picture[TOP:], frames=FRAMES, size=(WIDTH, HEIGHT), step=STEP, audio=None)
    summary = gpen.restore_video(source, tmp_path / "out.mp4", GreyRestorer(64), fast_detector, chunk=5, crf=0,
                                 select=SelectOptions(threshold=SURE, max_faces=3), progress=False)
    assert summary.faces == 3 * FRAMES
    with av.open(str(tmp_path / "out.mp4")) as container:
        frames = [torch.from_numpy(f.to_ndarray(format="rgb24")).float() / 255 for f in container.decode(video=0)]
    greyed = []
    for t, frame in enumerate(frames):
        centres = (people - torch.tensor([STEP * t, TOP])).round().long()
        inside = [i for i, (x, y) in enumerate(centres.tolist()) if 3 <= x < WIDTH - 3 and 3 <= y < HEIGHT - 3]
        greyed.append({i for i in inside if (frame[centres[i, 1] - 2:centres[i, 1] + 3,
                                                   centres[i, 0] - 2:centres[i, 0] + 3] - 0.5).abs().max() < 0.03})
    assert len(greyed[0]) == 3 and all(g == greyed[0] for g in greyed)


def test_indices_pick_the_same_tracks_in_every_chunk(picture, fast_detector, people, found):
    two = SelectOptions(threshold=SURE, order="left-right", indices="1,3")
    whole = restored_people([gpen.restore_faces(pan(picture), IdentityRestorer(64), fast_detector, select=two)],
                            people)
    assert len(whole[0]) == 2 and all(w == whole[0] for w in whole)
    chunked = restore_frames(iter(pan(picture)), IdentityRestorer(64), fast_detector, chunk=4, select=two)
    assert restored_people(chunked, people) == whole
    assert [set(who(f, t, people)) for t, f in enumerate(select_tracks(found, two))] == whole


def test_a_face_hidden_for_a_few_frames_keeps_its_index(picture, fast_detector, people, found):
    """Faces numbered left to right; the third is hidden in frames 10-12. Numbered frame by frame, the
    fourth face would be number 2 there; as tracks, numbers 2 and 3 stay with their people."""
    order = SelectOptions(threshold=SURE, order="left-right")
    third, fourth = who(gpen.select_faces(found[0], order), 0, people)[2:4]
    x, y = people[third].round().long().tolist()
    hidden = pan(picture, hide=(x - 30, y - 30, x + 30, y + 30), frames=range(10, 13))
    faces = detect_faces(hidden, fast_detector, SelectOptions(threshold=SURE))
    assert all(third not in who(faces[t], t, people) for t in range(10, 13))  # it is gone there

    number_2 = select_tracks(faces, SelectOptions(threshold=SURE, order="left-right", indices="2"))
    assert [who(f, t, people) for t, f in enumerate(number_2)] == [[] if t in range(10, 13) else [third]
                                                                    for t in range(FRAMES)]
    number_3 = select_tracks(faces, SelectOptions(threshold=SURE, order="left-right", indices="3"))
    assert all(who(f, t, people) == [fourth] for t, f in enumerate(number_3))
