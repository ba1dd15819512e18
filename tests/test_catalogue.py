"""The model catalogue, where weights are looked for, and what happens to a bad file found there."""

import functools
import http.server
import io
import json
import re
import threading
from pathlib import Path

import pytest
import torch

from gpen.files import catalogue


def torch_bytes(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


WEIGHTS = torch_bytes({"w": torch.ones(1000)})


@pytest.fixture
def site(tmp_path):
    """A folder served on 127.0.0.1, and the catalogue's downloads pointed at it."""
    folder = tmp_path / "site"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=folder)
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def use_catalogue(monkeypatch, tmp_path, change):
    """The pack's catalogue with change(entry) applied to every entry."""
    data = json.loads(catalogue.CATALOGUE_FILE.read_text())
    for entry in data["models"]:
        change(entry)
    (tmp_path / "catalogue.json").write_text(json.dumps(data))
    monkeypatch.setattr(catalogue, "CATALOGUE_FILE", tmp_path / "catalogue.json")


def test_catalogue_names_every_checkpoint_users_have():
    entries = catalogue.catalogue()
    assert {"GPEN-BFR-256", "GPEN-BFR-512", "GPEN-BFR-1024", "GPEN-BFR-2048",
            "retinaface_resnet50", "retinaface_mobilenet0.25", "parsing_parsenet", "parsing_bisenet",
            "GPEN-BFR-512-onnx", "gpen_bfr_256", "gpen_bfr_512", "gpen_bfr_1024", "gpen_bfr_2048"} <= set(entries)
    for entry in entries.values():
        assert entry.url.startswith("https://") and entry.source
        assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
        assert entry.folder in catalogue.MODEL_FOLDERS[entry.role]
        assert entry.max_bytes >= 2**20  # every download has a cap


def test_lookup_by_name_file_or_stem_ignoring_case():
    assert catalogue.lookup("gpen-bfr-512").file == "GPEN-BFR-512.pth"
    assert catalogue.lookup("detection_Resnet50_Final.pth").name == "retinaface_resnet50"
    assert catalogue.lookup("GPEN-BFR-512.onnx").name == "GPEN-BFR-512-onnx"  # ReActor's, by its file name
    assert catalogue.lookup("gpen_bfr_2048").file == "gpen_bfr_2048.onnx"  # FaceFusion's
    assert catalogue.lookup("GPEN-BFR-4096") is None


def test_face_parsers_are_facexlibs_releases_saved_with_the_detectors():
    entries = catalogue.catalogue()
    for name, tag in (("parsing_parsenet", "v0.2.2"), ("parsing_bisenet", "v0.2.0")):
        entry = entries[name]
        assert (entry.role, entry.folder, entry.file) == ("parser", "facedetection", f"{name}.pth")
        assert entry.url == f"https://github.com/xinntao/facexlib/releases/download/{tag}/{name}.pth"
    assert catalogue.MODEL_FOLDERS["parser"] == ("facedetection", "face_parsing")
    assert {e.folder for e in entries.values() if e.file.endswith(".onnx")} == {"facerestore_models"}


