"""Payloads: validation and JSON encoding on the way in, decoding on the way out. Pure functions.

Every way a payload can fail to be stored as JSONB is caught here, before anything is written, as
:class:`InvalidPayload` naming its index: not a dict, not JSON-serialisable (sets, NaN, non-string keys of
other types than str, int, float, bool, None), a NUL character or a lone surrogate (JSONB cannot store
them), nested too deeply, or larger than the size limit.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from core.errors import InvalidPayload

MAX_PAYLOAD_BYTES = 1024 * 1024  # the default size limit of one payload's JSON text

_json_decode = json.JSONDecoder().decode

# One encoder for every payload: json.dumps with options builds a new encoder per call.
_json_encode = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode


def loads(data: str | bytes) -> Any:
    """Decode a JSONB value as PostgreSQL sends it."""
    # json.loads on bytes first sniffs the encoding; PostgreSQL always sends UTF-8, so decode first. This is
    # per record on the claim path, where it shows.
    return _json_decode(data if isinstance(data, str) else bytes(data).decode())


def check_payloads(payloads: Sequence[Any]) -> None:
    """Every payload must be a dict (what the handler receives back)."""
    for i, payload in enumerate(payloads):
        if not isinstance(payload, dict):
            raise InvalidPayload(i, f"expected a dict, got {type(payload).__name__}")


def encode_payload(i: int, payload: dict[str, Any], max_bytes: int | None = MAX_PAYLOAD_BYTES) -> str:
    """The JSON text stored for payload ``i`` of a batch, or :class:`InvalidPayload` naming it."""
    try:
        text = _json_encode(payload)
    except (TypeError, ValueError) as exc:
        raise InvalidPayload(i, f"not JSON-serialisable ({exc})") from None
    except RecursionError:
        raise InvalidPayload(i, "nested too deeply to encode") from None
    if max_bytes is not None and len(text) > max_bytes:  # ASCII (escaped) text: one byte per character
        raise InvalidPayload(i, f"{len(text):,} bytes of JSON, more than max_payload_bytes ({max_bytes:,})")
    if "\\u0000" in text or "\\ud" in text:  # rare: only these escapes can be a NUL or a surrogate
        _check_escapes(i, text)
    return text


def encode_value(value: Any, max_bytes: int | None = MAX_PAYLOAD_BYTES) -> str:
    """Any JSON value (a flow step's result) as JSONB will store it; ValueError says what is wrong with it."""
    # The results steps return most (none, a flag, a count) written as the encoder writes them, without setting
    # one up per record (a max_bytes below their length: the general way, which says so).
    if max_bytes is None or max_bytes >= 16:  # the longest of these is 16 characters
        kind = type(value)
        if value is None:
            return "null"
        if kind is bool:
            return "true" if value else "false"
        if kind is int and -10**15 < value < 10**15:
            return str(value)
    try:
        return encode_payload(0, value, max_bytes)
    except InvalidPayload as exc:
        raise ValueError(exc.reason) from None


def _check_escapes(i: int, text: str) -> None:
    # The encoder writes a NUL as \u0000 and every non-ASCII character as \uXXXX; a NUL, or a surrogate
    # left unpaired (a paired one is one character), is what PostgreSQL refuses. The data's own backslashes
    # are written \\, so the escape alone can be a false alarm: the decoded strings tell.
    stack: list[Any] = [_json_decode(text)]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            if "\x00" in value:
                raise InvalidPayload(i, "contains a NUL character, which PostgreSQL JSONB cannot store")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidPayload(i, "contains a lone surrogate (half of a UTF-16 pair), which JSONB cannot"
                                     " store") from None


def serialise(payloads: Sequence[Any], max_bytes: int | None = MAX_PAYLOAD_BYTES) -> list[str]:
    """Check and encode a whole batch."""
    check_payloads(payloads)
    return [encode_payload(i, p, max_bytes) for i, p in enumerate(payloads)]


def copy_text(value: str) -> str:
    """Escape a value for COPY's text format."""
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
