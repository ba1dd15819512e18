"""ONNX networks users keep, run by onnxruntime and recognised by their input and output shapes.

GPEN exports (the files ReActor and FaceFusion users keep) take NCHW RGB in [-1, 1] and return the
same, like the PyTorch model; many fix the batch dimension at 1, in which case faces are run one at
a time.

FaceFusion's face parsers and occluders:

- Region parsers (bisenet_resnet_18.onnx, bisenet_resnet_34.onnx): one input (1 or N, 3, 512, 512),
  RGB normalised with the ImageNet mean/std; the first output holds the 19 face-region logits at
  512x512 (background, skin, brows, eyes, glasses, ears, earring, nose, mouth, lips, neck, necklace,
  cloth, hair, hat: facexlib's BiSeNet classes, in that order).
- Occluders (xseg_1.onnx, xseg_2.onnx, xseg_3.onnx, DeepFaceLab's XSeg): one input (N, 256, 256, 3),
  channels last, BGR in 0..1, the way FaceFusion feeds them; the output is the probability that the
  face shows, (N, 256, 256, 1) channels last (N,256,256 and N,1,256,256 are accepted too).

FaceFusion 2.x's face_parser.onnx has the region parsers' shapes but took RGB scaled to -1..1;
shapes cannot tell it apart, and it is fed the ImageNet normalisation of the 3.x parsers here.

insightface's SCRFD detectors are told by their number of outputs and run through insightface.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .spec import MAX_PARSER_FEATURES, ArchSpec, ConfigError, Convention, check_parser_output

ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# Face sizes accepted from a GPEN export: the released GPEN runs 256 to 2048. A fixed input far bigger
# (a 97-byte file can declare 30000x30000) would take gigabytes on the first restore. (The torch
# network's bounds, read from its layers, are archs.gpen's MIN_SIZE and MAX_SIZE.)
EXPORT_MIN_SIZE, EXPORT_MAX_SIZE = 64, 4096
# insightface's SCRFD exports: number of outputs -> whether they include the five landmarks.
SCRFD_OUTPUTS = {6: False, 9: True, 10: False, 15: True}
PARSER_SIZE = 512
PARSER_CLASSES = 19
OCCLUDER_SIZE = 256


class OnnxRunner:
    """An onnxruntime session as a tensor -> tensor function, like a torch network: its first input to
    its first output, in steps of the file's fixed batch (1 for many exports) or all at once."""

    def __init__(self, session):
        self.session = session
        inputs = session.get_inputs()
        self.input_name, self.output_name = inputs[0].name, session.get_outputs()[0].name
        self.input_dtype = input_dtype(session)
        self.fixed_batch = inputs[0].shape[0] if isinstance(inputs[0].shape[0], int) else None
        self.providers = session.get_providers()
        on_cuda = "CUDAExecutionProvider" in self.providers and torch.cuda.is_available()
        # Where callers had best keep their tensors; results always come back on the input's device.
        self.device = torch.device("cuda" if on_cuda else "cpu")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=self.input_dtype)
        step = self.fixed_batch or len(batch)
        outs = []
        for i in range(0, len(batch), step):
            part = batch[i:i + step]
            if len(part) < step:  # the last faces of a file with a fixed batch: padded, the padding dropped
                part = np.concatenate([part, np.zeros((step - len(part), *part.shape[1:]), part.dtype)])
            outs.append(self.session.run([self.output_name], {self.input_name: part})[0][:len(batch) - i])
        return torch.from_numpy(np.concatenate(outs).astype(np.float32)).to(x.device)

    def __repr__(self) -> str:
        return f"<onnxruntime session on {', '.join(self.providers)}>"


def input_dtype(session) -> np.dtype:
    return np.dtype(ONNX_DTYPES.get(session.get_inputs()[0].type, np.float32))


def fits(dim, want: int) -> bool:
    """Whether an ONNX dimension (an int, or a name/None where it is dynamic) can be `want`."""
    return not isinstance(dim, int) or dim == want


def is_fixed(dim, want: int) -> bool:
    return isinstance(dim, int) and dim == want


def describe_shapes(session) -> str:
    inputs = ", ".join(f"{i.name} {list(i.shape)}" for i in session.get_inputs())
    outputs = ", ".join(f"{o.name} {list(o.shape)}" for o in session.get_outputs())
    return f"inputs {inputs or 'none'}; outputs {outputs or 'none'}"


