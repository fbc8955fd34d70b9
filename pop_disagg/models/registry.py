"""Model names -> checkpoint folders. Any value that is not a registered name is a folder path."""

from __future__ import annotations

from pathlib import Path

from .arch import ModelConfigError


def resolve_model(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    raise ModelConfigError(f"model {name_or_path!r}: not a registered model name and not a checkpoint folder")
