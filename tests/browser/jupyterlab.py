"""Helpers for end-to-end tests in a real browser: a throw-away JupyterLab server and headless Chromium.

Not a test module. Used by ``tests/test_browser_inspector.py``; see /work/shared/env/NOTES.md
("A real browser against JupyterLab") for the measurements behind the choices here.

* :func:`jupyterlab_server` starts ``jupyter lab`` from the project's venv on 127.0.0.1 (a free port, a random
  token), with a throw-away HOME / JUPYTER_CONFIG_DIR / JUPYTER_DATA_DIR / JUPYTER_RUNTIME_DIR / IPYTHONDIR /
  MPLCONFIGDIR, and ``--notebook-dir`` a temporary *copy* of a notebooks folder (nothing is written into the
  repository's ``notebooks/``). It waits until the server answers and, at the end, shuts its kernels down
  through the REST API and stops the server by its own PID (terminate, then kill).
* :func:`launch_chromium` launches Debian's ``/usr/bin/chromium`` headless through Playwright's sync API
  (``executable_path``: Playwright never downloads a browser here; never run ``playwright install``).
* :func:`browser_unavailable` says why a browser test cannot run (no chromium, no playwright), or None.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("PIGEON_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",  # we run as root in CI and on the dev machines
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
# JupyterLab user settings written into the throw-away config dir:
USER_SETTINGS = {
    # no news pop-up, no update check (it would try the network)
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
    # keep every cell attached to the DOM, so an output scrolled out of view can still be found
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}
# no proxy for loopback, whatever the environment says
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def venv_python() -> str:
    """The project's venv interpreter (JupyterLab and ipykernel live there), else the running one."""
    p = REPO / ".venv" / "bin" / "python"
    return str(p) if p.exists() else sys.executable


def browser_unavailable() -> str | None:
    """A reason why the browser test cannot run here, or None when it can."""
    missing = []
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"{CHROMIUM} (Debian's chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the `playwright` Python package")
    if not missing:
        return None
    return ("missing " + " and ".join(missing) + "; run `bash scripts/install_browser.sh` "
            "(apt chromium + PyPI playwright, never `playwright install`)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class JupyterLab:
    """A running throw-away JupyterLab server."""

    proc: subprocess.Popen
    port: int
    token: str
    root: Path       # --notebook-dir: the temporary copy of the notebooks
    home: Path       # the throw-away HOME (config, data, runtime dirs beneath it)
    log_path: Path   # the server's stdout + stderr

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def lab_url(self, notebook: str) -> str:
        """URL that opens ``notebook`` (relative to the notebook dir) in JupyterLab and logs in with the token."""
        return f"{self.base_url}/lab/tree/{urllib.request.quote(notebook)}?token={self.token}"

    def api(self, path: str, method: str = "GET", timeout: float = 5.0):
        req = urllib.request.Request(f"{self.base_url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with _OPENER.open(req, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no server log)"


def _write_user_settings(config_dir: Path) -> None:
    for rel, value in USER_SETTINGS.items():
        f = config_dir / "lab" / "user-settings" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(value))


def _throwaway_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HOME=str(home),
        JUPYTER_CONFIG_DIR=str(home / ".jupyter"),
        JUPYTER_DATA_DIR=str(home / ".local" / "share" / "jupyter"),
        JUPYTER_RUNTIME_DIR=str(home / ".local" / "share" / "jupyter" / "runtime"),
        IPYTHONDIR=str(home / ".ipython"),
        MPLCONFIGDIR=str(home / ".config" / "matplotlib"),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        JUPYTER_PLATFORM_DIRS="0",
        PYDEVD_DISABLE_FILE_VALIDATION="1",  # quiet the debugger's warning in the kernel log
    )
    env.setdefault("MPLBACKEND", "Agg")
    for k in ("JUPYTER_PATH", "JUPYTER_CONFIG_PATH", "JUPYTER_TOKEN", "JPY_SESSION_NAME"):
        env.pop(k, None)
    return env


def stop_server(lab: JupyterLab, grace: float = 10.0) -> None:
    """Shut the server's kernels down through the API, then stop the server by its own PID."""
    proc = lab.proc
    if proc.poll() is None:
        with contextlib.suppress(Exception):
            for k in lab.api("/api/kernels") or []:
                with contextlib.suppress(Exception):
                    lab.api(f"/api/kernels/{k['id']}", method="DELETE", timeout=grace)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace)


