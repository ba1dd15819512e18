"""What the nodes need from ComfyUI (model folders, devices, memory, progress, interrupt), with plain
stand-ins when the modules are imported outside ComfyUI (tests, scripts)."""

from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..gpen.devices import resolve_device
from ..gpen.files import registry
from ..gpen.files.catalogue import MODEL_FOLDERS

try:  # inside ComfyUI
    import comfy.model_management as model_management
    import comfy.utils
    import folder_paths
except ImportError:  # outside ComfyUI: the pack's own models/ folder, no progress bar, no interrupt
    model_management = None
    folder_paths = None

PACK_MODELS = Path(__file__).resolve().parents[1] / "models"
TORCH_SUFFIXES = {".pth", ".pt", ".safetensors"}
WEIGHT_SUFFIXES = TORCH_SUFFIXES | {".onnx"}
GPEN_FOLDERS = MODEL_FOLDERS["restorer"]
PARSER_FOLDERS = MODEL_FOLDERS["parser"]  # facedetection (where facexlib's parsers go) and face_parsing
FOLDERS: dict[str, set[str]] = {"insightface": {".onnx"}}
for _kind, _suffixes in (("restorer", WEIGHT_SUFFIXES), ("detector", TORCH_SUFFIXES), ("parser", WEIGHT_SUFFIXES)):
    for _name in MODEL_FOLDERS[_kind]:  # facedetection holds detectors and parsers: .onnx too, for FaceFusion's
        FOLDERS[_name] = FOLDERS.get(_name, set()) | _suffixes
# File names detectors go by (facexlib, insightface, FaceFusion): kept out of the parser list.
DETECTOR_NAMES = ("detection_", "det_", "scrfd", "retinaface", "yolo")
NO_GPEN = "(no GPEN model: put GPEN-BFR-512.pth in models/facerestore_models)"
NO_DETECTOR = "(no detector: put detection_Resnet50_Final.pth in models/facedetection)"
NO_PARSER = "(no face parser: put parsing_bisenet.pth in models/facedetection)"


def register_model_folders() -> None:
    """Add our folders to ComfyUI's, merging extensions and keeping every path the user configured."""
    if folder_paths is None:
        return
    for name, suffixes in FOLDERS.items():
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
        paths, existing = folder_paths.folder_names_and_paths[name]
        if not set(suffixes) <= set(existing):
            # A new tuple with the same path list: another pack's shared extension set stays untouched.
            folder_paths.folder_names_and_paths[name] = (paths, set(existing) | suffixes)


def folder_files(name: str) -> list[str]:
    register_model_folders()  # again: a pack loaded after us may have replaced the entry
    if folder_paths is not None:
        return folder_paths.get_filename_list(name)
    folder = PACK_MODELS / name
    if not folder.is_dir():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix.lower() in FOLDERS[name])


def full_path(name: str, filename: str) -> str | None:
    if folder_paths is not None:
        return folder_paths.get_full_path(name, filename)
    path = PACK_MODELS / name / filename
    return str(path) if path.is_file() else None


def gpen_model_files() -> list[str]:
    """Every weight file in the GPEN folders: what a file is comes from its tensors when it is loaded,
    never from its name, so a renamed GPEN file is listed and another restorer's says what it is."""
    return sorted({f for folder in GPEN_FOLDERS for f in folder_files(folder)}) or [NO_GPEN]


def detector_files() -> list[str]:
    detection = [f for f in folder_files("facedetection") if Path(f).suffix.lower() in TORCH_SUFFIXES
                 and not any(w in f.lower() for w in ("parsing", "yolo"))]
    scrfd = [f"insightface/{f}" for f in folder_files("insightface")
             if Path(f).name.startswith(("det_", "scrfd"))]
    return detection + scrfd or [NO_DETECTOR]


def parser_files() -> list[str]:
    """Every weight file in facedetection and face_parsing but the detectors' (by their usual names): a
    parser is told apart by its tensors when it is loaded, so a renamed one is listed."""
    return sorted({f for folder in PARSER_FOLDERS for f in folder_files(folder)
                   if not Path(f).name.lower().startswith(DETECTOR_NAMES)}) or [NO_PARSER]


