"""Push an adapter directory (PEFT layout + lorakit.json + model card) to the Hugging Face Hub."""

from __future__ import annotations

import os
from pathlib import Path

from lorakit.adapters.folder import find_adapter_dir
from lorakit.errors import LorakitError


class HubError(LorakitError):
    """The Hub cannot be reached, the token is missing or refused, or the repo id is invalid."""


def push_to_hub(adapter: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Create (if needed) the model repo ``repo_id`` and upload the adapter folder as one commit.

    Args:
        adapter: Adapter directory or run directory.
        repo_id: ``owner/name`` on the Hub.
        private: Create the repo private.
        token: A write token; default ``$HF_TOKEN`` or the one ``hf auth login`` stored.

    Returns:
        The URL of the commit.

    Raises:
        HubError: Offline mode, no token, invalid repo id, network failure or a refused request.
    """
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    folder = find_adapter_dir(adapter)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubError(
            f"--hub: {repo_id!r} is not a Hub repo id; use owner/name, e.g. my-user/imdb-minilm-lora"
        ) from None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise HubError(
            "--hub: Hugging Face offline mode is on (HF_HUB_OFFLINE); unset it to push, or "
            "publish to the local registry only"
        )
    token = token or os.environ.get("HF_TOKEN") or huggingface_hub.get_token()
    if not token:
        raise HubError(
            "--hub: no Hugging Face token; set HF_TOKEN to a write token "
            "(https://huggingface.co/settings/tokens) or run `hf auth login`"
        )
    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message="Upload LoRA adapter with lorakit",
        )
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubError(
                f"--hub: the Hub refused the token for {repo_id} (HTTP {status}); use a token "
                "with write access to that namespace"
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubError(f"--hub: the Hub refused the upload to {repo_id}: {first[:200]}") from None
    except Exception as exc:  # network layer (httpx / requests / OS): no connection, DNS, TLS, timeouts
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubError(
            f"--hub: cannot reach the Hugging Face Hub ({reason[:160]}); check the network or "
            "publish to the local registry only"
        ) from None
    return str(getattr(info, "commit_url", None) or info)
