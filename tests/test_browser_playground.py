"""End-to-end: notebook 08's playground, driven in a real browser.

The harness of the mask inspector's test (tests/browser/jupyterlab.py): a throw-away JupyterLab on 127.0.0.1 over a
temporary copy of ``notebooks/``, Debian's headless Chromium through Playwright. Opens
``notebooks/08_playground.ipynb`` (toy mode, its defaults), runs all cells, finds the playground
(``.pigeon-playground``), moves the α_r slider with the keyboard and checks that the image and its scores follow —
without a new generation (the status line stays empty and the answer comes fast). The panel's screenshot is
``docs/img/playground.png`` (and ``$PIGEON_ARTIFACTS``, default ``runs/browser-artifacts/``).

Skipped without ``/usr/bin/chromium`` and ``playwright`` (``bash scripts/install_browser.sh``), unless
``PIGEON_REQUIRE_BROWSER=1``, which turns the skip into a failure.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

from conftest import browser_helpers

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "08_playground.ipynb"
ARTIFACTS = Path(os.environ.get("PIGEON_ARTIFACTS", REPO / "runs" / "browser-artifacts"))
SCREENSHOT = REPO / "docs" / "img" / "playground.png"
REQUIRE = os.environ.get("PIGEON_REQUIRE_BROWSER", "") not in ("", "0")

T_KERNEL, T_READY, T_UPDATE, QUIET = 120, 300, 30, 1.5  # seconds

# the playground's DOM contract (pigeon_utils.playground.Playground)
ROOT = ".pigeon-playground"
REF_RATIO = ".pigeon-pg-ref-ratio"
IMAGE = "img.pigeon-pg-image, .pigeon-pg-image img"
STRIP = "img.pigeon-pg-strip, .pigeon-pg-strip img"
SCORES = ".pigeon-pg-scores"
STATUS = ".pigeon-pg-status"
MODEL = ".pigeon-pg-model select"


jl = browser_helpers()


class Panel:
    """Reads and drives the playground on a JupyterLab page."""

    def __init__(self, page):
        self.page = page
        self.root = page.locator(ROOT).first

    def text(self, sel: str) -> str:
        loc = self.root.locator(sel)
        return " ".join(loc.first.inner_text().split()) if loc.count() else ""

    def state(self) -> tuple[str, str | None]:
        png = jl.img_bytes(self.root.locator(IMAGE))
        return self.text(SCORES), (hashlib.sha256(png).hexdigest()[:16] if png else None)

    def wait_settled(self, before, timeout: float, what: str):
        """Wait until (scores text, image) differs from `before`, then stays put with the kernel idle."""
        deadline = time.monotonic() + timeout
        last, since = None, time.monotonic()
        while True:
            cur = self.state()
            if cur != last:
                last, since = cur, time.monotonic()
            elif cur[0] and cur[1] and cur != before and jl.kernel_idle(self.page) \
                    and time.monotonic() - since >= QUIET:
                return cur
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: the playground did not settle on a new state within {timeout:.0f} s"
                                     f"\n  before: {before}\n  now:    {cur}")
            time.sleep(0.25)

    def step_ratio(self, steps: int, expect: str) -> float:
        """Press ArrowRight / ArrowLeft on the α_r handle; return when the readout shows `expect`."""
        handle = self.root.locator(f"{REF_RATIO} .noUi-handle").first
        handle.focus()
        t0 = time.monotonic()
        for _ in range(abs(steps)):
            handle.press("ArrowRight" if steps > 0 else "ArrowLeft")
        self.page.wait_for_function(
            "([root, sel, want]) => { const r = document.querySelector(root + ' ' + sel + ' .widget-readout');"
            " return r && r.textContent.trim() === want; }", arg=[ROOT, REF_RATIO, expect], timeout=10_000)
        return t0


@pytest.mark.slow
def test_playground_in_browser(tmp_path):
    reason = jl.browser_unavailable()
    if reason:
        if REQUIRE:
            pytest.fail(f"PIGEON_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    t0 = time.monotonic()
    with jl.jupyterlab_server(NOTEBOOK.parent, workdir=tmp_path / "lab") as lab, sync_playwright() as pw:
        browser = jl.launch_chromium(pw, home=lab.home)
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.set_default_timeout(30_000)
        try:
            page.goto(lab.lab_url(NOTEBOOK.name), wait_until="domcontentloaded")
            jl.wait_for_kernel(page, T_KERNEL)
            jl.run_all_cells(page)
            jl.wait_for_visible(page, ROOT, T_READY)
            panel = Panel(page)
            start = panel.wait_settled(None, T_READY - (time.monotonic() - t0), "first render")
            assert "α_r = 0.50" in start[0] and "history CIS" in start[0], start[0]
            assert panel.root.locator(MODEL).count() == 1 and panel.root.locator(f"{REF_RATIO} .noUi-handle").count()
            assert jl.img_bytes(panel.root.locator(STRIP)), "no sweep strip"
            print(f"[e2e] playground ready after {time.monotonic() - t0:.1f} s: {start[0]!r}")

            t_move = panel.step_ratio(+1, "0.75")
            s_075 = panel.wait_settled(start, T_UPDATE, "α_r 0.50 -> 0.75")
            took = time.monotonic() - t_move - QUIET
            assert "α_r = 0.75" in s_075[0] and s_075[1] != start[1], "the image did not change with α_r"
            assert panel.text(STATUS) == "", f"status after moving α_r: {panel.text(STATUS)!r}"
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            panel.root.scroll_into_view_if_needed()
            panel.root.screenshot(path=str(ARTIFACTS / "playground_alpha_r_0.75.png"))
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ARTIFACTS / "playground_alpha_r_0.75.png", SCREENSHOT)

            panel.step_ratio(-3, "0.00")
            s_000 = panel.wait_settled(s_075, T_UPDATE, "α_r 0.75 -> 0.00")
            assert "α_r = 0.00" in s_000[0] and s_000[1] not in (start[1], s_075[1])
            panel.step_ratio(+2, "0.50")
            s_050 = panel.wait_settled(s_000, T_UPDATE, "α_r 0.00 -> 0.50")
            assert s_050 == start, "back at α_r 0.50 the playground shows another image or scores"
            print(f"[e2e] α_r 0.75 answered in {took:.1f} s; screenshot {SCREENSHOT}; total "
                  f"{time.monotonic() - t0:.1f} s")
        except BaseException:
            try:
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "failure_playground_page.png"), full_page=True)
            except Exception:  # noqa: BLE001 - diagnostics only
                pass
            errs = jl.error_outputs(page)
            if errs:
                print("[e2e] notebook stderr / error outputs:\n" + "\n---\n".join(e[-1500:] for e in errs))
            print("[e2e] jupyter lab log (tail):\n" + lab.log_tail())
            raise
        finally:
            browser.close()
