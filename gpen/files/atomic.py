"""Writing a file whole or not at all: a temporary file beside it, renamed over it in one step.

Every result the package writes (images, videos and their segments, safetensors, records) goes
through here, so that Ctrl-C, a full disk or a crash leaves what was there before.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = True, suffix: str = ".part") -> Iterator[str]:
    """A temporary file in `path`'s folder, to write and close within the block: it becomes `path`
    when the block ends, and is removed when the block fails, Ctrl-C included. It is readable like
    any new file (0666 less the umask), whatever the writer made of it. With overwrite=False an
    existing `path` is kept and FileExistsError raised."""
    path = Path(path)
    temp, mode = _create_beside(path, suffix)
    try:
        yield str(temp)
        os.chmod(temp, mode)  # writers that replace the file (safetensors) leave 0600
        if not overwrite and path.exists():
            raise FileExistsError(f"{path}: exists, not replaced")
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def write_file_atomically(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> None:
    """Write `data` to `path` through atomic_file, flushed to the disk before the rename."""
    with atomic_file(path, overwrite) as temp, open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _create_beside(path: Path, suffix: str) -> tuple[Path, int]:
    """A new, empty, hidden file next to `path`, and the mode the umask gave it (read without
    setting the umask, which would race with other threads creating files)."""
    while True:
        temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")
        try:
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return temp, temp.stat().st_mode & 0o777
