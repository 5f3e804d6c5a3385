"""Binary and huge inputs of the bad-input corpus, made at test time (nothing big is committed)."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

GOOD = {"instruction": "Hi", "output": "Hello"}


def png_bytes(width: int = 4, height: int = 4) -> bytes:
    """A real (tiny, grey) PNG image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def latin1(path: Path) -> None:
    """Two good UTF-8 lines, then one saved as Latin-1 (é is 0xe9)."""
    lines = [json.dumps(GOOD), json.dumps(GOOD)]
    path.write_bytes(("\n".join(lines) + "\n").encode() +
                     '{"instruction": "Café?", "output": "Oui"}\n'.encode("latin-1"))


def huge_record(path: Path) -> None:
    """A good record, then one 17 MiB record (over the 16 MiB limit)."""
    from core.data.loader import MAX_RECORD_BYTES

    big = {"instruction": "Summarise", "output": "x" * (MAX_RECORD_BYTES + 2**20)}
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(big) + "\n", encoding="utf-8")


def _parquet(path: Path, columns: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def parquet_int_output(path: Path) -> None:
    _parquet(path, {"instruction": ["What is 6*7?", "And 2+2?"], "output": [42, 4]})


def parquet_image_bytes(path: Path) -> None:
    """An image column where the answer text should be (a vision dataset given to a text model)."""
    _parquet(path, {"instruction": ["Describe the picture"], "output": [png_bytes()]})


def parquet_truncated(path: Path) -> None:
    parquet_int_output(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def png(path: Path) -> None:
    path.write_bytes(png_bytes())


def jpeg(path: Path) -> None:
    """A JPEG header (SOI + JFIF APP0) and end marker."""
    header = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    path.write_bytes(header + b"\x00" * 64 + b"\xff\xd9")


GENERATORS = {f.__name__: f for f in (latin1, huge_record, parquet_int_output, parquet_image_bytes,
                                      parquet_truncated, png, jpeg)}
