"""The nodes' models inside ComfyUI's memory manager: on their device from the first run to the next, moved
off when ComfyUI needs the room or the user frees memory, back on the next run; each run tells it the working
memory it needs beyond their weights, for which other models make room. ComfyUI is not installed
here: the pack is imported beside a small copy of the parts of it that nodes/host.py uses (below)."""

import importlib.util
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from tests.helpers import random_gpen

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


class FakeComfy:
    """comfy.model_management, comfy.model_patcher, comfy.utils and folder_paths as ComfyUI 0.3.64 has them, for
    what the pack uses, in its semantics for a model that ModelPatcher moves: load_models_gpu (one request:
    free_memory for what is not on a CPU, the models' size x 1.1 and `memory_required` besides, then each
    model loaded; one already loaded is not moved again (the real one may unload one of the request's own to
    make room, and load it again: the same end); a
    full load moves the module by `.to`, a partial one its weighted layers one by one), free_memory (unloads
    models of that device, other than keep_loaded, until the device has the memory asked for: first a layer
    at a time, then the whole model), unload_all_models (free_memory of everything on ComfyUI's device),
    current_loaded_models, the interrupt flag. Memory is counted, not measured: `total` bytes per device,
    less what the loaded models hold (the real one also keeps room for inference free: at least 1.2 GB, and
    memory_required plus 400 MB). The real LoadedModel
    keeps weak references and a finalizer (a model no one holds leaves the list); here the tests hold every
    model."""

    def __init__(self, models_dir: Path, device: torch.device = CPU, total: float = 1e12):
        self.device, self.total = device, total
        mm = self.model_management = types.ModuleType("comfy.model_management")
        mm.current_loaded_models = []
        mm.InterruptProcessingException = type("InterruptProcessingException", (Exception,), {})
        mm.interrupted = False
        mm.get_torch_device = lambda: self.device
        mm.unet_offload_device = lambda: CPU
        mm.get_free_memory = self.free
        mm.free_memory = self.free_memory
        mm.load_models_gpu = self.load_models_gpu
        mm.unload_all_models = lambda: self.free_memory(1e30, self.device)
        mm.soft_empty_cache = lambda force=False: None
        mm.interrupt_current_processing = lambda value=True: setattr(mm, "interrupted", value)
        mm.throw_exception_if_processing_interrupted = self.throw_if_interrupted
        patcher = self.model_patcher = types.ModuleType("comfy.model_patcher")
        patcher.ModelPatcher = ModelPatcher
        utils = types.ModuleType("comfy.utils")
        utils.ProgressBar = lambda total: types.SimpleNamespace(update_absolute=lambda done, total=None: None)
        self.comfy = types.ModuleType("comfy")
        self.comfy.model_management, self.comfy.model_patcher, self.comfy.utils = mm, patcher, utils
        self.folder_paths = folder_paths = types.ModuleType("folder_paths")
        folder_paths.models_dir = str(models_dir)
        folder_paths.folder_names_and_paths = {}
        folder_paths.add_model_folder_path = lambda name, path: folder_paths.folder_names_and_paths.setdefault(
            name, ([path], set()))
        folder_paths.get_folder_paths = lambda name: folder_paths.folder_names_and_paths[name][0]
        folder_paths.get_filename_list = lambda name: sorted(
            p.name for p in (models_dir / name).glob("*") if p.suffix in folder_paths.folder_names_and_paths[name][1])
        folder_paths.get_full_path = lambda name, file: str(models_dir / name / file) \
            if (models_dir / name / file).is_file() else None

    def modules(self) -> dict:
        return {"comfy": self.comfy, "comfy.model_management": self.model_management,
                "comfy.model_patcher": self.model_patcher, "comfy.utils": self.comfy.utils,
                "folder_paths": self.folder_paths}

    def loaded(self) -> list:
        """The ModelPatchers ComfyUI holds loaded, most recently loaded first."""
        return [entry.model for entry in self.model_management.current_loaded_models]

    def free(self, device) -> float:
        return self.total - sum(e.model.loaded_size() for e in self.model_management.current_loaded_models
                                if e.device == device)

    def free_memory(self, memory_required, device, keep_loaded=()):
        models = self.model_management.current_loaded_models
        unloaded = []
        for entry in reversed(models):  # the real one sorts by offloaded memory, then references: LRU last
            if entry.device != device or any(entry.model is kept.model for kept in keep_loaded):
                continue
            if self.free(device) > memory_required:
                break
            if entry.model_unload(memory_required - self.free(device)):
                unloaded.append(entry)
        for entry in unloaded:
            models.remove(entry)
        return unloaded

    def load_models_gpu(self, models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        current = self.model_management.current_loaded_models
        entries = [next((e for e in current if e.model is patcher), None) or LoadedModel(patcher) for patcher in models]
        needed: dict = {}
        for entry in entries:
            needed[entry.device] = needed.get(entry.device, 0) + entry.model.model_size() - entry.model.loaded_size()
        for device, size in needed.items():
            if device != CPU:
                self.free_memory(size * 1.1 + memory_required, device, entries)
                if self.free(device) < memory_required:
                    self.free_memory(memory_required, device, entries)
        for entry in entries:
            if entry in current:
                current.remove(entry)
            entry.model.partially_load(entry.device, 1e32 if force_full_load else self.free(entry.device))
            current.insert(0, entry)

    def throw_if_interrupted(self):
        mm = self.model_management
        if mm.interrupted:
            mm.interrupted = False
            raise mm.InterruptProcessingException()


class LoadedModel:
    def __init__(self, patcher):
        self.model, self.device = patcher, patcher.load_device

    def model_unload(self, memory_to_free=None) -> bool:
        """False when unloading layers freed enough and the rest stays loaded."""
        if memory_to_free is not None and memory_to_free < self.model.loaded_size() and \
                self.model.partially_unload(self.model.offload_device, memory_to_free) >= memory_to_free:
            return False
        self.model.detach()
        return True


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model, self.load_device, self.offload_device = model, load_device, offload_device
        self.size = size or sum(t.numel() * t.element_size() for t in model.state_dict().values())
        if getattr(model, "device", None) is None:
            model.device = offload_device
        model.model_loaded_weight_memory = 0

    def model_size(self) -> int:
        return self.size

    def loaded_size(self) -> int:
        return self.model.model_loaded_weight_memory

    def layers(self) -> list:
        """The modules ComfyUI moves one by one: those whose weights are all their own."""
        return [m for m in self.model.modules() if any(True for _ in m.parameters(recurse=False))
                and len(list(m.parameters())) == len(list(m.parameters(recurse=False)))]

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False) -> int:
        before = self.loaded_size()
        if before >= self.size:
            return 0
        if before + extra_memory > self.size:  # a full load
            self.model.to(device_to)
            self.model.model_loaded_weight_memory = self.size
        else:
            for layer in self.layers():
                size = sum(t.numel() * t.element_size() for t in layer.parameters())
                if self.loaded_size() + size < extra_memory:
                    layer.to(device_to)
                    self.model.model_loaded_weight_memory += size
        self.model.device = device_to
        return self.loaded_size() - before

    def partially_unload(self, device_to, memory_to_free=0) -> int:
        freed = 0
        for layer in self.layers():
            if freed >= memory_to_free:
                break
            layer.to(device_to)
            freed += sum(t.numel() * t.element_size() for t in layer.parameters())
        self.model.model_loaded_weight_memory -= freed
        return freed

    def detach(self, unpatch_all=True):
        self.model.to(self.offload_device)
        self.model.device = self.offload_device
        self.model.model_loaded_weight_memory = 0
        return self.model


