"""Results a radiologist can open: DICOM SEG (one segment per finding), a
continuous anomaly map (Parametric Map or FRACTIONAL SEG), a TID 1500
Comprehensive 3D SR and an optional secondary-capture overlay series, all
built with highdicom, written to disk and validated (re-read + ``dciodvfy``,
errors inherited from the source told apart from the node's own) before
delivery.

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
