"""Start the web page: ``streamlit run ui/app.py`` bound to loopback, with the settings passed on.

Settings travel as ``LOCALGPT_*`` environment variables (the layer the page's ``load_settings``
reads), so the page sees exactly what the CLI resolved. Nothing runs at import.
"""

from __future__ import annotations

import importlib.util
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

from localgpt.config import Settings
from localgpt.errors import ConfigError
from localgpt.offline import OFFLINE_ENV

APP = Path(__file__).resolve().parent / "app.py"


def settings_env(settings: Settings) -> dict[str, str]:
    """``LOCALGPT_*`` variables that make ``load_settings()`` in the page return ``settings``."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, Path):
            value = value.expanduser().resolve()
        env[f"LOCALGPT_{name.upper()}"] = str(value)
    return env


def streamlit_command(settings: Settings, host: str = "127.0.0.1", port: int = 8501) -> list[str]:
    """The command line that serves the page; headless, with no usage statistics and no file watcher."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",
        "--server.fileWatcherType", "none",
        "--server.runOnSave", "false",
        "--server.maxUploadSize", str(max(1, math.ceil(settings.max_file_mb))),
        "--browser.gatherUsageStats", "false",
        "--client.showErrorDetails", "none",  # the page shows one line per error, never a traceback
        "--client.toolbarMode", "minimal",
        "--theme.base", "light",
    ]


def launch(settings: Settings, host: str = "127.0.0.1", port: int = 8501) -> int:
    """Serve the page until Ctrl-C; returns Streamlit's exit code."""
    if importlib.util.find_spec("streamlit") is None:
        raise ConfigError("the web page needs Streamlit: pip install 'localgpt[ui]'")
    env = {**OFFLINE_ENV, **os.environ, **settings_env(settings)}
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"localgpt: warning: the page has no login; anyone who can reach {host}:{port} can read "
              "and change your collections", file=sys.stderr)
    print(f"localgpt: the page is at http://{host}:{port}  (Ctrl-C stops it)", file=sys.stderr)
    proc = subprocess.Popen(streamlit_command(settings, host, port), env=env)
    try:  # a service manager's SIGTERM stops the page too, not only this parent
        previous = signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the terminal sent SIGINT to Streamlit as well; let it finish
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
