"""Downloading weights: a final file appears only when it is complete and valid.

Bytes go to `dest.part`, with `dest.part.json` beside it saying which URL (and ETag) they came from.
The .part becomes the final file only after its size, hash and format check out; it is only ever a
plain file of ours (never written through a link), and a full disk deletes it rather than leave what
would fail every rerun. A lock file (`dest.lock`) lets one process download while others wait and
then use its file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import os
import re
import stat
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import filelock

from .atomic import write_file_atomically
from .weights import CheckpointError, first_line, read_state_dict, safetensors_header

CHUNK = 1 << 20
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")


class DownloadError(RuntimeError):
    """A download that did not produce a verified file; the message is one line for the user."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.reason = reason


class StartOver(Exception):
    """The server's answer cannot continue the .part: discard it and download from byte 0."""


@dataclass(frozen=True)
class Limits:
    timeout: float  # seconds for a connect or one read
    stall: float  # seconds over which at least stall * min_rate bytes must arrive
    min_rate: int  # bytes per second
    max_bytes: int | None  # the most a server may send


def download(url: str, dest: str | os.PathLike, *, sha256: str | None = None, size: int | None = None,
             max_bytes: int | None = None, timeout: float = 30.0, stall: float = 60.0, min_rate: int = 4096,
             progress: bool = True) -> Path:
    """Fetch url to dest, unless dest already holds valid weights; return dest.

    A `dest.part` from an earlier try of the same URL is resumed where the server allows. `size` and
    `sha256` are checked when given; `max_bytes` caps what a server may send. `timeout` bounds every
    connect and read, and a transfer slower than `min_rate` bytes/s over `stall` seconds fails too, so
    neither a silent nor a dripping server can hang it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    limits = Limits(timeout, stall, min_rate, size or max_bytes)
    with locked(dest):
        if dest.exists():
            try:
                check_complete(dest, sha256, size)
                return dest  # another process finished it while we waited, or it was fine all along
            except CheckpointError as e:
                say(f"{e}; downloading it again from {url}")
        part = Part(dest)
        try:
            fetch(url, part, limits, progress)
        except StartOver as e:
            say(f"{url}: {e}; downloading {dest.name} from the start")
            part.discard()
            fetch(url, part, limits, progress)
        try:
            check_complete(part.path, sha256, size, dest.suffix)
        except CheckpointError as e:
            part.discard()
            raise DownloadError(url, f"what arrived is not usable ({e}); it was deleted") from None
        part.path.replace(dest)
        part.meta.unlink(missing_ok=True)
    return dest


def validate_weights(path: str | os.PathLike, *, quick: bool = False, suffix: str | None = None) -> None:
    """Raise CheckpointError, naming the file, unless path holds complete weights in the format of
    `suffix` (default: its own): a torch zip with its central directory that loads with
    weights_only, a safetensors file whose header accounts for every byte, an ONNX model that builds.

    `quick` checks only the structure where it is cheap to read (zip central directory, safetensors
    header); legacy (non-zip) torch files and ONNX models are always loaded in full.
    """
    path = Path(path)
    suffix = (suffix or path.suffix).lower()
    if suffix == ".onnx":
        check_onnx(path)
    elif suffix == ".safetensors":
        check_safetensors(path, quick)
    else:
        check_torch(path, quick)


def check_complete(path: Path, sha256: str | None, size: int | None, suffix: str | None = None) -> None:
    got = path.stat().st_size
    if size is not None and got != size:
        raise CheckpointError(path, f"has {got} bytes, not the published {size}")
    if sha256 is not None and (digest := file_sha256(path)) != sha256.lower():
        raise CheckpointError(path, f"sha256 {digest} does not match the published {sha256}")
    validate_weights(path, suffix=suffix)


def check_torch(path: Path, quick: bool) -> None:
    if zipfile.is_zipfile(path):
        check_torch_zip(path)
        if quick:
            return
    elif starts_with(path, b"PK\x03\x04"):
        raise CheckpointError(path, "is cut short: a zip archive without its central directory")
    read_state_dict(path)


def starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def check_torch_zip(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        entries = archive.infolist()
    if not any(e.filename.rsplit("/", 1)[-1] == "data.pkl" for e in entries):
        raise CheckpointError(path, "is a zip archive without data.pkl, not a PyTorch checkpoint")
    first = min(e.header_offset for e in entries)
    if first:  # zipfile tolerates a prefix (self-extracting archives); here it means bytes written twice
        raise CheckpointError(path, f"has {first} stray bytes before its zip archive (written twice?)")


def check_safetensors(path: Path, quick: bool) -> None:
    """The header must account for every byte of the file."""
    length, header = safetensors_header(path)
    try:
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError):
        raise CheckpointError(path, "has no readable safetensors header") from None
    size = path.stat().st_size
    if 8 + length + end != size:
        raise CheckpointError(path, f"has {size} bytes where its safetensors header says {8 + length + end}")
    if not quick:
        open_safetensors(path)


def open_safetensors(path: Path) -> None:
    """The library's own check of every tensor's dtype, shape and extent (read_state_dict goes by suffix,
    and a .part has none)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(path, f"is not valid safetensors ({e})") from None