def load_pack_in(comfy: FakeComfy, monkeypatch):
    """The pack imported as ComfyUI imports it, seeing `comfy`'s modules (under its own name, so the pack the
    other tests import outside ComfyUI stays as it is)."""
    for name, module in comfy.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    name = str(REPO).replace(".", "_x_") + "_in_comfyui"
    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, loaded)
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module, sys.modules[name + ".nodes.host"]


@pytest.fixture
def comfy(tmp_path, shared, monkeypatch):
    """ComfyUI (the part above) with a user's model folders: a GPEN, a copy of it and the small detector."""
    (tmp_path / "facerestore_models").mkdir()
    torch.save(random_gpen(64, 1, 0.125).state_dict(), tmp_path / "facerestore_models" / "GPEN-random-64.pth")
    (tmp_path / "facedetection").mkdir()
    shutil.copy(shared / "models" / "retinaface_mobilenet0.25.pth",
                tmp_path / "facedetection" / "detection_mobilenet0.25_Final.pth")
    fake = FakeComfy(tmp_path)
    fake.pack, fake.host = load_pack_in(fake, monkeypatch)
    return fake


class Moves:
    """Each `.to` a handle is given, by the handle's name."""

    def __init__(self, monkeypatch, *loaded):
        self.seen: list[tuple[str, torch.device]] = []
        for name, item in zip(("gpen", "detector", "parser"), loaded):
            moved = item.model.to
            monkeypatch.setattr(item.model, "to", lambda device, name=name, moved=moved: (
                self.seen.append((name, torch.device(device))), moved(device))[1])

    def of(self, name: str) -> int:
        return sum(1 for who, _ in self.seen if who == name)


