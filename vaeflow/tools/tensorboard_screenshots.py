"""Look at a run's TensorBoard the way a user does: headless-Chromium screenshots.

Starts ``tensorboard --logdir LOGDIR`` on a free local port, loads the dashboard's
landing page (TIME SERIES in TensorBoard 2.21), the SCALARS tab and the HParams tab in
headless Chromium, saves one PNG per view in OUT, and stops the server. Not part of the
test suite (CI has no browser); run it after changing what the run writes to TensorBoard
and look at the PNGs (docs/design.md §6 says what to expect). Needs ``chromium`` (Debian:
``apt-get install chromium``) and tensorboard.

    python -m vaeflow.tools.tensorboard_screenshots runs/my_sweep /tmp/tb_shots
    python -m vaeflow.tools.tensorboard_screenshots runs/my_run /tmp/tb_shots --height 3000

Prints the PNG paths.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# The views a user meets first; "" is what http://host:port/ opens on.
VIEWS = {"landing": "", "scalars": "#scalars", "hparams": "#hparams"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_serving(url: str, server: subprocess.Popen, timeout: float = 60.0) -> None:
    """Poll until TensorBoard answers (its first load of the event files takes a while)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"tensorboard exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(url + "data/runs", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"tensorboard did not answer at {url} within {timeout:.0f} s")


def screenshot(browser: str, url: str, out: Path, width: int, height: int) -> Path:
    """One headless-Chromium screenshot of ``url``; the virtual-time budget lets the
    dashboard's requests and rendering finish before the picture is taken."""
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",  # runs as root in containers
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={width},{height}",
            "--virtual-time-budget=15000",
            f"--screenshot={out}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logdir", type=Path, help="a run or sweep directory")
    parser.add_argument("out", type=Path, help="folder for the PNGs")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--prefix", default="", help="prepended to the PNG names")
    args = parser.parse_args(argv)

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("no chromium on PATH (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(args.logdir),
         "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_until_serving(url, server)
        for name, fragment in VIEWS.items():
            png = args.out / f"{args.prefix}{name}.png"
            print(screenshot(browser, url + fragment, png, args.width, args.height))
    finally:
        server.terminate()  # only the server this script started
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
