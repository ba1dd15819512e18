"""The house: gpen/ is built in layers, each importing only the ones below it, with no circle.

    apps/      programs: cli, jobs, video files, Ray, benchmarks
    loader.py  a path -> a handle for a role (restorer, detector, parser, upscaler)
    faces/     the batched face pipeline on tensors, no file I/O
    files/     bytes on disk: weights, the registry of networks, images, catalogue, downloads
    archs/     the networks and their specs
    devices.py devices and dtypes

Imports are read from the source (inside functions too), so a lazy import cannot hide an arrow.
"""

import ast
from pathlib import Path

GPEN = Path(__file__).resolve().parents[1] / "gpen"
LAYERS = ["devices", "archs", "files", "faces", "loader", "apps"]
FACADE = {"gpen", "gpen.__main__"}  # the package's face: it may show anything
# Imports of gpen modules inside functions, each with the reason it is not at the top.
LAZY = {
    ("gpen.apps.cli", "gpen.apps.bench"): "python -m gpen --help does not import torch",
    ("gpen.apps.cli", "gpen.apps.acceptance"): "python -m gpen --help does not import torch",
    ("gpen.apps.cli", "gpen.apps.jobs"): "python -m gpen --help does not import torch",
    ("gpen.apps.cli", "gpen.apps.distributed"): "python -m gpen --help does not import torch",
    ("gpen.apps.cli", "gpen.files.catalogue"): "python -m gpen --help does not import torch",
    ("gpen.apps.cli", "gpen.files.weights"): "python -m gpen --help does not import torch",
    ("gpen.apps.cli", "gpen.files.download"): "python -m gpen --help does not import torch",
    ("gpen.apps.cli", "gpen.loader"): "python -m gpen --help does not import torch",
}


def modules() -> dict[str, Path]:
    found = {}
    for path in GPEN.rglob("*.py"):
        parts = list(path.relative_to(GPEN.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict) -> list[tuple[str, bool]]:
    """(gpen module imported, whether inside a function) for each import in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target in known and target != name:
                found.append((target, id(node) in nested))
    return found


def layer(name: str) -> int | None:
    if name in FACADE:
        return None
    return LAYERS.index(name.split(".")[1])


def graph() -> dict[str, list[tuple[str, bool]]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_sits_in_a_layer():
    for name in modules():
        assert name in FACADE or name.split(".")[1] in LAYERS, f"{name} is in no layer: {', '.join(LAYERS)}"


def test_no_module_imports_a_higher_layer():
    upward = [f"{name} -> {target}" for name, targets in graph().items() for target, _ in targets
              if layer(name) is not None and layer(target) is not None and layer(target) > layer(name)]
    assert not upward, "imports that run up the layers: " + "; ".join(sorted(set(upward)))


def test_no_modules_import_each_other_in_a_circle():
    edges = {name: {t for t, _ in targets} for name, targets in graph().items()}
    circles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not circles, "import circles: " + "; ".join(circles)


def test_imports_inside_functions_are_only_the_ones_with_a_reason():
    lazy = {(name, target) for name, targets in graph().items() for target, inside in targets if inside}
    unexplained = sorted(lazy - set(LAZY))
    assert not unexplained, "imports of gpen modules inside functions (move them to the top, or say why in LAZY): " \
        + "; ".join(f"{a} -> {b}" for a, b in unexplained)
