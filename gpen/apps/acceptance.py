"""`python -m gpen bench --acceptance`: the GPU acceptance check (issue 25) in one command.

Sections (SECTIONS), each a list of checks, each check a row of the table:
  parity    every network on the device in float32 against the CPU's float32 forward of the same weights,
            and in float16 and bfloat16 against the device's float32
  speed     ms per face of GPEN-512 and GPEN-2048 by dtype and batch (CUDA events, warm-up, medians), whether
            precision "auto" is the fastest dtype that passed parity, and the reference's computation
            (plain_gpen.py) on the same device
  memory    peak GPU memory by size and batch; a batch forced past the memory halves and completes
  pipeline  restore_faces on a 4K frame of many faces and a batch of 1080p frames, every stage on the device,
            and what a node run asks ComfyUI for against what the run takes
  video     restore_video on a short clip; one Ray actor
  compile   torch.compile tried on GPEN (last but the goals: inductor's first call is the one unknown cost)
  goals     the issue's goals, each with its figure and whether it is met
A check that raises is one FAIL row (its exception's first line) and the others still run. A check that
would start after the time budget (--budget, FULL's 6 minutes by default) is a skip row; the goals run
always. The reports are rewritten after every row, so a run cut short keeps what it measured.

Networks have random weights in the released files' layouts (no download), a GPEN-BFR file in the
models folder is used when there is one; the pipeline needs a face detector file and a group photo (by
default the project's shared/ ones, beside the checkout or in it). `--quick` runs the same code at tiny
sizes: `--device cpu --quick` finishes in under a minute, and the test suite runs it so that the check
cannot rot between GPU runs.
Prints one table; acceptance-<device>.json and .md (rows for BENCHMARKS.md) in --out say how far the
run got ("partial: 17 of 40 checks", then "complete: 40 checks"), and stderr each check's seconds.
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property, partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..archs import bisenet, parsenet
from ..archs.bisenet import BiSeNet
from ..archs.gpen.network import GPEN
from ..archs.parsenet import ParseNet
from ..archs.retinaface import RetinaFace
from ..archs.rrdbnet import RRDBNet
from ..archs.srvgg import SRVGGNetCompact
from ..archs.working_memory import counted_peak, forward_bytes, weight_bytes
from ..devices import DTYPES, has_native_bf16, resolve_device, resolve_dtype
from ..faces.options import CLASSES, MaskOptions
from ..faces.parse import ParserHandle
from ..faces.pipeline import restore_faces
from ..faces.restore import as_restorer, finite_faces, rerun_note, restore_crops
from ..faces.run_memory import run_working_bytes
from ..files.catalogue import PACK, resolve
from ..files.images import read_image
from ..files.weights import first_line
from ..loader import load_detector
from .bench import STANDARD_UPSCALERS, bench_model, device_name, median, peak_mib, pipeline_scenes
from .plain_gpen import plain_forward
from .video import probe_video, restore_video

# Largest difference allowed, as a fraction of the reference output's range. float32 on another device
# differs only in the order of its sums (~1e-6 on the CPU against the reference). float16 keeps 11
# significant bits (rounding ~5e-4 a step), bfloat16 8 (~4e-3), and the errors add up over the layers:
# GPEN-256 measured 1.5e-3 and 1.4e-2 of the range on the CPU; the bounds leave room for GPEN-2048's
# deeper decoder and for a GPU's other order of sums.
BOUNDS = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}
DTYPE_NAMES = tuple(BOUNDS)
EVERY_REGION = tuple(range(len(CLASSES)))  # random parsers: every class shows the face, so every face is pasted
# The project's test data: beside the checkout, or inside it (as a GPU machine's copy of the tree has it).
SHARED_FOLDERS = (PACK.parent / "shared", PACK / "shared")
OOM_FACES = 8  # faces of the out-of-memory check, asked for in one batch
AUTO_SLACK = 1.05  # precision "auto" may be this much slower than the fastest dtype that passed parity
ALWAYS_RUN = ("goals",)  # sections run past the time budget: they only read the figures measured before them
# Budget a section's check needs left to start: inductor's first call on GPEN-2048 takes minutes, and a
# compile started at the budget's end would run on past it.
RESERVE_S = {"compile": 120}
RAY_TIMEOUT_S = 120  # the Ray check's process: Ray's start and a short clip take well under a minute


@dataclass(frozen=True)
class Plan:
    """What is run: FULL on a GPU (about 6 minutes), QUICK the same code paths at tiny sizes."""

    gpen_sizes: tuple[int, ...]  # parity
    speed_sizes: tuple[int, ...]  # speed and memory
    batches: tuple[int, ...]
    goal_batch: int
    warmup: int
    repeat: int
    sides: dict[str, int]  # input side of each kind of network in the parity check
    group_frame: tuple[int, int]  # (W, H): the group photo tiled
    close_up: tuple[int, int, int]  # (W, H, frames): one face a frame
    video_frames: int
    pipeline_size: int  # GPEN size in the pipeline and the video
    face_batch: int
    budget_s: float | None  # --budget's default
    quick: bool


FULL = Plan(gpen_sizes=(256, 512, 1024, 2048), speed_sizes=(512, 2048), batches=(1, 4, 8), goal_batch=4, warmup=3,
            repeat=10, sides={"detector": 640, "parser": 512, "upscaler": 128}, group_frame=(3840, 2160),
            close_up=(1920, 1080, 60), video_frames=24, pipeline_size=512, face_batch=8, budget_s=360, quick=False)
QUICK = Plan(gpen_sizes=(16, 32), speed_sizes=(16, 32), batches=(1, 4), goal_batch=4, warmup=1, repeat=1,
             sides={"detector": 64, "parser": 64, "upscaler": 32}, group_frame=(320, 240), close_up=(256, 144, 3),
             video_frames=3, pipeline_size=32, face_batch=4, budget_s=None, quick=True)


class Skip(Exception):
    """A check that cannot run here (no Ray, no detector file): a row saying why, not a failure."""


@dataclass
class Outcome:
    result: str
    ok: bool = True
    figures: dict = field(default_factory=dict)
    goal: str = ""
    met: str = ""


Check = tuple[str, Callable[[], Outcome]]


class Context:
    """What the checks share: the device, the plan, the inputs found, the figures the goals read, and the
    time budget (seconds from the first check; None: no budget) on `clock`."""

    def __init__(self, device: torch.device, plan: Plan, image: str | None = None, detector: str | None = None,
                 models_dir: str | None = None, budget: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.device, self.plan, self.models_dir = device, plan, models_dir
        self.image, self.detector = image, detector
        self.budget, self.clock = budget, clock
        self.out_of_time = False  # set when a check was not run for the budget
        self.sections: tuple[str, ...] | None = None  # the sections run, when not all (--sections)
        self.figures: dict[tuple, float] = {}

    @cached_property
    def tmp(self) -> Path:
        """A folder for the clips and files the checks write, removed by `run` at the end."""
        return Path(tempfile.mkdtemp(prefix="gpen-acceptance-"))

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def pipeline_dtype(self) -> str:
        """Precision "auto" on this device, as the nodes run it."""
        return dtype_name(resolve_dtype("auto", self.device))

    @cached_property
    def photo_path(self) -> Path:
        path = Path(self.image) if self.image else shared_file("images", "solvay_1927.png")
        if not path.is_file():
            raise Skip(f"no group photo: {path} is missing (--image PHOTO)")
        return path

    @cached_property
    def detector_path(self) -> Path:
        name = self.detector or "retinaface_mobilenet0.25"
        try:
            return resolve(name, "detector", self.models_dir, fetch=False)
        except FileNotFoundError:
            shared = shared_file("models", f"{name}.pth")
            if shared.is_file():
                return shared
            raise Skip(f"no face detector file for {name} (python -m gpen download {name}, "
                       "or --detector PATH)") from None

    @cached_property
    def close_up(self) -> torch.Tensor:
        """(H,W,3) float: the photo's largest face alone, about 400 px wide in 1080p (bench's scene), resized
        to the plan's frame."""
        (_, frames), *_ = pipeline_scenes(str(self.photo_path), self.detector_path, 1)
        width, height, _ = self.plan.close_up
        frame = frames[0, ..., :3].permute(2, 0, 1)[None]
        return F.interpolate(frame, (height, width), mode="area")[0].permute(1, 2, 0).contiguous()

    def gpen(self, size: int) -> tuple[GPEN, str]:
        """A CPU float32 GPEN of `size`: the GPEN-BFR file in the models folder, else random weights in its
        layout (QUICK: a narrow one), with its origin."""
        if self.plan.quick:
            return stir(GPEN(size, channel_multiplier=1, narrow=0.125)), "random, narrow"
        try:
            path = resolve(f"GPEN-BFR-{size}", "restorer", self.models_dir, fetch=False)
            return bench_model(size, torch.device("cpu"), "fp32", str(path)), path.name
        except FileNotFoundError:
            return stir(bench_model(size, torch.device("cpu"), "fp32", None)), "random"

    def parser(self) -> ParserHandle:
        """A face parser with random weights: BiSeNet(19) as released, QUICK a small ParseNet."""
        if self.plan.quick:
            return ParserHandle(stir(small_parsenet()).to(self.device), parsenet.SPEC, name="ParseNet (random)")
        return ParserHandle(stir(BiSeNet(19)).to(self.device), bisenet.SPEC, name="BiSeNet (random)")


