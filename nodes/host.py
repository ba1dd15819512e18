"""What the nodes need from ComfyUI (model folders, devices, memory, progress, interrupt), with plain
stand-ins when the modules are imported outside ComfyUI (tests, scripts)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..gpen.devices import resolve_device
from ..gpen.files import registry
from ..gpen.files.catalogue import MODEL_FOLDERS

try:  # inside ComfyUI
    import comfy.model_management as model_management
    import comfy.model_patcher
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


def load_handle(load, path: str, target: torch.device, **options) -> Loaded:
    """`load(path, device=..., **options)` as a node's model for `target`: torch networks are loaded onto
    the offload device and go to `target` on their first run (see Loaded); onnxruntime sessions are made on
    `target` and stay there."""
    return Loaded(load(path, device=target if registry.is_onnx(path) else offload_device(), **options), target)


class GPENPackNetwork(torch.nn.Module):
    """A handle as ComfyUI's memory manager sees a model. It holds no tensors of its own, so ComfyUI never
    moves its layers one at a time (lowvram): ours run whole on one device, so it loads and unloads it
    whole, through `.to`, which moves the handle and so keeps where the handle says it runs true."""

    def __init__(self, handle):
        super().__init__()
        self.handle = handle  # a handle, not an nn.Module: held, not registered as a layer
        self.device = None  # ModelPatcher sets it: the offload device, where handles are loaded

    def to(self, device):
        self.handle.to(device)
        return self


@dataclass(eq=False)
class Loaded:
    """A GPEN model, detector or face parser and where it runs. A torch one stays there between runs: inside
    ComfyUI its memory manager holds it (`patcher`) like its own models, moving it to the offload device
    when another model needs the room, on an out-of-memory error or when the user frees memory, and back on
    its next run. onnxruntime's stay where their session runs (ComfyUI does not see them)."""

    model: object
    device: torch.device
    patcher: object = field(init=False, default=None)

    def __post_init__(self):
        if model_management is not None and self.size_bytes:
            self.patcher = comfy.model_patcher.ModelPatcher(GPENPackNetwork(self.model), load_device=self.device,
                                                            offload_device=offload_device(), size=self.size_bytes)

    @property
    def size_bytes(self) -> int:
        """What its weights take where it runs (0 for onnxruntime's)."""
        return getattr(self.model, "memory_bytes", 0)

    def release(self) -> None:
        """Off the device, as ComfyUI unloads a model: for one the nodes' cache lets go of (a node output
        that still holds it brings it back on its next run)."""
        if self.patcher is None:
            if self.size_bytes:
                self.model.to(offload_device())
            return
        for i, entry in enumerate(model_management.current_loaded_models):
            if entry.model is self.patcher:
                model_management.current_loaded_models.pop(i).model_unload()  # as free_memory unloads one
                return


def on_device(*chain: Loaded | None, working_bytes: int = 0) -> list:
    """The models of one node run (None for an input not connected), each on its device. Inside ComfyUI
    they are asked for in one request, as its samplers ask for a model and its control nets, so that making
    room for one never unloads another of the same run; `working_bytes` (faces/run_memory.py) is the memory
    the run needs beyond their weights, which ComfyUI frees beside them (as it does for a VAE decode)."""
    connected = [loaded for loaded in chain if loaded is not None]
    patchers = [loaded.patcher for loaded in connected if loaded.patcher is not None]
    if patchers:
        model_management.load_models_gpu(patchers, memory_required=working_bytes, force_full_load=True)
    for loaded in connected:
        if loaded.size_bytes and (loaded.patcher is None or not loaded.patcher.loaded_size()):
            loaded.model.to(loaded.device)  # outside ComfyUI; and under --novram, where ComfyUI loads no weights
    return [loaded and loaded.model for loaded in chain]


def counted(loaded: Loaded | None):
    """The model, where it runs on ComfyUI's device, for the working memory a run asks it for (faces/run_memory.py);
    None for one on another device (a GPEN set to the CPU beside a GPU), or not connected."""
    return loaded.model if loaded is not None and loaded.device == torch_device() else None


def handles(chain: tuple[Loaded, ...] | None) -> list:
    """The models of a chain (a FACE_PARSER input; None when not connected) counted as `counted` counts one."""
    return [model for model in map(counted, chain or ()) if model is not None]


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
