"""Hub ids without a network: know within a second or two that the hub cannot be reached, and say so in one line.

A name such as ``owner/model`` that is not a local folder is tried as a Hugging Face hub id. Without a network
``huggingface_hub`` retries and waits on its timeouts (half a minute or more) before failing, so before any download
the hub is asked one short question with a hard deadline; ``HF_HUB_OFFLINE`` skips even that. Models already in the
local hub cache load either way.
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

from instaflow_pl.errors import UserError

PROBE_SECONDS = 1.5
"""How long the hub may take to answer before it counts as unreachable."""
_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (in the environment now, or when huggingface_hub was imported)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def hub_unreachable_reason(repo_id: str, seconds: float = PROBE_SECONDS) -> str | None:
    """Why the hub cannot serve ``repo_id`` now (offline mode, no answer in ``seconds``, no network), else None.

    One HEAD request to the hub's model API, in a daemon thread with a hard deadline, so neither a name lookup nor
    a silent connection can hold the caller longer than ``seconds``. A reply of any HTTP status counts as reachable
    (the download that follows says what is wrong with the id).
    """
    from huggingface_hub import constants

    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    url = f"{constants.ENDPOINT.rstrip('/')}/api/models/{repo_id}"
    silent = f"{constants.ENDPOINT} did not answer within {seconds:g} s (no network?)"
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=seconds).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)  # the hub answered
        except Exception as err:  # noqa: BLE001 - any failure to get an answer means no hub
            reason = getattr(err, "reason", err)
            if isinstance(reason, TimeoutError):
                outcome.append(silent)
            else:
                outcome.append(f"{constants.ENDPOINT} cannot be reached ({type(reason).__name__}: {reason})")

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(seconds)
    return outcome[0] if outcome else silent


def cached_snapshot(repo_id: str, allow_patterns: list[str] | None = None) -> Path | None:
    """The local hub cache's snapshot of ``repo_id``, or None when it is not cached (no network used)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, in whatever way
        return None


def require_hub(repo_id: str, what: str, allow_patterns: list[str] | None = None) -> Path | None:
    """Check that ``repo_id`` can come from the hub before anything waits on it.

    Returns:
        The cached snapshot when the hub cannot be reached but the model is cached; None when the hub answers (the
        caller downloads as usual).

    Raises:
        UserError: the hub cannot be reached (or offline mode is on) and the model is not cached; names ``what``.
    """
    reason = hub_unreachable_reason(repo_id)
    if reason is None:
        return None
    cached = cached_snapshot(repo_id, allow_patterns)
    if cached is not None:
        return cached
    raise UserError(
        f"{what} {repo_id!r} is not a local folder, and as a hub id it cannot be downloaded: {reason}; "
        "give the path of a downloaded copy (or fetch it where there is a network, then point at that folder)"
    )