def test_models_live_in_comfyui_when_told_or_when_the_pack_is_inside_it(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert catalogue.models_root("/somewhere") == Path("/somewhere")
    monkeypatch.setattr(catalogue, "PACK", tmp_path / "ComfyUI" / "custom_nodes" / "ComfyUI-GPEN")
    assert catalogue.models_root() == tmp_path / "ComfyUI" / "custom_nodes" / "ComfyUI-GPEN" / "models"
    (tmp_path / "ComfyUI" / "models").mkdir(parents=True)
    assert catalogue.models_root() == tmp_path / "ComfyUI" / "models"
    monkeypatch.setenv("COMFYUI_PATH", "/opt/ComfyUI")
    assert catalogue.models_root() == Path("/opt/ComfyUI/models")


def test_an_installed_package_keeps_models_in_the_users_data_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setattr(catalogue, "INSTALLED", True)
    monkeypatch.setattr(catalogue, "PACK", tmp_path / "lib" / "python3.11" / "site-packages")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert catalogue.models_root() == tmp_path / "data" / "comfyui-gpen" / "models"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert catalogue.models_root() == tmp_path / "home" / ".local" / "share" / "comfyui-gpen" / "models"
    assert catalogue.models_root(tmp_path / "mine") == tmp_path / "mine"  # --models-dir still says where


def test_files_already_in_the_folders_are_found_without_the_network(tmp_path):
    (tmp_path / "gpen").mkdir()
    (tmp_path / "gpen" / "GPEN-BFR-1024.pth").write_bytes(WEIGHTS)
    assert catalogue.resolve("GPEN-BFR-1024", "restorer", tmp_path, fetch=False) == \
        tmp_path / "gpen" / "GPEN-BFR-1024.pth"
    (tmp_path / "face_parsing").mkdir()
    (tmp_path / "face_parsing" / "parsing_bisenet.pth").write_bytes(WEIGHTS)
    assert catalogue.resolve("parsing_bisenet", "parser", tmp_path, fetch=False) == \
        tmp_path / "face_parsing" / "parsing_bisenet.pth"
    with pytest.raises(FileNotFoundError, match="not a model this pack knows"):
        catalogue.resolve("GPEN-BFR-4096", "restorer", tmp_path)


def test_a_file_cut_short_is_downloaded_again_and_said_so(site, tmp_path, monkeypatch, capsys):
    folder, url = site
    (folder / "GPEN-BFR-512.pth").write_bytes(WEIGHTS)
    use_catalogue(monkeypatch, tmp_path, lambda e: e.update(url=f"{url}/{e['file']}"))
    bad = tmp_path / "models" / "facerestore_models" / "GPEN-BFR-512.pth"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(WEIGHTS[: len(WEIGHTS) // 2])  # what an older version left after a cut connection
    with pytest.raises(FileNotFoundError, match=re.escape(f"; download it again from {url}/GPEN-BFR-512.pth")):
        catalogue.resolve("GPEN-BFR-512", "restorer", tmp_path / "models", fetch=False)
    assert catalogue.resolve("GPEN-BFR-512", "restorer", tmp_path / "models") == bad
    assert bad.read_bytes() == WEIGHTS
    assert f"{bad}: is cut short" in capsys.readouterr().err
    assert catalogue.resolve("GPEN-BFR-512", "restorer", tmp_path / "models") == bad
    assert capsys.readouterr().err == ""  # now it is fine, and nothing is said


def test_a_bad_file_that_cannot_be_replaced_says_so(tmp_path, monkeypatch):
    use_catalogue(monkeypatch, tmp_path, lambda e: e.update(url=f"http://127.0.0.1:9/{e['file']}"))  # nothing there
    bad = tmp_path / "facedetection" / "detection_Resnet50_Final.pth"
    bad.parent.mkdir()
    bad.write_text("<html>Not Found</html>")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{bad} is not usable and could not be downloaded")):
        catalogue.resolve("retinaface_resnet50", "detector", tmp_path)
    assert bad.read_text() == "<html>Not Found</html>"  # replaced only by a valid file


@pytest.mark.parametrize("file", ["../evil.pth", "/tmp/evil.pth", "sub/evil.pth", "sub\\evil.pth", "..", "C:x.pth", ""])
def test_catalogue_file_names_stay_inside_their_folder(tmp_path, monkeypatch, file):
    use_catalogue(monkeypatch, tmp_path, lambda e: e.update(file=file) if e["name"] == "GPEN-BFR-512" else None)
    with pytest.raises(ValueError, match=f"GPEN-BFR-512: file {re.escape(repr(file))} must be a plain file name"):
        catalogue.resolve("GPEN-BFR-512", "restorer", tmp_path)
    assert list(tmp_path.iterdir()) == [tmp_path / "catalogue.json"]


def test_catalogue_folders_are_the_roles_own(tmp_path, monkeypatch):
    use_catalogue(monkeypatch, tmp_path, lambda e: e.update(folder="../facerestore_models"))
    with pytest.raises(ValueError, match="folder '../facerestore_models' is not a restorer folder"):
        catalogue.catalogue()
