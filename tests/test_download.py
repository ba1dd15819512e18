"""The real download code against a local HTTP server on 127.0.0.1: success, resume, 404, bad hash, stall."""

import hashlib
import http.server
import threading
import time

import pytest

from gpen.download import DownloadError, download

DATA = bytes(range(256)) * 4096  # 1 MiB


class Handler(http.server.BaseHTTPRequestHandler):
    cut_once = True

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/missing":
            self.send_error(404, "Not Found")
            return
        start = 0
        if self.headers.get("Range") and self.path != "/no-range":
            start = int(self.headers["Range"].split("=")[1].rstrip("-"))
        body = DATA[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path == "/cut" and Handler.cut_once:
            Handler.cut_once = False
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.connection.close()  # the connection drops a third of the way in
            return
        if self.path == "/stall":
            self.wfile.write(body[:1000])
            self.wfile.flush()
            time.sleep(2)  # longer than the client's timeout
            return
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_downloads_and_checks_the_hash(server, tmp_path):
    path = download(f"{server}/file", tmp_path / "w.pth", sha256=hashlib.sha256(DATA).hexdigest(), progress=False)
    assert path.read_bytes() == DATA and not (tmp_path / "w.pth.part").exists()


def test_a_cut_download_resumes_where_it_stopped(server, tmp_path):
    with pytest.raises(DownloadError, match="run again to resume"):
        download(f"{server}/cut", tmp_path / "w.pth", progress=False)
    assert not (tmp_path / "w.pth").exists()
    kept = (tmp_path / "w.pth.part").stat().st_size
    assert 0 < kept < len(DATA)
    download(f"{server}/cut", tmp_path / "w.pth", progress=False)
    assert (tmp_path / "w.pth").read_bytes() == DATA


def test_a_server_that_ignores_ranges_restarts_cleanly(server, tmp_path):
    (tmp_path / "w.pth.part").write_bytes(b"stale bytes")
    download(f"{server}/no-range", tmp_path / "w.pth", progress=False)
    assert (tmp_path / "w.pth").read_bytes() == DATA


def test_404_is_one_clear_line(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        download(f"{server}/missing", tmp_path / "w.pth", progress=False)
    assert "\n" not in str(info.value) and not (tmp_path / "w.pth").exists()


def test_a_corrupt_file_is_deleted(server, tmp_path):
    with pytest.raises(DownloadError, match="does not match"):
        download(f"{server}/file", tmp_path / "w.pth", sha256="0" * 64, progress=False)
    assert not (tmp_path / "w.pth").exists() and not (tmp_path / "w.pth.part").exists()


def test_a_stalled_server_times_out(server, tmp_path):
    start = time.monotonic()
    with pytest.raises(DownloadError, match="timed out"):
        download(f"{server}/stall", tmp_path / "w.pth", timeout=0.5, progress=False)
    assert time.monotonic() - start < 2
