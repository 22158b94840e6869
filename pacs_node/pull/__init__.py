"""Pull mode and archive checks: the node as a DICOM/DICOMweb *client* of
the archives configured as ``[[sources]]``.

* :mod:`pacs_node.pull.settings` -- the ``[[sources]]`` tables;
* :mod:`pacs_node.pull.dicomweb` -- QIDO-RS / WADO-RS client;
* :mod:`pacs_node.pull.dimse` -- C-FIND / C-GET / C-MOVE client (pynetdicom);
* :mod:`pacs_node.pull.service` -- pull a study, then create its job
  (``pacs-node analyze UID --source NAME``, ``POST /api/v1/studies/{uid}/analyze``);
* :mod:`pacs_node.pull.completeness` -- the assembler's gate that waits until
  the node holds every instance the archive has for a pushed study.
"""

from pacs_node.pull.base import (
    PullBusyError,
    PullError,
    PullReport,
    SourceError,
    SourceListing,
    SourceUnavailableError,
    StudyNotOnSourceError,
)
from pacs_node.pull.settings import SourceSettings, load_sources

__all__ = [
    "PullBusyError",
    "PullError",
    "PullReport",
    "SourceError",
    "SourceListing",
    "SourceSettings",
    "SourceUnavailableError",
    "StudyNotOnSourceError",
    "load_sources",
]