def check_onnx(path: Path) -> None:
    import onnxruntime

    try:
        onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's errors share no base class besides Exception
        raise CheckpointError(path, f"is not a valid ONNX model ({first_line(e)})") from None


class Part:
    """dest.part and the JSON beside it naming the URL, ETag and total size its bytes came from."""

    def __init__(self, dest: Path):
        self.path = dest.with_name(dest.name + ".part")
        self.meta = dest.with_name(dest.name + ".part.json")

    def resumable(self, url: str) -> tuple[int, dict]:
        """Bytes that may be resumed for url, and what was recorded about them; a foreign .part is discarded."""
        if not os.path.lexists(self.path):
            return 0, {}
        refuse_unless_plain(self.path)
        try:
            meta = json.loads(self.meta.read_text())
        except (OSError, ValueError):
            meta = {}
        if not isinstance(meta, dict):  # [], 42, "text": not a record of ours
            meta = {}
        have = self.path.lstat().st_size
        total = meta.get("total")
        if meta.get("url") != url or not isinstance(total, (int, type(None))) or (total is not None and have > total):
            say(f"{self.path}: not a part of {url}; discarding it")
            self.discard()
            return 0, {}
        return have, meta

    def start(self, url: str, etag: str | None, total: int | None) -> None:
        """Empty the .part and record where its bytes will come from, before any of them is written."""
        self.meta.unlink(missing_ok=True)
        with self.open(truncate=True):
            pass
        write_file_atomically(self.meta, json.dumps({"url": url, "etag": etag, "total": total}).encode())

    def open(self, truncate: bool = False) -> BinaryIO:
        """The .part to append to, created if need be: never through a link, and only a plain file."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | (os.O_TRUNC if truncate else 0)
        try:
            fd = os.open(self.path, flags, 0o666)
        except OSError as e:
            if e.errno == errno.ELOOP:  # O_NOFOLLOW met a link
                refuse_unless_plain(self.path)
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            refuse_unless_plain(self.path)
        return open(fd, "ab")

    def discard(self) -> None:
        self.meta.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)


def refuse_unless_plain(path: Path) -> None:
    """A .part that is a link, folder or device is not ours to write to, or to delete: say so, by name."""
    mode = path.lstat().st_mode
    if not stat.S_ISREG(mode):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a plain file"
        raise DownloadError(str(path), f"is {kind}, not a partial download; nothing is written through it "
                                       "(remove it to download)")


def fetch(url: str, part: Part, limits: Limits, progress: bool) -> None:
    """Bring part up to the whole file, resuming it when it came from url and the server agrees."""
    have, meta = part.resumable(url)
    request = urllib.request.Request(url, headers={"User-Agent": "ComfyUI-GPEN"})
    if have:
        request.add_header("Range", f"bytes={have}-")
        if meta.get("etag") and not meta["etag"].startswith("W/"):
            request.add_header("If-Range", meta["etag"])  # a changed file comes back whole (200)
    try:
        response = urllib.request.urlopen(request, timeout=min(limits.timeout, limits.stall))
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            finish_unsatisfiable_range(e, have)
            return
        raise DownloadError(url, f"HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise DownloadError(url, describe(e)) from None
    with response:
        offset, total = body_position(response, have, meta)
        if total is not None and limits.max_bytes is not None and total > limits.max_bytes:
            raise DownloadError(url, f"the server offers {total} bytes, more than the {limits.max_bytes} expected")
        if offset == 0:
            part.start(url, response.headers.get("ETag"), total)
        receive(url, response, part, offset, total, limits, progress)


def finish_unsatisfiable_range(error: urllib.error.HTTPError, have: int) -> None:
    """416 for our Range: the .part is complete when the server's total is exactly what we have."""
    match = UNSATISFIED_RANGE.fullmatch(error.headers.get("Content-Range", "").strip())
    error.close()
    if not match or int(match[1]) != have:
        raise StartOver(f"HTTP 416 for bytes {have}- ({error.headers.get('Content-Range') or 'no Content-Range'})")


