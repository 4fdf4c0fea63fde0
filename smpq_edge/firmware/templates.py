"""The firmware's text: templates under ``firmware/`` filled whole with ``FileTemplate``
(``@@name@@`` placeholders; every placeholder given and every value used), and the helpers that
turn numbers and strings into C."""

from __future__ import annotations

import re
import string
from importlib import resources
from pathlib import Path

import numpy as np


# The templates are package data (installed with the package, editable or not).
FIRMWARE_DIR = Path(str(resources.files("smpq_edge.firmware_templates")))  # firmware/ in the repository
BYTES_PER_LINE = 12  # model_data.cc: hex bytes per line
VALUES_PER_LINE = 16  # test_vectors.cc: decimal values per line


class FileTemplate(string.Template):
    """``@@name@@`` placeholders, so C's and make's ``$`` and make's ``$@`` pass through."""

    delimiter = "@@"
    pattern = r"""
        @@(?:
          (?P<escaped>@@) |
          (?P<named>[a-z][a-z0-9_]*)@@ |
          (?P<braced>(?!)) |
          (?P<invalid>)
        )
    """
    flags = re.VERBOSE  # placeholders are lower case


def fill_template(relative: str, values: dict[str, object]) -> str:
    """A template under firmware/ filled whole; each placeholder given, each value used."""
    path = FIRMWARE_DIR / relative
    template = FileTemplate(path.read_text(encoding="utf-8"))
    wanted = set(template.get_identifiers())
    given = set(values)
    if wanted != given or not template.is_valid():
        raise RuntimeError(
            f"template {relative}: missing {sorted(wanted - given)}, unused {sorted(given - wanted)}"
        )
    return template.substitute({k: str(v) for k, v in values.items()})


def c_identifier(text: str) -> str:
    """A valid C identifier from any text: other characters become '_', no leading digit."""
    ident = re.sub(r"[^A-Za-z0-9_]", "_", text)
    if not ident or ident[0].isdigit():
        ident = "_" + ident
    return ident


def c_string(text: str) -> str:
    """Contents for a C string literal: quotes, backslashes and non-printables escaped."""
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        if char in "\\\"":
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F and char != "?":  # '?' escaped: no trigraphs
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return "".join(out)


def comment_text(text: str) -> str:
    """Text safe inside a // comment or Markdown code span: printable ASCII on one line."""
    return "".join(c if 0x20 <= ord(c) < 0x7F and c != "`" else "?" for c in text)


def c_float(value: float) -> str:
    """A float32 literal that round-trips (9 significant digits)."""
    text = f"{float(np.float32(value)):.9g}"
    if not any(c in text for c in ".eEn"):
        text += ".0"
    return text + "f"


def c_int(value: int) -> str:
    return f"({value})" if value < 0 else str(value)


def hex_bytes(data: bytes, per_line: int = BYTES_PER_LINE) -> str:
    lines = []
    for start in range(0, len(data), per_line):
        chunk = data[start:start + per_line]
        lines.append("  " + " ".join(f"0x{b:02x}," for b in chunk))
    return "\n".join(lines)


def int_lines(values: np.ndarray, indent: str) -> list[str]:
    flat = [int(v) for v in np.asarray(values).reshape(-1)]
    return [
        indent + " ".join(f"{v:4d}," for v in flat[i:i + VALUES_PER_LINE])
        for i in range(0, len(flat), VALUES_PER_LINE)
    ]


def int_rows(rows: np.ndarray) -> str:
    """A 2-D C initialiser body: one braced row per sample, wrapped."""
    out = []
    for index, row in enumerate(rows):
        out.append(f"  {{  // {index}")
        out.extend(int_lines(row, "    "))
        out.append("  },")
    return "\n".join(out)
