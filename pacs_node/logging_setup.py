"""Logging configuration, called only by entry points."""

from __future__ import annotations

import json
import logging
import sys
import warnings

__all__ = ["WithholdInvalidValues", "configure_logging"]


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload)


_INVALID_VALUE = "Invalid value for VR "


class WithholdInvalidValues(logging.Filter):
    """pydicom logs a value that fails its VR check verbatim (``Invalid value
    for VR UI: '<value>'``, on reading and on writing). The value is whatever a
    peer sent, patient data included: the VR is kept, the value is withheld."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite pydicom's invalid-value records; keep every record.

        Parameters
        ----------
        record:
            A log record.

        Returns
        -------
        bool
            Always True.
        """
        if record.name.startswith("pydicom"):
            message = record.getMessage()
            if message.startswith(_INVALID_VALUE):
                vr = message[len(_INVALID_VALUE):].split(":", 1)[0][:4]
                record.msg, record.args = f"{_INVALID_VALUE}{vr} (value withheld)", ()
        return True


def configure_logging(level: str = "INFO", *, json_format: bool = False) -> None:
    """Log to stderr; pynetdicom's per-message chatter is kept at WARNING;
    pydicom's invalid-value messages are logged without the value (and its
    duplicate Python warning, which would print it to stderr, is off)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _JsonFormatter() if json_format else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    handler.addFilter(WithholdInvalidValues())
    warnings.filterwarnings("ignore", message=_INVALID_VALUE, category=UserWarning)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("pynetdicom", "uvicorn.access", "httpx", "celery.redirected", "kombu"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