def shared_file(*parts: str) -> Path:
    """The first of SHARED_FOLDERS that has the file, else the file in the first (missing)."""
    paths = [folder.joinpath(*parts) for folder in SHARED_FOLDERS]
    return next((path for path in paths if path.is_file()), paths[0])


def stir(module: nn.Module, seed: int = 0) -> nn.Module:
    """Biases and GPEN's noise strengths, zero in a fresh network, moved by N(0, 0.1), so that they count."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("bias", "noise.weight")):
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return module.eval().requires_grad_(False)


def small_parsenet() -> ParseNet:
    return ParseNet(in_size=64, out_size=64, min_feat_size=16, base_ch=8, res_depth=2, ch_range=(8, 32))


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name in DTYPE_NAMES if DTYPES[name] == dtype)


def uniform(*shape: int, seed: int, device: torch.device) -> torch.Tensor:
    """Values in [0, 1) drawn on the CPU, so the same on every device and run, then moved to `device`."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).to(device)


# ---------------------------------------------------------------------------------------------- running


def run(args) -> int:
    """The command: on CUDA unless --device says otherwise; refused without a GPU unless --quick."""
    device = resolve_device(args.device)
    if device.type != "cuda" and not args.quick:
        raise ValueError("bench --acceptance checks a GPU and torch finds none here; --device cpu --quick runs its "
                         "quick CPU mode (the same code at tiny sizes)")
    if args.quick and device.type == "cpu":
        # Tiny networks: one thread beats threads waiting on each other on a shared machine (3x here).
        torch.set_num_threads(1)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # CUDA events, peaks and the OOM check's limit use the current device
    plan = QUICK if args.quick else FULL
    budget = plan.budget_s if args.budget is None else args.budget
    context = Context(device, plan, args.image, args.detector, args.models_dir, budget)
    out = Path(args.out or ".")
    paths = report_paths(context, out)
    print(f"rewriting {' and '.join(map(str, paths))} after every check"
          + (f"; a budget of {budget:g} s (--budget)" if budget is not None else ""), file=sys.stderr, flush=True)
    sections = {name: checks for name, checks in SECTIONS.items()
                if not args.sections or name in args.sections or name in ALWAYS_RUN}
    context.sections = tuple(sections) if args.sections else None
    try:
        rows = run_sections(context, sections,
                            report=lambda rows, planned: write_reports(rows, planned, context, out))
    finally:
        if "tmp" in vars(context):  # made on first use
            shutil.rmtree(context.tmp, ignore_errors=True)
    print_rows(rows)
    for path in paths:
        print(f"wrote {path}")
    return 0 if all(row["status"] != "FAIL" for row in rows) else 1


def run_sections(context: Context, sections: dict | None = None,
                 report: Callable[[list[dict], int], object] = lambda rows, planned: None) -> list[dict]:
    """Every check of every section, in order, each on its own: a section or check that raises is one
    FAIL row, a Skip a row saying why, a check that would start past the budget a skip row. `report(rows,
    planned)` is called after every row, with the rows so far and the number of checks planned."""
    planned = planned_checks(context, sections or SECTIONS)
    started, rows = context.clock(), []
    for section, label, check in planned:
        print(f"[{section}] {label}", file=sys.stderr, flush=True)
        if isinstance(check, Exception):  # the section could not list its checks
            row = dict(failed_row(section, label, check), seconds=0.0)
        elif context.budget is not None and section not in ALWAYS_RUN \
                and context.clock() - started + RESERVE_S.get(section, 0) >= context.budget:
            context.out_of_time = True
            reserve = f" less the {RESERVE_S[section]} s it needs" if section in RESERVE_S else ""
            row = dict(skipped_row(section, label, f"not run: past the time budget of {context.budget:g} s"
                                                   f"{reserve} (--budget)"), seconds=0.0)
        else:
            row = run_check(section, label, check, context)
        rows.append(row)
        print(f"  {row['status']} in {row['seconds']:.1f} s; {context.clock() - started:.1f} s since the start",
              file=sys.stderr, flush=True)
        report(rows, len(planned))
    return rows