def is_gpen_export(session) -> bool:
    """One image input N,3,S,S with a fixed S, and an image out (its bounds and size are checked by
    gpen_export_config)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = inputs[0].shape if len(inputs) == 1 else ()
    out = outputs[0].shape if len(outputs) == 1 else ()
    return (len(shape) == 4 and shape[1] == 3 and isinstance(shape[2], int) and shape[2] == shape[3]
            and len(out) == 4 and fits(out[1], 3))


def gpen_export_config(session) -> dict:
    """{"size": S} of a GPEN export, its bounds and output checked before anything runs."""
    size = session.get_inputs()[0].shape[2]
    if not EXPORT_MIN_SIZE <= size <= EXPORT_MAX_SIZE:
        raise ValueError(f"is an ONNX model for {size}x{size} faces; GPEN exports run from {EXPORT_MIN_SIZE} "
                         f"to {EXPORT_MAX_SIZE} (the released GPEN: 256 to 2048)")
    output = session.get_outputs()[0].shape
    if not (fits(output[2], size) and fits(output[3], size)):
        raise ValueError(f"is an ONNX model whose output is {output}, not a GPEN export "
                         f"(output N,3,{size},{size} like its input)")
    return {"size": size}


class GpenExport(OnnxRunner):
    def __init__(self, session, size: int):
        super().__init__(session)
        self.size = size


def is_region_parser(session) -> bool:
    """One input (1 or dynamic, 3, 512, 512) and a first output with 19 channels at 512x512."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or not outputs:
        return False
    shape, out = inputs[0].shape, outputs[0].shape
    return (len(shape) == 4 and fits(shape[0], 1) and is_fixed(shape[1], 3)
            and is_fixed(shape[2], PARSER_SIZE) and is_fixed(shape[3], PARSER_SIZE)
            and len(out) == 4 and fits(out[0], 1) and is_fixed(out[1], PARSER_CLASSES)
            and fits(out[2], PARSER_SIZE) and fits(out[3], PARSER_SIZE))


def is_occluder(session) -> bool:
    """One input (N, 256, 256, 3) channels last and a first output of one channel at 256x256:
    (N, 256, 256, 1) as the XSeg exports have it, or (N, 256, 256) or (N, 1, 256, 256)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or not outputs:
        return False
    shape, out = inputs[0].shape, list(outputs[0].shape)
    if not (len(shape) == 4 and fits(shape[0], 1) and is_fixed(shape[1], OCCLUDER_SIZE)
            and is_fixed(shape[2], OCCLUDER_SIZE) and is_fixed(shape[3], 3)):
        return False
    if len(out) == 4 and is_fixed(out[3], 1):
        out = out[:3]
    elif len(out) == 4 and is_fixed(out[1], 1):
        out = out[:1] + out[2:]
    return len(out) == 3 and fits(out[0], 1) and fits(out[1], OCCLUDER_SIZE) and fits(out[2], OCCLUDER_SIZE)


def parser_shapes(session, batch: int) -> tuple[dict[str, tuple[int, ...]], str]:
    """The shape of every tensor a parser's graph makes from `batch` inputs of its input's shape, worked
    out from the graph alone (its declared shapes ignored: a file may declare what it likes), and the
    name of its first output. onnxruntime allocates each tensor inside the run, at whatever size the
    data makes it, so a graph where a size follows the input's values (a Resize whose scales it computes
    from the image: a 768-byte file gave 19x8192x8192 floats) is refused here, before it ever runs."""
    try:
        import onnx
    except ImportError:
        raise ConfigError("is an ONNX face parser; checking its graph needs the onnx package: pip install onnx") \
            from None
    source = getattr(session, "_model_path", None) or getattr(session, "_model_bytes", None)
    model = onnx.load(source, load_external_data=False) if isinstance(source, str) else \
        onnx.load_model_from_string(source)
    graph = model.graph
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ConfigError(f"is an ONNX face parser with a {node.op_type} (a graph inside the graph), whose "
                              "tensors' sizes cannot be known before it runs")
    constants = {i.name for i in graph.initializer}
    image = next(i for i in graph.input if i.name not in constants)
    first = image.type.tensor_type.shape.dim[0]
    if not first.HasField("dim_value"):
        first.dim_value = batch
    graph.ClearField("value_info")
    for output in graph.output:
        output.type.tensor_type.ClearField("shape")
    try:
        graph = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True).graph
    except Exception as e:  # onnx raises its own types (InferenceError, ValidationError) for graphs it cannot follow
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"is an ONNX face parser whose tensor shapes cannot be worked out ({reason[:200]})") \
            from None
    known = {value.name: value.type for value in (*graph.value_info, *graph.output)}
    shapes = {}
    for node in graph.node:
        for name in filter(None, node.output):
            kind = known.get(name)
            dims = kind.tensor_type.shape.dim if kind is not None and kind.tensor_type.HasField("shape") else None
            if dims is None or not all(d.HasField("dim_value") for d in dims):
                raise ConfigError(f"is an ONNX face parser whose {node.op_type} output {name!r} has a size that "
                                  "depends on the image's values, not only on its size: refused, since onnxruntime "
                                  "would allocate it whatever size it came to")
            shapes[name] = tuple(d.dim_value for d in dims)
    return shapes, graph.output[0].name


def check_parser_graph(session) -> tuple[int, ...]:
    """Refuse a parser's graph (ConfigError) with a tensor whose size is not fixed by the input's, larger
    than a face parser needs (MAX_PARSER_FEATURES a face), or growing faster than the batch; its first
    output's shape for one face, worked out from the graph."""
    (one, output), (two, _) = parser_shapes(session, 1), parser_shapes(session, 2)
    for name, shape in one.items():
        size = math.prod(shape)
        if size > MAX_PARSER_FEATURES:
            raise ConfigError(f"is an ONNX face parser making a {'x'.join(map(str, shape))} tensor ({name!r}), "
                              f"{size * 4 / 2**20:.0f} MiB a face: more than a face parser needs "
                              f"(at most {MAX_PARSER_FEATURES * 4 // 2**20} MiB)")
        if math.prod(two[name]) > 2 * size:
            raise ConfigError(f"is an ONNX face parser whose tensor {name!r} grows faster than the number of faces")
    return one[output]


