"""What a network is, and whether a file is ONNX, is decided in one place: the specs (gpen/archs) as
files/registry.py reads them. Elsewhere no code compares a `kind` with a name, nor a suffix with
".onnx". Read from the source, so that the next network cannot add a branch unnoticed."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REGISTRY = "gpen/files/registry.py"
# Comparisons that are about something else than networks, each with what it is about.
ELSEWHERE = {
    ("gpen/files/download.py", '".onnx"'): "a download's bytes are checked as the format its name promises "
                                           "(zip, safetensors, ONNX), before any registry reads them",
    ("gpen/apps/video.py", "kind"): "a video container's format name (avi)",
    ("gpen/files/images.py", "kind"): "a numpy dtype's kind (float or integer pixels)",
}


def sources() -> list[Path]:
    return sorted([*(REPO / "gpen").rglob("*.py"), *(REPO / "nodes").rglob("*.py")])


def is_kind(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "kind" or isinstance(node, ast.Attribute) and node.attr == "kind"


def is_onnx_suffix(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.lower() == ".onnx"


def branches(path: Path) -> list[tuple[int, str]]:
    """(line, what) for each comparison of a kind with a name, and each test of a suffix for ".onnx"."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            names = [side for side in sides if isinstance(side, ast.Constant) and isinstance(side.value, str)]
            if names and any(is_kind(side) for side in sides):
                found.append((node.lineno, "kind"))
            if any(is_onnx_suffix(side) or isinstance(side, (ast.Tuple, ast.Set, ast.List))
                   and any(is_onnx_suffix(e) for e in side.elts) for side in sides):
                found.append((node.lineno, '".onnx"'))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "endswith":
            if any(is_onnx_suffix(arg) for arg in node.args):
                found.append((node.lineno, '".onnx"'))
    return found


def test_no_kind_comparisons_or_onnx_suffix_switches_outside_the_registry():
    offending = [f"{path.relative_to(REPO)}:{line} compares {what}" for path in sources()
                 if str(path.relative_to(REPO)) != REGISTRY
                 for line, what in branches(path) if (str(path.relative_to(REPO)), what) not in ELSEWHERE]
    assert not offending, "decide what a network is in its spec, and ONNX or not in files/registry.py: " + \
        "; ".join(offending)


def test_the_check_sees_both_kinds_of_branch(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('if parser.kind == "parsenet":\n    pass\n'
                      'onnx = path.lower().endswith(".onnx")\n'
                      'if suffix in (".onnx", ".ort"):\n    pass\n'
                      'fine = detector.info.arch\n')
    assert branches(sample) == [(1, "kind"), (3, '".onnx"'), (4, '".onnx"')]