@contextlib.contextmanager
def jupyterlab_server(notebooks_dir: Path, *, start_timeout: float = 90.0,
                      workdir: Path | None = None) -> Iterator[JupyterLab]:
    """Run a throw-away JupyterLab on 127.0.0.1 over a temporary copy of ``notebooks_dir``.

    Everything (HOME, the notebook copy, the server log) lives in a temporary directory that is removed at the
    end, unless ``workdir`` is given (then the caller owns it, e.g. pytest's ``tmp_path``).
    """
    own_tmp = workdir is None
    base = Path(tempfile.mkdtemp(prefix="pigeon-jlab-")) if own_tmp else Path(workdir)
    home, root, log_path = base / "home", base / "notebooks", base / "jupyterlab.log"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copytree(notebooks_dir, root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    env = _throwaway_env(home)
    _write_user_settings(Path(env["JUPYTER_CONFIG_DIR"]))

    port, token = free_port(), secrets.token_hex(24)
    cmd = [venv_python(), "-m", "jupyterlab", "--no-browser", "--ip", "127.0.0.1", f"--port={port}",
           "--port-retries=0", "--allow-root", f"--ServerApp.token={token}", f"--notebook-dir={root}",
           "--ServerApp.open_browser=False",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # no terminal signals
    lab = JupyterLab(proc=proc, port=port, token=token, root=root, home=home, log_path=log_path)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with code {proc.returncode} before answering:\n"
                                   f"{lab.log_tail()}")
            try:
                lab.api("/api/status", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"jupyter lab did not answer on port {port} within {start_timeout:.0f} s:\n"
                                   f"{lab.log_tail()}")
            time.sleep(0.25)
        yield lab
    finally:
        try:
            stop_server(lab)
        finally:
            log.close()
            if own_tmp:
                shutil.rmtree(base, ignore_errors=True)


def launch_chromium(playwright, home: Path | None = None, headless: bool = True):
    """Launch Debian's Chromium headless through Playwright (sync API). Playwright makes a fresh profile itself;
    ``home`` (a throw-away folder) keeps Chromium's other files out of the real HOME."""
    env = None
    if home is not None:
        home = Path(home)
        home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
               "XDG_CACHE_HOME": str(home / ".cache")}
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=headless, args=CHROMIUM_ARGS,
                                      env=env)


# ------------------------------------------------------------------------------------------------ page helpers
# (used by tests/test_browser_playground.py; the inspector's test keeps its own copies)
STDERR_OUTPUT = "[data-mime-type='application/vnd.jupyter.stderr']"  # error and stderr outputs in JupyterLab


def wait_for_kernel(page, timeout: float) -> None:
    """Wait until the notebook's kernel exists (the debugger button is enabled; data-status='idle' shows too early)."""
    page.wait_for_selector(".jp-DebuggerBugButton[aria-disabled='false']", timeout=timeout * 1000)


def run_all_cells(page) -> None:
    """Run ▸ Run All Cells, through the menu bar."""
    import re

    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).first.click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).first.click()


def error_outputs(page) -> list[str]:
    """The texts of the notebook's stderr / error outputs on the page (empty when it cannot be read)."""
    try:
        return [t.strip() for t in page.locator(STDERR_OUTPUT).all_inner_texts() if t.strip()]
    except Exception:  # noqa: BLE001 - diagnostics only
        return []


def wait_for_visible(page, selector: str, timeout: float) -> None:
    """Wait until `selector` is visible; fail at once when a cell shows a traceback (Run All stops there)."""
    deadline = time.monotonic() + timeout
    while True:
        loc = page.locator(selector)
        if loc.count() and loc.first.is_visible():
            return
        errs = [t for t in error_outputs(page) if "Traceback (most recent call last)" in t]
        if errs:
            raise AssertionError(f"a notebook cell failed before {selector} showed up:\n{errs[0][-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {selector} within {timeout:.0f} s after Run All")
        time.sleep(0.5)


def img_bytes(img) -> bytes | None:
    """The bytes an <img> locator shows (ipywidgets serves them as a blob: URL, new on every update)."""
    import base64

    if not img.count():
        return None
    b64 = img.first.evaluate("""async (img) => {
        if (!img.src) return null;
        const buf = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
        let s = '';
        for (let i = 0; i < buf.length; i += 0x8000) s += String.fromCharCode(...buf.subarray(i, i + 0x8000));
        return btoa(s);
    }""")
    return base64.b64decode(b64) if b64 else None


def kernel_idle(page) -> bool:
    ind = page.locator(".jp-Notebook-ExecutionIndicator")
    return not ind.count() or ind.first.get_attribute("data-status") in (None, "idle")
