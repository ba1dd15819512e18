"""Make the template-browser thumbnails: workflows/<workflow>.jpg beside each workflow file.

    python scripts/make_thumbnails.py [--photo PATH] [--detector PATH] [--out DIR] [--only NAME ...]

ComfyUI's template browser shows, for a custom-node pack's workflows/<name>.json, the picture
workflows/<name>.jpg in a 256x256 card (object-contain); these are 512x512 JPEGs (sharp on HiDPI screens,
a few tens of KB each).

Everything drawn here is computed by the pack itself, on the public-domain photo of the 1927 Solvay
conference (29 faces), with a trained RetinaFace detector: the face boxes and landmarks it finds, the
aligned crops GPEN is fed (gpen.locate_faces), and the paste-back masks that say which pixels GPEN
replaces (gpen.paste_faces). No GPEN weights are used and no "restored" faces are shown: the pictures
say what each workflow does, not how good the result looks. Two pictures contain stand-ins, and say so
on the picture: the face swap in the ReActor workflow is another face of the photo pasted with the
pack's own paste-back, and the occlusion-aware workflow's "parse mask" is drawn geometrically (an
ellipse minus a drawn occluder), not a face parser's output. The restore-and-upscale picture's 4x image
is the pack's Lanczos enlargement (upscale_by), standing in for an upscale model, and says so. The
FaceDetailer picture's crop regions and paste areas are the pack's own BBOX_DETECTOR's segments and
GPEN Restore SEGS's paste masks; FaceDetailer itself is not run, and the picture says so.

Needs only the pack (torch, numpy, opencv-python) and two files, by default from ../shared (the
project's shared data): images/solvay_1927.png and models/retinaface_mobilenet0.25.pth
(detection_mobilenet0.25_Final.pth and detection_Resnet50_Final.pth work too). Runs in about half a
minute on a CPU.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.dont_write_bytecode = True  # leave no __pycache__ in the checkout

import gpen
from gpen.faces.paste import face_mask
from gpen.faces.pipeline import detect_faces
from gpen.faces.restore import IdentityRestorer

SIZE = 512
CAPTION = 76  # px at the bottom for the title and one line of detail
BG = (30, 30, 30)  # RGB, close to ComfyUI's dark theme
BOX = (255, 208, 64)  # face boxes (amber)
TINT = (64, 200, 255)  # what GPEN replaces (sky blue)
GREY = (150, 150, 150)
CHANGED = (255, 110, 60)  # the swapped face (orange)
FONT = cv2.FONT_HERSHEY_SIMPLEX


# ------------------------------------------------------------------------------------------ drawing

def to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return np.ascontiguousarray(image)


def tint(image: np.ndarray, mask: np.ndarray, colour=TINT, alpha: float = 0.55) -> np.ndarray:
    """Colour where mask (0..1, HxW) is on."""
    a = (np.clip(mask, 0, 1) * alpha)[..., None]
    return (image * (1 - a) + np.array(colour, np.float32) * a).round().astype(np.uint8)


def text(img, s, org, scale=0.5, colour=(235, 235, 235), thickness=1, shadow=False):
    if shadow:
        cv2.putText(img, s, (org[0] + 1, org[1] + 1), FONT, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.putText(img, s, org, FONT, scale, colour, thickness, cv2.LINE_AA)


def label(img, s, org, scale=0.45, colour=(240, 240, 240)):
    """Text on a dark box, for labels on top of a picture."""
    (w, h), base = cv2.getTextSize(s, FONT, scale, 1)
    x, y = org
    cv2.rectangle(img, (x - 4, y - h - 5), (x + w + 4, y + base + 2), (20, 20, 20), -1)
    cv2.putText(img, s, (x, y), FONT, scale, colour, 1, cv2.LINE_AA)


def canvas() -> np.ndarray:
    return np.full((SIZE, SIZE, 3), BG, np.uint8)


def caption(img, title: str, detail: str) -> np.ndarray:
    y0 = SIZE - CAPTION
    img[y0:] = BG
    cv2.line(img, (0, y0), (SIZE, y0), (70, 70, 70), 1)
    text(img, title, (14, y0 + 30), 0.72, (255, 255, 255), 2, shadow=False)
    text(img, detail, (14, y0 + 58), 0.46, (190, 190, 190), 1, shadow=False)
    return img


def boxes(img, faces, scale=1.0, offset=(0, 0), colour=BOX, numbers=False, thickness=2):
    for i, b in enumerate(faces.boxes.tolist()):
        x0, y0, x1, y1 = [round(v * scale) for v in b]
        x0, x1, y0, y1 = x0 - offset[0], x1 - offset[0], y0 - offset[1], y1 - offset[1]
        cv2.rectangle(img, (x0, y0), (x1, y1), colour, thickness, cv2.LINE_AA)
        if numbers:
            label(img, str(i), (x0 + 2, y0 - 4), 0.42)


def landmarks(img, faces, scale=1.0, offset=(0, 0), colour=(255, 80, 80)):
    for points in faces.landmarks.tolist():
        for x, y in points:
            cv2.circle(img, (round(x * scale - offset[0]), round(y * scale - offset[1])), 2, colour, -1,
                       cv2.LINE_AA)


def paste(dst, src, x, y):
    h, w = src.shape[:2]
    dst[y:y + h, x:x + w] = src


def fit(image: np.ndarray, width: int, height: int, interpolation=cv2.INTER_AREA) -> np.ndarray:
    return cv2.resize(image, (width, height), interpolation=interpolation)


def arrow(img, p0, p1, colour=(220, 220, 220)):
    cv2.arrowedLine(img, p0, p1, colour, 2, cv2.LINE_AA, tipLength=0.3)


def graph(img, steps: list[str], x: int, y: int, gap: int) -> list[tuple[int, int]]:
    """A row of node boxes joined by arrows, the last one (GPEN's) in blue; each box's left and right x."""
    spans = []
    for i, name in enumerate(steps):
        (w, _), _ = cv2.getTextSize(name, FONT, 0.45, 1)
        colour = (60, 90, 120) if i == len(steps) - 1 else (70, 70, 70)
        cv2.rectangle(img, (x, y), (x + w + 14, y + 30), colour, -1)
        text(img, name, (x + 7, y + 20), 0.45, shadow=False)
        spans.append((x, x + w + 14))
        x += w + 14
        if i < len(steps) - 1:
            arrow(img, (x + 3, y + 15), (x + gap - 3, y + 15))
            x += gap
    return spans

# ------------------------------------------------------------------------------------------ the pack

class Scene:
    """The photo, its faces, aligned crops and paste masks, computed once."""

    def __init__(self, photo: Path, detector: Path):
        rgb = cv2.cvtColor(cv2.imread(str(photo), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        self.rgb = rgb
        self.image = torch.from_numpy(rgb).float()[None] / 255
        self.detector = gpen.load_detector(detector, device="cpu")
        # 128 px crops are plenty for pictures this size; the crop size changes nothing else
        self.crops, self.info = gpen.locate_faces(self.image, self.detector, 128,
                                                  gpen.SelectOptions(threshold=0.5))
        self.faces = self.info.faces[0]
        # Paste the crops back unchanged: the image stays as it was, and the masks are GPEN's.
        _, masks = gpen.paste_faces(self.image, self.crops, self.info.affines, self.info.frames)
        self.mask = masks[0].numpy()

    def window(self, x0, y0, x1, y1):
        """Faces whose box lies inside the window, as a gpen Faces."""
        b = self.faces.boxes
        keep = (b[:, 0] >= x0) & (b[:, 1] >= y0) & (b[:, 2] <= x1) & (b[:, 3] <= y1)
        return self.faces[keep]


# ------------------------------------------------------------------------------------------ pictures

def restore_photo(s: Scene) -> np.ndarray:
    img = canvas()
    h, w = s.rgb.shape[:2]
    top_h = round(h * SIZE / w)  # the whole photo, 512 wide
    small = fit(s.rgb, SIZE, top_h)
    boxes(small, s.faces, SIZE / w, thickness=1)
    paste(img, small, 0, 0)
    label(img, f"{len(s.faces)} faces found", (8, 18))
    # a 2x zoom below: left as it is, right with the paste masks tinted
    x0, y0, zw, zh = 600, 130, 256, 105
    region = s.rgb[y0:y0 + zh, x0:x0 + zw]
    zoom = fit(region, 2 * zw, 2 * zh, cv2.INTER_CUBIC)
    mask = fit(s.mask[y0:y0 + zh, x0:x0 + zw], 2 * zw, 2 * zh, cv2.INTER_LINEAR)
    tinted = tint(zoom, mask)
    zoom[:, SIZE // 2:] = tinted[:, SIZE // 2:]
    y = top_h + 6
    paste(img, zoom[: SIZE - CAPTION - y], 0, y)
    cv2.line(img, (SIZE // 2, y), (SIZE // 2, SIZE - CAPTION), (255, 255, 255), 2)
    label(img, "photo", (8, y + 20))
    label(img, "what GPEN replaces", (SIZE // 2 + 8, y + 20))
    return caption(img, "Restore every face of a photo",
                   "GPEN Face Restore: detect, align, restore, paste back")


def modular(s: Scene) -> np.ndarray:
    img = canvas()
    top, x0, y0, zw = 250, 560, 40, 342  # 5 faces of the middle rows at 1.5x
    scale = SIZE / zw
    zh = round(top / scale)
    region = s.rgb[y0:y0 + zh, x0:x0 + zw]
    picked = gpen.select_faces(s.window(x0, y0, x0 + zw, y0 + zh), gpen.SelectOptions(order="left-right"))
    zoom = fit(region, SIZE, top, cv2.INTER_CUBIC)
    zoom = tint(zoom, fit(s.mask[y0:y0 + zh, x0:x0 + zw], SIZE, top, cv2.INTER_LINEAR), alpha=0.35)
    boxes(zoom, picked, scale, (round(x0 * scale), round(y0 * scale)), numbers=True)
    paste(img, zoom, 0, 0)
    label(img, "1 Detect and Crop Faces", (8, 18))
    # aligned crops as GPEN gets them, in the order above, then "restore" and "paste"
    order = [int(i) for i in torch.cdist(picked.boxes, s.faces.boxes).argmin(1)]
    tile, gap = 92, 8
    y = top + 34
    label(img, "aligned crops (GPEN's input)", (8, top + 22))
    for k, i in enumerate(order[:5]):
        crop = fit(to_uint8(s.crops[i]), tile, tile, cv2.INTER_AREA)
        x = 8 + k * (tile + gap)
        paste(img, crop, x, y)
        label(img, str(k), (x + 4, y + 16), 0.42)
    y2 = y + tile + 26
    text(img, "2 GPEN Restore Faces -> 3 Paste Faces Back", (8, y2), 0.48)
    text(img, "through the blend mask (blue above)", (8, y2 + 24), 0.46, (190, 190, 190))
    return caption(img, "Detect, restore and paste, step by step",
                   "crops, restored crops and the blend mask on show")


def large_portrait(s: Scene) -> np.ndarray:
    img = canvas()
    # one sitter (the photo's centre, Einstein) as a portrait: 256 px around his face, upscaled
    cx, cy, half = 723, 235, 110
    region = s.rgb[cy - half:cy + half, cx - half:cx + half]
    side = SIZE - CAPTION
    big = fit(region, side, side, cv2.INTER_CUBIC)
    portrait = torch.from_numpy(big).float()[None] / 255
    # what the workflow asks for: one face, the largest, over the detector's own threshold
    found = s.detector.detect(portrait, threshold=0.3)[0]
    bar = s.detector.threshold
    chosen = gpen.select_faces(found[found.scores >= bar], gpen.SelectOptions(max_faces=1, order="largest"))
    crops, info = gpen.locate_faces(portrait, s.detector, 128, faces=[chosen])
    _, masks = gpen.paste_faces(portrait, crops, info.affines, info.frames)
    shown = tint(big, masks[0].numpy(), alpha=0.35)
    others = found[found.scores < bar]
    boxes(shown, others, colour=GREY, thickness=1)
    boxes(shown, chosen)
    x = (SIZE - side) // 2
    paste(img, shown, x, 0)
    b = chosen.boxes[0].tolist() if len(chosen) else [0, 0, 0, 0]
    label(img, f"score {chosen.scores[0]:.2f}, largest" if len(chosen) else "no face", (x + int(b[0]), int(b[1]) - 8))
    label(img, f"max_faces 1, order largest, threshold {bar:g} (the detector's)", (x + 8, 20))
    return caption(img, "One large face with GPEN-BFR-2048",
                   "for portraits ~2048 px; faces under min_size 256 are skipped")


def video(s: Scene) -> np.ndarray:
    img = canvas()
    cw, ch, x0, y0, step = 240, 180, 440, 70, 40
    frames = torch.stack([s.image[0, y0:y0 + ch, x0 + i * step:x0 + i * step + cw] for i in range(4)])
    faces = detect_faces(frames, s.detector, gpen.SelectOptions(threshold=0.5, temporal_sigma=2.0))
    crops, info = gpen.locate_faces(frames, s.detector, 128, faces=faces)
    _, masks = gpen.paste_faces(frames, crops, info.affines, info.frames)
    tw, th = 248, 186
    for i in range(4):
        frame = fit(to_uint8(frames[i]), tw, th, cv2.INTER_CUBIC)
        frame = tint(frame, fit(masks[i].numpy(), tw, th, cv2.INTER_LINEAR), alpha=0.35)
        landmarks(frame, faces[i], tw / cw)
        x, y = 6 + (i % 2) * (tw + 4), 8 + (i // 2) * (th + 4)
        cv2.rectangle(img, (x - 2, y - 2), (x + tw + 1, y + th + 1), (90, 90, 90), 2)
        paste(img, frame, x, y)
        label(img, f"frame {i + 1}", (x + 6, y + 18), 0.42)
    text(img, "landmarks steadied over time (temporal_smoothing 2)", (8, 8 + 2 * (th + 4) + 22), 0.46)
    return caption(img, "Restore a video, steadily",
                   "every frame, faces batched across frames; sound and fps kept")


def after_reactor(s: Scene) -> np.ndarray:
    img = canvas()
    x0, y0, w, h = 590, 130, 330, 140
    target = s.image[:, y0:y0 + h, x0:x0 + w]
    crops, info = gpen.locate_faces(target, s.detector, 128,
                                    gpen.SelectOptions(threshold=0.5, order="left-right"))
    # A stand-in for the swap: the leftmost face's crop pasted over the second face with the pack's
    # paste-back (ReActor is not used here).
    swapped, _ = gpen.paste_faces(target, crops[:1], info.affines[1:2], info.frames[:1],
                                  gpen.PasteOptions(mask_shape="ellipse"))
    changed, cinfo = gpen.locate_faces(swapped, s.detector, 128, gpen.SelectOptions(changed_from=target),
                                      faces=info.faces)
    _, masks = gpen.paste_faces(swapped, changed, cinfo.affines, cinfo.frames)
    tw, th = SIZE - 16, round((SIZE - 16) * h / w)
    sc = tw / w
    before = fit(to_uint8(target[0]), tw, th, cv2.INTER_CUBIC)
    after = tint(fit(to_uint8(swapped[0]), tw, th, cv2.INTER_CUBIC), fit(masks[0].numpy(), tw, th), alpha=0.4)
    kept = [i for i in range(len(info.faces[0])) if not any(
        torch.equal(info.faces[0].boxes[i], b) for b in cinfo.faces[0].boxes)]
    boxes(after, info.faces[0][torch.tensor(kept, dtype=torch.long)], sc, colour=GREY, thickness=1)
    boxes(after, cinfo.faces[0], sc, colour=CHANGED)
    paste(img, before, 8, 6)
    label(img, "target image (original_image)", (14, 24))
    y = 6 + th + 10
    paste(img, after, 8, y)
    label(img, f"after the swap: {len(cinfo)} of {len(info)} faces changed, only they are restored", (14, y + 18), 0.4)
    return caption(img, "Restore the faces a swap changed",
                   "after ReActor (swap stand-in: another face pasted by the pack)")


def after_txt2img(s: Scene) -> np.ndarray:
    img = canvas()
    graph(img, ["Checkpoint", "KSampler", "VAE Decode", "GPEN Face Restore"], 10, 12, gap=22)
    text(img, '"portrait photo of an elderly fisherman, natural light"', (10, 72), 0.45, (200, 200, 160))
    # a generated portrait would go here; a face of the photo shows what GPEN does to it
    cx, cy, half = 844, 222, 60
    region = s.rgb[cy - half:cy + half, cx - half:cx + half]
    side = 240
    face = fit(region, side, side, cv2.INTER_CUBIC)
    mask = fit(s.mask[cy - half:cy + half, cx - half:cx + half], side, side)
    y = 92
    paste(img, face, 10, y)
    paste(img, tint(face, mask, alpha=0.45), SIZE - side - 10, y)
    label(img, "decoded image", (16, y + 18), 0.42)
    label(img, "GPEN's paste mask", (SIZE - side - 4, y + 18), 0.42)
    text(img, "(face from the Solvay photo, for illustration)", (10, y + side + 22), 0.42, (170, 170, 170))
    return caption(img, "Text to image, then GPEN on its faces",
                   "needs an SD 1.5 checkpoint; any KSampler graph works")


def occlusion(s: Scene) -> np.ndarray:
    img = canvas()
    i = int(torch.cdist(torch.tensor([[702.0, 192, 745, 248]]), s.faces.boxes).argmin())
    crop, _ = gpen.crop_faces(s.image, s.faces.landmarks[i:i + 1], 160)
    side = 160
    face = to_uint8(crop[0])
    # a drawn occluder (a microphone) in front of the chin
    occ = np.zeros((side, side), np.uint8)
    cv2.line(occ, (side - 20, side), (side // 2 + 6, side * 2 // 3 + 4), 255, 14, cv2.LINE_AA)
    cv2.circle(occ, (side // 2 + 6, side * 2 // 3 + 4), 15, 255, -1, cv2.LINE_AA)
    occluded = face.copy()
    occluded[occ > 127] = (45, 45, 50)
    box = face_mask(side, "box").numpy()
    parse = face_mask(side, "ellipse", erode=0.16, feather=0.03).numpy() * (1 - cv2.GaussianBlur(
        occ.astype(np.float32) / 255, (0, 0), 2))
    panels = [(occluded, "face + occluder"), (tint(occluded, box), "box mask"), (tint(occluded, parse), "parse mask")]
    y = 40
    for k, (p, name) in enumerate(panels):
        x = 8 + k * (side + 8)
        paste(img, p, x, y)
        label(img, name, (x + 4, y - 10), 0.45)
    y2 = y + side + 30
    lines = ["Load Face Parser (parsing_bisenet.pth) limits GPEN to",
             "the face itself: hair, hands, microphones keep the",
             "original pixels. mask_regions picks the parts.",
             "(masks drawn to illustrate; no parser output shown)"]
    for k, line in enumerate(lines):
        text(img, line, (10, y2 + k * 24), 0.48, (170, 170, 170) if k == 3 else (225, 225, 225))
    return caption(img, "Occlusion-aware restoration",
                   "a face parser keeps what covers the face")


def restore_and_upscale(s: Scene) -> np.ndarray:
    img = canvas()
    # the graph, drawn: the original goes to the upscaler and, as image, to GPEN too
    y = 24
    (load, _), (_, upscaled), (gpen_x, _) = graph(img, ["Load Image", "Upscale Image x4", "GPEN Face Restore"], 10, y,
                                                  gap=44)
    text(img, "background", (upscaled - 16, y - 6), 0.38, (190, 190, 190))
    below = y + 42
    cv2.polylines(img, [np.array([(load + 40, y + 31), (load + 40, below), (gpen_x + 60, below)])], False,
                  (220, 220, 220), 2, cv2.LINE_AA)
    arrow(img, (gpen_x + 60, below), (gpen_x + 60, y + 34))
    text(img, "image: the faces are found in the original", (load, below + 16), 0.38, (190, 190, 190))
    # a 1024 px portrait (a sitter of the photo, enlarged) and its 4x upscale (Lanczos: upscale_by)
    cx, cy, half = 723, 232, 88
    portrait = fit(s.rgb[cy - half:cy + half, cx - half:cx + half], 1024, 1024, cv2.INTER_CUBIC)
    image = torch.from_numpy(portrait).float()[None] / 255
    crops, info = gpen.locate_faces(image, s.detector, 128, gpen.SelectOptions(threshold=0.8, max_faces=1))
    scale = 4
    output, masks = gpen.paste_faces(image, crops, info.affines, info.frames, gpen.PasteOptions(upscale_by=scale))
    crop_px = scale * 128 / float(info.affines[0, :, :2].det().abs().sqrt())  # the face's crop at the output
    y0 = below + 26
    side = SIZE - CAPTION - y0 - 4
    small = side // scale
    big = tint(fit(to_uint8(output[0]), side, side), fit(masks[0].numpy(), side, side), alpha=0.35)
    # the aligned crop's square, where it lands in the output
    corners = np.array([[0, 0], [128, 0], [128, 128], [0, 128]], np.float64)
    inverse = cv2.invertAffineTransform(info.affines[0].double().numpy())
    square = (corners @ inverse[:, :2].T + inverse[:, 2]) * side / 1024
    cv2.polylines(big, [square.round().astype(np.int32)], True, BOX, 2, cv2.LINE_AA)
    x_big = SIZE - side - 8
    paste(img, big, x_big, y0)
    label(img, f"output: 4096 px (4x), face crop ~{crop_px:.0f} px", (x_big + 6, y0 + 18), 0.42)
    label(img, "GPEN-BFR-2048 fits it", (x_big + 6, y0 + 40), 0.42)
    thumb = fit(portrait, small, small)
    boxes(thumb, info.faces[0], small / 1024)
    paste(img, thumb, 8, y0)
    text(img, "image: 1024 px", (8, y0 + small + 18), 0.4)
    rows = ["crop at output", "~256: GPEN-256", "~512: GPEN-512", "~1024: GPEN-1024", "~2048: GPEN-2048"]
    for k, row in enumerate(rows):
        text(img, row, (8, y0 + small + 50 + k * 20), 0.4, (190, 190, 190) if k == 0 else (235, 235, 235))
    return caption(img, "Restore and upscale with GPEN-BFR-2048",
                   "faces found in the original, pasted into the 4x image (Lanczos here)")


def inside_facedetailer(s: Scene) -> np.ndarray:
    img = canvas()
    graph(img, ["FaceDetailer", "BBOX Detector (SEGS)", "GPEN Restore SEGS"], 10, 10, gap=22)
    text(img, "both find the faces with GPEN Face Detector for FaceDetailer", (10, 62), 0.45, (200, 200, 160))
    # the segments as FaceDetailer asks for them (bbox_threshold 0.5, dilation 10, crop_factor 3, drop_size 10)
    segs = gpen.FaceSegmentDetector(s.detector).detect(s.image, 0.5, 10, 3.0, 10)
    pasted = gpen.restore_segs(s.image, segs, IdentityRestorer(128)).masks[0].numpy()
    x0, y0, w, h, top = 645, 108, 300, 214, 76  # four sitters of the middle rows
    scale = SIZE / w
    zoom = fit(s.rgb[y0:y0 + h, x0:x0 + w], SIZE, round(h * scale), cv2.INTER_CUBIC)
    zoom = tint(zoom, fit(pasted[y0:y0 + h, x0:x0 + w], SIZE, round(h * scale), cv2.INTER_LINEAR), alpha=0.4)

    def on_zoom(x, y):
        return round((x - x0) * scale), round((y - y0) * scale)

    for seg in segs[1]:
        bx0, by0, bx1, by1 = (float(v) for v in seg.bbox)
        if bx0 >= x0 and by0 >= y0 and bx1 <= x0 + w and by1 <= y0 + h:  # crop regions of the whole faces only
            cx0, cy0, cx1, cy1 = seg.crop_region
            cv2.rectangle(zoom, on_zoom(cx0, cy0), on_zoom(cx1 - 1, cy1 - 1), (255, 255, 255), 1, cv2.LINE_AA)
        cv2.rectangle(zoom, on_zoom(bx0, by0), on_zoom(bx1, by1), BOX, 2, cv2.LINE_AA)
    bottom = SIZE - CAPTION
    paste(img, zoom[:bottom - top], 0, top)
    label(img, "amber: the faces found", (8, bottom - 54), 0.4)
    label(img, "white: their crop regions at crop_factor 3, which FaceDetailer re-draws", (8, bottom - 32), 0.4)
    label(img, "blue: where GPEN Restore SEGS pastes (the segments' masks)", (8, bottom - 10), 0.4)
    return caption(img, "GPEN inside FaceDetailer", "needs the Impact Pack and SD 1.5; FaceDetailer not run here")


PICTURES = {
    "gpen_restore_photo": restore_photo,
    "gpen_modular_detect_restore_paste": modular,
    "gpen_large_portrait_2048": large_portrait,
    "gpen_video_temporal_smoothing": video,
    "gpen_after_reactor_swap": after_reactor,
    "gpen_after_txt2img": after_txt2img,
    "gpen_occlusion_aware": occlusion,
    "gpen_restore_and_upscale": restore_and_upscale,
    "gpen_inside_facedetailer": inside_facedetailer,
}


def main() -> int:
    shared = Path(os.environ.get("GPEN_SHARED", ROOT.parent / "shared"))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photo", type=Path, default=shared / "images" / "solvay_1927.png")
    p.add_argument("--detector", type=Path, default=shared / "models" / "retinaface_mobilenet0.25.pth")
    p.add_argument("--out", type=Path, default=ROOT / "workflows")
    p.add_argument("--only", nargs="*", default=[], help="workflow names (or parts of them)")
    p.add_argument("--quality", type=int, default=82, help="JPEG quality")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    names = [n for n in PICTURES if not args.only or any(o in n for o in args.only)]
    missing = [n for n in PICTURES if not (ROOT / "workflows" / f"{n}.json").exists()]
    if missing:
        print(f"warning: no workflow for {', '.join(missing)}", file=sys.stderr)
    extra = sorted(p.stem for p in (ROOT / "workflows").glob("*.json") if p.stem not in PICTURES)
    if extra:
        print(f"warning: no picture for {', '.join(extra)}: add one to PICTURES", file=sys.stderr)
    scene = Scene(args.photo, args.detector)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        picture = PICTURES[name](scene)
        path = args.out / f"{name}.jpg"
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR),
                                [cv2.IMWRITE_JPEG_QUALITY, args.quality, cv2.IMWRITE_JPEG_OPTIMIZE, 1,
                                 cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
        assert ok
        path.write_bytes(data.tobytes())
        print(f"{path} {picture.shape[1]}x{picture.shape[0]} {len(data) / 1024:.0f} KiB")
    return 1 if missing or extra else 0


if __name__ == "__main__":
    sys.exit(main())
