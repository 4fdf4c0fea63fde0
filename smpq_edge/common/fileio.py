"""Atomic file writes: write to a temporary name in the same folder, then rename.

A build interrupted at any point leaves each file either complete or absent, never half-written.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from smpq_edge.common.errors import UserError


def ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{path}: cannot create output folder ({exc.strerror or exc.__class__.__name__})") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"{path}: output folder is not writable")
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    ensure_dir(path.parent)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    # Mode 0666 less the umask, as open() gives any new file (tempfile.mkstemp would force 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: {what} is not readable JSON ({exc.__class__.__name__})") from None
