"""Downloading weights: a .part file renamed only when complete and verified, resumable, with timeouts."""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download that did not produce a verified file; the message is one line for the user."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.reason = reason


def download(url: str, dest: str | os.PathLike, *, sha256: str | None = None, size: int | None = None,
             timeout: float = 30.0, progress: bool = True) -> Path:
    """Fetch url to dest. A partial `dest.part` from an earlier try is resumed where the server allows.

    `timeout` bounds every connect and every read, so a stalled server fails instead of hanging.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "ComfyUI-GPEN"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if have and response.status != 206:
                have = 0  # the server ignored the range: start again
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else size
            with open(part, "ab" if have else "wb") as out:
                done, shown = have, 0.0
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    done += len(chunk)
                    if progress and time.monotonic() - shown > 0.5:
                        _show(dest.name, done, total)
                        shown = time.monotonic()
    except urllib.error.HTTPError as e:
        raise DownloadError(url, f"HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, OSError) as e:
        reason = str(getattr(e, "reason", None) or e or type(e).__name__)
        if part.exists() and part.stat().st_size:
            reason += f"; the {part.stat().st_size} bytes received are kept, run again to resume"
        raise DownloadError(url, reason) from None
    if progress:
        _show(dest.name, done, total, end="\n")
    if total is not None and done < total:
        raise DownloadError(url, f"connection closed after {done} of {total} bytes; run again to resume")
    if sha256 is not None:
        digest = file_sha256(part)
        if digest != sha256.lower():
            part.unlink()
            raise DownloadError(url, f"sha256 {digest} does not match the published {sha256}; the file was deleted")
    part.replace(dest)
    return dest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _show(name: str, done: int, total: int | None, end: str = "") -> None:
    if total:
        width = 30
        filled = int(width * done / total)
        text = f"\r{name} [{'#' * filled}{'.' * (width - filled)}] {done / 2**20:.1f}/{total / 2**20:.1f} MB"
    else:
        text = f"\r{name} {done / 2**20:.1f} MB"
    print(text, end=end, file=sys.stderr, flush=True)
