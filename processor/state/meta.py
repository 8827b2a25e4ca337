"""The ``meta`` table (key → value) and what it keys: the patient pseudonym.

PatientID is never stored. A study's ``patient_key`` is ``HMAC-SHA256(secret, issuer + "\\x00" +
patient_id)`` in hex, where the secret is 32 random bytes made once per database by migration
``0009_provenance`` (``meta.patient_key_secret``). The same patient (same PatientID under the same
IssuerOfPatientID) gets the same key in this database, so the fit commands can keep a patient's
studies in one fold; without the database the key cannot be turned back into the ID, nor matched
against another site's keys. Deleting the database (or its secret) makes new keys unrelated to old.
"""

from __future__ import annotations

import hashlib
import hmac

from processor.state.db import Database

PATIENT_KEY_SECRET = "patient_key_secret"


class Meta(Database):
    _patient_secret: bytes | None = None  # read once from ``meta``, then kept on the instance

    def meta_value(self, key: str) -> str | None:
        rows = list(self.db.query("select value from meta where key = ?", [key]))
        return str(rows[0]["value"]) if rows else None

    def patient_key(self, patient_id: str | None, issuer: str | None = None) -> str | None:
        """The pseudonym of a patient (hex HMAC-SHA256, see the module docstring); None when
        ``patient_id`` is empty or only spaces. Both values are stripped of surrounding spaces."""
        pid = (patient_id or "").strip()
        if not pid:
            return None
        secret = self._patient_secret
        if secret is None:
            stored = self.meta_value(PATIENT_KEY_SECRET)
            if stored is None:  # only a database that skipped migration 0009 lacks it
                raise RuntimeError(f"{self.path}: no {PATIENT_KEY_SECRET} in table meta")
            secret = self._patient_secret = bytes.fromhex(stored)
        message = f"{(issuer or '').strip()}\x00{pid}".encode("utf-8", "surrogatepass")
        return hmac.new(secret, message, hashlib.sha256).hexdigest()

    def patient_key_fingerprint(self) -> str:
        """16 hex digits that identify this database's secret (an HMAC of a constant, not of any
        patient): cards record it, so patient tags made under another database are recognised."""
        key = self.patient_key("ctwatch patient key fingerprint")
        assert key is not None
        return key[:16]