def load_models(pack, gpen_file="GPEN-random-64.pth"):
    nodes = pack.NODE_CLASS_MAPPINGS
    (model,) = nodes["GPENLoadModel"]().load(gpen_file, "auto", "auto")
    (detector,) = nodes["GPENLoadFaceDetector"]().load("detection_mobilenet0.25_Final.pth", "auto")
    return model, detector


def restore(pack, image, model, detector):
    return pack.NODE_CLASS_MAPPINGS["GPENFaceRestore"]().restore(
        image, model, detector, face_batch=4, threshold=0.5, min_size=0, max_faces=1, order="largest", indices="",
        temporal_smoothing=0.0, strength=1.0, mask_shape="ellipse", feather=0.02, erode=0.05, color_correction=False)


@pytest.fixture(scope="module")
def photo(solvay):
    return solvay[:, :260, :360].contiguous()  # a few of the Solvay photo's faces


def test_models_go_to_the_device_on_the_first_run_and_stay_there(comfy, photo, monkeypatch):
    model, detector = load_models(comfy.pack)
    assert load_models(comfy.pack) == (model, detector)  # two loader nodes of one file share one model
    moves = Moves(monkeypatch, model, detector)
    first = restore(comfy.pack, photo, model, detector)
    assert comfy.loaded() == [detector.patcher, model.patcher]  # the last loaded first, as ComfyUI lists them
    for _ in range(2):
        again = restore(comfy.pack, photo, model, detector)
    assert torch.equal(again[0], first[0]) and first[1].amax() > 0
    assert moves.seen == [("gpen", CPU), ("detector", CPU)]  # once each, onto ComfyUI's device (--cpu here)
    assert model.patcher.loaded_size() == model.size_bytes > 0 and detector.patcher.loaded_size() > 0


def test_a_run_asks_comfyui_for_all_its_models_at_once(comfy, photo, monkeypatch):
    model, detector = load_models(comfy.pack)
    requests = []
    load = comfy.model_management.load_models_gpu
    monkeypatch.setattr(comfy.model_management, "load_models_gpu",
                        lambda models, **options: (requests.append(list(models)), load(models, **options)))
    restore(comfy.pack, photo, model, detector)
    assert requests == [[model.patcher, detector.patcher]]


def test_memory_asked_for_by_another_model_unloads_ours_and_the_next_run_loads_it_again(comfy, photo, monkeypatch):
    model, detector = load_models(comfy.pack)
    restore(comfy.pack, photo, model, detector)
    moves = Moves(monkeypatch, model, detector)
    # An upscaler node needs all but the detector's room (as ImageUpscaleWithModel asks): GPEN must go.
    comfy.model_management.free_memory(comfy.total - detector.size_bytes - 1, CPU)
    assert comfy.loaded() == [detector.patcher] and moves.seen == [("gpen", CPU)]  # to the offload device
    assert model.patcher.loaded_size() == 0
    restore(comfy.pack, photo, model, detector)
    assert comfy.loaded() == [detector.patcher, model.patcher] and moves.seen == [("gpen", CPU)] * 2