def planned_checks(context: Context, sections: dict) -> list[tuple[str, str, Callable[[], Outcome] | Exception]]:
    """(section, label, check) for every check, listed before any runs so that the reports can say how far
    the run got; a section that cannot list its checks is one entry holding its exception."""
    planned = []
    for section, checks_of in sections.items():
        try:
            planned += [(section, label, check) for label, check in checks_of(context)]
        except Exception as e:
            planned.append((section, "(the section's checks)", e))
    return planned


def run_check(section: str, label: str, check: Callable[[], Outcome], context: Context) -> dict:
    started = context.clock()
    try:
        row = outcome_row(section, label, check())
    except Skip as e:
        row = skipped_row(section, label, str(e))
    except Exception as e:  # one clear row; the other checks still run
        row = failed_row(section, label, e)
    finally:
        gc.collect()  # the check's networks and tensors, before the next one measures memory
        if context.on_gpu:
            torch.cuda.empty_cache()
    row["seconds"] = round(context.clock() - started, 1)
    return row


def failed_row(section: str, label: str, error: Exception) -> dict:
    return dict(section=section, check=label, status="FAIL", result=f"{type(error).__name__}: {first_line(error)}",
                goal="", met="", figures={})


def outcome_row(section: str, label: str, outcome: Outcome) -> dict:
    return dict(section=section, check=label, status="ok" if outcome.ok else "FAIL", result=outcome.result,
                goal=outcome.goal, met=outcome.met, figures=outcome.figures)


def skipped_row(section: str, label: str, why: str) -> dict:
    return dict(section=section, check=label, status="skip", result=why, goal="", met="", figures={})


# ----------------------------------------------------------------------------------------------- parity


def parity_checks(context: Context) -> list[Check]:
    plan, side = context.plan, context.plan.sides
    checks = [(f"GPEN-{size}", lambda size=size: gpen_parity(context, size)) for size in plan.gpen_sizes]
    # Detectors stay in float32 (the loader keeps them so): only their float32 is checked.
    networks = [("RetinaFace mobilenet0.25", lambda: RetinaFace("mobilenet0.25"), side["detector"], ("fp32",)),
                ("RetinaFace resnet50", lambda: RetinaFace("resnet50"), side["detector"], ("fp32",)),
                ("ParseNet", small_parsenet if plan.quick else ParseNet, side["parser"], DTYPE_NAMES),
                ("BiSeNet", lambda: BiSeNet(19), side["parser"], DTYPE_NAMES)]
    upscalers = {"rrdbnet": lambda: RRDBNet(3, 3, scale=4, num_feat=16, num_block=1, num_grow_ch=8),
                 "srvgg": lambda: SRVGGNetCompact(3, 3, num_feat=16, num_conv=4, upscale=4)} if plan.quick \
        else STANDARD_UPSCALERS
    networks += [(f"upscaler {name}", build, side["upscaler"], DTYPE_NAMES) for name, build in upscalers.items()]
    checks += [(name, lambda build=build, s=s, d=d: network_parity(context, stir(build()), s, d, "random"))
               for name, build, s, d in networks]
    return checks


def gpen_parity(context: Context, size: int) -> Outcome:
    model, origin = context.gpen(size)
    outcome = network_parity(context, model, size, DTYPE_NAMES, origin, low=-1)
    for dtype in DTYPE_NAMES:  # for the speed section's "default dtype" rows
        if f"{dtype}_relative_error" in outcome.figures:
            context.figures["parity", size, dtype] = outcome.figures[f"{dtype}_relative_error"]
    return outcome


def network_parity(context: Context, network: nn.Module, side: int, dtypes: tuple[str, ...], origin: str,
                   low: float = 0) -> Outcome:
    """A batch of 2 (the batched path on a GPU) through the CPU float32 network and its copies on the device."""
    x = uniform(2, 3, side, side, seed=0, device=torch.device("cpu")) * (1 - low) + low
    with torch.inference_mode(), exact_fp32():
        reference = outputs(network(x))
        on_device = copy.deepcopy(network).to(context.device)
        fp32 = outputs(on_device(x.to(context.device)))
        errors = {"fp32": relative_error(fp32, reference)}
        del on_device
        for dtype in usable_dtypes(context, dtypes)[1:]:
            half = copy.deepcopy(network).to(context.device, DTYPES[dtype])
            errors[dtype] = relative_error(outputs(half(x.to(context.device, DTYPES[dtype]))), fp32)
            del half
    within = all(errors[dtype] <= BOUNDS[dtype] for dtype in errors)
    text = ", ".join(f"{dtype} {error:.1e} (<= {BOUNDS[dtype]:.0e})" for dtype, error in errors.items())
    against = "fp32 vs the CPU's" + (", halves vs the device's fp32" if len(dtypes) > 1 else "")
    return Outcome(f"{text}; {against}; {origin} weights, {side} px, batch 2", within,
                   {f"{dtype}_relative_error": error for dtype, error in errors.items()})


@contextmanager
def exact_fp32():
    """float32 computed in float32 on a GPU: by default torch lets cuDNN's convolutions round their inputs to
    TF32 (10-bit significands, ~1e-3 of the range over GPEN) from Ampere on, which the fp32 bound is not about.
    The timings keep torch's default, as users get it."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def usable_dtypes(context: Context, dtypes: tuple[str, ...]) -> tuple[str, ...]:
    """bfloat16 only where the GPU computes in it (Ampere and later), as resolve_dtype allows it: torch's own
    is_bf16_supported() also says yes where it only emulates it."""
    bf16 = not context.on_gpu or has_native_bf16(context.device)
    return tuple(dtype for dtype in dtypes if dtype != "bf16" or bf16)


def outputs(y) -> list[torch.Tensor]:
    return [t.float() for t in (y if isinstance(y, (tuple, list)) else [y])]


def relative_error(values: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The largest difference over the outputs, each as a fraction of its reference's range (inf if not finite)."""
    worst = 0.0
    for value, ref in zip(values, reference):
        ref = ref.to(value.device)
        error = float((value - ref).abs().max() / (ref.max() - ref.min()).clamp_min(1e-12))
        worst = max(worst, error if np.isfinite(error) else float("inf"))
    return worst


