"""The checkpoints the pack knows by name (models/catalogue.json), and where weights live.

Weights go in ComfyUI's models folders when the pack sits in a ComfyUI tree (custom_nodes/<pack>) or
COMFYUI_PATH names one, else in the pack's own models/ folder, with ComfyUI's subfolder names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .download import DownloadError, download

PACK = Path(__file__).resolve().parents[1]
CATALOGUE_FILE = PACK / "models" / "catalogue.json"
# ComfyUI model folders by kind: GPEN files live with the other face restorers (ReActor, facerestore_cf).
MODEL_FOLDERS = {"gpen": ("facerestore_models", "gpen"), "detector": ("facedetection",)}


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # "gpen" or "detector"
    file: str
    folder: str
    url: str
    source: str
    sha256: str | None = None
    size: int | None = None
    approx_mb: int | None = None


def catalogue() -> dict[str, Entry]:
    entries = json.loads(CATALOGUE_FILE.read_text())["models"]
    return {e["name"]: Entry(**e) for e in entries}


def models_root(models_dir: str | os.PathLike | None = None) -> Path:
    """--models-dir, else COMFYUI_PATH/models, else the ComfyUI tree around the pack, else models/."""
    if models_dir:
        return Path(models_dir)
    if os.environ.get("COMFYUI_PATH"):
        return Path(os.environ["COMFYUI_PATH"]) / "models"
    if PACK.parent.name == "custom_nodes" and (PACK.parent.parent / "models").is_dir():
        return PACK.parent.parent / "models"
    return PACK / "models"


def lookup(name: str) -> Entry | None:
    """A catalogue entry by name, file name or file stem, ignoring case."""
    wanted = name.lower()
    for entry in catalogue().values():
        if wanted in (entry.name.lower(), entry.file.lower(), Path(entry.file).stem.lower()):
            return entry
    return None


def resolve(name_or_path: str, kind: str, models_dir: str | os.PathLike | None = None, fetch: bool = True) -> Path:
    """A weight file from a path, or from a catalogue name (downloaded on first use when missing)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    entry = lookup(name_or_path)
    root = models_root(models_dir)
    if entry is None:
        for folder in MODEL_FOLDERS[kind]:
            if (root / folder / name_or_path).is_file():
                return root / folder / name_or_path
        known = ", ".join(e.name for e in catalogue().values() if e.kind == kind)
        raise FileNotFoundError(f"{name_or_path}: no such file, and not a model this pack knows ({known})")
    for folder in MODEL_FOLDERS[kind]:
        if (root / folder / entry.file).is_file():
            return root / folder / entry.file
    dest = root / entry.folder / entry.file
    if not fetch:
        raise FileNotFoundError(f"{entry.file} is not in {dest.parent}; download it from {entry.url}")
    try:
        return download(entry.url, dest, sha256=entry.sha256, size=entry.size)
    except DownloadError as e:
        raise FileNotFoundError(f"{entry.file} is not in {dest.parent} and could not be downloaded ({e.reason}). "
                                f"Download it from {entry.url} and put it in that folder.") from None