def test_freeing_memory_in_comfyui_unloads_every_model_until_the_next_run(comfy, photo, monkeypatch):
    model, detector = load_models(comfy.pack)
    restore(comfy.pack, photo, model, detector)
    moves = Moves(monkeypatch, model, detector)
    comfy.model_management.unload_all_models()  # the "Free model and node cache" button, or after an OOM
    assert comfy.loaded() == [] and moves.of("gpen") == moves.of("detector") == 1
    restore(comfy.pack, photo, model, detector)
    assert len(comfy.loaded()) == 2 and moves.of("gpen") == moves.of("detector") == 2


def test_comfyui_moves_our_models_whole_never_a_layer_at_a_time(comfy, photo):
    model, detector = load_models(comfy.pack)
    restore(comfy.pack, photo, model, detector)
    # Freeing less than GPEN holds would move some of a network's layers (ComfyUI's lowvram): ours have
    # none it can see, so the whole model goes.
    kept = [e for e in comfy.model_management.current_loaded_models if e.model is detector.patcher]
    comfy.model_management.free_memory(comfy.total - model.size_bytes - detector.size_bytes + 1, CPU, kept)
    assert comfy.loaded() == [detector.patcher] and model.patcher.loaded_size() == 0
    assert list(model.patcher.model.parameters()) == [] and model.model.device == CPU


def test_a_model_the_nodes_cache_lets_go_of_is_unloaded(comfy, photo, monkeypatch):
    folder = Path(comfy.folder_paths.models_dir) / "facerestore_models"
    for n in range(3):
        shutil.copy(folder / "GPEN-random-64.pth", folder / f"copy-{n}.pth")
    model, detector = load_models(comfy.pack)
    restore(comfy.pack, photo, model, detector)
    moves = Moves(monkeypatch, model)
    for n in range(3):  # with the first model and the detector: five, one more than the cache keeps
        comfy.pack.NODE_CLASS_MAPPINGS["GPENLoadModel"]().load(f"copy-{n}.pth", "auto", "auto")
    assert model.patcher not in comfy.loaded() and detector.patcher in comfy.loaded()
    assert moves.seen == [("gpen", CPU)]
    restore(comfy.pack, photo, model, detector)  # a node output still holding it: loaded again
    assert model.patcher in comfy.loaded()


def test_an_interrupt_stops_the_run_and_the_models_stay_loaded(comfy, photo, monkeypatch):
    model, detector = load_models(comfy.pack)
    restore(comfy.pack, photo, model, detector)
    moves = Moves(monkeypatch, model, detector)
    comfy.model_management.interrupt_current_processing()
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        restore(comfy.pack, photo, model, detector)
    restore(comfy.pack, photo, model, detector)
    assert comfy.loaded() == [detector.patcher, model.patcher] and moves.seen == []


class Asked:
    """What each load_models_gpu request asked for besides the models (memory_required, force_full_load)."""

    def __init__(self, comfy: FakeComfy, monkeypatch):
        self.options: list[dict] = []
        load = comfy.model_management.load_models_gpu
        monkeypatch.setattr(comfy.model_management, "load_models_gpu",
                            lambda models, **options: (self.options.append(options), load(models, **options)))

    def last(self) -> int:
        assert self.options[-1]["force_full_load"]
        return self.options[-1]["memory_required"]