# ------------------------------------------------------------------------------------------------ speed


def speed_checks(context: Context) -> list[Check]:
    checks = []
    for size in context.plan.speed_sizes:
        checks += [(f"GPEN-{size} {dtype}", lambda size=size, dtype=dtype: gpen_speed(context, size, dtype))
                   for dtype in DTYPE_NAMES]
        checks.append((f"GPEN-{size} default dtype (auto)", lambda size=size: default_dtype(context, size)))
        checks.append((f"GPEN-{size} reference computation fp32", lambda size=size: plain_speed(context, size)))
    checks.append(("channels_last", lambda: Outcome("the network's own layout on every device (network.py keeps "
                                                    "its maps and weights channels_last): no other path to compare")))
    return checks


def device_gpen(context: Context, size: int, dtype: str) -> tuple[GPEN, torch.Tensor]:
    """GPEN-`size` on the device in `dtype`, and a batch of faces in [-1, 1] (as many as the largest batch)."""
    model, _ = context.gpen(size)
    model = model.to(context.device, DTYPES[dtype])
    faces = uniform(max(context.plan.batches), 3, model.size, model.size, seed=0, device=context.device) * 2 - 1
    return model, faces


def time_ms(run: Callable[[], object], device: torch.device, warmup: int, repeat: int) -> float:
    """The median of `repeat` runs after `warmup`, in ms: CUDA events on a GPU, the wall clock elsewhere."""
    with torch.inference_mode():
        for _ in range(warmup):
            run()
        times = []
        for _ in range(repeat):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                began = time.perf_counter()
                run()
                times.append((time.perf_counter() - began) * 1e3)
    return median(times)


def gpen_speed(context: Context, size: int, dtype: str) -> Outcome:
    if dtype not in usable_dtypes(context, DTYPE_NAMES):
        raise Skip(f"this GPU has no {dtype}")
    plan = context.plan
    model, faces = device_gpen(context, size, dtype)
    per_face = {}
    for batch in plan.batches:
        per_face[batch] = time_ms(lambda x=faces[:batch]: model(x), context.device, plan.warmup, plan.repeat) / batch
        context.figures["ms", size, dtype, batch] = per_face[batch]
    text = ", ".join(f"batch {batch} {ms:.2f}" for batch, ms in per_face.items())
    figures = {f"ms_per_face_batch_{batch}": round(ms, 3) for batch, ms in per_face.items()}
    tf32 = dtype == "fp32" and context.on_gpu and torch.backends.cudnn.allow_tf32
    return Outcome(f"ms per face: {text}" + "; convolutions in TF32 (torch's default)" * tf32, figures=figures)


def default_dtype(context: Context, size: int) -> Outcome:
    """Precision "auto" (resolve_dtype) against what was measured: of the dtypes whose GPEN-`size` parity row
    passed, the fastest at the goal batch; auto must be it or within AUTO_SLACK of its time."""
    batch, auto = context.plan.goal_batch, context.pipeline_dtype
    times, failed, unmeasured = {}, [], []
    for dtype in DTYPE_NAMES:
        error, ms = context.figures.get(("parity", size, dtype)), context.figures.get(("ms", size, dtype, batch))
        if error is None or ms is None:
            unmeasured.append(f"{dtype} not measured ({'parity' if error is None else 'speed'})")
        elif error > BOUNDS[dtype]:
            failed.append(f"{dtype} failed parity ({error:.1e})")
        else:
            times[dtype] = ms
    if not times and not failed:
        raise not_measured(context, f"the parity and speed rows of GPEN-{size} it comes from")
    fastest = min(times, key=times.get) if times else None
    met = judged(context, auto in times and times[auto] <= AUTO_SLACK * times[fastest])
    measured = ", ".join(f"{dtype} {ms:.2f}" for dtype, ms in times.items()) or "none"
    return Outcome(f"auto is {auto}; fastest that passed parity: {fastest}; ms per face at batch {batch}: "
                   f"{measured}" + "".join(f"; {why}" for why in failed + unmeasured), met != "NO",
                   dict(auto=auto, fastest=fastest, ms_per_face=times),
                   goal=f"auto = the fastest that passed parity, or within {AUTO_SLACK - 1:.0%}", met=met)


def plain_speed(context: Context, size: int) -> Outcome:
    """The reference's computation (plain_gpen.py) at batch 1 in float32, as the reference runs, beside ours."""
    plan = context.plan
    model, faces = device_gpen(context, size, "fp32")
    x = faces[:1]
    with torch.inference_mode(), exact_fp32():
        error = relative_error(outputs(plain_forward(model, x)), outputs(model(x)))
    plain = time_ms(lambda: plain_forward(model, x), context.device, plan.warmup, plan.repeat)
    ours = time_ms(lambda: model(x), context.device, plan.warmup, plan.repeat)
    context.figures["plain", size] = plain
    return Outcome(f"batch 1: {plain:.2f} ms per face, ours {ours:.2f} ({plain / ours:.1f}x); ours within "
                   f"{error:.1e} of it (<= {BOUNDS['fp32']:.0e})", error <= BOUNDS["fp32"],
                   dict(plain_ms_per_face=round(plain, 3), ours_ms_per_face=round(ours, 3), relative_error=error))


# ----------------------------------------------------------------------------------------------- memory


def memory_checks(context: Context) -> list[Check]:
    size = max(context.plan.speed_sizes)
    checks = [(f"GPEN-{s} fp16 peak", lambda s=s: peak_memory(context, s)) for s in context.plan.speed_sizes]
    checks.append((f"out of memory: GPEN-{size}, {OOM_FACES} faces in one batch", lambda: oom_back_off(context, size)))
    checks.append(("GPEN working memory: counted vs measured", lambda: counted_memory(context)))
    return checks


