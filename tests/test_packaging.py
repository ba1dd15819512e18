"""pip install . as a user does it: the wheel holds every package and the catalogue, and the installed
`gpen` command resolves catalogue names from any folder, keeping models in the user's data folder."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.test_cli import file_server

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "gpen", "models/catalogue.json")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel pip builds from a copy of the checkout (offline, with the setuptools installed here)."""
    source, dist = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    for name in SOURCES:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    pip(["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, source])
    (found,) = dist.glob("*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """The wheel installed into a folder of its own: (that folder, the `gpen` command)."""
    target = tmp_path_factory.mktemp("site")
    pip(["install", "--no-deps", "--no-index", "--target", target, wheel])
    return target, target / "bin" / "gpen"


def pip(args):
    done = subprocess.run([sys.executable, "-m", "pip", "-q", *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_wheel_holds_every_package_the_catalogue_and_the_command(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {path.relative_to(REPO).as_posix() for path in (REPO / "gpen").rglob("__init__.py")}
    assert {"gpen/archs/gpen/__init__.py", "gpen/apps/__init__.py", "gpen/faces/__init__.py"} <= packages
    assert packages <= names
    assert "gpen/models/catalogue.json" in names
    assert not any(name.startswith(("models/", "tests/", "nodes/")) for name in names)
    (entry_points,) = [name for name in names if name.endswith("entry_points.txt")]
    assert "gpen = gpen.apps.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_installed_command_downloads_catalogue_models_into_the_users_folder(installed, tmp_path):
    target, command = installed
    catalogue = target / "gpen" / "models" / "catalogue.json"
    entries = json.loads(catalogue.read_text())
    (tmp_path / "site").mkdir()
    torch.save({"weight": torch.zeros(4)}, tmp_path / "site" / "detection_mobilenet0.25_Final.pth")
    elsewhere = tmp_path / "elsewhere"  # no checkout around: the catalogue comes from the package
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target), XDG_DATA_HOME=str(tmp_path / "data"))
    env.pop("COMFYUI_PATH", None)
    with file_server(tmp_path / "site") as url:
        for entry in entries["models"]:
            entry["url"] = f"{url}/{entry['file']}"
        catalogue.write_text(json.dumps(entries))  # the installed copy, pointed at the local server
        done = subprocess.run([command, "download", "retinaface_mobilenet0.25"], cwd=elsewhere, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        mine = subprocess.run([command, "download", "retinaface_mobilenet0.25", "--models-dir", tmp_path / "mine"],
                              cwd=elsewhere, env=env, capture_output=True, text=True)
        assert mine.returncode == 0, mine.stderr
    kept = tmp_path / "data" / "comfyui-gpen" / "models" / "facedetection" / "detection_mobilenet0.25_Final.pth"
    assert kept.read_bytes() == (tmp_path / "site" / "detection_mobilenet0.25_Final.pth").read_bytes()
    assert done.stdout == f"retinaface_mobilenet0.25: {kept}\n" and str(kept) in done.stderr
    assert (tmp_path / "mine" / "facedetection" / "detection_mobilenet0.25_Final.pth").is_file()
    assert list(elsewhere.iterdir()) == []
