"""Payloads: validation and JSON encoding on the way in, decoding on the way out. Pure functions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from core.errors import InvalidPayload

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


def encode_payload(i: int, payload: dict[str, Any]) -> str:
    """The JSON text stored for payload ``i`` of a batch, or :class:`InvalidPayload` naming it."""
    try:
        text = _json_encode(payload)
    except (TypeError, ValueError) as exc:
        raise InvalidPayload(i, f"not JSON-serialisable ({exc})") from None
    if "\\u0000" in text:
        raise InvalidPayload(i, "contains a NUL character, which PostgreSQL JSONB cannot store")
    return text


def serialise(payloads: Sequence[Any]) -> list[str]:
    """Check and encode a whole batch."""
    check_payloads(payloads)
    return [encode_payload(i, p) for i, p in enumerate(payloads)]


def copy_text(value: str) -> str:
    """Escape a value for COPY's text format."""
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