def region_parser_config(session) -> dict:
    """No configuration; the graph checked (check_parser_graph): its logits are 19 classes at 512x512."""
    shape = check_parser_graph(session)
    check_parser_output(shape[1] if len(shape) == 4 else 0, *shape[2:] if len(shape) == 4 else (0, 0))
    if shape[1:] != (PARSER_CLASSES, PARSER_SIZE, PARSER_SIZE):
        raise ConfigError(f"is an ONNX face parser whose graph gives {'x'.join(map(str, shape))} logits, not the "
                          f"{PARSER_CLASSES} classes at {PARSER_SIZE}x{PARSER_SIZE} it declares")
    return {}


def occluder_config(session) -> dict:
    """No configuration; the graph checked (check_parser_graph): one probability a pixel at 256x256."""
    shape = check_parser_graph(session)
    if sorted(shape[1:]) not in ([OCCLUDER_SIZE, OCCLUDER_SIZE], [1, OCCLUDER_SIZE, OCCLUDER_SIZE]):
        raise ConfigError(f"is an ONNX occluder whose graph gives {'x'.join(map(str, shape))}, not one channel at "
                          f"{OCCLUDER_SIZE}x{OCCLUDER_SIZE} as it declares")
    return {}


def is_scrfd(session) -> bool:
    return len(session.get_outputs()) in SCRFD_OUTPUTS


def scrfd_details(session) -> dict:
    if SCRFD_OUTPUTS[len(session.get_outputs())]:
        return {"detail": "with landmarks"}
    return {"detail": "without landmarks (alignment needs them: use a *_bnkps or det_10g file)"}


def no_config(session) -> dict:
    return {}


GPEN_EXPORT = ArchSpec("GPEN", "restorer", is_gpen_export, gpen_export_config, GpenExport, format="onnx",
                       convention=Convention(input="-1..1", output="image", template="gpen", batch="file"),
                       face_size=lambda runner: runner.size, details=gpen_export_config)
REGION_PARSER = ArchSpec(
    "FaceFusion region parser", "parser", is_region_parser, region_parser_config, OnnxRunner, format="onnx",
    convention=Convention(input="imagenet", output="logits", size=PARSER_SIZE, batch="file"),
    details=lambda session: {"detail": f"{PARSER_CLASSES} face regions at {PARSER_SIZE}x{PARSER_SIZE}"})
OCCLUDER = ArchSpec(
    "FaceFusion occluder", "parser", is_occluder, occluder_config, OnnxRunner, format="onnx",
    convention=Convention(input="0..1", colour="bgr", layout="nhwc", output="probability", size=OCCLUDER_SIZE,
                          batch="file"),
    details=lambda session: {"detail": f"visible-face probability at {OCCLUDER_SIZE}x{OCCLUDER_SIZE}"})
def insightface_scrfd(session):
    """insightface's SCRFD over the session: it letterboxes, runs and decodes for the detector handle."""
    try:
        from insightface.model_zoo.scrfd import SCRFD as InsightfaceSCRFD
    except ImportError:
        raise ImportError("SCRFD detectors need insightface: pip install insightface") from None
    try:
        model = InsightfaceSCRFD(model_file=getattr(session, "_model_path", None), session=session)
    except Exception as e:  # insightface raises assorted types for files it cannot use
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"is not a usable SCRFD model ({reason})") from None
    model.landmarks = SCRFD_OUTPUTS[len(session.get_outputs())]
    return model


SCRFD = ArchSpec("SCRFD face-detector", "detector", is_scrfd, no_config, insightface_scrfd, format="onnx",
                 convention=Convention(input="0..1", colour="bgr", output="detections"),
                 details=scrfd_details,
                 # insightface's own default for det_10g and FaceFusion's; not measured here (no SCRFD weights).
                 threshold=0.5)
