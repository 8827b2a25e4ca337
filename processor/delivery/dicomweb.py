"""STOW-RS (DICOM PS3.18 §10.5, "Store Transaction") to a PACS's DICOMweb root, with dicomweb-client.

At each send: the host is checked against ``fetch.allow_hosts``, the token is read from the
environment variable ``bearer_env``, redirects are refused (a redirect would carry the token to
wherever the server points), no proxy or netrc is taken from the environment, and the client's own
retries are off (the queue retries, with back-off, across restarts). The files are the outbox's,
sha256-checked. A 200 or 202 answer whose Failed SOP Sequence (0008,1198) is not empty is a failure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient

from processor.config import DicomWebTarget
from processor.delivery.base import (
    check_host,
    classify_network_error,
    env_token,
    http_failed,
    quiet_loggers,
    read_dicom,
    transport_failed,
)
from processor.errors import SendFailed

ACTION = "STOW-RS"
CONNECT_TIMEOUT_CAP = 30.0


class _Redirected(requests.RequestException):
    """The server answered with a redirect; it is not followed."""


def _refuse_redirect(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
    if 300 <= response.status_code < 400:
        raise _Redirected(response=response)
    return response


class DicomWebSender:
    """Stores a row's DICOM files in one STOW-RS request to ``target.url`` (see the module docstring)."""

    kind = "dicomweb"

    def __init__(self, target: DicomWebTarget, allow_hosts: Iterable[str]) -> None:
        self.target = target
        self.allow_hosts = frozenset(allow_hosts)
        quiet_loggers("dicomweb_client", "urllib3")  # they log each request's URL and study at INFO

    def send(self, items: Sequence[Mapping[str, Any]], outbox: Path) -> None:
        check_host(self.target.url, self.allow_hosts)
        token = env_token(self.target.bearer_env)
        datasets = [read_dicom(item, outbox) for item in items]
        headers = {"User-Agent": "ctwatch", "Accept": "application/dicom+json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        session = requests.Session()
        session.trust_env = False
        session.max_redirects = 0
        timeout = self.target.timeout_seconds
        try:
            client = DICOMwebClient(
                self.target.url,
                session=session,
                headers=headers,
                callback=_refuse_redirect,
                timeout=(min(timeout, CONNECT_TIMEOUT_CAP), timeout),
            )
            client.set_http_retry_params(retry=False)
            answer = client.store_instances(datasets)
        except (_Redirected, requests.TooManyRedirects) as exc:
            status = exc.response.status_code if exc.response is not None else 302
            raise http_failed(ACTION, status) from None
        except requests.HTTPError as exc:
            raise http_failed(ACTION, exc.response.status_code if exc.response is not None else 500) from None
        except requests.RequestException as exc:
            raise transport_failed(ACTION, classify_network_error(exc)) from None
        except (ValueError, KeyError) as exc:  # an answer dicomweb-client cannot parse (DICOM JSON or XML)
            raise SendFailed(
                f"{ACTION} failed: the answer was not a DICOMweb store response — check that the url is "
                "the DICOMweb root (e.g. …/dicom-web)",
                retry=False,
            ) from exc
        finally:
            session.close()
        refused = answer.get("FailedSOPSequence") or []
        if refused:
            reasons = sorted({int(getattr(r, "FailureReason", 0) or 0) for r in refused})
            raise SendFailed(
                f"{ACTION} failed: the PACS refused {len(refused)} of {len(datasets)} object(s) (failure "
                f"reason {', '.join(f'0x{code:04X}' for code in reasons)}); see the PACS's log",
                retry=any(0xA700 <= code <= 0xA7FF for code in reasons),  # out of resources may pass
            )
