"""The search gallery in a real browser: headless Chromium (Debian's `chromium`) renders it with no console message.

Slow (starts a browser): `make screenshot`, or `pytest -m slow tests/test_report_chromium.py`. Skipped where
/usr/bin/chromium is missing (`apt-get install -y chromium`). Set MMCROSS_SCREENSHOT to keep the PNG somewhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from index_helpers import make_dataset
from PIL import Image
from typer.testing import CliRunner

from cli import app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--enable-logging=stderr",
    "--v=0",
    "--window-size=1200,900",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="needs Debian's chromium (/usr/bin/chromium)"),
]


def screenshot(page: Path, png: Path, profile: Path) -> list[str]:
    """Render `page` to `png` in a fresh headless Chromium profile; returns the console messages it logged."""
    args = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}", page.resolve().as_uri()]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [line for line in proc.stderr.splitlines() if re.search(r":CONSOLE|Uncaught", line)]


def test_console_errors_are_caught(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<!doctype html><script>throw new Error("boom")</script>')
    messages = screenshot(bad, tmp_path / "bad.png", tmp_path / "profile")
    assert any("Uncaught" in m for m in messages)  # the check below can see an error when there is one


def test_search_gallery_renders_in_chromium_without_console_errors(tmp_path):
    dataset = make_dataset(tmp_path / "ds", n=6, missing=False)
    index = tmp_path / "index"
    result = CliRunner().invoke(app, ["index", str(dataset), "--out", str(index), "--model", "tiny", "-j", "0"])
    assert result.exit_code == 0, result.output
    page = tmp_path / "gallery.html"
    args = ["search", str(index), "--text", "<script>alert(1)</script> a red circle", "--k", "5", "--rerank", "6"]
    args += ["--allow-untrained-head"]  # random init: the page is tested, not the head
    result = CliRunner().invoke(app, [*args, "--html", str(page)])
    assert result.exit_code == 0, result.output
    png = Path(os.environ.get("MMCROSS_SCREENSHOT") or tmp_path / "gallery.png")
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    messages = screenshot(page, png, tmp_path / "profile")
    assert messages == []
    with Image.open(png) as shot:
        assert shot.format == "PNG" and shot.size == (1200, 900)
        colours = shot.convert("RGB").getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 50  # text and thumbnails drawn, not a blank page
