"""Benchmarks that print and save their figures (``python -m bench`` runs them all)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_result(result: dict[str, Any], path: str | Path) -> None:
    """Print ``result`` and write it as JSON at ``path`` (the path printed last)."""
    print(json.dumps(result, indent=2))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    print(path)
