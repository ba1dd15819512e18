"""The real download code against local HTTP servers on 127.0.0.1 that misbehave the ways real ones did.

Every server loop is bounded in bytes and time, and stops by itself when the client hangs up.
"""

import errno
import hashlib
import http.server
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import torch

import gpen.files.download
from gpen.files.download import DownloadError, download, validate_weights
from gpen.files.weights import CheckpointError

REPO = Path(__file__).resolve().parents[1]


def torch_bytes(state, **options) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer, **options)
    return buffer.getvalue()


WEIGHTS = torch_bytes({"w": torch.arange(1 << 18, dtype=torch.float32)})  # 1 MiB of tensor, a real .pth
OTHER = torch_bytes({"v": torch.ones(1 << 16)})


class Site(http.server.ThreadingHTTPServer):
    """Files by URL path; the query says how to misbehave (cut, ranges, length, drip, endless, ...)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files = {"/w.pth": WEIGHTS, "/other.pth": OTHER}
        self.requests = []  # (path and query, Range header) in order
        self.cut_done = set()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def gets(self, path: str) -> list:
        return [rng for p, rng in self.requests if p == path]


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        site, parts = self.server, urlsplit(self.path)
        site.requests.append((self.path, self.headers.get("Range")))
        query = parse_qs(parts.query, keep_blank_values=True)
        if parts.path not in site.files:
            self.send_error(404, "Not Found")
            return
        data = site.files[parts.path]
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        start = self.range_start(query.get("ranges", ["honest"])[0], etag, len(data))
        if start is None:
            return
        body = data[start:]
        if "big" in query:
            self.send_header("Content-Length", str(2 << 30))
        elif "length" not in query and "endless" not in query:
            self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", etag)
        self.end_headers()
        try:
            self.send_body(body, query)
        except OSError:
            pass  # the client hung up, as it should on a bad server

    def range_start(self, ranges: str, etag: str, total: int) -> int | None:
        """Send the status line (and Content-Range) for this request; the offset the body starts at."""
        asked = self.headers.get("Range")
        start = int(asked.split("=")[1].rstrip("-")) if asked else 0
        if self.headers.get("If-Range", etag) != etag or ranges == "ignore":
            start = 0
        if ranges in ("zero", "bare") and asked:  # a broken server: "partial content" from byte 0
            self.send_response(206)
            if ranges == "zero":
                self.send_header("Content-Range", f"bytes 0-{total - 1}/{total}")
            return 0
        if start >= total:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{total}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
        return start

    def send_body(self, body: bytes, query: dict):
        if "cut" in query and self.path not in self.server.cut_done:
            self.server.cut_done.add(self.path)
            self.wfile.write(body[: len(body) // 3])  # the connection drops a third of the way in
        elif "stall" in query:
            self.wfile.write(body[:1000])
            self.wfile.flush()
            time.sleep(2)  # longer than the client's timeout
        elif "drip" in query:
            for byte in body[:500]:  # one byte per 20 ms: at most 10 s
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.02)
        elif "endless" in query:
            for _ in range(256):  # "endless": 16 MiB at most
                self.wfile.write(bytes(1 << 16))
        elif "slow" in query:
            for i in range(0, len(body), len(body) // 20 + 1):  # about one second
                self.wfile.write(body[i:i + len(body) // 20 + 1])
                self.wfile.flush()
                time.sleep(0.05)
        elif "big" not in query:
            self.wfile.write(body)


@pytest.fixture
def site():
    httpd = Site()
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def fetch(site, path, dest, **options):
    return download(site.url(path), dest, progress=False, **options)


def test_downloads_checks_the_hash_and_leaves_nothing_else(site, tmp_path):
    path = fetch(site, "/w.pth", tmp_path / "w.pth", sha256=hashlib.sha256(WEIGHTS).hexdigest())
    assert path.read_bytes() == WEIGHTS
    assert {p.name for p in tmp_path.iterdir()} - {"w.pth.lock"} == {"w.pth"}  # the lock stays on POSIX


def test_a_valid_file_is_not_downloaded_again(site, tmp_path):
    (tmp_path / "w.pth").write_bytes(WEIGHTS)
    assert fetch(site, "/w.pth", tmp_path / "w.pth") == tmp_path / "w.pth"
    assert site.requests == []


def test_a_cut_download_resumes_where_it_stopped(site, tmp_path):
    with pytest.raises(DownloadError, match="run again to resume"):
        fetch(site, "/w.pth?cut", tmp_path / "w.pth")
    assert not (tmp_path / "w.pth").exists()
    kept = (tmp_path / "w.pth.part").stat().st_size
    assert 0 < kept < len(WEIGHTS)
    fetch(site, "/w.pth?cut", tmp_path / "w.pth")
    assert (tmp_path / "w.pth").read_bytes() == WEIGHTS
    assert site.gets("/w.pth?cut") == [None, f"bytes={kept}-"]


def test_a_server_that_ignores_ranges_restarts_cleanly(site, tmp_path):
    with pytest.raises(DownloadError):
        fetch(site, "/w.pth?cut&ranges=ignore", tmp_path / "w.pth")
    fetch(site, "/w.pth?cut&ranges=ignore", tmp_path / "w.pth")
    assert (tmp_path / "w.pth").read_bytes() == WEIGHTS


@pytest.mark.parametrize("ranges", ["zero", "bare"])
def test_a_206_from_byte_0_does_not_double_the_file(site, tmp_path, ranges):
    with pytest.raises(DownloadError):
        fetch(site, f"/w.pth?cut&ranges={ranges}", tmp_path / "w.pth")
    fetch(site, f"/w.pth?cut&ranges={ranges}", tmp_path / "w.pth")
    assert (tmp_path / "w.pth").read_bytes() == WEIGHTS


def test_a_partial_file_from_another_url_is_not_resumed(site, tmp_path, capsys):
    with pytest.raises(DownloadError):
        fetch(site, "/other.pth?cut", tmp_path / "w.pth")
    fetch(site, "/w.pth", tmp_path / "w.pth")
    assert (tmp_path / "w.pth").read_bytes() == WEIGHTS
    assert site.gets("/w.pth") == [None]  # asked for the whole file, not a range
    assert "w.pth.part: not a part of" in capsys.readouterr().err


def test_a_partial_file_without_its_record_is_not_resumed(site, tmp_path):
    (tmp_path / "w.pth.part").write_bytes(WEIGHTS[:1000])  # left by an older version of the pack
    fetch(site, "/w.pth", tmp_path / "w.pth")
    assert (tmp_path / "w.pth").read_bytes() == WEIGHTS and site.gets("/w.pth") == [None]


def test_a_file_changed_on_the_server_is_downloaded_whole(site, tmp_path):
    with pytest.raises(DownloadError):
        fetch(site, "/w.pth?cut", tmp_path / "w.pth")
    site.files["/w.pth"] = OTHER
    fetch(site, "/w.pth?cut", tmp_path / "w.pth")
    assert (tmp_path / "w.pth").read_bytes() == OTHER


def test_a_complete_partial_file_is_finished_on_416(site, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C after the last byte, before the rename

    monkeypatch.setattr(gpen.files.download, "validate_weights", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch(site, "/w.pth", tmp_path / "w.pth")
    monkeypatch.undo()
    assert (tmp_path / "w.pth.part").read_bytes() == WEIGHTS
    fetch(site, "/w.pth", tmp_path / "w.pth")
    assert (tmp_path / "w.pth").read_bytes() == WEIGHTS
    assert site.gets("/w.pth") == [None, f"bytes={len(WEIGHTS)}-"]  # answered 416, bytes */total


def test_a_cut_response_without_length_never_becomes_the_final_file(site, tmp_path):
    with pytest.raises(DownloadError, match="is cut short.*it was deleted"):
        fetch(site, "/w.pth?cut&length=none", tmp_path / "w.pth")
    assert not (tmp_path / "w.pth").exists() and not (tmp_path / "w.pth.part").exists()
    fetch(site, "/w.pth?cut&length=none", tmp_path / "w.pth")
    assert (tmp_path / "w.pth").read_bytes() == WEIGHTS


def test_a_corrupt_final_file_is_downloaded_again_and_said_so(site, tmp_path, capsys):
    (tmp_path / "w.pth").write_bytes(WEIGHTS[:5000])  # what older versions left after a cut
    fetch(site, "/w.pth", tmp_path / "w.pth")
    assert (tmp_path / "w.pth").read_bytes() == WEIGHTS
    message = capsys.readouterr().err.strip()
    assert message == (f"{tmp_path / 'w.pth'}: is cut short: a zip archive without its central directory; "
                       f"downloading it again from {site.url('/w.pth')}")


def test_a_dripping_server_fails_in_bounded_time(site, tmp_path):
    start = time.monotonic()
    with pytest.raises(DownloadError, match="stalled"):
        fetch(site, "/w.pth?drip", tmp_path / "w.pth", stall=0.5)
    assert time.monotonic() - start < 3


def test_a_stalled_server_times_out(site, tmp_path):
    start = time.monotonic()
    with pytest.raises(DownloadError, match="timed out"):
        fetch(site, "/w.pth?stall", tmp_path / "w.pth", timeout=0.5)
    assert time.monotonic() - start < 2


def test_an_endless_body_is_cut_off_at_the_cap(site, tmp_path):
    with pytest.raises(DownloadError, match=f"more than the {2 << 20} bytes expected"):
        fetch(site, "/w.pth?endless", tmp_path / "w.pth", max_bytes=2 << 20)
    assert not (tmp_path / "w.pth").exists() and not (tmp_path / "w.pth.part").exists()


def test_an_oversized_file_is_refused_before_it_is_sent(site, tmp_path):
    with pytest.raises(DownloadError, match=f"offers {2 << 30} bytes, more than the {2 << 20}"):
        fetch(site, "/w.pth?big", tmp_path / "w.pth", max_bytes=2 << 20)


def test_404_is_one_clear_line(site, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        fetch(site, "/missing", tmp_path / "w.pth")
    assert "\n" not in str(info.value) and not (tmp_path / "w.pth").exists()


def test_a_wrong_hash_deletes_the_file(site, tmp_path):
    with pytest.raises(DownloadError, match="does not match"):
        fetch(site, "/w.pth", tmp_path / "w.pth", sha256="0" * 64)
    assert not (tmp_path / "w.pth").exists() and not (tmp_path / "w.pth.part").exists()


CHILD = """
import sys, time
from pathlib import Path
from gpen.files.download import download
url, dest, ready, go = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
ready.touch()
for _ in range(3000):  # both start together, or give up after 30 s
    if go.exists():
        break
    time.sleep(0.01)
