"""Saved workflows keep loading: every node's id, inputs, widget order and outputs, against a frozen copy.

tests/data/node_definitions_v1.json is what the eight nodes declared before the package was
reorganised; tests/data/node_definitions_segs.json what the four SEGS nodes declared when they came (issue 24). A workflow saved then names node ids, links inputs and outputs by name and position, and
stores widget values in widget order; so nothing may be renamed, retyped, reordered or removed, a
default may not change (but for the deliberate changes in CHANGED_DEFAULTS), and a range may only widen.
New inputs go at the end, new outputs last.
"""

import json
import math
from pathlib import Path

import pytest

from tests.test_nodes import load_pack

FROZEN = {**json.loads((Path(__file__).parent / "data" / "node_definitions_v1.json").read_text()),
          **json.loads((Path(__file__).parent / "data" / "node_definitions_segs.json").read_text())}
# Defaults changed on purpose, with the reason. A saved workflow stores its own value, so it loads as it was.
CHANGED_DEFAULTS = {
    # Issue 22: 0.5 passed a cat, a pearl, a painting; 0 now asks for the detector's own measured default
    # (RetinaFace 0.95, SCRFD 0.5: BENCHMARKS.md, "Detector thresholds").
    "GPENFaceRestore.threshold": 0, "GPENDetectAndCropFaces.threshold": 0,
}


def declared(cls) -> dict:
    """A node class's inputs as the frozen copy lists them."""
    inputs = cls.INPUT_TYPES()
    out = {}
    for section in ("required", "optional"):
        out[section] = []
        for name, spec in inputs.get(section, {}).items():
            kind, options = (tuple(spec) + ({},))[:2]
            entry = {"name": name, "type": "COMBO" if isinstance(kind, list) else kind, **options}
            if isinstance(kind, list):
                entry["choices"] = kind
            out[section].append(entry)
    return out


@pytest.fixture(scope="module")
def pack():
    return load_pack()


def test_every_frozen_node_is_still_registered_under_its_id_and_name(pack):
    for node_id, frozen in FROZEN.items():
        assert node_id in pack.NODE_CLASS_MAPPINGS, node_id
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[node_id] == frozen["display_name"]
        assert pack.NODE_CLASS_MAPPINGS[node_id].FUNCTION == frozen["function"]


@pytest.mark.parametrize("node_id", list(FROZEN))
def test_outputs_keep_their_types_names_and_positions(pack, node_id):
    cls, frozen = pack.NODE_CLASS_MAPPINGS[node_id], FROZEN[node_id]
    outputs = list(cls.RETURN_TYPES)
    names = list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))
    assert outputs[:len(frozen["outputs"])] == frozen["outputs"], "outputs may only be added, last"
    assert names[:len(frozen["output_names"])] == frozen["output_names"]


@pytest.mark.parametrize("node_id", list(FROZEN))
def test_inputs_keep_their_names_order_types_defaults_and_ranges(pack, node_id):
    now = declared(pack.NODE_CLASS_MAPPINGS[node_id])
    for section in ("required", "optional"):
        frozen = FROZEN[node_id][section]
        current = now[section]
        assert [e["name"] for e in current[:len(frozen)]] == [e["name"] for e in frozen], \
            f"{node_id} {section} inputs renamed or reordered (new ones go at the end)"
        for old, new in zip(frozen, current):
            where = f"{node_id}.{old['name']}"
            assert new["type"] == old["type"], where
            if where in CHANGED_DEFAULTS:
                assert new.get("default") == CHANGED_DEFAULTS[where], f"{where}: default changed"
            elif "default" in old:
                assert new.get("default") == pytest.approx(old["default"]) if isinstance(old["default"], float) \
                    else new.get("default") == old["default"], f"{where}: default changed"
            if "min" in old:
                assert new["min"] <= old["min"], f"{where}: range narrowed"
            if "max" in old:
                assert new["max"] >= old["max"], f"{where}: range narrowed"
            if "step" in old:
                assert math.isclose(new["step"], old["step"]), f"{where}: step changed"
            if "choices" in old:
                assert set(old["choices"]) <= set(new["choices"]), f"{where}: a choice was removed"
        for added in current[len(frozen):]:
            if section == "required":  # a saved workflow has no value for it: it must be a widget with a default
                assert "default" in added or added["type"] == "COMBO", \
                    f"{node_id}.{added['name']}: a new required input needs a default (or make it optional)"


WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def test_the_shipped_workflows_widget_values_fit_the_nodes_by_position(pack):
    """A saved node stores its widget values in widget order: each value of the shipped workflows,
    read by the frozen order, is one the current node still accepts under that name."""
    workflows = Path(__file__).resolve().parents[1] / "workflows"
    for path in sorted(workflows.glob("*.json")):
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] not in FROZEN:
                continue
            frozen = FROZEN[node["type"]]
            names = [e["name"] for e in frozen["required"] + frozen["optional"] if e["type"] in WIDGET_TYPES]
            values = node.get("widgets_values", [])
            # the frozen widgets' values first; widgets added since (at the end) save theirs after them
            assert len(values) >= len(names), f"{path.name}: {node['type']} saved {len(values)} widget values"
            now = {e["name"]: e for section in declared(pack.NODE_CLASS_MAPPINGS[node["type"]]).values()
                   for e in section}
            for name, value in zip(names, values):
                spec, where = now[name], f"{path.name}: {node['type']}.{name} = {value!r}"
                if "choices" in spec and name not in ("model_name", "detector_name", "parser_name"):
                    assert value in spec["choices"], where
                if spec["type"] in ("INT", "FLOAT"):
                    assert spec.get("min", -math.inf) <= value <= spec.get("max", math.inf), where
