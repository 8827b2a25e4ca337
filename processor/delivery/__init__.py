"""Send-back: results and notifications out of ctwatch, from the durable queue in SQLite.

* :mod:`~processor.delivery.base`: the :class:`Sender` protocol, a row's files read back from the
  outbox (sha256 checked), the token and the allow-list at send time, failures in words;
* one module per destination kind: :mod:`~processor.delivery.dicomweb` (STOW-RS),
  :mod:`~processor.delivery.dimse` (C-STORE), :mod:`~processor.delivery.folder` (a copy),
  :mod:`~processor.delivery.webhook` (a JSON POST);
* :mod:`~processor.delivery.service`: :class:`DeliveryService`, one thread per destination, with
  the back-off and the give-up.

It sends what the queue holds (:mod:`processor.state.deliveries`): it never builds an object or a
payload, and never reads a study's results.
"""

from processor.delivery.base import Sender
from processor.delivery.service import DeliveryService, Route, backoff_seconds, routes_from_settings

__all__ = ["DeliveryService", "Route", "Sender", "backoff_seconds", "routes_from_settings"]
