"""Reading and validating request bodies: the size and time limits, JSON, and each endpoint's fields. Every
refusal is an `ApiError` whose kind and message the client sees (serving/server.py answers it)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import TYPE_CHECKING, Any

from fastapi import Request

from serving.schemas import ApiError

if TYPE_CHECKING:
    from serving.settings import ServerSettings


async def read_body(request: Request, limit: int, timeout: float | None = None) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` (before reading it all), and with
    408 when it has not all arrived within `timeout` seconds (a client that sends its body slowly or never:
    slowloris). Both refusals close the connection, so the server stops receiving the rest."""
    if timeout is None:
        return await _read_body_unbounded(request, limit)
    try:
        async with asyncio.timeout(timeout):
            return await _read_body_unbounded(request, limit)
    except TimeoutError:
        raise ApiError(408, "request_timeout", f"the request body did not arrive within {timeout:g} s",
                       {"Connection": "close"}) from None


async def _read_body_unbounded(request: Request, limit: int) -> bytes:
    close = {"Connection": "close"}
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ApiError(413, "body_too_large", f"request body is {int(declared)} bytes; the limit is {limit}",
                               close)
        except ValueError:
            raise ApiError(400, "invalid_request", "Content-Length is not a number") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"request body is over the limit of {limit} bytes", close)
        chunks.append(chunk)
    return b"".join(chunks)


def _type_name(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


def parse_json(body: bytes) -> Any:
    """A request body as JSON, or the 400 that says why not (every endpoint that takes JSON uses this)."""
    try:
        decoded = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, "invalid_utf8", f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(decoded)
    except json.JSONDecodeError as e:
        raise ApiError(400, "invalid_json", f"request body is not JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "request body is nested too deeply") from None
    except ValueError:  # Python's int-string limit: an integer literal of thousands of digits
        raise ApiError(400, "invalid_json", "request body has an integer with more than "
                       f"{sys.get_int_max_str_digits()} digits") from None


def _check_unicode(value: str, where: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # JSON allows "\ud800"; an unpaired surrogate is not a character and the tokenizer cannot take it.
        raise ApiError(400, "invalid_unicode", f"{where} contains an unpaired surrogate escape") from None


def parse_texts(body: bytes, settings: ServerSettings) -> tuple[list[str], list[bool], bool]:
    """Validate a /v1/classify body; returns the texts (cut at max_chars in truncate mode), which were cut,
    and whether explanations were asked for."""
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise ApiError(422, "invalid_request", f'body must be an object {{"texts": [...]}}, got {_type_name(payload)}')
    if "texts" not in payload:
        raise ApiError(422, "invalid_request", 'body has no "texts" field')
    texts = payload["texts"]
    if not isinstance(texts, list):
        raise ApiError(422, "invalid_request", f'"texts" must be an array of strings, got {_type_name(texts)}')
    if not texts:
        raise ApiError(422, "empty_texts", '"texts" is empty: send at least one text')
    if len(texts) > settings.max_texts:
        raise ApiError(413, "too_many_texts",
                       f'"texts" has {len(texts)} items; the limit is {settings.max_texts} per request')
    explain = payload.get("explain", False)
    if not isinstance(explain, bool):
        raise ApiError(422, "invalid_request", f'"explain" must be true or false, got {_type_name(explain)}')
    if explain and len(texts) > settings.explain_max_texts:
        raise ApiError(413, "too_many_texts", f'"texts" has {len(texts)} items; the limit with "explain": true '
                       f'is {settings.explain_max_texts} per request')
    cut = [False] * len(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ApiError(422, "invalid_request", f"texts[{i}] must be a string, got {_type_name(t)}")
        _check_unicode(t, f"texts[{i}]")
        if len(t) > settings.max_chars:
            if settings.too_long == "reject":
                raise ApiError(413, "text_too_long",
                               f"texts[{i}] has {len(t)} characters; the limit is {settings.max_chars}")
            texts[i], cut[i] = t[: settings.max_chars], True
    return texts, cut, explain


def parse_feedback(body: bytes, settings: ServerSettings) -> dict:
    """Validate a /v1/feedback body: {"text", "label", "reporter"?, "note"?} -> those four ('' for absent).
    The text is never cut (--too-long truncate or not): the store keeps what the user received."""
    from serving.feedback import LABELS, MAX_REPORTER_CHARS

    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise ApiError(422, "invalid_request",
                       f'body must be an object {{"text": ..., "label": "spam"|"ham"}}, got {_type_name(payload)}')
    out = {}
    for name, required, limit in (("text", True, settings.max_chars), ("label", True, None),
                                  ("reporter", False, MAX_REPORTER_CHARS), ("note", False, settings.max_chars)):
        value = payload.get(name)
        if value is None:
            if required:
                raise ApiError(422, "invalid_request", f'body has no "{name}" field' if name not in payload
                               else f'"{name}" must be a string, got null')
            value = ""
        if not isinstance(value, str):
            raise ApiError(422, "invalid_request", f'"{name}" must be a string, got {_type_name(value)}')
        _check_unicode(value, f'"{name}"')
        if limit is not None and len(value) > limit:
            raise ApiError(413, "text_too_long", f'"{name}" has {len(value)} characters; the limit is {limit}')
        out[name] = value
    if out["label"] not in LABELS:
        raise ApiError(422, "invalid_request", f'"label" must be "spam" or "ham", got {out["label"][:40]!r}')
    if not out["text"] or out["text"].isspace():
        raise ApiError(422, "empty_text", '"text" is empty: send the message being reported')
    return out


def parse_reload(body: bytes) -> str | None:
    """Validate a /admin/reload body: empty, or {"bundle": "<dir>"}. Returns the directory or None."""
    if not body.strip():
        return None
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise ApiError(422, "invalid_request", f'body must be an object {{"bundle": "<dir>"}}, got {_type_name(payload)}')
    unknown = sorted(set(payload) - {"bundle"})
    if unknown:
        raise ApiError(422, "invalid_request", f"unknown field(s) {', '.join(map(repr, unknown))} (expected 'bundle')")
    bundle = payload.get("bundle")
    if bundle is None:
        return None
    if not isinstance(bundle, str) or not bundle.strip():
        raise ApiError(422, "invalid_request", f'"bundle" must be a directory path, got {_type_name(bundle)}')
    _check_unicode(bundle, '"bundle"')
    return bundle
