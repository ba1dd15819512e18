"""Load, queue and screenshot every example workflow in ComfyUI's real web frontend (headless Chromium).

Not part of CI (CI has no ComfyUI). Run it before calling workflow work done:

    python scripts/check_workflows_in_browser.py --comfyui ~/ComfyUI --python ~/ComfyUI/venv/bin/python \\
        --image photo.png --video clip.mp4 --input-file large_portrait.png=portrait_2048.png \\
        --known-missing ReActorFaceSwap --known-missing FaceDetailer --known-missing BboxDetectorSEGS \\
        --no-queue txt2img --no-queue facedetailer

One-time setup (this script installs nothing):

    apt-get install chromium chromium-driver    # Debian/Ubuntu; any Chromium/Chrome with a matching chromedriver
    pip install selenium                        # in the Python that runs this script (any venv)

and a ComfyUI checkout whose Python (--python) has ComfyUI's requirements.txt installed (that brings
comfyui-frontend-package, the real frontend) plus this pack's requirements, and model files in its
models/ folder (or --models DIR).

What it does:
1. Makes a throwaway ComfyUI base directory (--base-directory) in --out: custom_nodes/ComfyUI-GPEN
   links to this checkout, models/ links to --models (default <comfyui>/models), input/ gets --image
   under its own name and under every example file name the workflows' LoadImage nodes use (--video
   likewise for LoadVideo; --input-file NAME=FILE for one name), output/, temp/ and user/ start empty.
   Nothing is written to your ComfyUI folders or to this checkout.
2. Starts ComfyUI (<comfyui>/main.py) on 127.0.0.1 at a free port with --cpu; log in out/server.log.
3. Checks that GET /workflow_templates lists every workflow and that each thumbnail (<name>.jpg beside
   the workflow) is served as an image.
4. Opens the frontend in headless Chromium (a new empty profile, the --window viewport), opens the
   template browser on this pack's category, checks that every card's picture loads and screenshots
   it (out/templates.png).
5. For each workflow: `app.loadGraphData(workflow)`, as the template browser does. Collects console
   errors (SEVERE browser log entries; failed requests to other hosts are listed apart, as this may
   run offline), open dialogs (the missing-nodes dialog among them) and node types the frontend does
   not know. Checks what the frontend shows in the saved view: node boxes (title bars included)
   overlapping, nodes not wholly on the canvas, title bars covered (menu, workflow tabs), nodes under
   the workflow tabs, minimap or zoom controls, nodes saved smaller than the frontend draws them,
   a zoom below its level-of-detail threshold. Screenshots it (out/<name>.png). Then applies
   --replace to combo values (as a user would pick another file), queues it with
   `app.queuePrompt(0)` (what the Run button does), waits for /history and screenshots the result
   (out/<name>_done.png). Workflows with missing node types are loaded and checked, not queued.
6. Writes out/report.json (everything, with each node's drawn size and the frontend's minimum) and
   prints a summary. Exit status 0 only when nothing unexpected happened: node types named with
   --known-missing (e.g. ReActorFaceSwap without ComfyUI-ReActor) and their dialog are reported as
   known, not as failures. Console errors while the page starts (before any workflow) are listed but
   not counted: the frontend logs some of its own (404s for user.css and an empty user folder).

Other options: --only NAME and --no-queue NAME (substrings, repeatable), --load-only, --replace OLD=NEW
(e.g. detection_Resnet50_Final.pth=detection_mobilenet0.25_Final.pth when you have only that one),
--window 1280x720 (the viewport the layout test in tests/test_workflows.py assumes), --timeout
(seconds per prompt), --server-arg ARG (extra ComfyUI argument), --chromium / --chromedriver, --port.
Environment: COMFYUI_PATH and COMFYUI_PYTHON stand for --comfyui and --python.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True  # leave no __pycache__ in the checkout (scripts/comfyui_server.py)
from comfyui_server import Server, http, http_json, logger

ROOT = Path(__file__).resolve().parents[1]
MEDIA_NODES = {"LoadImage": "image", "LoadVideo": "video"}  # node type -> which file (--image, --video) it gets
LOCAL = ("http://127.0.0.1", "http://localhost")


log = logger("browser-check")


# ------------------------------------------------------------------------------------------ server

def make_base(args, out: Path) -> Path:
    base = out / "comfyui-base"
    if base.exists():
        shutil.rmtree(base)
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / args.pack_name).symlink_to(ROOT, target_is_directory=True)
    (base / "models").symlink_to(args.models.resolve(), target_is_directory=True)
    for sub in ("input", "output", "temp", "user"):
        (base / sub).mkdir()
    # the media files, under their own names and under each example name the workflows use, so the
    # LoadImage / LoadVideo nodes show a preview and run as they come
    names = {"image": {args.image.name} if args.image else set(), "video": {args.video.name} if args.video else set()}
    for path in args.workflows.glob("*.json"):
        for node in json.loads(path.read_text()).get("nodes", []):
            if node.get("type") in MEDIA_NODES and node.get("widgets_values"):
                names[MEDIA_NODES[node["type"]]].add(str(node["widgets_values"][0]))
    for kind, source in (("image", args.image), ("video", args.video)):
        for name in names[kind] if source else ():
            if name and "/" not in name and not name.startswith("."):
                shutil.copyfile(source, base / "input" / name)
    for name, source in args.input_file:  # after the defaults: these win
        shutil.copyfile(source, base / "input" / name)
    return base


# ------------------------------------------------------------------------------------------ browser

def start_browser(args, profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    if args.chromium:
        options.binary_location = args.chromium
    width, height = args.window
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=args.chromedriver) if args.chromedriver else Service()
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_script_timeout(120)
    set_viewport(driver, width, height)
    return driver


def set_viewport(driver, width: int, height: int) -> None:
    """The page's viewport (what --window means), not the window around it."""
    for _ in range(2):
        inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
        outer = driver.get_window_size()
        driver.set_window_size(outer["width"] + width - inner[0], outer["height"] + height - inner[1])


