import contextlib
import socket
import subprocess
import sys
import time
import urllib.request

from hydra import compose, initialize_config_dir

from corexp.config import config_dir


def compose_cfg(overrides=(), return_hydra_config=False):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


@contextlib.contextmanager
def mlflow_server(backend_uri: str, *extra: str, command: str = "server"):
    """A real `mlflow server` (or `mlflow ui`) on a free loopback port; yields its base URL once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", command, "--backend-store-uri", backend_uri, "--host",
                             "127.0.0.1", "--port", str(port), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
