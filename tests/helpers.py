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
def mlflow_server(backend_uri: str, *extra: str, command: str = "server", log_file=None, env=None):
    """A real `mlflow server` (or `mlflow ui`) on a free loopback port; yields its base URL once /health answers.
    The server's own output goes to `log_file` (shown if it never becomes healthy)."""
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_file, "w+") if log_file else tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", command, "--backend-store-uri", backend_uri, "--host",
                             "127.0.0.1", "--port", str(port), *extra], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"mlflow {command} never became healthy:\n{log.read()[-3000:]}") from None
                time.sleep(1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def build_job(overrides=()):
    """The Job of `python -m corexp <overrides>` (composed with Hydra's compose API, built at the door)."""
    from corexp.job import Job

    return Job.from_config(compose_config(list(overrides)))


def prompt_spec(name="core", *overrides):
    """A prompt preset's PromptSpec, as a job builds it (nested strategies instantiated)."""
    return build_job([f"prompt={name}", *overrides]).prompt