def wait_for(driver, script: str, timeout: float, what: str):
    from selenium.common.exceptions import WebDriverException

    end = time.time() + timeout
    while time.time() < end:
        try:
            value = driver.execute_script(script)
        except WebDriverException:  # the page may still be loading
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise RuntimeError(f"timed out waiting for {what}")


def browser_log(driver) -> list[dict]:
    """Console entries since the last call (the driver hands each out once)."""
    return [{"level": e["level"], "message": e["message"]} for e in driver.get_log("browser")]


def severe(entries: list[dict]) -> list[str]:
    return [e["message"] for e in entries if e["level"] == "SEVERE"]


def offline(message: str) -> bool:
    """A request to another host that failed for want of a network (this check runs offline)."""
    return message.startswith(("http://", "https://")) and not message.startswith(LOCAL) and "net::ERR_" in message


DIALOGS_JS = """
return [...document.querySelectorAll('.p-dialog')].filter(d => d.offsetParent !== null || d.getClientRects().length)
  .map(d => d.innerText.trim().slice(0, 600));
"""

CLOSE_DIALOGS_JS = """
for (const b of document.querySelectorAll('.p-dialog .p-dialog-close-button, .p-dialog-header-close')) b.click();
"""

LOAD_JS = """
const [graph, name, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
const types = [...new Set(graph.nodes.map(n => n.type))];
const missing = types.filter(t => !(t in LiteGraph.registered_node_types));
app.loadGraphData(graph, true, true, name).then(
  () => done({ok: true, missing}),
  e => done({ok: false, missing, error: String(e && e.stack || e)}));
"""

