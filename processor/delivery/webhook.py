"""A notification as one JSON POST (httpx): the allow-list and the token at send time, no redirects.

2xx: sent. 408, 429, 5xx and no answer at all (refused, timed out, broken off): tried again with
back-off. Any other status (a 3xx included: redirects are not followed) fails the row — trying the
same request again cannot help. The payload is the row's, built PHI-free by
:mod:`processor.outputs.notify`; nothing of the answer is kept but its status code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from processor.config import NotificationSettings
from processor.delivery.base import (
    check_host,
    classify_network_error,
    env_token,
    http_failed,
    quiet_loggers,
    transport_failed,
)
from processor.errors import SendFailed
from processor.redact import Failure

ACTION = "webhook POST"


class WebhookSender:
    """POSTs a row's one ``webhook`` item's ``payload`` to ``settings.url``."""

    kind = "webhook"

    def __init__(self, settings: NotificationSettings, allow_hosts: Iterable[str]) -> None:
        self.settings = settings
        self.allow_hosts = frozenset(allow_hosts)
        quiet_loggers("httpx", "httpcore")  # httpx logs every request's full URL at INFO

    def send(self, items: Sequence[Mapping[str, Any]], outbox: Path) -> None:
        if len(items) != 1 or items[0].get("kind") != "webhook":
            raise SendFailed(
                "a webhook row must hold exactly one webhook item; a ctwatch bug: please report it",
                retry=False,
            )
        check_host(self.settings.url, self.allow_hosts)
        token = env_token(self.settings.bearer_env)
        headers = {"User-Agent": "ctwatch"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        timeout = self.settings.timeout_seconds
        try:
            with httpx.Client(
                timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
                follow_redirects=False,
                trust_env=False,
                headers=headers,
            ) as client:
                response = client.post(self.settings.url, json=items[0]["payload"])
        except httpx.TimeoutException:
            raise transport_failed(ACTION, Failure.TIMEOUT) from None
        except httpx.HTTPError as exc:
            raise transport_failed(ACTION, classify_network_error(exc)) from None
        if not 200 <= response.status_code < 300:
            raise http_failed(ACTION, response.status_code)
