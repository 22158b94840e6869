"""Data sets arriving over DIMSE: bounded memory while they stream in, and the
maximum instance size.

pynetdicom (3.0) collects the data set fragments of a DIMSE message in a
``BytesIO``: a C-STORE of any size is held in memory until its last fragment,
and a peer that never sends the last fragment grows it without end. Its own
alternative (``_config.STORE_RECV_CHUNKED_DATASET``) is process-wide, also
changes the C-GET storage handlers of :mod:`pacs_node.pull.dimse`, and writes
to the system temporary directory (often a RAM-backed tmpfs).

:class:`GuardedDIMSE` (installed on each accepted association by class
assignment, see :func:`guard_dimse`) gives every incoming message a
:class:`SpoolBuffer` instead:

* a C-STORE data set stays in memory up to :data:`SPOOL_THRESHOLD`, then
  continues in an anonymous temporary file in the storage root (same disk as
  the instances, unlinked at once: nothing to clean up after a crash);
* beyond ``dicom.max_instance_bytes`` the rest of the data set is read and
  dropped, the spooled part freed, and the C-STORE handler answers 0xA700
  with an Error Comment naming the limit (the association goes on: the
  sender can store the study's other instances);
* a command set above :data:`MAX_COMMAND_BYTES`, a data set of another
  message above :data:`MAX_OTHER_DATASET_BYTES`, or more than
  :data:`MAX_QUEUED_MESSAGES` complete requests waiting (a peer ignoring the
  asynchronous operations window) aborts the association (A-ABORT).

The C-STORE handler keeps receiving the data set as ``bytes``
(``event.encoded_dataset(include_meta=False)`` reads a spooled data set back
once); :func:`refusal` tells it that the instance was refused instead, and
:func:`release` frees the spool file.
"""

from __future__ import annotations

import logging
import tempfile
import weakref
from io import BytesIO
from typing import IO, Any, cast

from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage

from pacs_node.ingest.guard import ABORT_INVALID_PARAMETER, Limits, Throttle, abort_pdu, send_and_close

__all__ = [
    "MAX_COMMAND_BYTES",
    "MAX_OTHER_DATASET_BYTES",
    "MAX_QUEUED_MESSAGES",
    "SPOOL_THRESHOLD",
    "GuardedDIMSE",
    "SpoolBuffer",
    "guard_dimse",
    "refusal",
    "release",
]

logger = logging.getLogger(__name__)

#: A C-STORE data set above this size continues in a temporary file (bytes).
SPOOL_THRESHOLD = 16 * 1024 * 1024
#: Largest command set (a real one is a few hundred bytes).
MAX_COMMAND_BYTES = 64 * 1024
#: Largest data set of a message other than C-STORE (N-EVENT-REPORT, C-FIND...).
MAX_OTHER_DATASET_BYTES = 16 * 1024 * 1024
#: Complete requests allowed to wait for the association's handler thread.
MAX_QUEUED_MESSAGES = 2


class _TooLarge(Exception):
    """A message part the association cannot accept; aborts it."""