# What the user sees: each node's box (with its title bar) on screen, what covers it, and overlaps.
GEOMETRY_JS = """
const canvasEl = app.canvas.canvas, rect = canvasEl.getBoundingClientRect();
const ds = app.canvas.ds, title = LiteGraph.NODE_TITLE_HEIGHT;
const toScreen = (x, y) => [rect.left + (x + ds.offset[0]) * ds.scale, rect.top + (y + ds.offset[1]) * ds.scale];
const nodes = app.graph.nodes.map(n => {
  const collapsed = !!(n.flags && n.flags.collapsed);
  const box = [n.pos[0], n.pos[1] - title, n.size[0], (collapsed ? 0 : n.size[1]) + title];  // x, y, w, h
  const [x0, y0] = toScreen(box[0], box[1]), [x1, y1] = toScreen(box[0] + box[2], box[1] + box[3]);
  const inset = 4;
  // points on the title bar: what covers them?
  const probes = [[x0 + inset, y0 + inset], [(x0 + x1) / 2, y0 + inset], [x1 - inset, y0 + inset]];
  const covered = [];
  for (const [px, py] of probes) {
    if (px < 0 || py < 0 || px >= window.innerWidth || py >= window.innerHeight) { covered.push('off-screen'); continue; }
    const el = document.elementFromPoint(px, py);
    if (el !== canvasEl) covered.push(el ? (el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') +
      (typeof el.className === 'string' && el.className ? '.' + el.className.split(' ').slice(0, 2).join('.') : '')) : 'nothing');
  }
  const inside = x0 >= rect.left && y0 >= rect.top && x1 <= rect.right && y1 <= rect.bottom &&
                 x1 <= window.innerWidth && y1 <= window.innerHeight;
  const min = n.computeSize();
  return {id: n.id, type: n.type, title: n.title, pos: [...n.pos], size: [...n.size], min: [min[0], min[1]], box,
          screen: [x0, y0, x1, y1].map(Math.round), inside, covered: [...new Set(covered)]};
});
const overlaps = [];
for (let i = 0; i < nodes.length; i++) for (let j = i + 1; j < nodes.length; j++) {
  const a = nodes[i].box, b = nodes[j].box;
  if (a[0] < b[0] + b[2] && b[0] < a[0] + a[2] && a[1] < b[1] + b[3] && b[1] < a[1] + a[3])
    overlaps.push([nodes[i].id + ' ' + nodes[i].type, nodes[j].id + ' ' + nodes[j].type]);
}
// what the frontend puts over the canvas: workflow tabs, minimap, zoom controls
const overlays = [];
for (const [name, sel] of [['workflow tabs', '.workflow-tabs'], ['minimap', '.minimap-main-container'],
                           ['zoom controls', '.graph-canvas-panel .p-buttongroup']]) {
  for (const e of document.querySelectorAll(sel)) {
    const r = e.getBoundingClientRect();
    if (r.width && r.height) overlays.push({name, rect: [r.left, r.top, r.right, r.bottom].map(Math.round)});
  }
}
return {overlays, canvas: [rect.left, rect.top, rect.width, rect.height].map(Math.round), scale: ds.scale,
        offset: [...ds.offset], lowQualityBelow: app.canvas._lowQualityZoomThreshold ?? null, nodes, overlaps};
"""

SET_INPUTS_JS = """
const replace = arguments[0];
const changes = [];
for (const node of app.graph.nodes) {
  for (const w of node.widgets || []) {
    let value = w.value;
    if (typeof value === 'string' && value in replace) value = replace[value];
    if (value !== w.value) {
      const values = w.options && w.options.values;
      const list = typeof values === 'function' ? values() : values;
      if (Array.isArray(list) && !list.includes(value)) list.push(value);  // a file added since the page loaded
      changes.push(`${node.id} ${node.type}.${w.name}: ${w.value} -> ${value}`);
      w.value = value;
      if (w.callback) w.callback(value, app.canvas, node);
    }
  }
}
app.graph.setDirtyCanvas(true, true);
return changes;
"""

QUEUE_JS = """
const done = arguments[arguments.length - 1];
const api = window.comfyAPI.api.api;
if (!api.__gpenCheck) {
  const original = api.queuePrompt.bind(api);
  api.queuePrompt = async (...a) => {
    try { const r = await original(...a); window.__gpenQueued = {ok: true, response: r}; return r; }
    catch (e) { window.__gpenQueued = {ok: false, error: String(e), response: e && e.response || null}; throw e; }
  };
  api.__gpenCheck = true;
}
window.__gpenQueued = null;
app.queuePrompt(0).then(() => done(window.__gpenQueued || {ok: false, error: 'queuePrompt sent nothing'}),
                        e => done(window.__gpenQueued || {ok: false, error: String(e)}));
"""


