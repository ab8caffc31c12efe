"""Stream entries and the bytes they become: the backend's resume body (SPEC 8.1) and
Server-Sent Events (8.2). Pure functions, no I/O.

The resume objects go through the standard library's `json.dumps` with its default
arguments because the backend itself produced them that way: same separators, same
`\\uXXXX` escapes (surrogate pairs for emoji), same float spelling, byte for byte.
"""

from __future__ import annotations

import json
import json.encoder
import re
from collections.abc import Mapping, Sequence
from typing import Any

from session_sidecar.problems import warn_once

StreamId = tuple[int, int]
ZERO: StreamId = (0, 0)
_MAX_PART = 2**64 - 1
_ID = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")
# Fields that name the entry rather than describe it: 8.2 leaves them out of `data`.
_ADDRESS_FIELDS = frozenset({"type", "conversation_id", "run_id"})

RETRY = b"retry: 2000\n\n"
KEEPALIVE = b": keepalive\n\n"
RESUME_KEEPALIVE = b"\n"
# What `json.dumps` (ensure_ascii, its default) writes for a string, quotes included.
_json_string = json.encoder.encode_basestring_ascii


def parse_id(text: str) -> StreamId | None:
    """`ms-seq` or `ms` (seq 0), each part a 64-bit unsigned number, as Redis accepts; else None."""
    match = _ID.fullmatch(text)
    if match is None:
        return None
    ms, seq = int(match[1]), int(match[2] or 0)
    if ms > _MAX_PART or seq > _MAX_PART:
        return None
    return ms, seq


def format_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


def successor(sid: StreamId) -> StreamId:
    ms, seq = sid
    return (ms, seq + 1) if seq < _MAX_PART else (ms + 1, 0)


def before(sid: StreamId) -> StreamId:
    """The exclusive position equivalent to the inclusive cursor `sid` (0-0 is never an entry id)."""
    ms, seq = sid
    if sid == ZERO:
        return ZERO
    return (ms, seq - 1) if seq > 0 else (ms - 1, _MAX_PART)


class Entry:
    """One stream entry. Its fields are decoded from Redis's bytes when first needed (an
    entry that only becomes resume bytes needs a few of them, and a replay decodes
    thousands of entries a second), its wire forms encoded once however many listeners
    get it."""

    __slots__ = ("_fields", "_raw", "_resume", "_sse", "id", "sid", "type")

    def __init__(self, entry_id: str, sid: StreamId, raw: Mapping[bytes, bytes]):
        self.id = entry_id
        self.sid = sid
        self._raw = raw
        self._fields: dict[str, str] | None = None
        kind = raw.get(b"type")
        self.type = None if kind is None else _text(kind, entry_id)
        self._resume: bytes | None = None
        self._sse: bytes | None = None

    @property
    def fields(self) -> dict[str, str]:
        if self._fields is None:
            raw = self._raw
            try:
                self._fields = {k.decode(): v.decode() for k, v in raw.items()}
            except UnicodeDecodeError:
                self._fields = {_text(k, self.id): _text(v, self.id) for k, v in raw.items()}
        return self._fields

    @property
    def resume_bytes(self) -> bytes:
        if self._resume is None:
            raw = self._raw
            if (
                raw.get(b"type") == b"chunk"
                and raw.get(b"citations_json", b"[]") == b"[]"
                and raw.get(b"tool_calls_json", b"[]") == b"[]"
            ):  # the usual chunk: two fields decoded, not all of them
                thinking = raw.get(b"thinking")
                self._resume = plain_chunk_bytes(
                    _text(raw.get(b"content", b""), self.id),
                    None if thinking is None else _text(thinking, self.id),
                )
            else:
                self._resume = resume_bytes(self.fields)
        return self._resume

    @property
    def sse_bytes(self) -> bytes:
        if self._sse is None:
            self._sse = sse_frame(self.id, self.fields)
        return self._sse

    def __repr__(self) -> str:
        return f"Entry({self.id!r}, {self.type!r})"


def decode_entry(raw_id: bytes | str, raw_fields: Mapping[bytes, bytes] | Sequence[bytes]) -> Entry:
    """From redis-py's `(id, {field: value})` or the raw reply's flat `[field, value, ...]`."""
    entry_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
    # Redis only hands out well-formed ids: no need for `parse_id`'s checks.
    ms, _, seq = entry_id.partition("-")
    raw = raw_fields if isinstance(raw_fields, Mapping) else dict(_pairs(raw_fields))
    return Entry(entry_id, (int(ms), int(seq)), raw)


