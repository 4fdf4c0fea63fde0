"""Render a build's report.html in headless Chromium to a PNG, to look at it as a user would.

    python bench/report_screenshot.py BUILD_DIR [OUT.png]

Needs Debian's chromium (apt-get install chromium). The flags keep it off the network.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path


def screenshot(html: Path, png: Path, width: int = 1100, height: int = 4200) -> None:
    with tempfile.TemporaryDirectory(prefix="smpq_chromium_") as profile:
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--screenshot={png}",
                        html.resolve().as_uri()], check=True, capture_output=True, timeout=120)


if __name__ == "__main__":
    build = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else build / "report_screenshot.png"
    screenshot(build / "report.html", out)
    print(f"wrote {out}")
