"""``nagkit ui`` in a real browser: the gradio page on localhost, driven by headless Chromium through Playwright.

Skipped (with the reason) only where gradio, Playwright or a Chromium executable is missing; ``.ci/run`` installs
Debian's ``chromium`` and the ``test`` extra brings gradio and Playwright (Playwright's own browser download is not
used: the test points it at the system executable).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _chromium() -> str | None:
    given = os.environ.get("NAGKIT_CHROMIUM")
    if given and Path(given).is_file():
        return given
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ui_help_imports_neither_gradio_nor_torch() -> None:
    import subprocess
    import sys

    code = ("import sys\nfrom nagkit.cli.main import main\ntry:\n    main(['ui', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('LOADED', 'gradio' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--model" in out and "LOADED False False" in out


def test_ui_errors_are_one_line() -> None:
    from nagkit.cli.common import CLIError
    from nagkit.cli.ui import Session

    session = Session(device="cpu")
    with pytest.raises(CLIError, match="--nag-tau must be > 0"):
        session.generate("embedded", "a circle", "red", tau=0.0)
    with pytest.raises(CLIError, match="the prompt is empty"):
        session.generate("embedded", "  ", "red")


def test_ui_in_headless_chromium(tmp_path: Path) -> None:
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'nagkit[ui]' or the test extra)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium executable (apt-get install chromium; or set NAGKIT_CHROMIUM): the browser test "
                    "needs one")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from PIL import Image

    from nagkit.cli.ui import build_app

    app = build_app(model="embedded", device="cpu")
    port = _free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, show_error=True,
                       inbrowser=False, share=False)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=executable, headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 820})
                page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded", timeout=30_000)
                page.locator("#prompt textarea").fill("a circle")
                page.locator("#negative textarea").fill("red")
                page.locator("#generate").click()
                page.wait_for_function(
                    "() => ['#without-nag', '#with-nag'].every(id => { const img = document.querySelector("
                    "id + ' img'); return img && img.complete && img.naturalWidth > 0; })", timeout=30_000)
                page.wait_for_function("() => document.querySelector('#summary').innerText.includes('FLOP overhead')",
                                       timeout=10_000)
                summary = page.locator("#summary").inner_text()
                assert "without NAG" in summary and "with NAG" in summary and "%" in summary
                sources = [page.locator(f"{sel} img").first.get_attribute("src")
                           for sel in ("#without-nag", "#with-nag")]
                images = []
                for src in sources:
                    assert src
                    if src.startswith("data:"):
                        import base64

                        data = base64.b64decode(src.split(",", 1)[1])
                    else:
                        url = src if src.startswith("http") else f"http://127.0.0.1:{port}{src}"
                        data = page.request.get(url).body()
                    images.append(Image.open(io.BytesIO(data)).convert("RGB"))
                assert images[0].size == images[1].size and images[0].width >= 32
                assert images[0].tobytes() != images[1].tobytes(), "NAG did not change the image"
                shot = artifacts / "ui.png"
                page.screenshot(path=str(shot), full_page=True)
                # a mistake is one line on the page (gr.Error), never a traceback
                page.locator("#nag-tau input").fill("0")
                page.locator("#generate").click()
                page.get_by_text("--nag-tau must be > 0").first.wait_for(timeout=15_000)
                assert "Traceback" not in page.content()
                page.screenshot(path=str(artifacts / "ui_error.png"), full_page=True)
            finally:
                browser.close()
    finally:
        app.close()
    assert shot.stat().st_size > 1000
    if os.environ.get("NAGKIT_UPDATE_DOCS") == "1":  # refresh the README's screenshot (a test run never edits docs/)
        Image.open(shot).convert("RGB").quantize(colors=128).save(ROOT / "docs" / "ui.png", optimize=True)
