"""Results a radiologist can open: DICOM SEG, a continuous anomaly map
(FRACTIONAL SEG or Parametric Map), a TID 1500 Comprehensive 3D SR and an
optional secondary-capture overlay series, all built with highdicom, written
to disk and validated (re-read + ``dciodvfy``) before delivery.

Entry points::

    from worker.outputs.build import build_outputs, write_outputs, save_output_rows
    from worker.outputs.source import SourceSeries
    from worker.outputs.settings import OutputSettings

``docs/outputs.md`` describes what each object contains.
"""

from __future__ import annotations

__all__ = ["NOT_FOR_CLINICAL_USE"]

#: Marker written into descriptions/comments of every object this node makes.
NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"
