"""python -m gpen --help answers at once: building the parser imports no torch, only running a command does."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# python -m gpen ARGS, then which of the heavy modules the process had imported by its end.
RUN_AND_LIST = """
import runpy, sys
sys.argv = ["gpen", *sys.argv[1:]]
try:
    runpy.run_module("gpen", run_name="__main__", alter_sys=True)
except SystemExit as end:
    print("exit", end.code)
print("imported:", sorted({name.split(".")[0] for name in sys.modules} & {"torch", "av", "ray", "onnxruntime"}))
"""


def imported_by(*args) -> list[str]:
    done = subprocess.run([sys.executable, "-c", RUN_AND_LIST, *args], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    *_, status, modules = done.stdout.splitlines()
    return [status, modules]


@pytest.mark.parametrize("args", [["--help"], ["restore", "--help"], ["download", "--help"], ["bench", "--help"]])
def test_help_imports_no_torch(args):
    assert imported_by(*args) == ["exit 0", "imported: []"]


def test_a_command_that_runs_imports_its_work():
    status, modules = imported_by("info", "no-such-file.pth")
    assert status == "exit 1" and "torch" in modules

