"""The report in a real browser: headless Chromium renders it (non-blank screenshot, every section in the DOM)
without a single console message (no script error, no blocked load, no Content-Security-Policy violation).

Needs Debian's `chromium` (`make test` installs it where apt is available). Without it the test skips, unless
INCOMPAT_REQUIRE_CHROMIUM is set (CI sets it): then it fails.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from incompat.report import SECTION_IDS, write_report
from tests.test_report import HOSTILE, make_run

CHROMIUM = "/usr/bin/chromium"
# Chromium with --enable-logging=stderr writes every console message of the page as
#   [pid:tid:time:INFO:CONSOLE:12] "message", source: file:///... (12)      (older versions: CONSOLE(12))
# whatever its level (log, error, an uncaught exception, a CSP violation, a failed load).
CONSOLE_LINE = re.compile(r":CONSOLE[:(]|Uncaught")


def _chromium() -> str:
    path = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    if path:
        return path
    if os.environ.get("INCOMPAT_REQUIRE_CHROMIUM"):
        pytest.fail(f"INCOMPAT_REQUIRE_CHROMIUM is set but {CHROMIUM} is absent: install Debian's chromium "
                    "(`apt-get install -y chromium`, which `make test` does where apt is available)")
    pytest.skip(f"{CHROMIUM} is absent (Debian package `chromium`); set INCOMPAT_REQUIRE_CHROMIUM=1 to fail instead")


def _run_chromium(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-extensions", "--mute-audio", f"--user-data-dir={profile}", "--enable-logging=stderr",
           "--v=0", *extra, url]
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if CONSOLE_LINE.search(line)]


def test_console_detector_sees_errors(tmp_path):
    """The check below is only worth something if chromium's console really reaches stderr: a page with an
    uncaught exception and a load blocked by the report's Content-Security-Policy must be caught."""
    page = tmp_path / "canary.html"
    page.write_text("<!DOCTYPE html><html><head><meta http-equiv=\"Content-Security-Policy\" "
                    "content=\"default-src 'none'; img-src data:\"></head><body><p>canary</p>"
                    "<img src=\"missing.png\"><script>throw new Error('canary')</script></body></html>")
    proc = _run_chromium(tmp_path, page.as_uri(), "--dump-dom")
    lines = _console_lines(proc.stderr)
    assert any("missing.png" in line for line in lines), proc.stderr[-3000:]
    assert "<p>canary</p>" in proc.stdout


def test_report_renders_without_console_messages(tmp_path):
    sources = make_run(tmp_path / "run")
    html_path = write_report(sources, tmp_path / "out", top_k=8)["html"]
    url = html_path.resolve().as_uri()

    # The DOM: every section rendered, the hostile class name shown as text, no element made from it.
    dom = _run_chromium(tmp_path, url, "--dump-dom")
    assert _console_lines(dom.stderr) == [], "\n".join(_console_lines(dom.stderr))
    for section in SECTION_IDS:
        assert f'id="{section}"' in dom.stdout, f"section {section!r} missing from the rendered DOM"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;/.." in dom.stdout and HOSTILE not in dom.stdout
    assert "<script" not in dom.stdout.lower()

    # The pixels: a real page (images, text, colours), not a blank or error page.
    shot = tmp_path / "report.png"
    proc = _run_chromium(tmp_path, url, f"--screenshot={shot}", "--window-size=1280,2000",
                         "--hide-scrollbars")
    assert _console_lines(proc.stderr) == [], "\n".join(_console_lines(proc.stderr))
    assert shot.exists(), proc.stderr[-3000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2000, 1280)
    packed = (pixels[..., 0].astype(np.int32) << 16) | (pixels[..., 1].astype(np.int32) << 8) | pixels[..., 2]
    colours = len(np.unique(packed))
    not_white = float((pixels.min(axis=2) < 235).mean())
    assert colours > 500, f"only {colours} distinct colours: a blank page?"
    assert not_white > 0.05, f"only {not_white:.1%} of the page is not white: a blank page?"
