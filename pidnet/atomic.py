"""Atomic file writes: readers see the old file or the whole new one, never a torn one."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import OutputError


PREFIX, SUFFIX = ".", ".tmp"   # a temporary is named .<target name>.<random>.tmp


def remove_temporaries(directory: str | os.PathLike) -> list[str]:
    """Delete the temporaries a killed writer left in ``directory`` (SIGKILL skips the
    cleanup below); returns their names. Call it only where no other writer is at work."""
    found = sorted(Path(directory).glob(f"{PREFIX}*{SUFFIX}"))
    for tmp in found:
        tmp.unlink(missing_ok=True)
    return [tmp.name for tmp in found]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write`` on a temporary file beside ``path``, flush it to disk, then rename it
    over ``path``. On any error the temporary file is removed and ``path`` is untouched; an
    error of the file system (disk full, read-only, permission, file-size limit) is an
    ``OutputError`` naming ``path`` and the cause."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{PREFIX}{path.name}.", suffix=SUFFIX,
                                   dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        os.chmod(tmp, 0o644)   # mkstemp makes it private; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None:
            kept = "the previous file is intact" if path.exists() else "nothing was written"
            raise OutputError(f"cannot write {path}: {exc.strerror} ({kept})") from None
        raise
    return path