download(url, dest, progress=False)
"""


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status")
    if not status.exists():  # not Linux: time is still watched
        return 0.0
    line = next((x for x in status.read_text().splitlines() if x.startswith("VmRSS:")), "VmRSS: 0 kB")
    return int(line.split()[1]) / 1024


def watch(processes, seconds=60.0, max_rss_mib=3072.0):
    """Wait for the processes, killing them all when one outgrows max_rss_mib or time runs out."""
    deadline = time.monotonic() + seconds
    while any(p.poll() is None for p in processes):
        problem = ("ran past its time" if time.monotonic() > deadline else
                   next((f"used over {max_rss_mib} MiB" for p in processes if rss_mib(p.pid) > max_rss_mib), None))
        if problem:
            for p in processes:
                p.kill()
                p.wait()
            pytest.fail(f"a download process {problem}")
        time.sleep(0.05)


def test_two_processes_download_once_and_share_the_file(site, tmp_path):
    url, dest, go = site.url("/w.pth?slow"), tmp_path / "models" / "w.pth", tmp_path / "go"
    logs = [open(tmp_path / f"stderr{i}", "w+") for i in range(2)]
    processes = [subprocess.Popen([sys.executable, "-c", CHILD, url, str(dest), str(tmp_path / f"ready{i}"), str(go)],
                                  cwd=REPO, stdout=subprocess.DEVNULL, stderr=logs[i]) for i in range(2)]
    for _ in range(600):  # imports done, or 60 s
        if all((tmp_path / f"ready{i}").exists() for i in range(2)) or any(p.poll() is not None for p in processes):
            break
        time.sleep(0.1)
    go.touch()
    watch(processes)
    errors = []
    for log in logs:
        log.seek(0)
        errors.append(log.read())
        log.close()
    assert [p.returncode for p in processes] == [0, 0], errors
    assert dest.read_bytes() == WEIGHTS
    assert site.gets("/w.pth?slow") == [None]  # one download; the other process waited and used it
    assert sum("another process is downloading it; waiting" in e for e in errors) == 1


def test_validate_weights_accepts_every_format(tmp_path):
    onnx = pytest.importorskip("onnx")
    from safetensors.torch import save_file

    (tmp_path / "zip.pth").write_bytes(WEIGHTS)
    (tmp_path / "legacy.pth").write_bytes(torch_bytes({"w": torch.ones(3)}, _use_new_zipfile_serialization=False))
    save_file({"w": torch.ones(3)}, tmp_path / "w.safetensors")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=8),
              tmp_path / "w.onnx")
    for name in ("zip.pth", "legacy.pth", "w.safetensors", "w.onnx"):
        validate_weights(tmp_path / name)
        validate_weights(tmp_path / name, quick=True)


def safetensors_bytes() -> bytes:
    from safetensors.torch import save

    return save({"w": torch.ones(1000)})


BROKEN = {  # file name: (content, what the error says)
    "cut.pth": (WEIGHTS[:-5000], "is cut short: a zip archive without its central directory"),
    "twice.pth": (WEIGHTS + WEIGHTS, f"has {len(WEIGHTS)} stray bytes before its zip archive"),
    "page.pth": (b"<html>Not Found</html>", "is a text file"),
    "cut.safetensors": (safetensors_bytes()[:-10], "bytes where its safetensors header says"),
    "long.safetensors": (safetensors_bytes() + bytes(10), "bytes where its safetensors header says"),
    "w.onnx": (b"\x08\x07" + bytes(100), "is not a valid ONNX model"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_validate_weights_names_the_file_and_what_is_wrong(tmp_path, name):
    content, problem = BROKEN[name]
    (tmp_path / name).write_bytes(content)
    for quick in (False, True):
        with pytest.raises(CheckpointError, match=problem) as info:
            validate_weights(tmp_path / name, quick=quick)
        assert str(info.value).startswith(f"{tmp_path / name}: ") and "\n" not in str(info.value)


def test_validation_uses_the_final_name_for_a_part_file(tmp_path):
    (tmp_path / "w.safetensors.part").write_bytes(safetensors_bytes())
    validate_weights(tmp_path / "w.safetensors.part", suffix=".safetensors")
    with pytest.raises(CheckpointError):
        validate_weights(tmp_path / "w.safetensors.part", suffix=".pth")
    assert os.path.exists(tmp_path / "w.safetensors.part")


def test_a_part_file_that_is_a_link_is_refused_not_written_through(site, tmp_path):
    with pytest.raises(DownloadError):
        fetch(site, "/w.pth?cut", tmp_path / "w.pth")  # leaves w.pth.part and its record
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    (tmp_path / "w.pth.part").unlink()
    (tmp_path / "w.pth.part").symlink_to(notes)
    with pytest.raises(DownloadError, match=r"w.pth.part: is a symbolic link, not a partial download; nothing is "
                                            r"written through it \(remove it to download\)"):
        fetch(site, "/w.pth?cut", tmp_path / "w.pth")
    assert notes.read_text() == "my notes\n" and (tmp_path / "w.pth.part").is_symlink()
    assert not os.path.lexists(tmp_path / "w.pth") and site.gets("/w.pth?cut") == [None]


@pytest.mark.parametrize("record", ["[]", "42", '"a string"', '{"url": "URL", "total": "many"}'])
def test_a_part_record_that_is_not_ours_is_discarded_like_a_foreign_one(site, tmp_path, capsys, record):
    (tmp_path / "w.pth.part").write_bytes(WEIGHTS[:1000])
    (tmp_path / "w.pth.part.json").write_text(record.replace("URL", site.url("/w.pth")))
    fetch(site, "/w.pth", tmp_path / "w.pth")
    assert (tmp_path / "w.pth").read_bytes() == WEIGHTS and site.gets("/w.pth") == [None]
    assert "w.pth.part: not a part of" in capsys.readouterr().err


class FullDisk:
    """A file on a disk with `room` bytes left: a longer write stores what fits, then fails with ENOSPC."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            self.file.write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_a_full_disk_leaves_no_partial_file_to_fail_every_rerun(site, tmp_path, monkeypatch):
    monkeypatch.setattr(gpen.files.download, "open", lambda *args: FullDisk(open(*args), 300_000), raising=False)
    with pytest.raises(DownloadError, match=r"w.pth.part failed: No space left on device; the partial file was "
                                            "deleted, free some space and run again"):
        fetch(site, "/w.pth", tmp_path / "w.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pth.lock"]  # the space is back
    monkeypatch.undo()
    fetch(site, "/w.pth", tmp_path / "w.pth")
    assert (tmp_path / "w.pth").read_bytes() == WEIGHTS and site.gets("/w.pth") == [None, None]


def test_a_failed_first_download_leaves_the_checkout_clean(site, tmp_path):
    """models/ is inside a checkout: what a download leaves there (its lock, a .part and its record) is ignored."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / ".gitignore").write_text((REPO / ".gitignore").read_text())
    subprocess.run(["git", "init", "-q"], cwd=checkout, check=True)
    with pytest.raises(DownloadError, match="run again to resume"):
        fetch(site, "/w.pth?cut", checkout / "models" / "facerestore_models" / "w.pth")
    assert {p.name for p in (checkout / "models" / "facerestore_models").iterdir()} == {
        "w.pth.part", "w.pth.part.json", "w.pth.lock"}
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=checkout,
                            capture_output=True, text=True, check=True).stdout
    assert status == "?? .gitignore\n"