def open_templates(driver, module: str, out: Path, window: tuple[int, int]) -> dict:
    """The template browser on this pack's category: screenshot and which thumbnails loaded."""
    result = {"module": module}
    set_viewport(driver, 1400, 1600)  # tall enough to show a pack's cards at once
    time.sleep(1)
    driver.execute_script("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    try:
        wait_for(driver, "return document.querySelector('.p-dialog') !== null", 20, "the template browser")
        found = driver.execute_script("""
          const item = [...document.querySelectorAll('.p-dialog *')]
            .find(e => e.children.length === 0 && e.textContent.trim() === arguments[0]);
          if (!item) return false;
          item.scrollIntoView({block: 'center'}); item.click(); return true;""", module)
        if not found:
            result["problem"] = f"no category named {module} in the template browser"
        time.sleep(1)
        # the cards' pictures load lazily: bring each into view until its picture is there (or 5 s)
        cards = "document.querySelectorAll('[data-testid^=\"template-workflow-\"]')"
        seen = set()
        for i in range(driver.execute_script(f"return {cards}.length")):
            driver.execute_script(f"{cards}[arguments[0]].scrollIntoView({{block: 'center'}})", i)
            loaded_js = (f"const c = {cards}[arguments[0]], img = c.querySelector('img');"
                         "return img && img.complete && img.naturalWidth > 0 ? c.dataset.testid : null")
            end = time.time() + 5
            while not (name := driver.execute_script(loaded_js, i)) and time.time() < end:
                time.sleep(0.25)
            if name:
                seen.add(name.replace("template-workflow-", ""))
        driver.execute_script(f"const c = {cards}[0]; if (c) c.scrollIntoView({{block: 'center'}})")
        time.sleep(1)
        result["cards"] = driver.execute_script("""
          return [...document.querySelectorAll('[data-testid^="template-workflow-"]')].map(c => {
            const img = c.querySelector('img');
            return {name: c.dataset.testid.replace('template-workflow-', ''), title: (c.querySelector('h3') || {}).innerText,
                    description: (c.querySelector('p') || {}).innerText,
                    img: img ? img.getAttribute('src') : null};
          });""")
        for card in result["cards"]:
            card["loaded"] = card["name"] in seen  # its picture showed when it was scrolled into view
        driver.save_screenshot(str(out / "templates.png"))
    finally:
        driver.execute_script(CLOSE_DIALOGS_JS)
        set_viewport(driver, *window)
        time.sleep(1)
    return result


def check_workflow(driver, server: Server, path: Path, args, out: Path) -> dict:
    name = path.stem
    graph = json.loads(path.read_text())
    r = {"workflow": name, "problems": [], "known": []}
    browser_log(driver)  # drop what came before
    loaded = driver.execute_async_script(LOAD_JS, graph, name)
    time.sleep(1.5)  # dialogs, DOM widgets, image previews
    r["loaded"] = loaded["ok"]
    if not loaded["ok"]:
        r["problems"].append(f"loadGraphData failed: {loaded.get('error')}")
    missing = loaded.get("missing", [])
    r["missing_nodes"] = missing
    unknown = [t for t in missing if t not in args.known_missing]
    if unknown:
        r["problems"].append(f"node types the frontend does not know: {', '.join(unknown)}")
    if set(missing) - set(unknown):
        r["known"].append(f"known missing node types: {', '.join(sorted(set(missing) - set(unknown)))}")
    dialogs = driver.execute_script(DIALOGS_JS)
    r["dialogs"] = dialogs
    for text in dialogs:
        if missing and not unknown and any(t in text for t in missing):
            r["known"].append("missing-nodes dialog shown for the known missing node types")
        else:
            r["problems"].append(f"dialog: {text[:300]!r}")
    driver.execute_script(CLOSE_DIALOGS_JS)
    time.sleep(0.5)
    geometry = driver.execute_script(GEOMETRY_JS)
    r["view"] = {k: geometry[k] for k in ("canvas", "scale", "offset", "lowQualityBelow", "overlays")}
    r["nodes"] = geometry["nodes"]
    for a, b in geometry["overlaps"]:
        r["problems"].append(f"nodes overlap on the canvas: {a} and {b}")
    saved = {n["id"]: n for n in graph["nodes"]}
    for n in geometry["nodes"]:
        if not n["inside"]:
            r["problems"].append(f"node {n['id']} {n['type']} is not wholly in view: screen box {n['screen']}")
        if n["covered"]:
            r["problems"].append(f"node {n['id']} {n['type']}: title bar covered by {', '.join(n['covered'])}")
        x0, y0, x1, y1 = n["screen"]
        for o in geometry["overlays"]:
            ox0, oy0, ox1, oy1 = o["rect"]
            if x0 < ox1 and ox0 < x1 and y0 < oy1 and oy0 < y1:
                r["problems"].append(f"node {n['id']} {n['type']} is partly under the {o['name']} {o['rect']}")
        size = saved.get(n["id"], {}).get("size")
        # heights only: for a node with a video preview the frontend's minimum width is its own width plus
        # padding, whatever that width is
        if size and size[1] < n["min"][1] - 0.5:
            r["problems"].append(f"node {n['id']} {n['type']}: saved size {size} is smaller than the frontend's "
                                 f"{[round(v) for v in n['min']]}; it grows on loading (and the layout test, which "
                                 f"reads saved sizes, misses overlaps)")
    low = geometry.get("lowQualityBelow")
    if low and geometry["scale"] < low:
        r["problems"].append(f"saved zoom {geometry['scale']} is below the frontend's low-quality threshold {low}: "
                             f"widgets are not drawn")
    driver.save_screenshot(str(out / f"{name}.png"))
    console = browser_log(driver)
    r["console_errors"] = [m for m in severe(console) if not offline(m)]
    r["console_offline"] = [m for m in severe(console) if offline(m)]
    r["console_warnings"] = [e["message"] for e in console if e["level"] == "WARNING"]
    r["problems"] += [f"console error: {m[:300]}" for m in r["console_errors"]]
    if r["console_offline"]:
        r["known"].append(f"{len(r['console_offline'])} request(s) to other hosts failed (no network here): "
                          + "; ".join(sorted({m.split(' ')[0][:80] for m in r['console_offline']})))

    if args.load_only or any(s in name for s in args.no_queue):
        r["queued"] = "skipped (--load-only / --no-queue)"
        return r
    if missing:
        r["queued"] = "skipped: missing node types"
        return r
    r["input_changes"] = driver.execute_script(SET_INPUTS_JS, dict(args.replace))
    started = time.time()
    queued = driver.execute_async_script(QUEUE_JS)
    time.sleep(0.5)
    r["queue_response"] = queued
    if not queued.get("ok"):
        r["queued"] = "rejected"
        r["problems"].append(f"queue rejected: {json.dumps(queued)[:600]}")
        r["dialogs_after_queue"] = driver.execute_script(DIALOGS_JS)
        driver.save_screenshot(str(out / f"{name}_done.png"))
        driver.execute_script(CLOSE_DIALOGS_JS)
        return r
    prompt_id = queued["response"]["prompt_id"]
    r["queued"] = prompt_id
    try:
        entry = server.wait_for_history(prompt_id, args.timeout)
    except (TimeoutError, RuntimeError) as e:
        r["problems"].append(str(e))
        r["history"] = "none"
        return r
    status = entry["status"]
    r["history"] = status.get("status_str")
    r["seconds"] = round(time.time() - started, 1)
    r["outputs"] = {nid: sorted(o) for nid, o in entry.get("outputs", {}).items()}
    errors = [m for m in status.get("messages", []) if m[0] in ("execution_error", "execution_interrupted")]
    if status.get("status_str") != "success" or errors:
        r["problems"].append(f"history status {status.get('status_str')}: {json.dumps(errors)[:800]}")
    time.sleep(2)  # previews land on the canvas
    driver.save_screenshot(str(out / f"{name}_done.png"))
    after = browser_log(driver)
    r["console_errors_after_queue"] = [m for m in severe(after) if not offline(m)]
    r["problems"] += [f"console error after queueing: {m[:300]}" for m in r["console_errors_after_queue"]]
    r["dialogs_after_queue"] = driver.execute_script(DIALOGS_JS)
    r["problems"] += [f"dialog after queueing: {t[:300]!r}" for t in r["dialogs_after_queue"]]
    driver.execute_script(CLOSE_DIALOGS_JS)
    return r


# ------------------------------------------------------------------------------------------ main

def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_PATH"),
                   help="ComfyUI checkout (folder with main.py); default $COMFYUI_PATH")
    p.add_argument("--python", default=os.environ.get("COMFYUI_PYTHON", sys.executable),
                   help="the Python that runs ComfyUI; default $COMFYUI_PYTHON or this one")
    p.add_argument("--models", type=Path, help="models folder; default <comfyui>/models")
    p.add_argument("--workflows", type=Path, default=ROOT / "workflows")
    p.add_argument("--pack-name", default="ComfyUI-GPEN", help="the pack's folder name under custom_nodes/ "
                   "(the template browser's category)")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "comfyui-gpen-browser-check",
                   help="screenshots, report, server log (default: comfyui-gpen-browser-check in the temp folder)")
    p.add_argument("--only", action="append", default=[], help="workflow name substring (repeatable)")
    p.add_argument("--no-queue", action="append", default=[], help="load and check, but do not queue (substring)")
    p.add_argument("--load-only", action="store_true", help="queue nothing")
    p.add_argument("--image", type=Path, help="image for every LoadImage node (copied into input/)")
    p.add_argument("--video", type=Path, help="video for every LoadVideo node (copied into input/)")
    p.add_argument("--input-file", action="append", default=[], metavar="NAME=FILE",
                   help="put FILE into input/ as NAME (e.g. a workflow's example file name), repeatable")
    p.add_argument("--replace", action="append", default=[], metavar="OLD=NEW",
                   help="replace a combo value (e.g. a model file you lack), repeatable")
    p.add_argument("--known-missing", action="append", default=[], metavar="NODE_TYPE",
                   help="a node type known to be absent here (reported, not a failure)")
    p.add_argument("--window", default="1280x720", help="browser viewport WIDTHxHEIGHT")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per prompt")
    p.add_argument("--ready-timeout", type=float, default=300, help="seconds for ComfyUI to start")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--server-arg", action="append", default=[], help="extra ComfyUI argument (repeatable)")
    p.add_argument("--chromium", help="Chromium/Chrome binary (default: what chromedriver finds)")
    p.add_argument("--chromedriver", default=shutil.which("chromedriver"), help="chromedriver binary")
    args = p.parse_args()
    if not args.comfyui or not (args.comfyui / "main.py").exists():
        p.error("--comfyui (or COMFYUI_PATH) must name a ComfyUI folder with main.py")
    args.comfyui = args.comfyui.resolve()
    args.models = args.models or args.comfyui / "models"
    args.window = tuple(int(v) for v in args.window.lower().split("x"))
    for option in ("replace", "input_file"):
        pairs = [tuple(r.split("=", 1)) for r in getattr(args, option)]
        if any(len(pair) != 2 or not all(pair) for pair in pairs):
            p.error(f"--{option.replace('_', '-')} takes OLD=NEW pairs")
        setattr(args, option, pairs)
    args.input_file = [(name, Path(source)) for name, source in args.input_file]
    for path in (args.image, args.video, *(source for _, source in args.input_file)):
        if path and not path.is_file():
            p.error(f"no such file: {path}")
    return args


