"""Atomic file writes: readers see the old file or the whole new one, never a torn one."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


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
    over ``path``. On any error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{PREFIX}{path.name}.", suffix=SUFFIX, dir=path.parent)
    os.chmod(tmp, 0o644)   # mkstemp makes it private; results are meant to be shared
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