def peak_memory(context: Context, size: int) -> Outcome:
    """Peak memory of one forward by batch: torch.cuda.max_memory_allocated (the weights and that batch's
    input included); on the CPU the process's peak resident memory, which only grows (a smoke figure)."""
    model, faces = device_gpen(context, size, "fp16")
    faces = faces.cpu()  # only the batch measured is on the device
    weights = weight_bytes(model) / 2 ** 20
    peaks = {}
    for batch in context.plan.batches:
        x = faces[:batch].to(context.device)
        if context.on_gpu:
            peaks[batch] = gpu_peak(partial(model, x))[1] / 2 ** 20
        else:
            with torch.inference_mode():
                model(x)
            peaks[batch] = peak_mib(context.device)
        del x
        context.figures["peak", size, batch] = peaks[batch]
    what = "max_memory_allocated" if context.on_gpu else "process peak RSS (cpu)"
    text = ", ".join(f"batch {batch} {mib:.0f}" for batch, mib in peaks.items())
    figures = {"weights_mib": round(weights), **{f"peak_mib_batch_{b}": round(mib) for b, mib in peaks.items()}}
    return Outcome(f"MiB ({what}): {text}; weights {weights:.0f}", figures=figures)


def gpu_peak(run: Callable[[], object]) -> tuple[int, int]:
    """(bytes allocated before, the most allocated during) `run()` on the current GPU."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        run()
    torch.cuda.synchronize()
    return before, torch.cuda.max_memory_allocated()


def counted_memory(context: Context) -> Outcome:
    """The working memory ComfyUI is told a run needs (archs/working_memory.py: counted on the meta device)
    beside a real forward's, GPEN by size and batch. On a GPU, in fp16: the estimate is the weights, the
    input and the count, the measure torch.cuda.max_memory_allocated; what the forward took (the peak less
    what was allocated before it) must be at least 0.8x the count (a GPU kernel may fuse what the meta
    device's decomposition makes in steps) and at most 1.25x it + 64 MiB: the count leaves out what kernels
    take inside an op (cuDNN's workspace) and the allocator's rounding to its blocks. The
    same counter on the device's tensors is shown beside it. On the CPU, in fp32 (where its plain path lays
    out every map as a GPU does; its fp16 convolutions lay some out otherwise), that counter on real tensors
    on the GPU's path (cpu_fast.plain_layers) must equal the meta count, byte for byte."""
    mib, lines, figures, ok = 2 ** 20, [], {}, True
    dtype = "fp16" if context.on_gpu else "fp32"
    for size in context.plan.speed_sizes:
        model, faces = device_gpen(context, size, dtype)
        faces = faces.cpu()  # only the batch measured is on the device
        weights = weight_bytes(model)
        if context.on_gpu:
            with torch.inference_mode():
                model(faces[:1].to(context.device, DTYPES[dtype]))  # first: cuBLAS's and cuDNN's handles
        for batch in context.plan.batches:
            x = faces[:batch].to(context.device, DTYPES[dtype])  # in the network's dtype, as the handles give it
            counted = forward_bytes(model, x.shape, x.dtype)
            on_tensors = counted_peak(partial(model, x))
            estimate = weights + x.numel() * x.element_size() + counted
            text = f"GPEN-{size} batch {batch}: estimate {estimate / mib:.0f} (working {counted / mib:.1f})"
            figure = dict(estimate_mib=round(estimate / mib, 1), working_bytes=counted,
                          device_tensor_bytes=on_tensors)
            if not counted:
                fits = False
                text += ": not counted (the meta device could not run it: see the warning logged)"
            elif context.on_gpu:
                before, peak = gpu_peak(partial(model, x))
                took = peak - before
                fits = 0.8 * counted <= took <= 1.25 * counted + 64 * mib
                text += (f", max_memory_allocated {peak / mib:.0f} (working {took / mib:.1f}, {took / counted:.2f}x; "
                         f"counted on the device's tensors {on_tensors / mib:.1f})")
                figure.update(peak_mib=round(peak / mib, 1), measured_working_mib=round(took / mib, 1))
            else:
                fits = on_tensors == counted
                text += f", {'=' if fits else '!='} {on_tensors / mib:.1f} counted on real CPU tensors"
            figures[f"GPEN-{size} batch {batch}"] = figure
            ok = ok and fits
            lines.append(text + ("" if fits else " OUTSIDE"))
            del x
    bound = "0.8x working <= measured <= 1.25x + 64 MiB" if context.on_gpu else "meta count = real-tensor count"
    return Outcome(f"MiB, {dtype}: {'; '.join(lines)}; {bound}", ok, figures)


def oom_back_off(context: Context, size: int) -> Outcome:
    """restore_crops asked for OOM_FACES faces in one batch where only 2 fit: on a GPU the allocator is held
    to what a batch of 2 took, plus a quarter; on the CPU the forward raises torch.OutOfMemoryError above 2.
    The batches must halve, every face come back finite, and the faces match those restored 2 at a time."""
    model, _ = device_gpen(context, size, "fp16")
    crops = uniform(OOM_FACES, size, size, 3, seed=1, device=context.device)
    seen = []

    def forward(x):
        seen.append(len(x))
        if not context.on_gpu and len(x) > 2:
            raise torch.OutOfMemoryError("out of memory (simulated above 2 faces)")
        return model(x)

    def restore(batch_size: int) -> torch.Tensor:
        return restore_crops(forward, size, crops, device=context.device, dtype=torch.float16, batch_size=batch_size)

    if context.on_gpu:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    in_pairs = restore(2).cpu()  # off the GPU: the budget is what a batch of 2 takes beyond what was there
    seen.clear()
    try:
        if context.on_gpu:
            budget = before + 1.25 * (torch.cuda.max_memory_allocated() - before)
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(context.device).total_memory
            torch.cuda.set_per_process_memory_fraction(budget / total)
        restored = restore(OOM_FACES)
    finally:
        if context.on_gpu:
            torch.cuda.set_per_process_memory_fraction(1.0)
    error = relative_error([restored], [in_pairs])
    halved = seen[:2] == [OOM_FACES, OOM_FACES // 2] and len(restored) == OOM_FACES
    finite = bool(finite_faces(restored).all())
    ok = halved and finite and error <= BOUNDS["fp16"]
    return Outcome(f"batches tried {seen}; {'all' if finite else 'NOT all'} finite; {error:.1e} from 2 at a time",
                   ok, dict(batches=seen, relative_error=error))


# --------------------------------------------------------------------------------------------- pipeline


def pipeline_checks(context: Context) -> list[Check]:
    width, height = context.plan.group_frame
    w, h, frames = context.plan.close_up
    return [(f"{width}x{height} frame, the group photo tiled", lambda: group_frame_check(context)),
            (f"{frames} frames of {w}x{h}, one face each", lambda: close_up_check(context)),
            (f"a node run's request to ComfyUI vs its peak ({width}x{height} frame)", lambda: request_check(context))]


def tiled(photo: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(H,W,3) the photo repeated to fill width x height, cut there."""
    rows, cols = -(-height // photo.shape[0]), -(-width // photo.shape[1])
    return photo.repeat(rows, cols, 1)[:height, :width].contiguous()


def group_frame_check(context: Context) -> Outcome:
    photo = torch.from_numpy(read_image(str(context.photo_path))[0][..., :3]).float()
    frame = tiled(photo, *context.plan.group_frame)[None]
    outcome = pipeline_outcome(context, frame)
    faces, copies = outcome.figures["faces"], outcome.figures.get("device_to_host_copies")
    if isinstance(copies, int):  # many faces in one frame: copies made per face would number at least the faces
        outcome.ok = outcome.ok and copies < faces
        outcome.result += f"; {copies} device-to-host copies for {faces} faces ({'not ' * (copies < faces)}per face)"
    elif copies is not None:
        outcome.result += f"; device-to-host copies {copies}"
    return outcome


def close_up_check(context: Context) -> Outcome:
    frames = context.close_up[None].expand(context.plan.close_up[2], -1, -1, -1).contiguous()
    outcome = pipeline_outcome(context, frames)
    context.figures["overhead",] = outcome.figures["share_outside_networks"]
    return outcome


def pipeline_outcome(context: Context, frames: torch.Tensor) -> Outcome:
    """restore_faces with a face parser on frames already on the device: the best of the plan's repeats after
    a warm-up, each stage's ms, the share outside GPEN (and the parser), and where each part ran."""
    device, plan = context.device, context.plan
    frames = frames.to(device)
    model, _ = context.gpen(plan.pipeline_size)
    restorer = as_restorer(model.to(device, DTYPES[context.pipeline_dtype]))
    detector = load_detector(context.detector_path, device=device)
    masks = MaskOptions(parser=context.parser(), regions=EVERY_REGION)

    def restore():
        return restore_faces(frames, restorer, detector, masks=masks, face_batch=plan.face_batch)

    result = restore()  # warm-up
    best = min((restore().timings for _ in range(max(1, plan.repeat // 5))), key=lambda t: sum(t.values()))
    total = sum(best.values())
    networks = best.get("restore", 0) + best.get("parse", 0)
    where = {"detection and alignment": result.info.device, "output": result.images.device,
             "masks": result.masks.device, "restorer": restorer.device, "parser": masks.parser.device}
    elsewhere = [part for part, at in where.items() if at.type != device.type]
    figures = dict(frames=len(frames), faces=result.face_count, ms_per_frame=round(total * 1e3 / len(frames), 2),
                   share_outside_gpen=round(1 - best.get("restore", 0) / total, 4),
                   share_outside_networks=round(1 - networks / total, 4),
                   stage_ms={stage: round(s * 1e3, 1) for stage, s in best.items()})
    if context.on_gpu:
        try:
            figures["device_to_host_copies"] = device_to_host_copies(restore)
        except Exception as e:  # whatever keeps the profiler from the GPU, the timings stand
            figures["device_to_host_copies"] = f"not counted: {type(e).__name__}: {first_line(e)}"
    stages = ", ".join(f"{stage} {ms:.0f}" for stage, ms in figures["stage_ms"].items())
    text = (f"{figures['faces']} faces: {figures['ms_per_frame']:.1f} ms per frame, "
            f"{100 * figures['share_outside_gpen']:.0f}% outside GPEN, {100 * figures['share_outside_networks']:.0f}% "
            f"outside GPEN and the parser; ms: {stages}; "
            + (f"not on {device.type}: {', '.join(elsewhere)}" if elsewhere else f"every part on {device.type}"))
    return Outcome(text, not elsewhere and result.face_count > 0, figures)


def request_check(context: Context) -> Outcome:
    """What a node run asks ComfyUI for (run_working_bytes: its largest stage and a frame) against what
    restore_faces takes, the frame on the CPU as ComfyUI's are and the networks on the device. On a GPU, in
    the nodes' dtype: torch.cuda.max_memory_allocated less what was allocated before (the weights), which
    must stay within 1.25x the request + 64 MiB (cuDNN's workspaces and the allocator's blocks are not
    counted). On the CPU the most bytes of tensors the run holds on the GPU's path (counted_peak), within the
    request + 1 MiB; GPEN takes faces one at a time there, so the batch is 1."""
    device, plan, mib = context.device, context.plan, 2 ** 20
    photo = torch.from_numpy(read_image(str(context.photo_path))[0][..., :3]).float()
    frame = tiled(photo, *plan.group_frame)[None]
    model, _ = context.gpen(plan.pipeline_size)
    restorer = as_restorer(model.to(device, DTYPES[context.pipeline_dtype]))
    detector = load_detector(context.detector_path, device=device)
    parser = context.parser()
    face_batch = plan.face_batch if context.on_gpu else 1
    asked = run_working_bytes(tuple(frame.shape), restorer, detector, [parser], face_batch=face_batch)

    def restore():
        return restore_faces(frame, restorer, detector, masks=MaskOptions(parser=parser, regions=EVERY_REGION),
                             face_batch=face_batch)

    if context.on_gpu:
        result = restore()  # first: cuBLAS's and cuDNN's handles, the detector's anchors
        before, peak = gpu_peak(restore)
        took, bound, what = peak - before, 1.25 * asked + 64 * mib, "max_memory_allocated beyond the weights"
    else:
        result = restore()
        took, bound, what = counted_peak(restore), asked + mib, "tensors held on the GPU's path (cpu)"
    figures = dict(faces=result.face_count, face_batch=face_batch, asked_mib=round(asked / mib, 1),
                   took_mib=round(took / mib, 1), rerun_fp32=result.rerun_fp32)
    text = (f"{result.face_count} faces, face_batch {face_batch}: asked {asked / mib:.0f} MiB, took {took / mib:.0f} "
            f"MiB ({what}; {took / asked:.2f}x)" if asked else "asked nothing: no network counted")
    if result.rerun_fp32:
        text += f"; {rerun_note(result.rerun_fp32)} (not in the request)"
    return Outcome(text, bool(asked) and result.face_count > 0 and took <= bound, figures)


def device_to_host_copies(run: Callable[[], object]) -> int:
    """The CUDA device-to-host copies one run makes (each one a wait for the GPU)."""
    # The GPU's activity alone: the CPU's ops would add tens of thousands of events to read back.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        run()
    return count_copies(profile.events())


def count_copies(events) -> int:
    """The device-to-host copies ("Memcpy DtoH (Device -> Pageable)") among a profile's events. A profile
    without a single GPU event means the profiler could not trace the device (CUPTI missing or not allowed,
    which it only warns about): a RuntimeError, not a count of 0 that would pass for none made."""
    on_gpu = [event for event in events if event.device_type == torch.autograd.DeviceType.CUDA]
    if not on_gpu:
        raise RuntimeError("the profiler recorded no GPU activity (CUPTI unavailable?)")
    return sum("DtoH" in event.name for event in on_gpu)


# ------------------------------------------------------------------------------------------------ video


def video_checks(context: Context) -> list[Check]:
    return [(f"restore_video, {context.plan.video_frames} frames", lambda: video_check(context)),
            ("python -m gpen restore --ray local, one actor", lambda: ray_check(context))]


def clip(context: Context) -> Path:
    """A short H.264 clip of the close-up (one face a frame), written with PyAV."""
    import av  # optional (pip install av): only the video checks need it

    path = context.tmp / "clip.mp4"
    if path.is_file():
        return path
    picture = (context.close_up.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = picture.shape[1], picture.shape[0], "yuv420p"
        for i in range(context.plan.video_frames):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def video_check(context: Context) -> Outcome:
    source, target = clip(context), context.tmp / "restored.mp4"
    model, _ = context.gpen(context.plan.pipeline_size)
    restorer = as_restorer(model.to(context.device, DTYPES[context.pipeline_dtype]))
    detector = load_detector(context.detector_path, device=context.device)
    masks = MaskOptions(parser=context.parser(), regions=EVERY_REGION)
    summary = restore_video(source, target, restorer, detector, masks=masks, face_batch=context.plan.face_batch,
                            progress=False)
    written = probe_video(target).frames
    ok = written == context.plan.video_frames and summary.faces == written
    return Outcome(f"{summary}; {written} frames written; {summary.seconds * 1e3 / max(1, written):.0f} ms per frame",
                   ok, dict(frames=written, faces=summary.faces, seconds=round(summary.seconds, 2)))


def ray_check(context: Context) -> Outcome:
    """The CLI's Ray path in a process of its own: a local Ray, one actor (with a GPU where there is one)."""
    if importlib.util.find_spec("ray") is None:
        raise Skip("Ray is not installed (pip install .[cluster])")
    model, _ = context.gpen(context.plan.pipeline_size)
    weights, target = context.tmp / "gpen.pth", context.tmp / "ray.mp4"
    torch.save(model.state_dict(), weights)
    command = [sys.executable, "-m", "gpen", "restore", str(clip(context)), "-o", str(target), "--ray", "local",
               "--ray-actors", "1", "--model", str(weights), "--detector", str(context.detector_path),
               "--device", str(context.device), "--dtype", context.pipeline_dtype, "--overwrite"]
    # gpen from this checkout, whatever the folder's name, even where Python leaves the working folder off its path
    path = os.pathsep.join(p for p in (str(PACK), os.environ.get("PYTHONPATH", "")) if p)
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=RAY_TIMEOUT_S, cwd=PACK,
                          env={**os.environ, "PYTHONPATH": path})
    seconds = time.perf_counter() - began
    if done.returncode:
        lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
        return Outcome(f"exit {done.returncode}: {lines[-1]}", False)
    written = probe_video(target).frames
    pool = next((line for line in done.stderr.splitlines() if line.startswith("ray: ")), "ray: no pool line")
    on_gpu = pool.endswith(" GPU")  # "ray: 1 actor(s), each 1 GPU" (distributed.pool_label)
    return Outcome(f"{pool}: {written} frames written in {seconds:.0f} s (Ray's start included)",
                   written == context.plan.video_frames and on_gpu == context.on_gpu,
                   dict(frames=written, seconds=round(seconds, 1), gpu_actor=on_gpu))


# ---------------------------------------------------------------------------------------------- compile


def compile_checks(context: Context) -> list[Check]:
    return [(f"GPEN-{size} fp16 torch.compile", lambda size=size: compiled_speed(context, size))
            for size in context.plan.speed_sizes]


def compiled_speed(context: Context, size: int) -> Outcome:
    """torch.compile (inductor on a GPU; the eager backend on the CPU, where inductor would compile C++ for
    minutes) against the eager network, fp16 at the goal batch. The restorer runs eager (nothing compiles it):
    a compiled network faster and within fp16's bound is "worth adding", and the goal rows show its figure."""
    plan = context.plan
    model, faces = device_gpen(context, size, "fp16")
    x = faces[:plan.goal_batch]
    backend = "inductor" if context.on_gpu else "eager"
    compiled = torch.compile(model, backend=backend, dynamic=False)
    began = time.perf_counter()
    with torch.inference_mode():
        out = compiled(x)
        error = relative_error(outputs(out), outputs(model(x)))
    compile_s = time.perf_counter() - began
    eager = time_ms(lambda: model(x), context.device, plan.warmup, plan.repeat) / len(x)
    fast = time_ms(lambda: compiled(x), context.device, plan.warmup, plan.repeat) / len(x)
    worth = fast < eager and error <= BOUNDS["fp16"]
    if worth:
        context.figures["compiled", size] = fast
    return Outcome(f"batch {len(x)}: {fast:.2f} ms per face compiled, {eager:.2f} eager; {error:.1e} from eager; "
                   f"{backend} backend, first call {compile_s:.0f} s; "
                   + ("faster and within bound: worth adding to the restorer" if worth else "eager stays"),
                   figures=dict(compiled_ms_per_face=round(fast, 3), eager_ms_per_face=round(eager, 3),
                                relative_error=error, compile_seconds=round(compile_s, 1), worth_adding=worth))


# ------------------------------------------------------------------------------------------------ goals


def goal_checks(context: Context) -> list[Check]:
    size, batch = max(context.plan.speed_sizes), context.plan.goal_batch
    return [(f"GPEN-{size} fp16 batch {batch}, ms per face", lambda: goal_speed(context, size, batch)),
            (f"GPEN-{size} against the reference's computation", lambda: goal_ratio(context, size, batch)),
            (f"GPEN-{size} fp16 batch 1, peak memory", lambda: goal_memory(context, size)),
            ("pipeline overhead, one face a 1080p frame", lambda: goal_overhead(context))]


def figure(context: Context, key: tuple, section: str) -> float:
    if key not in context.figures:
        raise not_measured(context, f"the {section} row it comes from", section)
    return context.figures[key]


def not_measured(context: Context, what: str, section: str | None = None) -> Exception:
    """A FAIL row's error for a figure a failed row did not give; a skip row's for a section this run left
    out (--sections), or past the budget."""
    if section is not None and context.sections is not None and section not in context.sections:
        return Skip(f"not measured: this run left out the {section} section (--sections)")
    if context.out_of_time:
        return Skip(f"not measured: {what} failed or was not run (past the time budget)")
    return LookupError(f"not measured: {what} failed")


def judged(context: Context, met: bool) -> str:
    """Whether a goal is met: the goals are a GPU's, so on the CPU the figure is shown but not judged."""
    return ("yes" if met else "NO") if context.on_gpu and not context.plan.quick else "not judged (not a full GPU run)"


def shipped_fp16(context: Context, size: int, batch: int) -> tuple[float, str]:
    """fp16 ms per face as the restorer runs it (eager: nothing in restore_faces, the nodes or the CLI compiles
    the network), and a note of torch.compile's figure where it was faster, for the decision to ship it."""
    eager = figure(context, ("ms", size, "fp16", batch), "speed")
    compiled = context.figures.get(("compiled", size))
    note = f"; torch.compile {compiled:.2f} (not used by the restorer)" if compiled is not None else ""
    return eager, note


def goal_speed(context: Context, size: int, batch: int) -> Outcome:
    ms, note = shipped_fp16(context, size, batch)
    return Outcome(f"{ms:.2f} ms per face, eager{note}", goal="<= 15 ms (H100/H200 class)",
                   met=judged(context, ms <= 15), figures=dict(ms_per_face=ms))


def goal_ratio(context: Context, size: int, batch: int) -> Outcome:
    plain, (ours, note) = figure(context, ("plain", size), "speed"), shipped_fp16(context, size, batch)
    return Outcome(f"{plain / ours:.1f}x: ours fp16 batch {batch} {ours:.2f} ms per face, the reference's fp32 "
                   f"batch 1 {plain:.2f}{note}", goal=">= 10x on the same GPU",
                   met=judged(context, plain / ours >= 10), figures=dict(ratio=plain / ours))


def goal_memory(context: Context, size: int) -> Outcome:
    mib = figure(context, ("peak", size, 1), "memory")
    return Outcome(f"{mib / 1024:.2f} GiB", goal="<= 3 GB", met=judged(context, mib * 2 ** 20 <= 3e9),
                   figures=dict(peak_mib=mib))


def goal_overhead(context: Context) -> Outcome:
    share = figure(context, ("overhead",), "pipeline")
    return Outcome(f"{100 * share:.1f}% of the frame's time outside GPEN and the parser",
                   goal="<= 15%", met=judged(context, share <= 0.15), figures=dict(share=share))


SECTIONS: dict[str, Callable[[Context], list[Check]]] = {
    "parity": parity_checks, "speed": speed_checks, "memory": memory_checks, "pipeline": pipeline_checks,
    "video": video_checks, "compile": compile_checks, "goals": goal_checks}


# ----------------------------------------------------------------------------------------------- output


COLUMNS = ("section", "check", "status", "result", "goal", "met")


def title(context: Context) -> str:
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
    return f"{device_name(context.device)}, torch {torch.__version__}, {cuda}" + ", quick mode" * context.plan.quick


def progress(done: int, planned: int) -> str:
    return f"complete: {planned} checks" if done >= planned else f"partial: {done} of {planned} checks"


def print_rows(rows: list[dict]) -> None:
    width = max((len(row["check"]) for row in rows), default=0)
    for row in rows:
        goal = f"  [goal {row['goal']}: {row['met']}]" if row["goal"] else ""
        print(f"{row['section']:<8} {row['check']:<{width}} {row['status']:<4} {row['result']}{goal}")
    failed = sum(row["status"] == "FAIL" for row in rows)
    print(f"{len(rows)} checks in {sum(row['seconds'] for row in rows):.0f} s: {failed} failed, "
          f"{sum(row['status'] == 'skip' for row in rows)} skipped")


def report_paths(context: Context, out: Path) -> tuple[Path, Path]:
    stem = out / f"acceptance-{context.device.type}"
    return stem.with_suffix(".json"), stem.with_suffix(".md")


def write_reports(rows: list[dict], planned: int, context: Context, out: Path) -> tuple[Path, Path]:
    """acceptance-<device>.json (every figure) and .md (the table's rows, for BENCHMARKS.md's GPU section),
    both saying how far the run got: rewritten after every row, so that a run cut short keeps its rows and,
    until the goals section runs, the goals as the figures measured so far give them."""
    out.mkdir(parents=True, exist_ok=True)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    done = progress(len(rows), planned)
    before_goals = len(rows) < planned and all(row["section"] != "goals" for row in rows)
    so_far = goals_so_far(context) if before_goals else []
    report = dict(title=title(context), progress=done, complete=len(rows) >= planned, checks_done=len(rows),
                  checks_planned=planned, seconds=round(sum(row["seconds"] for row in rows), 1),
                  budget_s=context.budget, date=when, device=str(context.device), torch=torch.__version__,
                  cuda=torch.version.cuda, quick=context.plan.quick, rows=rows, goals_so_far=so_far)
    json_path, md_path = report_paths(context, out)
    replace_text(json_path, json.dumps(report, indent=1, default=str) + "\n")
    flags = " --device cpu --quick" if context.plan.quick else ""
    lines = [f"### Acceptance: {title(context)} ({done})", "", f"`python -m gpen bench --acceptance{flags}`, {when}",
             "", *table(rows)]
    if so_far:
        lines += ["", "The goals from the figures measured so far (the run has not reached its goals section):", "",
                  *table(so_far)]
    replace_text(md_path, "\n".join(lines) + "\n")
    return json_path, md_path


def table(rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS[:-1]) + " | met? |", "|" + "---|" * len(COLUMNS)]
    return lines + ["| " + " | ".join(str(row[c]).replace("|", "/") for c in COLUMNS) + " |" for row in rows]


def goals_so_far(context: Context) -> list[dict]:
    """The goal rows as the figures measured so far give them (a goal whose figure is not there yet says so)."""
    rows = []
    for label, check in goal_checks(context):
        try:
            rows.append(outcome_row("goals", label, check()))
        except Exception:  # whatever a goal raises, the report is written
            rows.append(skipped_row("goals", label, "not measured yet"))
    return rows


def replace_text(path: Path, text: str) -> None:
    """The file's whole text at once: a reader, or a run killed mid-write, sees the old file or the new one."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
