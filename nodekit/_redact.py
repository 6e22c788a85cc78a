"""The one redactor: error text on its way to an event or a log line loses its secrets.

Exception messages carry what the failing call carried: a URL with ``?api_key=...``, a DSN with
its password, an ``Authorization`` header, pydantic's ``input_value=`` (the user's payload).
`error_text` is how nodekit turns an exception into text for events and logs: redacted, on one
line, and bounded. It runs only on the failure path: a node that succeeds never redacts
(unless it reports progress to a listener: `redact_fields`, for ``nk.context().emit``).

Built in: the values of secret-looking query parameters (any name containing key, token,
secret, passw, pwd, auth, sig, session, credential, code or bearer), the password of user info
in URLs and DSNs (``postgresql://user:***@host``), ``name=value`` / ``name: value`` pairs whose
name is clearly secret (password, passwd, pwd, secret, token, api_key, access_token,
client_secret, signature, …; libpq's ``password=...`` too), ``Authorization`` and
``Proxy-Authorization`` values and any ``Bearer`` token, JSON Web Tokens, and pydantic's
``input_value=…`` (``input_value=<redacted>``). `add_redactor` adds the user's own patterns,
kept in `RUNTIME.redactors` so that `RUNTIME.reset()` removes them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from ._runtime import RUNTIME

__all__ = ["MASK", "SECRET_NAME", "add_redactor", "error_text", "redact", "redact_fields"]

MASK = "***"

_SECRET_PARTS = "token|secret|passw|pwd|auth|key|sig|session|credential|code|bearer"
#: a query parameter whose name contains one of these has its value hidden
SECRET_NAME = re.compile(f"(?i)({_SECRET_PARTS})")

_QUERY = re.compile(
    r"(?i)([?&;][\w.\-\[\]%]*?(?:" + _SECRET_PARTS + r")[\w.\-\[\]%]*=)[^&#\s'\"<>]*"
)
# scheme://user:password@host (the password may hold '@'; the last '@' before the host ends it)
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^:/?#@\s'\"]*):[^\s/?#'\"]*@")
_SECRET_WORD = (
    r"(?:[\w\-]*[_\-])?(?:password|passwd|pwd|secret|token|api[_\-]?key|apikey|access[_\-]?key"
    r"|private[_\-]?key|signature|credentials?|cookie)"
)
# name=value, name: value, 'name': 'value', "name": "value" (libpq conninfo, headers, reprs)
_PAIR = re.compile(
    r"(?i)(\b" + _SECRET_WORD + r"['\"]?\s*[:=]\s*)"
    r"(?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s,;&'\"})\]]+)"
)
_AUTHORIZATION = re.compile(
    r"(?i)(\b(?:proxy-)?authorization['\"]?\s*[:=]\s*['\"]?)"
    r"(?:(bearer|basic|digest|token|negotiate|ntlm|apikey|aws4-hmac-sha256)\s+)?[^\s'\",;}\]]+"
)
_BEARER = re.compile(r"(?i)\b(bearer\s+)[\w\-.~+/]+=*")
_JWT = re.compile(r"\beyJ[\w\-]{4,}\.[\w\-]{4,}\.[\w\-]*")
# pydantic: "[type=..., input_value=..., input_type=...]": the value is the user's payload
_INPUT_VALUE = re.compile(r"input_value=(?:.*?(?=, input_type=)|[^\]\n]*)")
_PYDANTIC_URL = re.compile(r"\s*For further information visit https://errors\.pydantic\.dev\S*")
_NEWLINES = re.compile(r"\s*[\r\n]+\s*")

# texts longer than this are cut before the patterns run (the output is far shorter anyway)
_MAX_INPUT = 8192
_SEPARATORS = (" ", "\n", "\t", "'", '"', ",", ";", "&", "?")


def _authorization(match: re.Match[str]) -> str:
    scheme = match.group(2)
    return f"{match.group(1)}{scheme + ' ' if scheme else ''}{MASK}"


def redact(text: str) -> str:
    """`text` with the secrets nodekit knows, then the user's redactors' patterns, hidden.

    A user's redactor that raises or returns something other than a string withholds the
    whole text (``<withheld: ...>``): when in doubt, nothing is shown.
    """
    text = _INPUT_VALUE.sub("input_value=<redacted>", text)
    text = _USERINFO.sub(r"\1:" + MASK + "@", text)
    text = _QUERY.sub(r"\1" + MASK, text)
    text = _AUTHORIZATION.sub(_authorization, text)
    text = _BEARER.sub(r"\1" + MASK, text)
    text = _PAIR.sub(r"\1" + MASK, text)
    text = _JWT.sub(MASK, text)
    for redactor in RUNTIME.redactors:
        try:
            result = redactor(text)
        except Exception as error:
            return f"<withheld: redactor {_name(redactor)} raised {type(error).__name__}>"
        if not isinstance(result, str):
            return f"<withheld: redactor {_name(redactor)} returned no text>"
        text = result
    return text


def error_text(exc: BaseException, limit: int = 200) -> str:
    """``"Type: message"`` for events and logs: redacted, on one line, at most `limit` chars.

    Lines are joined with ``"; "``; pydantic's "For further information" links are dropped.
    """
    try:
        message = str(exc)
    except Exception:
        message = "<unprintable message>"
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    if len(text) > _MAX_INPUT:
        # cut at a separator, so that no half of a URL or pair is left for the patterns to miss
        head = text[:_MAX_INPUT]
        cut = max(head.rfind(sep) for sep in _SEPARATORS)
        text = (head[:cut] if cut > _MAX_INPUT // 2 else head) + " …"
    text = redact(_PYDANTIC_URL.sub("", text))
    text = _NEWLINES.sub("; ", text.strip())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# a field whose whole name is clearly secret (``password``, ``db_password``, ``api_key``)
_SECRET_FIELD = re.compile("(?i)" + _SECRET_WORD)
_FIELD_DEPTH = 4


def redact_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Fields a node reports (``nk.context().emit``) as events may carry them: a field whose
    name is clearly secret is masked, strings are `redact`-ed, numbers, booleans and None kept,
    lists, tuples and dicts redacted item by item, anything else replaced by its redacted
    ``repr``. Only called when someone listens to the event."""
    return {name: _field(name, value, 0) for name, value in fields.items()}


