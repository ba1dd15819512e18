"""Helpers the tests share: small random-weight networks."""

import gc
import weakref

import torch

from gpen import GPEN
from gpen.faces.restore import IdentityRestorer


def random_gpen(size: int = 32, channel_multiplier: float = 1, narrow: float = 0.125, seed: int = 0) -> GPEN:
    """A small GPEN with every weight random, noise strengths and biases included."""
    torch.manual_seed(seed)
    model = GPEN(size, channel_multiplier=channel_multiplier, narrow=narrow).eval().requires_grad_(False)
    for name, p in model.named_parameters():
        if name.endswith(("noise.weight", "bias")):
            p.add_(torch.randn_like(p) * 0.2)
    return model


class GreyRestorer(IdentityRestorer):
    """A restorer whose every face is flat grey, so that what it touched is plain to see."""

    def restore(self, faces, batch_size=4, on_batch=None):
        return torch.full_like(super().restore(faces, batch_size, on_batch), 0.5)



class ForgetfulRestorer:
    """Restores nothing (hands back copies of the crops), remembering how large a block of memory each batch
    it was given lies in, and the crops themselves only weakly."""

    def __init__(self, size: int = 64, remember: bool = True):
        self.size, self.remember = size, remember
        self.seen = []  # copies of the crops it was given, if it is to remember them
        self.held_bytes = []  # the bytes of the memory block each batch of crops given lies in
        self.given = []  # weak references to the crops given and the faces handed back
        self.alive = []  # at each batch, how many crops given or faces handed back before are still held

    def restore(self, faces, batch_size=4, on_batch=None):
        gc.collect()
        self.alive.append(sum(ref() is not None for ref in self.given))
        if self.remember:
            self.seen.append(faces.clone())
        self.held_bytes.append(faces.untyped_storage().nbytes())
        restored = faces.clone()
        self.given += [weakref.ref(faces), weakref.ref(restored)]
        return restored

class SplitParser:
    """Stands in for a face parser: class `first` on one half of every crop and `second` on the other,
    the top and bottom halves with `rows`, else left and right. It keeps the crops it was shown, if it is to
    remember them."""

    size = 64

    def __init__(self, first: int, second: int, rows: bool = False, remember: bool = True):
        self.first, self.second, self.rows, self.remember = first, second, rows, remember
        self.seen = []

    def logits(self, crops):
        if self.remember:
            self.seen.append(crops.clone())
        n, s = crops.shape[:2]
        logits = torch.zeros(n, 19, s, s)
        halves = (slice(None, s // 2), slice(s // 2, None))
        for cls, half in zip((self.first, self.second), halves):
            logits[(slice(None), cls, half) if self.rows else (slice(None), cls, slice(None), half)] = 5
        return logits


def psnr(a, b) -> float:
    return float(10 * torch.log10(1 / (a.float() - b.float()).square().mean()))


def export_fake_scrfd(path, face_cell=(6, 9), stride=32, distances=(2.0, 2.5, 2.0, 3.0)) -> tuple:
    """An ONNX file shaped like insightface's SCRFD *_bnkps models (9 outputs, strides 8/16/32, two
    anchors) that reports one face, at a cell of the stride-32 level. Returns its box and landmarks
    in 640x640 input pixels."""
    rows = {s: (640 // s) ** 2 * 2 for s in (8, 16, 32)}
    level = {8: 0, 16: 1, 32: 2}[stride]
    anchor = (face_cell[0] * (640 // stride) + face_cell[1]) * 2
    scores = [torch.full((1, n, 1), 0.01) for n in rows.values()]
    scores[level][0, anchor, 0] = 0.95
    boxes = [torch.ones(1, n, 4) for n in rows.values()]
    boxes[level][0, anchor] = torch.tensor(distances)
    offsets = torch.tensor([[-1.0, -0.5], [1.0, -0.5], [0.0, 0.3], [-0.8, 1.2], [0.8, 1.2]])
    points = [torch.zeros(1, n, 10) for n in rows.values()]
    points[level][0, anchor] = offsets.flatten()

    class FakeScrfd(torch.nn.Module):
        def forward(self, x):
            zero = x.mean() * 0
            return tuple(t + zero for t in scores + boxes + points)

    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in (8, 16, 32)]
    torch.onnx.export(FakeScrfd(), (torch.zeros(1, 3, 640, 640),), path, input_names=["input.1"],
                      output_names=names, dynamo=False)
    centre = torch.tensor([face_cell[1] * stride, face_cell[0] * stride], dtype=torch.float32)
    l, t, r, b = (d * stride for d in distances)
    box = torch.tensor([centre[0] - l, centre[1] - t, centre[0] + r, centre[1] + b])
    return box, centre + offsets * stride


def mux_tone(out, sound, samples: int, until: float) -> int:
    """Encode a 440 Hz stereo tone into the PyAV stream `sound` of `out`, from sample `samples` up to
    `until` seconds at 48 kHz; returns the sample reached."""
    import av
    import numpy as np

    while samples < 48000 * until:
        n = sound.frame_size or 1024
        wave = (0.3 * np.sin(2 * np.pi * 440 * (samples + np.arange(n)) / 48000)).astype(np.float32)
        chunk = av.AudioFrame.from_ndarray(np.stack([wave, wave]), format="fltp", layout="stereo")
        chunk.sample_rate, chunk.pts = 48000, samples
        out.mux(sound.encode(chunk))
        samples += n
    return samples