def test_each_node_run_tells_comfyui_the_memory_it_needs_beyond_the_weights(comfy, photo, shared, monkeypatch):
    """As ComfyUI's own VAE decode asks for its activations (memory_required): a run's largest stage and
    what it keeps beside it, from faces/run_memory.py, for the models of that run."""
    folder = Path(comfy.folder_paths.models_dir) / "facedetection"
    shutil.copy(shared / "fixtures" / "parsenet_random_64.pth", folder / "parsing_parsenet.pth")
    nodes, run_memory = comfy.pack.NODE_CLASS_MAPPINGS, sys.modules[comfy.pack.__name__ + ".gpen.faces.run_memory"]
    model, detector = load_models(comfy.pack)
    (parser,) = nodes["GPENLoadFaceParser"]().load("parsing_parsenet.pth", "auto", "auto")
    asked = Asked(comfy, monkeypatch)

    nodes["GPENFaceRestore"]().restore(
        photo, model, detector, face_batch=2, threshold=0.5, min_size=0, max_faces=1, order="largest", indices="",
        temporal_smoothing=0.0, strength=1.0, mask_shape="ellipse", feather=0.02, erode=0.05, color_correction=False,
        face_parser=parser)
    whole = asked.last()
    assert whole == run_memory.run_working_bytes(photo.shape, model.model, detector.model, [parser[0].model], 2)
    crops, info, *_ = nodes["GPENDetectAndCropFaces"]().detect(photo, detector, 512, "gpen", 0.5, 0, 2, "largest",
                                                               "", 0.0, gpen_model=model)
    assert asked.last() == run_memory.run_working_bytes(photo.shape, detector=detector.model, crop_size=64)
    restored, _ = nodes["GPENRestoreFaces"]().restore(model, crops, 1.0, 2)
    restoring = asked.last()
    assert restoring == run_memory.run_working_bytes(restorer=model.model, face_batch=2, crop_size=64)
    nodes["GPENPasteFacesBack"]().paste(photo, restored, info, 1.0, "box", 0.011, 0.05, False, face_parser=parser)
    assert asked.last() == run_memory.run_working_bytes(photo.shape, parsers=[parser[0].model], crop_size=64)
    nodes["GPENFaceParsingMask"]().parse(crops, parser, "face", 0.0)
    assert asked.last() == run_memory.run_working_bytes(parsers=[parser[0].model], crop_size=64)
    # GPEN's forward of a face batch is the most of the whole run: the frame (260x360) and more beside it.
    assert whole > restoring > model.model.working_bytes(2) > 0 and whole - restoring >= 260 * 360 * 4 * 4
    assert len(asked.options) == 5


def test_the_segs_nodes_tell_comfyui_the_memory_they_need_too(comfy, photo, shared, monkeypatch):
    folder = Path(comfy.folder_paths.models_dir) / "facedetection"
    shutil.copy(shared / "fixtures" / "parsenet_random_64.pth", folder / "parsing_parsenet.pth")
    nodes, run_memory = comfy.pack.NODE_CLASS_MAPPINGS, sys.modules[comfy.pack.__name__ + ".gpen.faces.run_memory"]
    model, detector = load_models(comfy.pack)
    (parser,) = nodes["GPENLoadFaceParser"]().load("parsing_parsenet.pth", "auto", "auto")
    _, info, *_ = nodes["GPENDetectAndCropFaces"]().detect(photo, detector, 64, "gpen", 0.5, 0, 2, "largest", "", 0.0)
    asked = Asked(comfy, monkeypatch)
    (segs,) = nodes["GPENFacesToSEGS"]().convert(info, crop_factor=2.0, dilation=0, drop_size=10,
                                                 segment_mask="ellipse", image=photo, face_parser=parser)
    assert asked.last() == run_memory.run_working_bytes(photo.shape, parsers=[parser[0].model], crop_size=64) > 0
    # FaceDetailer calls the detector's detect later, in its own node: each call asks for its models and memory.
    (bbox_detector,) = nodes["GPENFaceDetectorForFaceDetailer"]().make(detector, 0.0, "box", face_parser=parser)
    assert bbox_detector.detect(photo, 0.5, 0, 3.0)[1]  # its segments
    assert asked.last() == run_memory.run_working_bytes(photo.shape, detector=detector.model,
                                                        parsers=[parser[0].model], crop_size=512)
    nodes["GPENSEGSToFaces"]().detect([photo], segs, [detector], crop_size=[64], template=["gpen"], threshold=[0.5])
    assert asked.last() == run_memory.run_working_bytes(photo.shape, detector=detector.model, crop_size=64) > 0
    nodes["GPENRestoreSEGS"]().restore([photo], segs, [model], strength=[1.0], face_batch=[2],
                                       color_correction=[False], feather=[0], face_detector=[detector])
    assert asked.last() == run_memory.run_working_bytes(photo.shape, model.model, detector.model, face_batch=2)


