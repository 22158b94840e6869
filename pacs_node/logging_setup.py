"""Logging configuration, called only by entry points."""

from __future__ import annotations

import json
import logging
import sys
import warnings

__all__ = ["QuietDecoderFailures", "WithholdInvalidValues", "configure_logging"]


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


#: Loggers that log a caught exception at ERROR with its traceback and then
#: raise or fall back themselves: pydicom's pixel decoders (once per failing
#: plugin) and pynetdicom's ``decode_bytes`` (a non-ASCII byte in a PDU
#: field, before it tries other codecs).
_CAUGHT_AND_RAISED = ("pydicom.pixels.decoders", "pynetdicom.utils")


class QuietDecoderFailures(logging.Filter):
    """Library records of exceptions the library itself raises or handles
    (:data:`_CAUGHT_AND_RAISED`). Every caller in the node turns the exception
    into a refusal (0xC210, :mod:`pacs_node.ingest.validate`; A-ABORT,
    :mod:`pacs_node.ingest.guard`) or a job error with its message, so the
    record is kept only at DEBUG, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Downgrade decoder-failure records; keep every other record.

        Parameters
        ----------
        record:
            A log record.

        Returns
        -------
        bool
            False for a decoder failure unless the root logger is at DEBUG.
        """
        if record.name.startswith(_CAUGHT_AND_RAISED) and record.levelno >= logging.ERROR:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info, record.exc_text = None, None
            return logging.getLogger().isEnabledFor(logging.DEBUG)
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
    handler.addFilter(QuietDecoderFailures())
    warnings.filterwarnings("ignore", message=_INVALID_VALUE, category=UserWarning)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party INFO chatter (highdicom logs each module it copies, per
    # job; Celery and kombu their connections; PIL and matplotlib plugin
    # scans) is kept at WARNING.
    for noisy in ("pynetdicom", "uvicorn.access", "httpx", "httpcore", "celery", "kombu", "amqp", "highdicom",
                  "PIL", "matplotlib", "urllib3", "dicomweb_client", "multipart", "asyncio", "filelock"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