def body_position(response, have: int, meta: dict) -> tuple[int, int | None]:
    """Where the body starts in the file, and the file's total size if the server says it."""
    length = response.headers.get("Content-Length")
    if response.status != 206:
        return 0, int(length) if length is not None else None  # the whole file, whatever we asked for
    match = CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    if not match:
        raise StartOver(f"a 206 answer without a usable Content-Range ({response.headers.get('Content-Range')})")
    start, total = int(match[1]), None if match[3] == "*" else int(match[3])
    if start == 0:
        return 0, total
    if start != have:
        raise StartOver(f"asked for bytes from {have}, the server sent bytes from {start}")
    etag = response.headers.get("ETag")
    if meta.get("etag") and etag and etag != meta["etag"]:
        raise StartOver("the file changed on the server since the partial download")
    return have, total if total is not None else meta.get("total")


def receive(url: str, response, part: Part, offset: int, total: int | None, limits: Limits, progress: bool) -> None:
    """Append the body to part.path, failing on a stall or when more arrives than max_bytes."""
    done = offset
    window_start, window_bytes = time.monotonic(), 0
    shown = 0.0
    try:
        with part.open() as out:
            # read1 returns what has arrived, so the clock is checked even while a server drips
            while chunk := response.read1(CHUNK):
                write(out, chunk, url, part)
                done += len(chunk)
                if limits.max_bytes is not None and done > limits.max_bytes:
                    break
                window_bytes += len(chunk)
                now = time.monotonic()
                if now - window_start >= limits.stall:
                    if window_bytes < limits.min_rate * limits.stall:
                        raise TimeoutError(f"stalled: {window_bytes} bytes in {now - window_start:.1f} s, "
                                           f"under {limits.min_rate} bytes/s")
                    window_start, window_bytes = now, 0
                if progress and now - shown > 0.5:
                    show(part.path.name.removesuffix(".part"), done, total)
                    shown = now
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        if isinstance(e, OSError) and e.errno in DISK_FULL:  # the last buffer, flushed as the file closed
            disk_full(url, part, e)
        raise DownloadError(url, describe(e) + kept(part)) from None
    if limits.max_bytes is not None and done > limits.max_bytes:
        part.discard()  # an endless body: nothing in it is worth resuming
        raise DownloadError(url, f"the server sent more than the {limits.max_bytes} bytes expected; "
                                 "the partial file was deleted")
    if progress:
        show(part.path.name.removesuffix(".part"), done, total, end="\n")
    if total is not None and done < total:
        raise DownloadError(url, f"connection closed after {done} of {total} bytes" + kept(part))


def write(out: BinaryIO, chunk: bytes, url: str, part: Part) -> None:
    try:
        out.write(chunk)
    except OSError as e:
        if e.errno in DISK_FULL:
            disk_full(url, part, e)
        raise


def disk_full(url: str, part: Part, error: OSError) -> None:
    """A full disk: the .part goes, so that the space comes back and no rerun resumes what did not fit."""
    part.discard()
    raise DownloadError(url, f"writing {part.path} failed: {error.strerror or error}; "
                             "the partial file was deleted, free some space and run again") from None


@contextlib.contextmanager
def locked(dest: Path):
    """Hold dest.lock; a second process says that it waits, then waits for the first to finish."""
    lock = filelock.FileLock(str(dest) + ".lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        say(f"{dest}: another process is downloading it; waiting for it to finish")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def describe(e: BaseException) -> str:
    return str(getattr(e, "reason", None) or e or type(e).__name__)


def kept(part: Part) -> str:
    size = part.path.stat().st_size if part.path.exists() else 0
    return f"; the {size} bytes received are kept, run again to resume" if size else ""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def show(name: str, done: int, total: int | None, end: str = "") -> None:
    if total:
        width = 30
        filled = int(width * done / total)
        text = f"\r{name} [{'#' * filled}{'.' * (width - filled)}] {done / 2**20:.1f}/{total / 2**20:.1f} MB"
    else:
        text = f"\r{name} {done / 2**20:.1f} MB"
    print(text, end=end, file=sys.stderr, flush=True)