def test_a_run_needing_more_than_is_free_has_comfyui_unload_another_model_first(tmp_path, monkeypatch):
    gpu = torch.device("cuda", 0)
    comfy = FakeComfy(tmp_path, device=gpu, total=1000)
    _, host = load_pack_in(comfy, monkeypatch)
    other, restorer = host.Loaded(Network(500), gpu), host.Loaded(Network(300), gpu)
    host.on_device(other)  # another model ComfyUI holds (a checkpoint, say), 500 of 1000
    host.on_device(restorer, working_bytes=100)  # its 300 (x 1.1) and 100 of working memory fit in 500
    assert comfy.loaded() == [restorer.patcher, other.patcher]
    host.on_device(restorer, working_bytes=300)  # 300 with 200 free: the other model goes, ours stays
    assert comfy.loaded() == [restorer.patcher]
    assert other.model.device == CPU and restorer.model.device == gpu


def test_a_model_set_to_another_device_than_comfyuis_adds_nothing_to_the_memory_asked_for(tmp_path, monkeypatch):
    gpu = torch.device("cuda", 0)
    _, host = load_pack_in(FakeComfy(tmp_path, device=gpu), monkeypatch)
    run_memory = sys.modules[host.__name__.rsplit(".", 2)[0] + ".gpen.faces.run_memory"]
    on_gpu, on_cpu = host.Loaded(Network(300), gpu), host.Loaded(Network(300), CPU)  # GPEN set to device cpu
    assert host.counted(on_gpu) is on_gpu.model and host.counted(on_cpu) is None and host.counted(None) is None
    assert host.handles((on_cpu, on_gpu)) == [on_gpu.model]
    assert run_memory.run_working_bytes((1, 1080, 1920, 3), restorer=host.counted(on_cpu)) == 0  # not the frame's


class Network:
    """A stand-in handle on a GPU this machine lacks: `.to` only says where it is."""

    def __init__(self, size: int):
        self.memory_bytes, self.device = size, CPU

    def to(self, device):
        self.device = torch.device(device)
        return self


def test_models_of_one_run_stay_on_the_gpu_together_where_separate_requests_would_unload_one(tmp_path, monkeypatch):
    gpu = torch.device("cuda", 0)
    comfy = FakeComfy(tmp_path, device=gpu, total=1000)
    _, host = load_pack_in(comfy, monkeypatch)
    restorer, detector = host.Loaded(Network(600), gpu), host.Loaded(Network(400), gpu)
    (network,) = host.on_device(restorer)
    assert network.device == gpu
    host.on_device(detector)  # 400 more with 600 of 1000 held: ComfyUI makes room (x1.1) by unloading the restorer
    assert restorer.model.device == CPU
    assert host.on_device(restorer, None, detector) == [restorer.model, None, detector.model]
    assert restorer.model.device == detector.model.device == gpu
    assert comfy.loaded() == [detector.patcher, restorer.patcher]


def test_outside_comfyui_a_model_stays_where_it_runs_until_the_cache_lets_go(pack_outside):
    host = pack_outside
    loaded = host.Loaded(Network(500), torch.device("cuda", 0))
    assert loaded.patcher is None and host.on_device(loaded)[0].device == torch.device("cuda", 0)
    loaded.release()
    assert loaded.model.device == CPU


@pytest.fixture
def pack_outside():
    from tests.test_nodes import load_pack

    return sys.modules[load_pack().__name__ + ".nodes.host"]