def decode_page(raw: Any) -> list[Entry]:
    """A list of `(id, fields)` as redis-py or the raw reply give it; deleted entries
    (id None, only ever in consumer-group replies) are skipped."""
    return [decode_entry(raw_id, fields) for raw_id, fields in raw or () if raw_id is not None]


def _pairs(flat: Sequence[bytes]) -> zip[tuple[bytes, bytes]]:
    items = iter(flat)  # one iterator twice: pairs without copying the list in halves
    return zip(items, items, strict=True)


def _text(raw: bytes | str, entry_id: str) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode()
    except UnicodeDecodeError:
        # Never a crash (SPEC 4): the bad bytes become U+FFFD, logged once per entry.
        warn_once(("entry-utf8", entry_id), "stream entry %s holds bytes that are not UTF-8", entry_id)
        return raw.decode(errors="replace")


def _json_list(raw: str | None) -> Any:
    """A `citations_json`/`tool_calls_json` value: undecodable or not a list counts as `[]`."""
    if raw is None or raw == "[]":  # the usual value, decoded without the parser's cost
        return []
    try:
        value = json.loads(raw)
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def resume_object(fields: Mapping[str, str]) -> dict[str, Any] | None:
    """The backend's `ChatMessageResponse` for a `chunk` or `queued` entry; None for any other type."""
    entry_type = fields.get("type")
    if entry_type == "chunk":
        return {
            "message": fields.get("content", ""),
            "citations": _json_list(fields.get("citations_json")),
            "tool_calls": _json_list(fields.get("tool_calls_json")),
            "thinking": fields.get("thinking"),
        }
    if entry_type == "queued":
        return {"message": "", "citations": [], "tool_calls": [], "thinking": None}
    return None


def resume_bytes(fields: Mapping[str, str]) -> bytes:
    if (
        fields.get("type") == "chunk"
        and fields.get("citations_json", "[]") == "[]"
        and fields.get("tool_calls_json", "[]") == "[]"
    ):
        return plain_chunk_bytes(fields.get("content", ""), fields.get("thinking"))
    obj = resume_object(fields)
    return b"" if obj is None else json.dumps(obj).encode()


def plain_chunk_bytes(content: str, thinking: str | None) -> bytes:
    """The resume object of the usual chunk, with no citation and no tool call: the very
    text `json.dumps` makes of it, put together around json's own string encoder, at a
    fifth of the cost. Every entry a replay sends pays it, for each client."""
    return (
        f'{{"message": {_json_string(content)}, "citations": [], "tool_calls": [], '
        f'"thinking": {"null" if thinking is None else _json_string(thinking)}}}'
    ).encode()


def event_data(fields: Mapping[str, str]) -> Any:
    """8.2 `data`: the 8.1 object for a chunk; otherwise the fields minus the address ones,
    each `*_json` decoded under its name without the suffix (undecodable: `[]`, as the backend)."""
    obj = resume_object(fields) if fields.get("type") == "chunk" else None
    if obj is not None:
        return obj
    data: dict[str, Any] = {}
    for name, value in fields.items():
        if name in _ADDRESS_FIELDS:
            continue
        if name.endswith("_json"):
            try:
                data[name.removesuffix("_json")] = json.loads(value)
            except ValueError:
                data[name.removesuffix("_json")] = []
        else:
            data[name] = value
    return data


def compact(value: Any) -> str:
    """One line of compact JSON (json.dumps escapes every control character, so no newline)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate decoded from a `*_json` field
        text = json.dumps(value, separators=(",", ":"))
    return text


def _event_name(entry_type: str | None) -> str:
    if not entry_type:
        return "unknown"
    # A line break would end the field early and corrupt the framing.
    return entry_type.replace("\r", " ").replace("\n", " ")


def sse_frame(entry_id: str, fields: Mapping[str, str]) -> bytes:
    name = _event_name(fields.get("type"))
    return f"id: {entry_id}\nevent: {name}\ndata: {compact(event_data(fields))}\n\n".encode()


def sse_event(name: str, data: Any) -> bytes:
    """An event without `id:`, so it leaves the client's Last-Event-ID as it was."""
    return f"event: {name}\ndata: {compact(data)}\n\n".encode()
