"""A real Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) as a child process of the test.

HTTP and DICOM ports are both free ports (Orthanc 1.10 binds both on every interface; remote
access is refused), storage lives in the test's temp folder, and the process is always killed by
its PID. ``stop()`` then ``start()`` brings the same Orthanc back: same ports, same storage (an
outage of a PACS). It takes C-STORE from any calling AE title by default (``DicomAlwaysAllowStore``,
``DicomCheckCalledAet: false``). Without Orthanc the test is skipped — unless ``CI`` is set, where
it must be installed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import httpx
import pytest
from pydicom.dataset import Dataset

from tests.dicomgen import to_bytes

PLUGIN_CANDIDATES = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
    Path("/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so"),
)


def find_orthanc() -> tuple[str, Path]:
    """The Orthanc binary and the DICOMweb plugin, or skip (fail under CI) with what is missing."""
    binary = shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if Path(p).exists()), None
    )
    plugin = next((p for p in PLUGIN_CANDIDATES if p.exists()), None)
    if plugin is None and Path("/usr/lib/orthanc").is_dir():
        plugin = next(iter(sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))), None)
    if binary and plugin:
        return binary, plugin
    missing = ", ".join(
        what
        for what, found in (
            ("Orthanc (apt install orthanc)", binary),
            ("its DICOMweb plugin (apt install orthanc-dicomweb)", plugin),
        )
        if not found
    )
    message = f"DICOMweb tests need a real Orthanc: missing {missing}"
    if os.environ.get("CI"):
        pytest.fail(message + " — CI is set, so this is an error, not a skip", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Orthanc:
    """One running Orthanc; ``url`` is its REST root, ``dicomweb`` its DICOMweb root, ``aet`` its AE title.

    ``config``: more Orthanc settings, merged over the defaults below."""

    aet = "ORTHANC"

    def __init__(self, folder: Path, config: dict | None = None) -> None:
        binary, plugin = find_orthanc()
        self.binary = binary
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = free_port()
        settings = {
            "Name": "ctwatch-test",
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "Plugins": [str(plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomAet": self.aet,
            **(config or {}),
        }
        (folder / "orthanc.json").write_text(json.dumps(settings, indent=2))
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.start()

    def start(self) -> None:
        """Run Orthanc (again, after ``stop()``: same ports, same storage) and wait until it answers."""
        self._log = (self.folder / "orthanc.log").open("ab")
        self.process = subprocess.Popen(
            [self.binary, str(self.folder / "orthanc.json")],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.folder,
        )
        self.client = httpx.Client(base_url=self.url, timeout=30, trust_env=False)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"Orthanc exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                if self.client.get("/system").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"Orthanc did not answer /system within {timeout:.0f}s:\n{self.log_text()}")

    def upload(self, datasets: Iterable[Dataset]) -> int:
        """Store instances through the REST API (POST /instances); returns how many were stored."""
        count = 0
        for ds in datasets:
            response = self.client.post(
                "/instances", content=to_bytes(ds), headers={"Content-Type": "application/dicom"}
            )
            response.raise_for_status()
            count += 1
        return count

    def log_text(self) -> str:
        path = self.folder / "orthanc.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        """Kill by PID and reap; safe to call twice."""
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
