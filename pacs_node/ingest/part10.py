"""The DICOM File Format wrapper (PS3.10 §7.1) for a received data set.

A received instance is stored as sent: preamble, ``DICM``, a File Meta
Information group written by the node, then the data set's bytes untouched.
The File Meta group is small and fixed in shape, so it is encoded here
directly (explicit VR little endian, as PS3.10 requires) instead of through
``pydicom.filewriter.write_file_meta_info``: with pydicom 3.0 the general
writer (building a ``FileMetaDataset``, validating and encoding it) costs
about fifty times as much per instance, a few percent of a core at the
ingest rates issue 15 aims for (``python benchmarks/inproc_ingest.py``
times ``encode_part10`` per instance). The bytes are identical to pydicom's
for the same elements; ``tests/test_part10.py`` checks that on odd and even
lengths, with and without a Source AE Title.
"""

from __future__ import annotations

import struct
import uuid

from pacs_node import __version__
from pacs_node.ingest.uids import check_uid

__all__ = ["IMPLEMENTATION_CLASS_UID", "IMPLEMENTATION_VERSION_NAME", "PREAMBLE", "file_meta_bytes"]

#: The node's Implementation Class UID: a name-based UUID under the 2.25 root
#: (PS3.5 §B.2), the same on every installation and release.
IMPLEMENTATION_CLASS_UID = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "https://pacs-node.org/implementation").int)
#: Implementation Version Name (SH, at most 16 characters).
IMPLEMENTATION_VERSION_NAME = ("PACS_NODE_" + __version__.replace(".", ""))[:16]
#: 128-byte preamble and the ``DICM`` prefix.
PREAMBLE = b"\x00" * 128 + b"DICM"

_VERSION = struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"


def _short(element: int, vr: bytes, value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += pad
    return struct.pack("<HH2sH", 0x0002, element, vr, len(raw)) + raw


def file_meta_bytes(
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    source_aet: str | None = None,
) -> bytes:
    """Encode a File Meta Information group (0002,xxxx), group length included.

    Parameters
    ----------
    sop_class_uid:
        Media Storage SOP Class UID.
    sop_instance_uid:
        Media Storage SOP Instance UID.
    transfer_syntax_uid:
        Transfer syntax of the data set that follows.
    source_aet:
        Source Application Entity Title (0002,0016): the AE the data set came
        from; left out when ``None`` or empty.

    Raises
    ------
    InvalidUIDError
        When a UID does not follow the UID grammar.
    ValueError
        When ``source_aet`` is longer than 16 characters or not ASCII.
    """
    body = [
        _VERSION,
        _short(0x0002, b"UI", check_uid(sop_class_uid, "SOPClassUID"), b"\x00"),
        _short(0x0003, b"UI", check_uid(sop_instance_uid, "SOPInstanceUID"), b"\x00"),
        _short(0x0010, b"UI", check_uid(transfer_syntax_uid, "TransferSyntaxUID"), b"\x00"),
        _short(0x0012, b"UI", IMPLEMENTATION_CLASS_UID, b"\x00"),
        _short(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME, b" "),
    ]
    if source_aet:
        aet = source_aet.strip()
        if len(aet) > 16 or not aet.isascii():
            raise ValueError("Source Application Entity Title must be at most 16 ASCII characters")
        if aet:
            body.append(_short(0x0016, b"AE", aet, b" "))
    payload = b"".join(body)
    return struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(payload)) + payload
