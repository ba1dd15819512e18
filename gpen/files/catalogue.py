"""The checkpoints the pack knows by name (models/catalogue.json), and where weights live.

Weights go in ComfyUI's models folders when the pack sits in a ComfyUI tree (custom_nodes/<pack>) or
COMFYUI_PATH names one, else in a checkout's own models/ folder, else (the package installed with pip)
in a folder of the user's (user_models()); always with ComfyUI's subfolder names.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from .download import DownloadError, download, say, validate_weights
from .weights import CheckpointError

PACKAGE = Path(__file__).resolve().parents[1]  # gpen/
PACK = PACKAGE.parent  # a checkout (or ComfyUI's custom_nodes/<pack>); site-packages when installed
# A checkout keeps the catalogue in models/; a wheel ships it as gpen/models/catalogue.json (setup.py).
INSTALLED = not (PACK / "models" / "catalogue.json").is_file()
CATALOGUE_FILE = (PACKAGE if INSTALLED else PACK) / "models" / "catalogue.json"
# ComfyUI model folders by role: GPEN files live with the other face restorers (ReActor, facerestore_cf),
# face parsers with the detectors, where facexlib's users (ReActor, facerestore_cf) already keep them;
# upscalers in ComfyUI's own upscale_models.
MODEL_FOLDERS = {"restorer": ("facerestore_models", "gpen"), "detector": ("facedetection",),
                 "parser": ("facedetection", "face_parsing"), "upscaler": ("upscale_models",)}


@dataclass(frozen=True)
class Entry:
    name: str
    role: str  # "restorer", "detector", "parser" or "upscaler"
    file: str
    folder: str
    url: str
    source: str
    sha256: str | None = None
    size: int | None = None
    approx_mb: int | None = None

    @property
    def max_bytes(self) -> int | None:
        """The most a download may bring: the published size, else 4x the size the architecture implies."""
        if self.size is not None:
            return self.size
        return 4 * self.approx_mb * 2**20 if self.approx_mb is not None else None


def catalogue() -> dict[str, Entry]:
    entries = [Entry(**e) for e in json.loads(CATALOGUE_FILE.read_text())["models"]]
    for entry in entries:
        check_entry(entry)
    return {e.name: e for e in entries}


def check_entry(entry: Entry) -> None:
    """A download must land inside the entry's folder: one of its role's folders, under a plain file name."""
    if entry.folder not in MODEL_FOLDERS.get(entry.role, ()):
        raise ValueError(f"{CATALOGUE_FILE}: {entry.name}: folder {entry.folder!r} is not a {entry.role} folder "
                         f"({', '.join(MODEL_FOLDERS.get(entry.role, ()))})")
    if not is_plain_file_name(entry.file):
        raise ValueError(f"{CATALOGUE_FILE}: {entry.name}: file {entry.file!r} must be a plain file name")


def is_plain_file_name(name: str) -> bool:
    """No folders, no drive, no '..' on any system the pack runs on."""
    return (name not in ("", ".", "..") and "\0" not in name
            and PurePosixPath(name).name == name and PureWindowsPath(name).name == name)


def models_root(models_dir: str | os.PathLike | None = None) -> Path:
    """--models-dir, else COMFYUI_PATH/models, else the ComfyUI tree around the pack, else a checkout's
    models/, else (installed) user_models()."""
    if models_dir:
        return Path(models_dir)
    if os.environ.get("COMFYUI_PATH"):
        return Path(os.environ["COMFYUI_PATH"]) / "models"
    if PACK.parent.name == "custom_nodes" and (PACK.parent.parent / "models").is_dir():
        return PACK.parent.parent / "models"
    return user_models() if INSTALLED else PACK / "models"


def user_models() -> Path:
    """Where an installed package keeps weights: $XDG_DATA_HOME/comfyui-gpen/models (by default
    ~/.local/share/comfyui-gpen/models), or %LOCALAPPDATA%\\comfyui-gpen\\models on Windows."""
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        base = Path(os.environ["LOCALAPPDATA"])
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "comfyui-gpen" / "models"


def lookup(name: str) -> Entry | None:
    """A catalogue entry by name, file name or file stem, ignoring case."""
    wanted = name.lower()
    for entry in catalogue().values():
        if wanted in (entry.name.lower(), entry.file.lower(), Path(entry.file).stem.lower()):
            return entry
    return None


def resolve(name_or_path: str, role: str, models_dir: str | os.PathLike | None = None, fetch: bool = True) -> Path:
    """A weight file from a path, or from a catalogue name: downloaded on first use when missing, and
    again when the file there fails a quick check (a torch zip's central directory, a safetensors header;
    legacy torch files are loaded), as a download cut short by an older version of the pack would."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    entry = lookup(name_or_path)
    root = models_root(models_dir)
    if entry is None:
        if found := in_folders(root, role, name_or_path):
            return found
        known = ", ".join(e.name for e in catalogue().values() if e.role == role)
        raise FileNotFoundError(f"{name_or_path}: no such file, and not a model this pack knows ({known})")
    found = in_folders(root, role, entry.file)
    if found is not None:
        try:
            validate_weights(found, quick=True)
            return found
        except CheckpointError as e:
            if not fetch:
                raise FileNotFoundError(f"{e}; download it again from {entry.url}") from None
    dest = found or root / entry.folder / entry.file
    if not fetch:
        raise FileNotFoundError(f"{entry.file} is not in {dest.parent}; download it from {entry.url}")
    try:
        path = download(entry.url, dest, sha256=entry.sha256, size=entry.size, max_bytes=entry.max_bytes)
    except DownloadError as e:
        missing = f"{dest} is not usable" if found else f"{entry.file} is not in {dest.parent}"
        raise FileNotFoundError(f"{missing} and could not be downloaded ({e.reason}). "
                                f"Download it from {entry.url} and put it in that folder.") from None
    say(f"{entry.name}: downloaded to {path}")  # where models go, for the next time or another program
    return path


def in_folders(root: Path, role: str, file: str) -> Path | None:
    return next((root / folder / file for folder in MODEL_FOLDERS[role] if (root / folder / file).is_file()), None)
