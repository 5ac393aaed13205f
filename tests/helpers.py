import contextlib
import socket
import subprocess
import sys
import time
import urllib.request

from corexp.config import compose_config


def compose_cfg(overrides=(), return_hydra_config=False):
    return compose_config(overrides, return_hydra_config)


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
