"""The networks, pure: each module holds one architecture and the spec that says what it is.

SPECS lists them, one line each, in the order files are tried against them; `register(spec)` adds
a user's own network (see README, Development).
"""

from __future__ import annotations

from . import bisenet, onnx, parsenet, retinaface, rrdbnet, srvgg
from .gpen import SPEC as GPEN_SPEC
from .spec import ArchSpec

SPECS: list[ArchSpec] = [
    GPEN_SPEC,
    retinaface.SPEC,
    parsenet.SPEC,
    bisenet.SPEC,
    rrdbnet.SPEC,
    srvgg.SPEC,
    onnx.REGION_PARSER,
    onnx.OCCLUDER,
    onnx.SCRFD,
    onnx.GPEN_EXPORT,
]


def register(spec: ArchSpec) -> ArchSpec:
    """Add a network to those files are recognised as (tried after the built-in ones); a spec of the
    same name replaces the one registered before it, so re-importing a module is harmless."""
    SPECS[:] = [s for s in SPECS if s.name != spec.name or s.format != spec.format] + [spec]
    return spec
