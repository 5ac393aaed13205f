"""Hugging Face Hub models: use the local cache without touching the network, or fail fast with one line.

A model id that is cached loads with `local_files_only=True` (no update checks, works offline). One that is not is
looked up once on the Hub with a short timeout before any download starts, so that an offline machine, a gated
model without a token or a mistyped id ends within seconds in a line naming the id and the fixes, instead of a
minute of HTTP retries and a traceback.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from corexp.errors import CorexpError

PROBE_TIMEOUT_S = 5.0


def is_cached(repo_id: str, filename: str = "config.json") -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename), str)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}


def probe(repo_id: str, setting: str) -> None:
    """Raise one CorexpError when `repo_id` cannot be downloaded from here (offline, gated, unknown)."""
    fixes = (f"download it on a connected machine (`hf download {repo_id}`) and copy the Hugging Face cache "
             f"(~/.cache/huggingface) here, or set {setting}.path=<local folder>")
    if _offline():
        raise CorexpError(f"{setting} '{repo_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {fixes}")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    headers = {}
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"{endpoint}/api/models/{repo_id}/revision/main", headers=headers, method="GET")
    try:
        urllib.request.urlopen(req, timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise CorexpError(f"{setting} '{repo_id}' is gated: accept its licence on {endpoint}/{repo_id} and set HF_TOKEN "
                              f"(or `hf auth login`); or {fixes}") from None
        if err.code == 404:
            raise CorexpError(f"{setting} '{repo_id}' does not exist on the Hugging Face Hub; check the id, "
                              f"or set {setting}.path=<local folder>") from None
        raise CorexpError(f"{setting} '{repo_id}': the Hugging Face Hub answered HTTP {err.code}; {fixes}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise CorexpError(f"{setting} '{repo_id}' is not in the local Hugging Face cache and the Hub cannot be reached "
                          f"({reason}); {fixes}") from None


def ensure_available(repo_id: str, setting: str, required_file: str = "config.json", not_found_hint: str = "") -> Path:
    """The local snapshot folder of `repo_id`, downloading it (after a probe) when it is not cached."""
    from huggingface_hub import snapshot_download

    if not is_cached(repo_id, "config.json") and not is_cached(repo_id, required_file):
        probe(repo_id, setting)
        folder = Path(snapshot_download(repo_id))
    else:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    if not (folder / required_file).is_file():
        raise CorexpError(f"{setting} '{repo_id}' has no {required_file}" + (f": {not_found_hint}" if not_found_hint else ""))
    return folder
