"""End-to-end: notebook 02's mask inspector, driven in a real browser (issue 8).

Starts a throw-away JupyterLab on 127.0.0.1 (token auth, throw-away HOME, a temporary copy of ``notebooks/``),
drives Debian's headless Chromium through Playwright, opens ``notebooks/02_mask_generation.ipynb`` (toy mode, its
defaults), runs all cells, finds the inspector (``.pigeon-mask-inspector``), moves the α_r slider with the keyboard
and switches the mask type, and checks that the kept counts and the overlay image follow. Screenshots of the
inspector go to ``$PIGEON_ARTIFACTS`` (default ``runs/browser-artifacts/``).

Needs ``/usr/bin/chromium`` and the ``playwright`` package (``bash scripts/install_browser.sh``); skipped when
they are absent, unless ``PIGEON_REQUIRE_BROWSER=1`` (set in CI), which turns the skip into a failure.
``PIGEON_BROWSER_NOTEBOOK`` points the test at another notebook that follows the same DOM contract (only for
developing the harness).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from pathlib import Path

import pytest

from conftest import browser_helpers

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = Path(os.environ.get("PIGEON_BROWSER_NOTEBOOK", REPO / "notebooks" / "02_mask_generation.ipynb"))
ARTIFACTS = Path(os.environ.get("PIGEON_ARTIFACTS", REPO / "runs" / "browser-artifacts"))
REQUIRE = os.environ.get("PIGEON_REQUIRE_BROWSER", "") not in ("", "0")

# bounded, generous timeouts (seconds): the notebook's cells take ~10-30 s on a shared 2-core CPU
T_KERNEL = 120          # page load until the kernel is ready
T_INSPECTOR = 300       # Run All until the inspector shows its first counts and overlay
T_UPDATE = 60           # one control change until the outputs change
QUIET = 1.5             # outputs unchanged (and kernel idle) this long = settled

# the inspector's DOM contract (ipywidgets classes on the widgets' elements)
INSPECTOR = ".pigeon-mask-inspector"
SAMPLE = ".pigeon-sample select"
HIST_RATIO = ".pigeon-hist-ratio"
REF_RATIO = ".pigeon-ref-ratio"
MASK_TYPE = ".pigeon-mask-type select"
COUNTS = ".pigeon-kept-counts"
OVERLAY = "img.pigeon-overlay, .pigeon-overlay img"
STDERR = "[data-mime-type='application/vnd.jupyter.stderr']"  # error and stderr outputs in JupyterLab

_COUNT_RE = {part: re.compile(part + r"\D*?(\d+)\s*/\s*(\d+)", re.I) for part in ("history", "reference")}


jl = browser_helpers()


def _unavailable(reason: str):
    if REQUIRE:
        pytest.fail(f"PIGEON_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def parse_counts(text: str) -> dict[str, tuple[int, int]]:
    """'history kept 52 / 65 · reference kept 7 / 14' -> {'history': (52, 65), 'reference': (7, 14)}."""
    out = {}
    for part, rx in _COUNT_RE.items():
        m = rx.search(text)
        assert m, f"kept-counts text has no '{part} … k / n': {text!r}"
        kept, total = int(m.group(1)), int(m.group(2))
        assert 0 <= kept <= total and total > 0, f"implausible {part} count {kept} / {total} in {text!r}"
        out[part] = (kept, total)
    return out


class Inspector:
    """Reads and drives the mask inspector on a JupyterLab page."""

    def __init__(self, page):
        self.page = page
        self.root = page.locator(INSPECTOR).first

    # -- reading -------------------------------------------------------------------------------------------
    def counts_text(self) -> str:
        loc = self.root.locator(COUNTS)
        return " ".join(loc.first.inner_text().split()) if loc.count() else ""

    def overlay_png(self) -> bytes | None:
        """The bytes the overlay <img> shows (ipywidgets serves them as a blob: URL, new on every update)."""
        return jl.img_bytes(self.root.locator(OVERLAY))

    def state(self) -> tuple[str, str | None]:
        png = self.overlay_png()
        return self.counts_text(), (hashlib.sha256(png).hexdigest()[:16] if png else None)

    def readout(self, slider: str) -> float:
        return float(self.root.locator(f"{slider} .widget-readout").first.inner_text().strip())

    def kernel_idle(self) -> bool:
        ind = self.page.locator(".jp-Notebook-ExecutionIndicator")
        return not ind.count() or ind.first.get_attribute("data-status") in (None, "idle")

    # -- waiting -------------------------------------------------------------------------------------------
    def wait_settled(self, before, timeout: float, what: str):
        """Wait until the (counts, overlay) state differs from ``before`` and then stays put (kernel idle) for
        QUIET seconds; return the settled state. ``before=None``: wait for a first complete state."""
        deadline = time.monotonic() + timeout
        last, since = None, time.monotonic()
        while True:
            cur = self.state()
            complete = bool(cur[0]) and cur[1] is not None
            if cur != last:
                last, since = cur, time.monotonic()
            elif complete and cur != before and self.kernel_idle() and time.monotonic() - since >= QUIET:
                return cur
            if time.monotonic() > deadline:
                changed = "changed but did not settle" if complete and cur != before else "did not change"
                raise AssertionError(
                    f"{what}: the inspector's outputs {changed} within {timeout:.0f} s "
                    f"(is the inspector's callback connected?)\n  before: {before}\n  now:    {cur}")
            time.sleep(0.25)

    # -- driving -------------------------------------------------------------------------------------------
    def step_slider(self, slider: str, steps: int, expect: float):
        """Focus the slider's handle and press ArrowRight / ArrowLeft once per step; wait for the readout."""
        handle = self.root.locator(f"{slider} .noUi-handle").first
        handle.focus()
        key = "ArrowRight" if steps > 0 else "ArrowLeft"
        for _ in range(abs(steps)):
            handle.press(key)
        self.page.wait_for_function(
            "([root, sel, want]) => { const r = document.querySelector(root + ' ' + sel + ' .widget-readout');"
            " return r && Math.abs(parseFloat(r.textContent) - want) < 1e-6; }",
            arg=[INSPECTOR, slider, expect], timeout=10_000)

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        self.root.scroll_into_view_if_needed()
        self.root.screenshot(path=str(path))
        return path


