"""Open a report in a real headless Chromium and count the images it loaded.

Why: a report whose plots silently fail to embed looks fine in a diff and broken to a
reader.  The report's own script writes ``data-images-loaded="k/n"`` on the body once
the page has loaded; Chromium's ``--dump-dom`` gives us the DOM after scripts ran.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from dlmedit.errors import MissingPackageError

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=5000",
)


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise MissingPackageError("no Chromium found; install Debian's package: apt-get install chromium")


def check_report(html_path: str | Path, screenshot: str | Path | None = None, timeout: float = 120) -> tuple[int, int]:
    """Load ``html_path`` headless; return (images loaded, images total).  Optionally save a PNG screenshot."""
    browser = find_chromium()
    url = Path(html_path).resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
        dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=timeout,
                             check=False).stdout
        if screenshot is not None:
            subprocess.run([browser, *flags, f"--screenshot={Path(screenshot).resolve()}", "--window-size=1200,2400", url],
                           capture_output=True, timeout=timeout, check=False)
    match = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    if not match:
        raise RuntimeError(f"the report did not finish loading in Chromium (no image count in the DOM of {url})")
    return int(match.group(1)), int(match.group(2))


if __name__ == "__main__":  # python -m dlmedit.report.browser runs/quick/report.html [shot.png]
    import sys

    loaded, total = check_report(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
    print(f"{loaded}/{total} images loaded")
    sys.exit(0 if loaded == total and total > 0 else 1)
