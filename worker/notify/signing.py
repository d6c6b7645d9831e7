"""How completion callbacks are signed (docs/callbacks.md has the receiver's side).

Standard Webhooks: ``webhook-id`` (``msg_<outbox id>``: the same on every retry),
``webhook-timestamp`` (Unix seconds of this attempt) and ``webhook-signature``,
``v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`` once per key, space-separated.
The keys are the owner's own (owner_secrets: the current one, and the one it replaced
during its grace) or, for an owner without one and for the service's tasks,
``TASKMAN_CALLBACK_SECRET``'s. The body, the task's JSON, names the task (``task_id``),
its owner (``user_id``) and the receiver (``callback_url``): the signature binds them.

Deprecated, sent beside them unless ``TASKMAN_CALLBACK_LEGACY_SIGNATURE`` is off:
``X-Taskman-Timestamp`` and ``X-Taskman-Signature``, ``sha256=<hex>`` of HMAC-SHA256 over
``"<timestamp>.<body>"`` keyed with ``TASKMAN_CALLBACK_SECRET`` (never an owner's).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from worker.config import Settings
from worker.notify.owner_secrets import OwnerSecrets, keyed

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
LEGACY_SIGNATURE_HEADER = "X-Taskman-Signature"
LEGACY_TIMESTAMP_HEADER = "X-Taskman-Timestamp"


def message_id(outbox_id: int) -> str:
    """A callback's ``webhook-id``: its outbox row's, so retries share it."""
    return f"msg_{outbox_id}"


def v1_signature(key: hmac.HMAC, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``webhook-signature`` entry; ``key`` is copied, not changed."""
    mac = key.copy()
    mac.update(f"{msg_id}.{timestamp}.".encode())
    mac.update(body)
    return "v1," + base64.b64encode(mac.digest()).decode()


def legacy_signature(key: hmac.HMAC, timestamp: int, body: bytes) -> str:
    """The deprecated ``X-Taskman-Signature`` value; ``key`` is copied, not changed."""
    mac = key.copy()
    mac.update(b"%d." % timestamp)
    mac.update(body)
    return "sha256=" + mac.hexdigest()


class CallbackSigner:
    """The signature headers of one callback attempt.

    ``shared_secret`` is ``TASKMAN_CALLBACK_SECRET`` (None: callbacks of owners without a
    secret of their own go out unsigned); ``owner_secrets`` None signs every callback with
    it. ``legacy`` adds the deprecated headers."""

    def __init__(self, shared_secret: str | None, owner_secrets: OwnerSecrets | None = None,
                 *, legacy: bool = True) -> None:
        self._shared = keyed(shared_secret) if shared_secret else None
        self._legacy = legacy
        self._legacy_key = (hmac.new(shared_secret.encode(), digestmod=hashlib.sha256)
                            if shared_secret and legacy else None)
        self._owners = owner_secrets

    async def headers(self, outbox_id: int, user_id: object, timestamp: int,
                      body: bytes) -> dict[str, str]:
        """The headers for ``body`` sent at ``timestamp`` for the task of ``user_id``.
        Raises owner_secrets.SecretsUnavailable when the owner's keys cannot be known."""
        keys = None
        if self._owners is not None and isinstance(user_id, str):
            keys = await self._owners.keys(user_id)
        if keys is None and self._shared is not None:
            keys = (self._shared,)
        msg_id = message_id(outbox_id)
        headers = {ID_HEADER: msg_id, TIMESTAMP_HEADER: str(timestamp)}
        if keys:
            headers[SIGNATURE_HEADER] = " ".join(
                v1_signature(key, msg_id, timestamp, body) for key in keys)
        if self._legacy:
            headers[LEGACY_TIMESTAMP_HEADER] = str(timestamp)
            if self._legacy_key is not None:
                headers[LEGACY_SIGNATURE_HEADER] = legacy_signature(
                    self._legacy_key, timestamp, body)
        return headers


@asynccontextmanager
async def worker_signing(settings: Settings, conninfo: str) -> AsyncIterator[CallbackSigner]:
    """The worker's signer, with owners' secrets read from ``conninfo`` while the block
    runs."""
    owners = OwnerSecrets(conninfo)
    shared = settings.callback_secret.get_secret_value() if settings.callback_secret else None
    signer = CallbackSigner(shared, owners, legacy=settings.callback_legacy_signature)
    try:
        yield signer
    finally:
        await owners.aclose()
