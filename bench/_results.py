"""Shared by the bench scripts: replace one script's section of bench/RESULTS.md, keep the rest."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(heading: str, body: str) -> None:
    """Replace (or append) the section that starts at ``heading``, up to the next '## ' heading."""
    body = body.strip().removeprefix(heading)
    current = RESULTS.read_text() if RESULTS.exists() else "# Measured results\n"
    if heading in current:
        start = current.index(heading)
        end = current.find("\n## ", start + len(heading))
        current = current[:start] + (current[end + 1:] if end != -1 else "")
    RESULTS.write_text(current.rstrip() + "\n\n" + heading + "\n\n" + body.strip() + "\n")
