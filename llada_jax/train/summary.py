"""TensorBoard scalar summaries written without TensorFlow (or any other dependency).

A TensorBoard event file is a TFRecord file of `Event` protocol buffers. For scalars only three
small messages are needed, so they are encoded here by hand:

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }

and every record is framed as TFRecord does: length (uint64), masked CRC-32C of the length,
payload, masked CRC-32C of the payload (all little-endian). `tensorboard --logdir WORKDIR`
reads the files.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from etils import epath


def _crc32c_of_byte(crc: int) -> int:
    for _ in range(8):
        crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
    return crc


_CRC32C_TABLE = [_crc32c_of_byte(byte) for byte in range(256)]


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, the checksum TFRecord uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 bits and add a constant (mod 2^32)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload: bytes) -> bytes:
    """One TFRecord frame around `payload`."""
    length = struct.pack("<Q", len(payload))
    return (length + struct.pack("<I", masked_crc32c(length)) + payload
            + struct.pack("<I", masked_crc32c(payload)))


def _varint(value: int) -> bytes:
    """Protocol-buffer varint: 7 bits per byte, low first, the high bit set on all but the last."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(fields: bytes) -> bytes:
    """A serialized `Event`: its wall time (now), then `fields`."""
    return _varint(1 << 3 | 1) + struct.pack("<d", time.time()) + fields


def scalar_event(step: int, scalars: dict[str, float]) -> bytes:
    """The serialized `Event` holding one `simple_value` per tag."""
    values = b"".join(
        _field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5)
                     + struct.pack("<f", float(value)))
        for tag, value in scalars.items())
    return _event(_varint(2 << 3 | 0) + _varint(int(step)) + _field_bytes(5, values))


class SummaryWriter:
    """Writes scalar summaries to a fresh `events.out.tfevents.*` file in `logdir`.

    `logdir` may be local or remote (`gs://...`, through etils.epath). Records are written at
    `flush()`: appended to a local file; a cloud object cannot be appended to, so there the whole
    file (scalars only: small) is rewritten.
    """

    def __init__(self, logdir: str) -> None:
        directory = epath.Path(logdir)
        directory.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.fspath(directory / name)
        self._remote = "://" in os.fspath(logdir)
        # The first event of a file names its format version.
        self._pending = bytearray(tfrecord(_event(_field_bytes(3, b"brain.Event:2"))))
        self._written = bytearray()  # remote files only: everything written so far
        self.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._pending += tfrecord(scalar_event(step, values))

    def flush(self) -> None:
        if not self._pending:
            return
        if self._remote:
            self._written += self._pending
            epath.Path(self.path).write_bytes(bytes(self._written))
        else:
            with open(self.path, "ab") as f:
                f.write(self._pending)
        self._pending.clear()

    def close(self) -> None:
        self.flush()
