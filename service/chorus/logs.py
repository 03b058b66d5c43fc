"""Logging to stdout as text or one JSON object per line (`CHORUS_LOG_FORMAT`)."""

from __future__ import annotations

import logging
import re
import sys
import time
from urllib.parse import unquote_plus

import orjson

from .config import Settings


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(body).decode()


class _DenialNoiseFilter(logging.Filter):
    """Drop uvicorn's false alarm after a WebSocket denial response.

    websockets-sansio never marks the handshake complete after `websocket.http.response`, so
    every refused handshake (HTTP 400/403/503) also logs "ASGI callable returned without
    completing handshake." at ERROR (uvicorn PR #3138, open). Chorus always accepts or denies,
    so the message carries no information here and would page operators for nothing.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "ASGI callable returned without completing handshake."


class _ClientFaultFilter(logging.Filter):
    """A client's invalid UTF-8 is its fault, not the server's: log one INFO line, no traceback.

    uvicorn logs it at ERROR with a traceback (and closes with 1007, which is right), so any
    client could flood the error log and page operators.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.levelno >= logging.ERROR
            and record.getMessage() == "Invalid UTF-8 sequence received from client."
        ):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
        return True


# A query parameter in a logged path or URL: `?name=value` or `&name=value`.
_QUERY_PARAM = re.compile(r"([?&])([^=&\s\"'#]*)=([^&\s\"'#]*)")
TOKEN_PARAM = "token"


def _redact_param(found: re.Match[str]) -> str:
    # Starlette decodes names before `params.get("token")`, so `%74oken` is the token too;
    # any case is hidden as well, to be safe whatever a client or a proxy does with it.
    if unquote_plus(found[2]).strip().casefold() != TOKEN_PARAM:
        return found[0]
    return f"{found[1]}{found[2]}=***"


def redact(text: str) -> str:
    """Hide the value of every query parameter whose decoded name is `token`, however spelled."""
    if "=" not in text:
        return text
    return _QUERY_PARAM.sub(_redact_param, text)


class _RedactTokens(logging.Filter):
    """Access and handshake log lines print request paths with their query."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken record: the handler reports it as it would have
            return True
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stdout)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    level = settings.log_level.upper()
    for name in ("chorus", "uvicorn", "gunicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level)
        logger.propagate = False
    logging.getLogger("uvicorn.error").addFilter(_DenialNoiseFilter())
    logging.getLogger("uvicorn.error").addFilter(_ClientFaultFilter())
    for name in ("uvicorn.error", "uvicorn.access", "gunicorn.access", "gunicorn.error"):
        logging.getLogger(name).addFilter(_RedactTokens())
