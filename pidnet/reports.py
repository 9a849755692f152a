"""Run folders and the files written into them: results.json, CSV tables, printed tables."""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .atomic import atomic_write
from .errors import InputError

FINISHED_MARKER = "results.json"


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` atomically (see ``pidnet.atomic``)."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """All ``rows`` as one CSV, rewritten whole (so a restart never leaves half a line)."""
    buffer = io.StringIO()
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def prepare_output_dir(path: str | Path, resume: bool = False, force: bool = False,
                       resumable: bool = True) -> Path:
    """Make the run folder; refuse to overwrite a finished or started run unless told to. A
    folder that cannot be made (a file in the way, no permission, a read-only file system) is
    an ``InputError`` naming it and the cause."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"output_dir {path} is a file, not a folder; set another output_dir")
    started = (path / "last.pt").exists()
    finished = (path / FINISHED_MARKER).exists()
    if resume:
        if finished and not started:
            raise InputError(f"{path} holds finished results but no last.pt to resume from")
    elif (started or finished) and not force:
        hint = "pass --resume to continue it, " if resumable and started else "pass "
        if (path / "sensitivity.json").exists():   # a finished sweep: select again from it
            hint = "pass --reselect to select again from its layers (another tolerance), "
        raise InputError(f"output_dir {path} already holds a run; {hint}--force to overwrite "
                         "it, or set another output_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output_dir {path}: {exc.strerror or exc}; set another "
                         "output_dir") from None
    return path


def versions() -> dict[str, str]:
    """Versions of Python, this toolkit and the libraries whose behaviour shapes its figures."""
    import platform
    from importlib import metadata

    found = {"python": platform.python_version()}
    for package in ("pidnetqat", "torch", "torchvision", "nvidia-modelopt", "onnx",
                    "onnxruntime"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            if package == "pidnetqat":
                from . import __version__
                found[package] = __version__
    return found


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain fixed-width text table; floats with two decimals."""
    def cell(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    table = [list(columns)] + [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
