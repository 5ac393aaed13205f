"""Hub access as users configure huggingface_hub: the token `hf auth login` saved, HF_TOKEN, HF_ENDPOINT, offline mode;
gated / not found / unreachable told apart, each in one line within seconds. Against a local stand-in Hub that answers
the auth-check endpoint the way the Hub does (401/403 with X-Error-Code) unless the right token is sent."""

import http.server
import os
import subprocess
import sys
import threading
import time

import pytest

TOKEN = "hf_standin_token_123"


class StandInHub(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        parts = self.path.strip("/").split("/")  # api/models/<org>/<name>/auth-check
        repo = "/".join(parts[2:4]) if len(parts) >= 5 and parts[:2] == ["api", "models"] else ""
        authorized = self.headers.get("Authorization") == f"Bearer {TOKEN}"
        if self.headers.get("Authorization") == "Bearer hf_expired":  # the Hub's answer to an invalid or expired token
            self.send_response(401)
            self.send_header("X-Error-Message", "Invalid credentials in Authorization header")
        elif "/resolve/" in self.path and self.path.strip("/").startswith("org/gated-files"):
            # the auth check passed, the files are gated (a token without the licence accepted for them)
            self.send_response(403)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("X-Error-Message", "Access to model org/gated-files is restricted.")
        elif repo == "org/gated-files":
            self.send_response(200)
        elif repo == "org/gated-model" and not authorized:
            self.send_response(403)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("X-Error-Message", "Access to model org/gated-model is restricted.")
        elif repo in ("org/gated-model", "org/open-model"):
            self.send_response(200)
        else:
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def probe(repo, tmp_path, endpoint, **env):
    """corexp.engine.hub.probe in a fresh process (huggingface_hub reads HF_HOME and friends at import)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    clean.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=endpoint, **env)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", f"from corexp.engine.hub import probe; probe('{repo}', 'model'); print('ok')"],
                          capture_output=True, text=True, env=clean, timeout=120)
    return proc, time.perf_counter() - t0


def error_line(proc):
    assert proc.returncode != 0 and "CorexpError" in proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def test_the_token_hf_auth_login_saved_is_used(hub, tmp_path):
    (tmp_path / "hf").mkdir()
    proc, _ = probe("org/gated-model", tmp_path, hub)
    assert "is gated and no Hugging Face token is set" in error_line(proc)
    (tmp_path / "hf" / "token").write_text(TOKEN)  # what `hf auth login` writes
    proc, _ = probe("org/gated-model", tmp_path, hub)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-1000:]


def test_hf_token_environment_variable(hub, tmp_path):
    proc, _ = probe("org/gated-model", tmp_path, hub, HF_TOKEN=TOKEN)
    assert proc.returncode == 0, proc.stderr[-1000:]
    proc, _ = probe("org/gated-model", tmp_path, hub, HF_TOKEN="hf_wrong")
    assert "is gated and your token has no access to it" in error_line(proc)


def test_gated_not_found_unreachable_and_offline_are_each_one_line(hub, tmp_path):
    gated, _ = probe("org/gated-model", tmp_path, hub)
    assert f"accept its licence on {hub}/org/gated-model" in error_line(gated)
    missing, _ = probe("org/no-such-model", tmp_path, hub)
    assert f"'org/no-such-model' was not found on {hub}" in error_line(missing)
    unreachable, secs = probe("org/open-model", tmp_path, "http://127.0.0.1:9")
    assert "cannot be reached" in error_line(unreachable) and secs < 30
    offline, _ = probe("org/open-model", tmp_path, hub, HF_HUB_OFFLINE="1")
    assert "HF_HUB_OFFLINE is set" in error_line(offline)
    ok, _ = probe("org/open-model", tmp_path, hub)
    assert ok.returncode == 0


def test_an_invalid_token_is_called_invalid_and_hf_home_is_named(hub, tmp_path):
    expired, _ = probe("org/open-model", tmp_path, hub, HF_TOKEN="hf_expired")
    line = error_line(expired)
    assert "rejected your Hugging Face token (HTTP 401: invalid or expired)" in line and "download it" not in line
    offline, _ = probe("org/open-model", tmp_path, hub, HF_HUB_OFFLINE="1")
    assert f"copy the Hugging Face cache ({tmp_path / 'hf'}/hub) here" in error_line(offline)


def test_gated_files_after_a_passing_auth_check_end_in_one_line(hub, tmp_path):
    """The auth check passes, the config download is refused (403 GatedRepo): the load is wrapped too."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    clean.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=hub, HF_TOKEN=TOKEN, HF_HUB_ETAG_TIMEOUT="5",
                 HF_HUB_DOWNLOAD_TIMEOUT="5")
    code = ("from corexp.api import job_for; from corexp.engine.models import model_info; "
            "job = job_for('llama', overrides=['model.hf_id=org/gated-files']); model_info(job.model, job.paths.cache)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean, timeout=180)
    line = error_line(proc)
    assert "'org/gated-files' is gated" in line and "accept its licence" in line, proc.stderr[-2000:]
    assert "set model.path=<local folder>" in line and "hf_id.path" not in line, line
