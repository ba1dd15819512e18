"""The model catalogue and where weights are looked for."""

import re
from pathlib import Path

import pytest

from gpen import catalogue


def test_catalogue_names_every_checkpoint_users_have():
    entries = catalogue.catalogue()
    assert {"GPEN-BFR-256", "GPEN-BFR-512", "GPEN-BFR-1024", "GPEN-BFR-2048",
            "retinaface_resnet50", "retinaface_mobilenet0.25"} <= set(entries)
    for entry in entries.values():
        assert entry.url.startswith("https://") and entry.source
        assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
        assert entry.folder in catalogue.MODEL_FOLDERS[entry.kind]


def test_lookup_by_name_file_or_stem_ignoring_case():
    assert catalogue.lookup("gpen-bfr-512").file == "GPEN-BFR-512.pth"
    assert catalogue.lookup("detection_Resnet50_Final.pth").name == "retinaface_resnet50"
    assert catalogue.lookup("GPEN-BFR-512.onnx") is None


def test_models_live_in_comfyui_when_told_or_when_the_pack_is_inside_it(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert catalogue.models_root("/somewhere") == Path("/somewhere")
    monkeypatch.setattr(catalogue, "PACK", tmp_path / "ComfyUI" / "custom_nodes" / "ComfyUI-GPEN")
    assert catalogue.models_root() == tmp_path / "ComfyUI" / "custom_nodes" / "ComfyUI-GPEN" / "models"
    (tmp_path / "ComfyUI" / "models").mkdir(parents=True)
    assert catalogue.models_root() == tmp_path / "ComfyUI" / "models"
    monkeypatch.setenv("COMFYUI_PATH", "/opt/ComfyUI")
    assert catalogue.models_root() == Path("/opt/ComfyUI/models")


def test_files_already_in_the_folders_are_found_without_the_network(tmp_path):
    (tmp_path / "gpen").mkdir()
    (tmp_path / "gpen" / "GPEN-BFR-1024.pth").write_bytes(b"x")
    assert catalogue.resolve("GPEN-BFR-1024", "gpen", tmp_path, fetch=False) == tmp_path / "gpen" / "GPEN-BFR-1024.pth"
    with pytest.raises(FileNotFoundError, match="not a model this pack knows"):
        catalogue.resolve("GPEN-BFR-4096", "gpen", tmp_path)
