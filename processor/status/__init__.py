"""The read-only status endpoint: ``/health``, ``/status``, ``/metrics`` and a one-page HTML view.

* :mod:`~processor.status.document`: the documents, from the daemon's :class:`Probes` and the state;
* :mod:`~processor.status.plan`: every pipeline step — today's counts, the next study, why — and the
  model files (what ``python run.py weights`` lists);
* :mod:`~processor.status.words`: durations, local times, the night window, reasons and the headline
  in words;
* :mod:`~processor.status.metrics`, :mod:`~processor.status.page`: the same facts as Prometheus text
  and as HTML; :mod:`~processor.status.server`: the HTTP server.

Nothing that could identify a patient leaves this port: no file names, input paths, error texts,
study UIDs or accession numbers — arrivals are shown by id, state, times and study count, steps by
counts and a closed category of why.
"""

from processor.status.document import Probes, collect_status, gpu_memory, health, source_view
from processor.status.metrics import metrics_text
from processor.status.page import status_html
from processor.status.plan import PipelinePlan, pipeline_plan
from processor.status.server import StatusServer

__all__ = [
    "PipelinePlan",
    "Probes",
    "StatusServer",
    "collect_status",
    "gpu_memory",
    "health",
    "metrics_text",
    "pipeline_plan",
    "source_view",
    "status_html",
]