def find_gpen_file(name: str) -> str:
    if name == NO_GPEN:
        raise FileNotFoundError(f"No GPEN model found. Put GPEN-BFR-512.pth (or 256/1024/2048, .pth, "
                                f".safetensors or .onnx) in {describe_folder('facerestore_models')}")
    return find_in(GPEN_FOLDERS, name)


def find_detector_file(name: str) -> str:
    if name == NO_DETECTOR:
        raise FileNotFoundError(f"No face detector found. Put detection_Resnet50_Final.pth or "
                                f"detection_mobilenet0.25_Final.pth in {describe_folder('facedetection')}, "
                                f"or insightface's buffalo_l in {describe_folder('insightface')}/models")
    folder, filename = ("insightface", name.split("/", 1)[1]) if name.startswith("insightface/") else ("facedetection", name)
    path = full_path(folder, filename)
    if path is None:
        raise FileNotFoundError(f"{filename} is no longer in {describe_folder(folder)}")
    return path


def find_parser_file(name: str) -> str:
    if name == NO_PARSER:
        raise FileNotFoundError(f"No face parser found. Put facexlib's parsing_bisenet.pth or parsing_parsenet.pth, "
                                f"or FaceFusion's bisenet_resnet_34.onnx or xseg_1.onnx, in "
                                f"{' or '.join(describe_folder(folder) for folder in PARSER_FOLDERS)}")
    return find_in(PARSER_FOLDERS, name)


def find_in(folders: tuple[str, ...], name: str) -> str:
    """The full path of `name` in the first of these model folders that has it."""
    for folder in folders:
        path = full_path(folder, name)
        if path:
            return path
    raise FileNotFoundError(f"{name} is no longer in {' or '.join(describe_folder(folder) for folder in folders)}")


def describe_folder(name: str) -> str:
    if folder_paths is not None:
        return " or ".join(folder_paths.get_folder_paths(name))
    return str(PACK_MODELS / name)


def torch_device(choice: str = "auto") -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    device = model_management.get_torch_device() if model_management is not None else resolve_device("auto")
    if choice == "gpu" and device.type == "cpu":
        raise ValueError("device 'gpu' was chosen but no GPU is available; choose auto or cpu")
    return device


def offload_device() -> torch.device:
    return model_management.unet_offload_device() if model_management is not None else torch.device("cpu")


def load_handle(load, path: str, target: torch.device, **options):
    """`load(path, device=..., **options)`: torch networks are loaded onto the offload device and visit
    `target` per run (see Loaded); onnxruntime sessions are made on `target` and stay there."""
    return load(path, device=target if registry.is_onnx(path) else offload_device(), **options)


@dataclass
class Loaded:
    """A GPEN model, detector or face parser and where it runs; it waits on the offload device between runs."""

    model: object
    device: torch.device

    @property
    def size_bytes(self) -> int:
        """What its weights take where it runs (0 for onnxruntime's, which ComfyUI does not manage)."""
        return getattr(self.model, "memory_bytes", 0)

    def __enter__(self):
        if hasattr(self.model, "to") and self.device.type != "cpu":  # onnxruntime models stay put
            if model_management is not None:
                model_management.free_memory(self.size_bytes * 2, self.device)
            self.model.to(self.device)
        return self.model

    def __exit__(self, *exc):
        if hasattr(self.model, "to") and self.device.type != "cpu":
            self.model.to(offload_device())
            if model_management is not None:
                model_management.soft_empty_cache()
        return False


@contextmanager
def using_all(chain: tuple[Loaded, ...] | None):
    """Enter each Loaded of a chain (a FACE_PARSER: a parser and what was chained to it) for the length of
    a run; yields their models as a list, or None when nothing is connected."""
    if chain is None:
        yield None
        return
    with ExitStack() as stack:
        yield [stack.enter_context(loaded) for loaded in chain]


class Progress:
    """ComfyUI's progress bar and interrupt, wired to the library's progress and cancel hooks."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if model_management is None:
            return
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(total)
        self.bar.update_absolute(done, total)

    def step(self, done: int, total: int) -> None:
        self(done, total)
        self.cancel()

    @staticmethod
    def cancel() -> bool:
        if model_management is not None:
            model_management.throw_exception_if_processing_interrupted()
        return False