def _run_all(page):
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).first.click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).first.click()


def _wait_for_inspector(page, timeout: float):
    """Wait until the inspector is visible; fail at once when a cell shows a traceback (Run All stops there)."""
    deadline = time.monotonic() + timeout
    while True:
        if page.locator(INSPECTOR).count() and page.locator(INSPECTOR).first.is_visible():
            return
        errs = [t for t in page.locator(STDERR).all_inner_texts() if "Traceback (most recent call last)" in t]
        if errs:
            raise AssertionError(f"a notebook cell failed before the inspector showed up:\n{errs[0].strip()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {INSPECTOR} within {timeout:.0f} s after Run All")
        time.sleep(0.5)


def _notebook_errors(page) -> str:
    """Text of the error / stderr outputs on the page (for failure messages)."""
    try:
        texts = page.locator(STDERR).all_inner_texts()
    except Exception:  # noqa: BLE001 - diagnostics only
        return ""
    return "\n---\n".join(t.strip()[-1500:] for t in texts if t.strip())


@pytest.mark.slow
def test_mask_inspector_in_browser(tmp_path):
    reason = jl.browser_unavailable()
    if reason:
        _unavailable(reason)
    if not NOTEBOOK.is_file():
        _unavailable(f"{NOTEBOOK} does not exist")
    from playwright.sync_api import sync_playwright

    for stale in ("failure_page.png", "failure_inspector.png"):  # from an earlier failed run
        (ARTIFACTS / stale).unlink(missing_ok=True)
    t0 = time.monotonic()
    console: list[str] = []
    with jl.jupyterlab_server(NOTEBOOK.parent, workdir=tmp_path / "lab") as lab, sync_playwright() as pw:
        browser = jl.launch_chromium(pw, home=lab.home)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(30_000)
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
        try:
            page.goto(lab.lab_url(NOTEBOOK.name), wait_until="domcontentloaded")
            # the kernel exists once the debugger button is enabled (data-status='idle' shows too early)
            page.wait_for_selector(".jp-DebuggerBugButton[aria-disabled='false']", timeout=T_KERNEL * 1000)
            _run_all(page)
            _wait_for_inspector(page, T_INSPECTOR)
            insp = Inspector(page)
            for sel in (SAMPLE, HIST_RATIO, REF_RATIO, MASK_TYPE, COUNTS, OVERLAY):
                assert insp.root.locator(sel).count() == 1, f"the inspector has no unique {sel!r}"
            assert "α_r" in insp.root.locator(f"{REF_RATIO} .widget-label").first.inner_text()
            assert insp.root.locator(MASK_TYPE).input_value() == "mutual"
            assert (insp.readout(REF_RATIO), insp.readout(HIST_RATIO)) == (0.5, 0.2), "not the default α_r / α_h"
            s_start = insp.wait_settled(None, T_INSPECTOR - (time.monotonic() - t0), "first render")
            print(f"[e2e] inspector ready after {time.monotonic() - t0:.1f} s: {s_start[0]!r}")

            # α_r 0.5 -> 0.2 -> 0.8 with the keyboard
            insp.step_slider(REF_RATIO, -3, 0.2)
            s_02 = insp.wait_settled(s_start, T_UPDATE, "α_r 0.5 -> 0.2")
            shot_02 = insp.shot("inspector_alpha_r_0.2.png")
            insp.step_slider(REF_RATIO, +6, 0.8)
            s_08 = insp.wait_settled(s_02, T_UPDATE, "α_r 0.2 -> 0.8")
            shot_08 = insp.shot("inspector_alpha_r_0.8.png")
            c_start, c_02, c_08 = (parse_counts(s[0]) for s in (s_start, s_02, s_08))
            print(f"[e2e] α_r 0.2: {s_02[0]!r}\n[e2e] α_r 0.8: {s_08[0]!r}")
            assert s_02[1] != s_start[1] and s_08[1] != s_02[1], "the overlay image did not change with α_r"
            assert s_08[0] != s_02[0], "the kept counts did not change with α_r"
            ref = [c["reference"][0] for c in (c_02, c_start, c_08)]
            assert ref[0] >= ref[1] >= ref[2] and ref[0] > ref[2], \
                f"reference kept count should fall as α_r rises (0.2, 0.5, 0.8 -> {ref})"
            assert c_02["reference"][1] == c_08["reference"][1], "the reference token total changed with α_r"

            # mask type: mutual -> none (everything kept) -> random
            insp.root.locator(MASK_TYPE).select_option("none")
            s_none = insp.wait_settled(s_08, T_UPDATE, "mask type mutual -> none")
            c_none = parse_counts(s_none[0])
            assert s_none[0] != s_08[0] and s_none[1] != s_08[1], "counts / overlay did not change with mask type"
            assert all(k == n for k, n in c_none.values()), f"mask type 'none' should keep every token: {c_none}"
            insp.shot("inspector_mask_none.png")
            insp.root.locator(MASK_TYPE).select_option("random")
            s_rand = insp.wait_settled(s_none, T_UPDATE, "mask type none -> random")
            c_rand = parse_counts(s_rand[0])
            assert s_rand[1] != s_none[1], "the overlay did not change from mask type 'none' to 'random'"
            assert c_rand["reference"][0] < c_rand["reference"][1], f"'random' at α_r=0.8 kept everything: {c_rand}"
            print(f"[e2e] none: {s_none[0]!r}\n[e2e] random: {s_rand[0]!r}")
            print(f"[e2e] screenshots: {shot_02}, {shot_08}; total {time.monotonic() - t0:.1f} s")
        except BaseException:
            with_shot = ARTIFACTS / "failure_page.png"
            try:
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(with_shot), full_page=True)
            except Exception:  # noqa: BLE001 - diagnostics only
                with_shot = None
            with contextlib.suppress(Exception):  # the inspector itself, when it is there
                if page.locator(INSPECTOR).count():
                    page.locator(INSPECTOR).first.screenshot(path=str(ARTIFACTS / "failure_inspector.png"),
                                                             timeout=5_000)
            print(f"[e2e] FAILED after {time.monotonic() - t0:.1f} s; page screenshot: {with_shot}")
            errs = _notebook_errors(page)
            if errs:
                print("[e2e] notebook stderr / error outputs:\n" + errs)
            if console:
                print("[e2e] browser console errors:\n  " + "\n  ".join(console[-20:]))
            print("[e2e] jupyter lab log (tail):\n" + lab.log_tail())
            raise
        finally:
            browser.close()