class SpoolBuffer(BytesIO):
    """The data set of one incoming DIMSE message (a ``BytesIO`` for pynetdicom).

    Parameters
    ----------
    message:
        The message being assembled; its class tells whether it is a C-STORE
        request once the command set is complete.
    limits:
        ``max_instance_bytes`` and the spool directory.
    where, log:
        The peer, and the server's refusal log.
    """

    def __init__(self, message: DIMSEMessage, limits: Limits, where: str, log: Throttle) -> None:
        super().__init__()
        self._log = log
        self._message = weakref.ref(message)
        self._limits = limits
        self._where = where
        self._file: IO[bytes] | None = None
        self._value: bytes | None = None
        #: Bytes of data set received so far (kept or not).
        self.size = 0
        #: Why the instance is refused (an Error Comment), or None.
        self.refusal: str | None = None

    def _is_store(self) -> bool:
        return isinstance(self._message(), C_STORE_RQ)

    def _refuse(self, comment: str) -> None:
        self.refusal = comment
        self._drop()

    def _drop(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        self._value = None
        super().seek(0)
        super().truncate(0)

    def write(self, data: Any) -> int:
        n = len(data)
        self.size += n
        if self.refusal is not None:
            return n
        if not self._is_store():
            if self.size > MAX_OTHER_DATASET_BYTES:
                raise _TooLarge(f"a DIMSE data set larger than {MAX_OTHER_DATASET_BYTES} bytes")
            return super().write(data)
        if self.size > self._limits.max_instance_bytes:
            self._log.warn("instance-size", self._where.rsplit(":", 1)[0],
                          "C-STORE from %s exceeds %d bytes (dicom.max_instance_bytes): the rest of its data set "
                          "is dropped, answered 0xA700", self._where, self._limits.max_instance_bytes)
            self._refuse(f"instance exceeds dicom.max_instance_bytes ({self._limits.max_instance_bytes})")
            return n
        try:
            if self._file is None:
                if self.size <= SPOOL_THRESHOLD:
                    return super().write(data)
                self._file = tempfile.TemporaryFile(dir=self._limits.spool_dir, prefix=".incoming-spool-")
                self._file.write(super().getvalue())
                super().seek(0)
                super().truncate(0)
            self._file.write(data)
        except OSError as exc:
            logger.error("cannot spool a C-STORE data set from %s in %s: %s", self._where,
                         self._limits.spool_dir, exc)
            self._refuse("cannot buffer the instance: storage is full or failing")
        return n

    def getvalue(self) -> bytes:
        """The data set's bytes (read back once from the spool file)."""
        if self._file is None:
            return self._value if self._value is not None else super().getvalue()
        if self._value is None:
            self._file.seek(0)
            self._value = self._file.read()
            self._file.close()
            self._file = None
        return self._value

    def release(self) -> None:
        """Free the spool file and the bytes read back."""
        self._drop()


def refusal(dataset: object) -> str | None:
    """The Error Comment of a C-STORE data set that was refused while it
    arrived (larger than ``max_instance_bytes``, spool failure), else None."""
    return dataset.refusal if isinstance(dataset, SpoolBuffer) else None


def release(dataset: object) -> None:
    """Free what a received data set holds (after the C-STORE handler)."""
    if isinstance(dataset, SpoolBuffer):
        dataset.release()


class GuardedDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider with :class:`SpoolBuffer` data sets and
    size limits (see the module docstring)."""

    _limits: Limits
    _where: str
    _log: Throttle
    _aborted: bool

    def guard(self, limits: Limits, where: str, log: Throttle) -> None:
        self._limits = limits
        self._where = where
        self._log = log
        self._aborted = False

    def _abort(self, kind: str, why: str) -> None:
        self._aborted = True
        self._log.warn(kind, self._where.rsplit(":", 1)[0], "association with %s aborted: %s", self._where, why)
        sock = cast(Any, self.dul.socket)
        raw = getattr(sock, "socket", None) if sock is not None else None
        if raw is None:
            return
        # The DUL then reads the end of the connection and aborts the association.
        send_and_close(raw, abort_pdu(ABORT_INVALID_PARAMETER))

    def receive_primitive(self, primitive: Any) -> None:
        if self._aborted:
            return
        if self.message is None:
            self.message = DIMSEMessage()
            self.message.data_set = SpoolBuffer(self.message, self._limits, self._where, self._log)
        command = sum(len(data) for _, data in primitive.presentation_data_value_list if data and data[0] & 1)
        if command and self.message.encoded_command_set.tell() + command > MAX_COMMAND_BYTES:
            self._abort("command-size", f"a command set larger than {MAX_COMMAND_BYTES} bytes")
            return
        try:
            super().receive_primitive(primitive)
        except _TooLarge as exc:
            self._abort("dataset-size", str(exc))
            return
        if self.msg_queue.qsize() > MAX_QUEUED_MESSAGES:
            self._abort("pipelining", f"more than {MAX_QUEUED_MESSAGES} requests waiting for a response "
                        "(the asynchronous operations window is 1)")


def guard_dimse(assoc: Any, limits: Limits, where: str, log: Throttle) -> None:
    """Install :class:`GuardedDIMSE` on a new association (before it starts).

    Raises
    ------
    RuntimeError
        When the association's DIMSE provider is not pynetdicom's own class
        (another pynetdicom version): the connection is then closed.
    """
    if type(assoc.dimse) is not DIMSEServiceProvider:
        raise RuntimeError(f"unexpected DIMSE provider {type(assoc.dimse).__name__}")
    assoc.dimse.__class__ = GuardedDIMSE
    cast(GuardedDIMSE, assoc.dimse).guard(limits, where, log)