def _field(name: object, value: Any, depth: int) -> Any:
    if isinstance(name, str) and _SECRET_FIELD.fullmatch(name):
        return MASK
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact(value)
    if depth < _FIELD_DEPTH:
        if isinstance(value, list | tuple):
            items = [_field(None, item, depth + 1) for item in value]
            return items if isinstance(value, list) else tuple(items)
        if isinstance(value, Mapping):
            return {key: _field(key, item, depth + 1) for key, item in value.items()}
    try:
        text = repr(value)
    except Exception:
        return "<unprintable>"
    return redact(text[:_MAX_INPUT])


def add_redactor(redactor: Callable[[str], str]) -> Callable[[], None]:
    """Hide your own secrets in error text: ``redactor(text)`` returns the text to show.

    Runs after nodekit's built-in patterns (URL query secrets, user info in URLs and DSNs,
    ``password=`` pairs, ``Authorization``/``Bearer`` values, JWTs, pydantic's
    ``input_value``), on every exception message before it enters an event or a log line,
    only on the failure path (and on the fields of ``nk.context().emit``, when someone
    listens). It must be fast; one that raises withholds the whole message.
    Returns a function that removes it. Process-wide; `RUNTIME.reset()`
    (``nodekit.testing.reset_defaults()``) removes every redactor::

        nk.add_redactor(lambda text: re.sub(r"acct_[0-9]+", "acct_***", text))
    """
    if not callable(redactor):
        raise TypeError(f"add_redactor() takes a callable, not {redactor!r}")
    with RUNTIME.lock:
        RUNTIME.redactors = (*RUNTIME.redactors, redactor)

    def remove() -> None:
        with RUNTIME.lock:
            items = list(RUNTIME.redactors)
            for index, item in enumerate(items):
                if item is redactor:
                    del items[index]
                    break
            RUNTIME.redactors = tuple(items)

    return remove


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__
