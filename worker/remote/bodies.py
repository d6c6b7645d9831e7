"""Reading an answer's body within a size cap, decompressing without holding more than the cap.

HTTP clients decompress each network chunk whole: 64 KiB of gzip can become 64 MiB in one
step before any cap is checked, so the worker's sessions leave bodies compressed
(``auto_decompress=False``) and decode them here. Here each step may produce at most what
is left of the cap (plus one byte, to notice going over), so a compression bomb costs no more memory
than an honest answer of the largest accepted size. Polls ask for gzip and deflate only
(ACCEPT_ENCODING); any other coding is refused as unreadable.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterable, Mapping

ACCEPT_ENCODING = "gzip, deflate"


class ResponseTooLarge(Exception):
    """The answer, decompressed, was larger than the cap; it was not read to the end."""


class UndecodableBody(Exception):
    """The answer's Content-Encoding is not supported, or its compressed data is corrupt."""


class _Inflater:
    """One gzip or deflate layer, producing at most a given number of bytes per call."""

    def __init__(self, coding: str) -> None:
        self._raw_fallback = coding == "deflate"  # some servers send raw deflate, no zlib header
        self._zlib = zlib.decompressobj(zlib.MAX_WBITS | 16 if coding != "deflate"
                                        else zlib.MAX_WBITS)
        self._started = False

    def feed(self, data: bytes, room: int) -> bytes:
        try:
            out = self._zlib.decompress(data, room + 1)
        except zlib.error as exc:
            if not (self._raw_fallback and not self._started):
                raise UndecodableBody(f"the compressed answer is corrupt: {exc}") from None
            self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
            self._raw_fallback = False
            return self.feed(data, room)
        self._started = True
        if len(out) > room:
            raise ResponseTooLarge
        return out


def _layers(content_encoding: str) -> list[_Inflater]:
    """Decoders for a Content-Encoding header, in the order to apply them."""
    codings = [c.strip().lower() for c in content_encoding.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    unsupported = [c for c in codings if c not in ("gzip", "x-gzip", "deflate")]
    if unsupported:
        raise UndecodableBody(f"the answer uses an unsupported Content-Encoding: "
                              f"{unsupported[0][:40]!r}")
    return [_Inflater(c) for c in reversed(codings)]


async def read_capped(
    headers: Mapping[str, str], raw_chunks: AsyncIterable[bytes], limit: int
) -> bytes:
    """The decoded body of an answer with `headers`, read from `raw_chunks` (the bytes as
    sent, still compressed), at most `limit` bytes.

    Raises ResponseTooLarge as soon as the body (decoded) would pass `limit`, without
    reading further, and UndecodableBody for an unsupported or corrupt Content-Encoding.
    """
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ResponseTooLarge
    layers = _layers(headers.get("content-encoding", ""))
    chunks: list[bytes] = []
    size = 0
    async for raw in raw_chunks:
        data = raw
        for layer in layers:
            data = layer.feed(data, limit - size)
        size += len(data)
        if size > limit:
            raise ResponseTooLarge
        chunks.append(data)
    return b"".join(chunks)
