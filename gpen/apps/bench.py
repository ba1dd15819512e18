"""`python -m gpen bench`: time the GPEN forward pass; prints one JSON table (a list of rows).

Each configuration runs in a fresh subprocess so that its peak memory is its own. Weights are random
in the layout of the real checkpoint of each size unless --checkpoint names a file.

`bench --upscaler` times the upscalers' forward (ours: the CPU fast path) against the plain forward
of the same weights (the reference architecture's computation), a tile at a time.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import torch

from ..archs.gpen.network import GPEN
from ..archs.rrdbnet import RRDBNet
from ..archs.srvgg import SRVGGNetCompact
from ..devices import resolve_device, resolve_dtype
from ..faces.align import warp
from ..faces.options import MaskOptions
from ..faces.pipeline import restore_faces
from ..faces.restore import IdentityRestorer
from ..files.catalogue import resolve
from ..files.images import read_image
from ..files.weights import first_line
from ..loader import load_detector, load_model, load_upscaler
from .jobs import keep_freed_memory

STANDARD_CONFIGS = {256: (1, 0.5), 512: (2, 1), 1024: (2, 1), 2048: (2, 1)}
# Random weights in the released files' layouts: RealESRGAN_x4plus.pth and realesr-general-x4v3.pth.
STANDARD_UPSCALERS = {"rrdbnet": lambda: RRDBNet(3, 3, scale=4, num_feat=64, num_block=23, num_grow_ch=32),
                      "srvgg": lambda: SRVGGNetCompact(3, 3, num_feat=64, num_conv=32, upscale=4)}
PARITY_SIDE = 48  # pixels a side of the input on which ours is compared with the plain forward


def run(args) -> int:
    if args.upscaler is not None:
        return run_upscalers(args)
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    sizes = args.sizes or ([256, 512, 1024, 2048] if on_gpu else [512])
    dtypes = args.dtypes or (["fp32", "fp16", "bf16"] if on_gpu else ["fp32"])
    if args.pipeline:
        if not args.image:
            raise ValueError("bench --pipeline needs --image PHOTO: a photo with several faces")
        detector = resolve(args.detector, "detector", args.models_dir)
        if args.memory:
            return print_table([row for size in sizes for row in
                                pipeline_memory_rows(args.image, detector, size, device, args.system_allocator)])
        turned = args.rotations != ["none"]
        total = (2 + turned) * len(sizes) * len(dtypes) * len(args.rotations)  # pipeline_scenes makes 2 or 3
        rows = []
        for scene, frames in pipeline_scenes(args.image, detector, args.frames, turned):
            for size, dtype, rotations in itertools.product(sizes, dtypes, args.rotations):
                print(f"[{len(rows) + 1}/{total}] {scene}: GPEN-{size} {dtype}, rotations {rotations}, "
                      f"{args.repeat} run(s) after a warm-up", file=sys.stderr, flush=True)
                rows.append(pipeline_row(scene, frames, size, device, dtype, detector, rotations, args))
        return print_table(rows)
    if args.one:
        row = measure(sizes[0], device, dtypes[0], args.batch[0], args.repeat, args.compile, args.checkpoint)
        print(json.dumps(dict(row, allocator="system" if args.system_allocator else "heap")))
        return 0
    rows = []
    for size in sizes:
        for dtype in dtypes:
            for batch in args.batch:
                cmd = [sys.executable, "-m", "gpen", "bench", "--one", "--sizes", str(size), "--device", str(device),
                       "--dtypes", dtype, "--batch", str(batch), "--repeat", str(args.repeat)]
                cmd += ["--compile"] * args.compile + ["--system-allocator"] * args.system_allocator
                cmd += ["--checkpoint", args.checkpoint] if args.checkpoint else []
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    rows.append(dict(size=size, device=str(device), dtype=dtype, batch=batch,
                                     error=(done.stderr.strip().splitlines() or ["failed"])[-1]))
                else:
                    rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return print_table(rows)


def run_upscalers(args) -> int:
    """Each upscaler and tile size, ours and the plain forward each in its own process, alternating
    which goes first, for `--rounds` rounds; a row per configuration with the medians of the rounds."""
    device = resolve_device(args.device)
    if args.one:
        print(json.dumps(measure_upscaler(args.upscaler[0], args.tile_size[0], device, args.forward, args.repeat)))
        return 0
    configs = [(name, tile) for name in args.upscaler or list(STANDARD_UPSCALERS) for tile in args.tile_size]
    runs: dict[tuple, dict[str, list[dict]]] = {config: {"plain": [], "ours": []} for config in configs}
    for round_ in range(args.rounds):
        for config in configs:
            for forward in ("plain", "ours")[::1 if round_ % 2 == 0 else -1]:
                cmd = [sys.executable, "-m", "gpen", "bench", "--one", "--upscaler", config[0], "--tile-size",
                       str(config[1]), "--forward", forward, "--device", str(device), "--repeat", str(args.repeat)]
                cmd += ["--system-allocator"] * args.system_allocator
                done = subprocess.run(cmd, capture_output=True, text=True)
                runs[config][forward].append(json.loads(done.stdout.strip().splitlines()[-1]) if not done.returncode
                                             else {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]})
    return print_table([upscaler_row(name, tile, runs[name, tile]) for name, tile in configs])


def upscaler_row(name: str, tile: int, runs: dict[str, list[dict]]) -> dict:
    failed = [r["error"] for forward in runs.values() for r in forward if "error" in r]
    if failed:
        return dict(upscaler=name, tile=tile, error=failed[0])
    ours, plain = (median([r["ms_per_tile"] for r in runs[forward]]) for forward in ("ours", "plain"))
    ours_cpu, plain_cpu = (median([r["cpu_ms_per_tile"] for r in runs[forward]]) for forward in ("ours", "plain"))
    first = runs["ours"][0]
    megapixels = first["side"] ** 2 / 1e6
    return dict(upscaler=first["upscaler"], tile=first["side"], device=first["device"], cpu=first["cpu"],
                plain_ms_per_tile=round(plain, 1), ours_ms_per_tile=round(ours, 1),
                plain_ms_per_input_megapixel=round(plain / megapixels),
                ours_ms_per_input_megapixel=round(ours / megapixels),
                plain_over_ours=round(plain / ours, 2),
                plain_cpu_ms_per_tile=round(plain_cpu, 1), ours_cpu_ms_per_tile=round(ours_cpu, 1),
                plain_over_ours_cpu_time=round(plain_cpu / ours_cpu, 2),
                rounds={forward: [r["ms_per_tile"] for r in runs[forward]] for forward in ("plain", "ours")},
                peak_memory_mib={forward: max(r["peak_memory_mib"] for r in runs[forward]) for forward in runs},
                max_relative_difference=max(r["max_relative_difference"] for r in runs["ours"]))


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def bench_upscaler(name: str, device: torch.device) -> torch.nn.Module:
    """rrdbnet or srvgg (random weights in the released files' layouts), or an upscaler file."""
    if name in STANDARD_UPSCALERS:
        return STANDARD_UPSCALERS[name]().to(device).eval().requires_grad_(False)
    return load_upscaler(name, device=device).network


def measure_upscaler(name: str, tile: int, device: torch.device, forward: str, repeat: int) -> dict:
    """The median of `repeat` passes on a tile-sized input after a warm-up; ours also says how far it
    is from the plain forward on a small input."""
    network = bench_upscaler(name, device)
    run = network.plain_forward if forward == "plain" else network
    side = -(-tile // network.multiple) * network.multiple  # the pixel-unshuffle's multiple
    x = torch.rand(1, 3, side, side, device=device, generator=torch.Generator(device).manual_seed(0))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, cpu_times = [], []  # the CPU time of the process: what other work on the machine disturbs least
    with torch.inference_mode():
        run(x)
        for _ in range(repeat):
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            run(x)
            sync()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        difference = None
        if forward == "ours":
            small = x[:, :, :PARITY_SIDE, :PARITY_SIDE]
            plain = network.plain_forward(small)
            difference = float((network(small) - plain).abs().max() / (plain.max() - plain.min()))
    return dict(upscaler=f"{type(network).__name__} {network.scale}x ({name})", side=side, device=device_name(device),
                cpu=cpu_name(), ms_per_tile=round(median(times) * 1e3, 1),
                cpu_ms_per_tile=round(median(cpu_times) * 1e3, 1), peak_memory_mib=round(peak_mib(device)),
                max_relative_difference=difference)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def cpu_name() -> str:
    """The CPU's model (Linux) and the instruction set torch's CPU kernels use (AVX2, AVX512)."""
    models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("model name")] if Path("/proc/cpuinfo").is_file() else []
    return f"{models[0] if models else 'unknown CPU'}, {torch.backends.cpu.get_cpu_capability()}"


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    import resource  # Unix only: imported here so that the CLI loads on Windows

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def print_table(rows: list[dict]) -> int:
    """Print the rows; the exit status is 1 when any failed, since the table is then incomplete."""
    print(json.dumps(rows, indent=1))
    return 0 if all("error" not in r for r in rows) else 1


def bench_model(size: int, device: torch.device, dtype: str, checkpoint: str | None):
    """The checkpoint, or random weights in the layout of the real checkpoint of that size."""
    if checkpoint:
        return load_model(checkpoint, device=device, dtype=dtype).network
    cm, narrow = STANDARD_CONFIGS.get(size, (2, 1))
    model = GPEN(size, channel_multiplier=cm, narrow=narrow)
    return model.to(device, resolve_dtype(dtype)).eval().requires_grad_(False)


def measure(size: int, device: torch.device, dtype: str, batch: int, repeat: int, compile: bool,
            checkpoint: str | None) -> dict:
    model = bench_model(size, device, dtype, checkpoint)
    size = model.size
    forward = torch.compile(model) if compile else model
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        forward(x)
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            forward(x)
            sync()
            times.append(time.perf_counter() - start)
    return dict(size=size, device=device_name(device), dtype=dtype, batch=batch,
                ms_per_face=round(min(times) * 1e3 / batch, 1),
                ms_per_face_median=round(median(times) * 1e3 / batch, 1),
                peak_memory_mib=round(peak_mib(device)), compile=compile)


def pipeline_scenes(image_path: str, detector_path: Path, frames: int, turned: bool = False):
    """A 1080p frame with one large face, and the group photo itself (and, if `turned`, the group photo
    turned 90 degrees, as a phone held sideways takes it), each repeated `frames` times."""
    photo = torch.from_numpy(read_image(image_path)[0]).float()
    detector = load_detector(detector_path, device="cpu")
    (faces,) = detector.detect(photo[None])
    if not len(faces):
        raise ValueError(f"{image_path}: no face found to build the 1080p scene from")
    largest = faces[((faces.boxes[:, 2:] - faces.boxes[:, :2]).prod(1)).argmax()]
    zoom = 400 / float(largest.boxes[2] - largest.boxes[0])  # the face ~400 px wide, as in a close shot
    centre = (largest.boxes[:2] + largest.boxes[2:]) / 2
    affine = torch.tensor([[[zoom, 0, 960 - zoom * centre[0]], [0, zoom, 540 - zoom * centre[1]]]], dtype=torch.float64)
    x0, y0, x1, y1 = largest.boxes.tolist()
    alone = torch.zeros_like(photo)  # only this face: its neighbours would be restored too
    half = max(x1 - x0, y1 - y0) * 0.3
    ys, xs = slice(max(0, int(y0 - half)), int(y1 + half)), slice(max(0, int(x0 - half)), int(x1 + half))
    alone[ys, xs] = photo[ys, xs]
    close_up = warp(alone.permute(2, 0, 1), affine, 1080, 1920)[0].permute(1, 2, 0).clamp(0, 1)
    yield "1080p, one face", close_up[None].expand(frames, -1, -1, -1).contiguous()
    yield f"{Path(image_path).name}, {len(faces)} faces", photo[None].expand(frames, -1, -1, -1).contiguous()
    if turned:
        sideways = photo.rot90(1, (0, 1))[None]
        yield f"{Path(image_path).name} turned 90 degrees", sideways.expand(frames, -1, -1, -1).contiguous()


def pipeline_row(scene: str, images: torch.Tensor, size: int, device: torch.device, dtype: str, detector_path: Path,
                 rotations: str, args) -> dict:
    """One scene's stage timings, or the row with the error that stopped it (out of memory, say)."""
    try:
        return time_pipeline(scene, images, size, device, dtype, detector_path, rotations, args)
    except Exception as e:  # like a failed subprocess of the plain table: the row says why
        return dict(scene=scene, size=size, device=str(device), dtype=dtype, rotations=rotations,
                    error=f"{type(e).__name__}: {first_line(e)}")


def time_pipeline(scene: str, images: torch.Tensor, size: int, device: torch.device, dtype: str, detector_path: Path,
                  rotations: str, args) -> dict:
    model = bench_model(size, device, dtype, args.checkpoint)
    detector = load_detector(detector_path, device=device, rotations=rotations)
    restore_faces(images, model, detector, face_batch=args.batch[0])  # warm-up
    best: dict | None = None
    for _ in range(args.repeat):
        result = restore_faces(images, model, detector, face_batch=args.batch[0])
        if best is None or sum(result.timings.values()) < sum(best.values()):
            best = result.timings
    total = sum(best.values())
    return dict(scene=scene, frames=len(images), faces=result.face_count, size=model.size, device=str(device),
                dtype=dtype, rotations=rotations, **{f"{k}_ms": round(v * 1e3, 1) for k, v in best.items()},
                total_ms=round(total * 1e3, 1), fps=round(len(images) / total, 2),
                outside_gpen=f"{100 * (1 - best.get('restore', 0) / total):.1f}%")  # (no face: no restore stage)


class _EllipseParser:
    """A face parser that finds skin (class 1) in an ellipse in the middle of each crop, as 19 logits like
    a region parser's, so that only the pipeline around the parser is measured."""

    size = 512

    def logits(self, crops: torch.Tensor) -> torch.Tensor:
        side = crops.shape[1]
        axis = torch.linspace(-1, 1, side, device=crops.device)
        inside = axis[:, None].square() / 0.8 ** 2 + axis[None, :].square() / 0.6 ** 2 <= 1
        logits = torch.zeros(len(crops), 19, side, side, device=crops.device)
        logits[:, 1] = inside.float()
        return logits


MEMORY_FRAMES = ((6000, 4000), (6000, 6000), (10000, 10000))  # (W, H) of the frames measured


def pipeline_memory_rows(image_path: str, detector_path: Path, size: int, device: torch.device,
                         system_allocator: bool) -> list[dict]:
    """pipeline_memory for each frame of MEMORY_FRAMES, scene and parse mask, each in a process of its own
    (spawned: memory freed by one figure's work must not count in the next)."""
    rows = []
    for frame_size in MEMORY_FRAMES:
        for scene in ("group photo", "close-up"):
            for parse in (False, True):
                config = dict(scene=f"{frame_size[0]}x{frame_size[1]} frame, {scene}", parse_mask=parse)
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as one:
                    try:
                        rows.append(one.submit(pipeline_memory, image_path, detector_path, size, str(device),
                                               frame_size, scene, parse, system_allocator).result())
                    except Exception as e:  # the row says why, as pipeline_row does
                        rows.append(dict(config, error=f"{type(e).__name__}: {first_line(e)}"))
    return rows


def pipeline_memory(image_path: str, detector_path: Path, size: int, device: str, frame_size: tuple[int, int],
                    scene: str = "group photo", parse: bool = False, system_allocator: bool = True) -> dict:
    """Peak resident memory of restore_faces beyond its input (Linux: VmHWM), on a float32 frame of
    `frame_size` (W, H) holding the group photo, or with "close-up" the part of it around its largest face
    (five times that face's width), enlarged as far as the frame allows. With `parse`, a stand-in parser."""
    if not system_allocator:
        keep_freed_memory()  # as the CLI does for itself
    photo = read_image(image_path)[0][..., :3]
    detector = load_detector(detector_path, device=device)
    if scene == "close-up":
        photo = around_largest_face(photo, detector)
    width, height = frame_size
    scale = min(width / photo.shape[1], height / photo.shape[0])
    frame = torch.zeros(1, height, width, 3)
    resized = torch.from_numpy(cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC))
    frame[0, :resized.shape[0], :resized.shape[1]] = resized.clamp_(0, 1)
    del resized
    masks = MaskOptions(parser=_EllipseParser()) if parse else MaskOptions()
    Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from what is resident now
    before = _resident_mib("VmRSS")
    result = restore_faces(frame, IdentityRestorer(size), detector, masks=masks)
    beyond = _resident_mib("VmHWM") - before
    frame_mib = frame.numel() * frame.element_size() / 2 ** 20
    return dict(scene=f"{width}x{height} frame, {scene}", faces=result.face_count, parse_mask=parse,
                largest_face_px=round(max(result.output_face_px.tolist(), default=0)), crop_size=size, device=device,
                allocator="system" if system_allocator else "heap", frame_mib=round(frame_mib),
                peak_beyond_input_mib=round(beyond), times_frame=round(beyond / frame_mib, 2))


def around_largest_face(photo, detector):
    """The square of the photo (H,W,3 numpy) around its largest face, five times as wide as that face."""
    (faces,) = detector.detect(torch.from_numpy(photo)[None])
    if not len(faces):
        raise ValueError("no face found in the photo to make the close-up of")
    x0, y0, x1, y1 = faces.boxes[((faces.boxes[:, 2:] - faces.boxes[:, :2]).prod(1)).argmax()].tolist()
    half = 2.5 * (x1 - x0)
    left, top = max(0, int((x0 + x1) / 2 - half)), max(0, int((y0 + y1) / 2 - half))
    return photo[top:int(top + 2 * half), left:int(left + 2 * half)]


def _resident_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"/proc/self/status has no {field}: --memory needs Linux")
