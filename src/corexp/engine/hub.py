"""Hugging Face Hub models as users configure huggingface_hub: use the local cache without touching the network, or fail
fast with one line.

A model id that is cached loads with `local_files_only=True` (no update checks, works offline). One that is not is
checked once with `huggingface_hub.auth_check` before any download starts, with the token huggingface_hub itself
finds (`HF_TOKEN`, or the one `hf auth login` saved), the endpoint it uses (`HF_ENDPOINT`) and its offline mode
(`HF_HUB_OFFLINE`). Gated, not found and unreachable are told apart by huggingface_hub's own errors
(`GatedRepoError`, `RepositoryNotFoundError`, anything else) and each ends, within seconds, in a line naming the id
and the fix.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from corexp.errors import CorexpError

PROBE_TIMEOUT_S = 10.0


def is_cached(repo_id: str, filename: str = "config.json") -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename), str)


def _offline() -> bool:
    """huggingface_hub's offline mode, read from the environment now (its constant is read once at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _auth_check(repo_id: str, endpoint: str, token: str | None) -> BaseException | None:
    """huggingface_hub.auth_check in a thread, so that an unanswering network costs PROBE_TIMEOUT_S, not minutes."""
    from huggingface_hub import HfApi

    outcome: list[BaseException | None] = []

    def check() -> None:
        try:
            HfApi(endpoint=endpoint, token=token).auth_check(repo_id)
            outcome.append(None)
        except BaseException as err:
            outcome.append(err)

    thread = threading.Thread(target=check, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    return outcome[0] if outcome else TimeoutError(f"no answer within {PROBE_TIMEOUT_S:.0f} s")


def _fixes(repo_id: str, setting: str) -> str:
    home = os.environ.get("HF_HUB_CACHE") or (str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME")
                                              else "~/.cache/huggingface/hub")
    return (f"download it on a connected machine (`hf download {repo_id}`) and copy the Hugging Face cache ({home}) here, "
            f"or set {setting}.path=<local folder>")


def explain(err: BaseException, repo_id: str, setting: str) -> str:
    """One line for what huggingface_hub raised about `repo_id` (gated, not found, invalid token, HTTP, network)."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    endpoint, token = _endpoint(), get_token()
    fixes = _fixes(repo_id, setting)
    login = "your token has no access to it" if token else "no Hugging Face token is set (`hf auth login` or HF_TOKEN)"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, GatedRepoError):
        return (f"{setting} '{repo_id}' is gated and {login}: accept its licence on {endpoint}/{repo_id}, then log in with "
                f"a token that has access; or {fixes}")
    if status == 401 and token:  # before RepositoryNotFoundError: the Hub answers 401 to a bad token on any repository
        return (f"{setting} '{repo_id}': {endpoint} rejected your Hugging Face token (HTTP 401: invalid or expired); "
                "create a new one and log in again (`hf auth login`, or set HF_TOKEN)")
    if isinstance(err, RepositoryNotFoundError):
        return (f"{setting} '{repo_id}' was not found on {endpoint} (a wrong id, or a private repository and {login}); "
                f"check the id, or set {setting}.path=<local folder>")
    if isinstance(err, HfHubHTTPError):
        return f"{setting} '{repo_id}': {endpoint} answered HTTP {status or '?'}; {fixes}"
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"{setting} '{repo_id}' is not in the local Hugging Face cache and {endpoint} cannot be reached ({reason}); {fixes}"


def probe(repo_id: str, setting: str) -> None:
    """Raise one CorexpError when `repo_id` cannot be downloaded from here (offline, gated, unknown, unreachable)."""
    from huggingface_hub import get_token

    if _offline():
        raise CorexpError(f"{setting} '{repo_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                          f"{_fixes(repo_id, setting)}")
    err = _auth_check(repo_id, _endpoint(), get_token())
    if err is not None:
        raise CorexpError(explain(err, repo_id, setting))


def ensure_available(repo_id: str, setting: str, required_file: str = "config.json", not_found_hint: str = "") -> Path:
    """The local snapshot folder of `repo_id`, downloading it (after a probe) when it is not cached."""
    from huggingface_hub import snapshot_download

    try:
        if not is_cached(repo_id, "config.json") and not is_cached(repo_id, required_file):
            probe(repo_id, setting)
            folder = Path(snapshot_download(repo_id))
        else:
            folder = Path(snapshot_download(repo_id, local_files_only=True))
    except CorexpError:
        raise
    except Exception as err:  # the download itself (after a successful probe): gated files, a dropped connection
        raise CorexpError(explain(err, repo_id, setting)) from None
    if not (folder / required_file).is_file():
        raise CorexpError(f"{setting} '{repo_id}' has no {required_file}" + (f": {not_found_hint}" if not_found_hint else ""))
    return folder
