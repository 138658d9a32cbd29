"""Dead letters: what the worker could not read (or could not publish), bounded.

A dead letter keeps a bounded prefix of the value (``VALUE_PREFIX_BYTES``: as text when
the whole value is UTF-8, else as hex), the value's full size and its SHA-256 digest;
the same for the key (``KEY_PREFIX_BYTES``). So input of any size, up to the request
topics' limit, dead-letters within the dead-letter topic's limit, and the digest still
tells which message it was.
"""

from __future__ import annotations

import hashlib
from typing import Any

from creditgate.domain.intake import MAX_DETAIL_CHARS, bounded_text

VALUE_PREFIX_BYTES = 64 * 1024
KEY_PREFIX_BYTES = 1024


def _text_prefix(raw: bytes, limit: int) -> str | None:
    """The first ``limit`` bytes as text, when ``raw`` is UTF-8 (a character cut at the
    end is left out); None when it is not."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return raw[:limit].decode("utf-8", "ignore")


def dead_letter_key(key: bytes | None) -> bytes:
    """The dead letter's Kafka key: the input's, or its digest when it is long."""
    if key is None:
        return b""
    return key if len(key) <= KEY_PREFIX_BYTES else hashlib.sha256(key).hexdigest().encode()


def dead_letter_body(
    source: dict[str, Any], error: str, key: bytes | None, value: bytes | None, received_at: str
) -> dict[str, Any]:
    """The dead letter of a message; its size is bounded whatever the message's."""
    raw = value or b""
    text = _text_prefix(raw, VALUE_PREFIX_BYTES)
    return {
        "source": source,
        "error": bounded_text(error, MAX_DETAIL_CHARS),
        "key": key[:KEY_PREFIX_BYTES].decode("utf-8", "replace") if key else None,
        "key_bytes": len(key) if key is not None else None,
        "key_sha256": hashlib.sha256(key).hexdigest() if key is not None else None,
        "key_truncated": key is not None and len(key) > KEY_PREFIX_BYTES,
        "value": text,
        "value_hex": raw[: VALUE_PREFIX_BYTES // 2].hex() if text is None else None,
        "value_bytes": len(raw),
        "value_sha256": hashlib.sha256(raw).hexdigest(),
        "value_truncated": len(raw)
        > (VALUE_PREFIX_BYTES if text is not None else VALUE_PREFIX_BYTES // 2),
        "received_at": received_at,
    }