def main() -> int:
    args = parse_args()
    try:
        import selenium  # noqa: F401
    except ImportError:
        print("selenium is not installed: pip install selenium (see the docstring)", file=sys.stderr)
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    workflows = sorted(p for p in args.workflows.glob("*.json") if not args.only or any(o in p.stem for o in args.only))
    if not workflows:
        print(f"no workflows in {args.workflows}", file=sys.stderr)
        return 2
    base = make_base(args, out)
    report = {"comfyui": str(args.comfyui), "pack": str(ROOT), "window": args.window, "workflows": []}
    server = Server(args.comfyui, args.python, base, out / "server.log", log=log, port=args.port,
                    extra_args=args.server_arg)
    driver = None
    try:
        stats = server.wait_ready("/system_stats", args.ready_timeout)["system"]
        report["url"] = server.url
        report["versions"] = {"comfyui": stats.get("comfyui_version"), "python": stats.get("python_version"),
                              "pytorch": stats.get("pytorch_version")}
        log(f"ComfyUI {stats.get('comfyui_version')} up at {server.url}")
        # templates as the frontend asks for them
        module = args.pack_name
        templates = http_json(server.url + "/api/workflow_templates")
        listed = templates.get(module, [])
        report["templates"] = {"listed": sorted(listed), "problems": []}
        for path in workflows:
            if path.stem not in listed:
                report["templates"]["problems"].append(f"{path.stem} not listed by /workflow_templates")
            status, headers, body = http(f"{server.url}/api/workflow_templates/{module}/{path.stem}.jpg")
            if status != 200 or not headers.get("Content-Type", "").startswith("image/"):
                report["templates"]["problems"].append(f"{path.stem}.jpg: HTTP {status} {headers.get('Content-Type')}")
        # a returning user: no first-run template dialog over the canvas
        status, _, body = http(server.url + "/api/settings/Comfy.TutorialCompleted", True)
        if status != 200:
            raise RuntimeError(f"POST /api/settings: HTTP {status} {body[:200]!r}")
        profile = out / "chromium-profile"
        shutil.rmtree(profile, ignore_errors=True)
        driver = start_browser(args, profile)
        driver.get(server.url)
        wait_for(driver, "return !!(window.app && app.graph && app.canvas && app.canvas.canvas && "
                         "window.comfyAPI && window.comfyAPI.api && Object.keys(LiteGraph.registered_node_types).length > 50)",
                 120, "the frontend to start")
        time.sleep(2)
        report["frontend_version"] = driver.execute_script("return window.__COMFYUI_FRONTEND_VERSION__ || null")
        report["startup_console_errors"] = severe(browser_log(driver))
        driver.execute_script(CLOSE_DIALOGS_JS)
        report["templates"]["browser"] = open_templates(driver, module, out, args.window)
        for card in report["templates"]["browser"].get("cards", []):
            if card["name"] in listed and not card["loaded"]:
                report["templates"]["problems"].append(f"thumbnail not shown in the template browser: {card['name']}")
        shown = {c["name"] for c in report["templates"]["browser"].get("cards", [])}
        for path in workflows:
            if path.stem not in shown:
                report["templates"]["problems"].append(f"no card for {path.stem} in the template browser")
        if report["templates"]["browser"].get("problem"):
            report["templates"]["problems"].append(report["templates"]["browser"]["problem"])
        for path in workflows:
            log(f"{path.stem}: loading")
            r = check_workflow(driver, server, path, args, out)
            report["workflows"].append(r)
            log(f"{path.stem}: loaded {r['loaded']}, queued {r.get('queued')}, history {r.get('history')}, "
                f"{len(r['problems'])} problem(s)")
    finally:
        if driver is not None:
            driver.quit()
        server.stop()
        (out / "report.json").write_text(json.dumps(report, indent=1))
    problems = report["templates"]["problems"] + [f"{r['workflow']}: {p}" for r in report["workflows"] for p in r["problems"]]
    print("\n== summary")
    if report["startup_console_errors"]:
        print(f"console errors at startup (not counted): {report['startup_console_errors']}")
    for r in report["workflows"]:
        print(f"{r['workflow']}: loaded {r['loaded']}; queued {r.get('queued')}; history {r.get('history')}; "
              f"console errors {len(r['console_errors']) + len(r.get('console_errors_after_queue', []))}; "
              f"known: {'; '.join(r['known']) or '-'}")
    for p in problems:
        print(f"PROBLEM {p}")
    print(f"report: {out / 'report.json'}; screenshots: {out}/*.png; server log: {server.log_path}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
