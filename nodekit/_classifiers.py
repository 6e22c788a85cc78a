"""What the libraries users call raise, and what each error means: safe, ambiguous or permanent.

nodekit imports none of these libraries: an error is recognised by the module and name of the
classes in its MRO (``("requests", "ReadTimeout")``), by a status or SQLSTATE attribute, and, for
the wrappers (``requests.ConnectionError``, urllib3's ``MaxRetryError``, ``urllib.error.URLError``,
SQLAlchemy's ``DBAPIError``), by the error they wrap. Nothing here imports from nodekit either:
`_classify` runs these rules after the user's classifiers and nodekit's own errors, and hands
them itself (``inner``) to classify a wrapped error.

The rule of thumb, for every library: nothing sent (connection refused, DNS failure, connect
timeout, a pool that gave no connection, a statement the server refused and rolled back) is
*safe*; sent but no answer (read timeout, connection dropped, 500, 502, 504, a commit whose
outcome was lost) is *ambiguous*; a request that would fail the same way again (other 4xx, a
constraint, a syntax error, a bad certificate or password) is *permanent*.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable
from typing import Literal, TypeAlias

__all__ = [
    "AMBIGUOUS",
    "PERMANENT",
    "SAFE",
    "Kind",
    "http_status",
    "library_kind",
    "refused",
]

Kind: TypeAlias = Literal["safe", "ambiguous", "permanent"]
SAFE: Kind = "safe"
AMBIGUOUS: Kind = "ambiguous"
PERMANENT: Kind = "permanent"

#: classifies a wrapped error with the whole classifier (the user's rules included)
Inner: TypeAlias = Callable[[BaseException], Kind]
#: a rule for one class: a kind, or None to go on along the MRO
Rule: TypeAlias = Callable[[BaseException, Inner], "Kind | None"]

# ---------------------------------------------------------------------------- HTTP statuses

# the server refused before doing anything (408, 425, 429, 503), or may have acted (500, 502, 504)
_SAFE_STATUS = frozenset({408, 425, 429, 503})
_AMBIGUOUS_STATUS = frozenset({500, 502, 504})


def http_status(exc: BaseException) -> int | None:
    """The HTTP status an error carries, or None.

    ``status_code`` (nodekit.http, many SDKs), ``response.status_code`` (httpx, requests),
    ``response.status`` (urllib3, aiohttp responses), aiohttp's ``ClientResponseError.status``
    and ``urllib.error.HTTPError.code``. Only values from 100 to 599 count.
    """
    status = getattr(exc, "status_code", None)
    if not _is_status(status):
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None) if response is not None else None
        if not _is_status(status) and response is not None:
            status = getattr(response, "status", None)
        if not _is_status(status):
            module = type(exc).__module__
            if module.startswith("aiohttp"):
                status = getattr(exc, "status", None)
            elif module == "urllib.error":
                status = getattr(exc, "code", None)
    return status if _is_status(status) else None


def _is_status(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599


def status_kind(status: int) -> Kind:
    if status in _SAFE_STATUS:
        return SAFE
    if status in _AMBIGUOUS_STATUS:
        return AMBIGUOUS
    return PERMANENT


# ---------------------------------------------------------------------------- SQLSTATEs

# A server that answered with an SQLSTATE answered: the statement failed and its transaction is
# rolled back (or must be). Transient only where listed; anything else is permanent.
_SQLSTATES: dict[str, Kind] = {
    "40001": SAFE,  # serialization_failure
    "40P01": SAFE,  # deadlock_detected
    "40003": AMBIGUOUS,  # statement_completion_unknown
    "55P03": SAFE,  # lock_not_available (NOWAIT, lock_timeout)
    "57014": SAFE,  # query_canceled (statement_timeout)
    "57P01": AMBIGUOUS,  # admin_shutdown: the session ended, a COMMIT may have gone through
    "57P02": AMBIGUOUS,  # crash_shutdown
    "57P03": SAFE,  # cannot_connect_now (starting up, recovering)
    "53300": SAFE,  # too_many_connections
    "08001": SAFE,  # sqlclient_unable_to_establish_sqlconnection
    "08004": SAFE,  # sqlserver_rejected_establishment_of_sqlconnection
    "08007": AMBIGUOUS,  # transaction_resolution_unknown
}


def sqlstate_kind(exc: BaseException) -> Kind | None:
    """The kind an SQLSTATE gives (psycopg and asyncpg ``sqlstate``, psycopg2 ``pgcode``)."""
    state = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    if not isinstance(state, str) or len(state) != 5:
        return None
    kind = _SQLSTATES.get(state.upper())
    if kind is not None:
        return kind
    if state.startswith("08"):  # connection exception, mid-statement: it may have run
        return AMBIGUOUS
    return PERMANENT


# ---------------------------------------------------------------------------- helpers


def _chain(exc: BaseException, limit: int = 6) -> list[BaseException]:
    """`exc` and the errors it was raised from or during (``__cause__``/``__context__``)."""
    seen = [exc]
    current = exc.__cause__ or exc.__context__
    while current is not None and len(seen) < limit and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def refused(exc: BaseException) -> bool:
    """True when an error was caused by a refused connection (nothing was sent)."""
    for error in _chain(exc):
        if isinstance(error, ConnectionRefusedError):
            return True
        name = (type(error).__module__.partition(".")[0], type(error).__name__)
        if name in {("httpx", "ConnectError"), ("httpcore", "ConnectError")}:
            return True
    text = _text(exc)
    return "connection refused" in text or "error 111" in text


def _certificate(exc: BaseException) -> bool:
    """True for a TLS certificate verification failure: permanent, whatever wraps it."""
    for error in _chain(exc):
        if type(error).__name__ == "SSLCertVerificationError":
            return True
        inner = error.args[0] if error.args else None
        if isinstance(inner, BaseException) and type(inner).__name__ == "SSLCertVerificationError":
            return True
    return "certificate_verify_failed" in _text(exc) or "certificate verify failed" in _text(exc)


def _wrapped(exc: BaseException) -> BaseException | None:
    """The error a wrapper carries: ``reason`` (urllib3, urllib), else an argument (requests
    passes urllib3's error first, urllib3's ``ProtocolError`` its cause second), else the
    error it was raised from."""
    for candidate in (getattr(exc, "reason", None), *exc.args):
        if isinstance(candidate, BaseException) and candidate is not exc:
            return candidate
    cause = exc.__cause__ or exc.__context__
    return cause if cause is not exc else None


def _text(exc: BaseException) -> str:
    """The error's message, lower-cased ("" when its ``__str__`` fails)."""
    try:
        return str(exc).lower()
    except Exception:
        return ""


def _transient(kind: Kind) -> Kind | None:
    return kind if kind != PERMANENT else None


# ---------------------------------------------------------------------------- rules


def _os_error(exc: BaseException, inner: Inner) -> Kind | None:
    """An `OSError` by its errno: connect-time failures are safe, drops are ambiguous."""
    code = getattr(exc, "errno", None)
    if code in _CONNECT_ERRNOS:
        return SAFE
    if code in _DROP_ERRNOS:
        return AMBIGUOUS
    return None  # a file error, or no errno: not a network failure


_CONNECT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ECONNREFUSED", "ENETUNREACH", "EHOSTUNREACH", "EADDRNOTAVAIL", "ENETDOWN")
    if hasattr(errno, name)
)
_DROP_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ECONNRESET", "ECONNABORTED", "EPIPE", "ETIMEDOUT", "ENOTCONN", "ENETRESET")
    if hasattr(errno, name)
)


def _tls(exc: BaseException, inner: Inner) -> Kind | None:
    """A TLS error: a bad certificate is permanent; anything else may have cut a request."""
    return PERMANENT if _certificate(exc) else AMBIGUOUS


def _connect(exc: BaseException, inner: Inner) -> Kind | None:
    """A connect failure (nothing sent) — unless the certificate was refused (permanent)."""
    return PERMANENT if _certificate(exc) else SAFE


def _wrapper(exc: BaseException, inner: Inner) -> Kind | None:
    """A wrapper (requests' ``ConnectionError``, urllib3's ``MaxRetryError``/``ProtocolError``)
    takes the kind of the error it wraps when that one is transient, else ambiguous."""
    if _certificate(exc):
        return PERMANENT
    wrapped = _wrapped(exc)
    if wrapped is not None:
        kind = _transient(inner(wrapped))
        if kind is not None:
            return kind
    return SAFE if refused(exc) else AMBIGUOUS


def _url_error(exc: BaseException, inner: Inner) -> Kind | None:
    """`urllib.error.URLError` wraps only what failed while connecting or sending: a timeout
    there means the request never went out whole; a string reason is a bad URL (permanent)."""
    reason = getattr(exc, "reason", None)
    if not isinstance(reason, BaseException):
        return PERMANENT
    if isinstance(reason, TimeoutError):
        return SAFE
    return inner(reason)


def _connecting(exc: BaseException, inner: Inner) -> Kind | None:
    """redis-py says "connecting to" (or "Timeout connecting") when nothing was sent."""
    text = _text(exc)
    if "connecting to" in text or "timeout connecting" in text or refused(exc):
        return SAFE
    return AMBIGUOUS


_PG_PERMANENT = (
    "password authentication failed",
    "authentication failed",
    "no pg_hba.conf entry",
    "does not exist",
    "invalid dsn",
    "invalid connection option",
    "invalid sslmode",
    "the connection is closed",  # used after close: nothing sent, and a retry can't reopen it
)
_PG_CONNECT = (
    "connection failed:",  # psycopg 3: the connect attempt failed, whatever libpq said next
    "connection refused",
    "could not translate host name",
    "could not connect",
    "timeout expired",
    "no such file or directory",
    "the database system is starting up",
    "the database system is shutting down",
    "too many clients",
    "network is unreachable",
    "no route to host",
)


# libpq: 'connection to server at "db" (10.0.0.1), port 5432 failed: ...' (psycopg2 too)
_PG_CONNECT_TO = re.compile(r"connection to server (?:at|on) .{0,200}? failed")


def _pg_operational(exc: BaseException, inner: Inner) -> Kind | None:
    """A psycopg ``OperationalError`` without an SQLSTATE: a failed connect attempt (safe, or
    permanent for credentials and names) or a connection lost mid-statement (ambiguous)."""
    text = _text(exc)
    if any(part in text for part in _PG_PERMANENT):
        return PERMANENT
    if any(part in text for part in _PG_CONNECT) or _PG_CONNECT_TO.search(text):
        return SAFE
    return AMBIGUOUS


def _sqlite_operational(exc: BaseException, inner: Inner) -> Kind | None:
    """SQLITE_BUSY / SQLITE_LOCKED: the statement (or COMMIT) did not take effect; safe once the
    transaction is rolled back (``with conn:`` does). Any other operational error is permanent."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF in (5, 6):
        return SAFE
    text = _text(exc)
    if any(part in text for part in ("database is locked", "table is locked", "database is busy")):
        return SAFE
    return PERMANENT


def _sqlalchemy(exc: BaseException, inner: Inner) -> Kind | None:
    """SQLAlchemy's ``DBAPIError`` wraps the driver's error in ``.orig``: that one decides (or,
    for a driver adapter's own class, the error it was raised from); a connection SQLAlchemy
    found dead is at least ambiguous."""
    orig = getattr(exc, "orig", None)
    if isinstance(orig, BaseException) and orig is not exc:
        kind = inner(orig)
        cause = orig.__cause__
        if kind == PERMANENT and not _known(orig) and isinstance(cause, BaseException):
            kind = inner(cause)  # e.g. the asyncpg dialect re-raises asyncpg's error as its own
        if kind != PERMANENT:
            return kind
    return AMBIGUOUS if getattr(exc, "connection_invalidated", False) else PERMANENT


def _known(exc: BaseException) -> bool:
    """Whether a rule names the error's class (so PERMANENT is a verdict, not a default)."""
    return sqlstate_kind(exc) is not None or any(_key(c) in RULES for c in type(exc).__mro__)


def _key(cls: type) -> tuple[str, str]:
    return cls.__module__.partition(".")[0], cls.__name__


# (top-level module, class name) -> kind or rule, looked up along the exception's MRO: the most
# derived class with an entry decides. A rule may return None to go on along the MRO.
RULES: dict[tuple[str, str], Kind | Rule] = {
    # -- the standard library: sockets, TLS, asyncio streams, http.client, urllib
    ("builtins", "ConnectionRefusedError"): SAFE,
    ("builtins", "ConnectionResetError"): AMBIGUOUS,
    ("builtins", "ConnectionAbortedError"): AMBIGUOUS,
    ("builtins", "BrokenPipeError"): AMBIGUOUS,
    ("builtins", "ConnectionError"): AMBIGUOUS,
    ("builtins", "TimeoutError"): AMBIGUOUS,  # also socket.timeout, asyncio.TimeoutError
    ("builtins", "OSError"): _os_error,
    ("socket", "gaierror"): SAFE,  # DNS: nothing was sent
    ("socket", "herror"): SAFE,
    ("ssl", "SSLCertVerificationError"): PERMANENT,
    ("ssl", "SSLError"): _tls,
    ("asyncio", "IncompleteReadError"): AMBIGUOUS,
    ("http", "RemoteDisconnected"): AMBIGUOUS,  # sent, then closed without an answer
    ("http", "IncompleteRead"): AMBIGUOUS,
    ("http", "BadStatusLine"): AMBIGUOUS,
    ("http", "LineTooLong"): AMBIGUOUS,
    ("http", "HTTPException"): PERMANENT,  # misuse: CannotSendRequest, InvalidURL, ...
    ("urllib", "URLError"): _url_error,
    # -- httpx (and httpcore under it)
    ("httpx", "ConnectError"): _connect,
    ("httpx", "ConnectTimeout"): SAFE,
    ("httpx", "PoolTimeout"): SAFE,
    ("httpx", "ProxyError"): SAFE,
    ("httpx", "ReadTimeout"): AMBIGUOUS,
    ("httpx", "WriteTimeout"): AMBIGUOUS,
    ("httpx", "ReadError"): AMBIGUOUS,
    ("httpx", "WriteError"): AMBIGUOUS,
    ("httpx", "RemoteProtocolError"): AMBIGUOUS,
    ("httpx", "CloseError"): AMBIGUOUS,
    ("httpx", "TransportError"): AMBIGUOUS,
    ("httpx", "UnsupportedProtocol"): PERMANENT,  # refused before sending, and would be again
    ("httpx", "LocalProtocolError"): PERMANENT,
    # -- requests (its ConnectionError wraps urllib3's error: that one decides)
    ("requests", "ConnectTimeout"): SAFE,
    ("requests", "ReadTimeout"): AMBIGUOUS,
    ("requests", "Timeout"): AMBIGUOUS,
    ("requests", "ProxyError"): SAFE,
    ("requests", "SSLError"): _tls,
    ("requests", "ConnectionError"): _wrapper,
    ("requests", "ChunkedEncodingError"): AMBIGUOUS,
    ("requests", "RetryError"): AMBIGUOUS,  # urllib3 gave up on retryable statuses
    ("requests", "RequestException"): PERMANENT,  # bad URL, schema, header, redirects, JSON
    # -- urllib3
    ("urllib3", "MaxRetryError"): _wrapper,
    ("urllib3", "NewConnectionError"): SAFE,  # refused, unreachable; NameResolutionError too
    ("urllib3", "ConnectTimeoutError"): SAFE,
    ("urllib3", "EmptyPoolError"): SAFE,
    ("urllib3", "ProxyError"): SAFE,
    ("urllib3", "ReadTimeoutError"): AMBIGUOUS,
    ("urllib3", "TimeoutError"): AMBIGUOUS,
    ("urllib3", "ResponseNotChunked"): PERMANENT,
    ("urllib3", "ProtocolError"): _wrapper,  # "Connection aborted.", reset, ...
    ("urllib3", "IncompleteRead"): AMBIGUOUS,
    ("urllib3", "InvalidChunkLength"): AMBIGUOUS,
    ("urllib3", "ResponseError"): AMBIGUOUS,
    ("urllib3", "SSLError"): _tls,
    # -- aiohttp (ClientResponseError is decided by its status)
    ("aiohttp", "ClientConnectorCertificateError"): PERMANENT,
    ("aiohttp", "ClientConnectorError"): SAFE,  # refused, DNS, handshake, proxy connect
    ("aiohttp", "ConnectionTimeoutError"): SAFE,
    ("aiohttp", "SocketTimeoutError"): AMBIGUOUS,
    ("aiohttp", "ServerTimeoutError"): AMBIGUOUS,
    ("aiohttp", "ServerDisconnectedError"): AMBIGUOUS,
    ("aiohttp", "ServerFingerprintMismatch"): PERMANENT,
    ("aiohttp", "ClientConnectionResetError"): AMBIGUOUS,
    ("aiohttp", "ClientPayloadError"): AMBIGUOUS,
    ("aiohttp", "ClientOSError"): _os_error,  # by errno, else as a ClientConnectionError
    ("aiohttp", "ClientConnectionError"): AMBIGUOUS,
    ("aiohttp", "ClientError"): PERMANENT,  # InvalidURL, redirects, a response error
    # -- PostgreSQL: psycopg 3, psycopg2 (with an SQLSTATE, that decides first), asyncpg
    ("psycopg", "ConnectionTimeout"): SAFE,
    ("psycopg", "OperationalError"): _pg_operational,
    ("psycopg2", "OperationalError"): _pg_operational,
    ("psycopg_pool", "PoolTimeout"): SAFE,
    ("psycopg_pool", "TooManyRequests"): SAFE,
    # -- sqlite3
    ("sqlite3", "OperationalError"): _sqlite_operational,
    # -- SQLAlchemy
    ("sqlalchemy", "DBAPIError"): _sqlalchemy,
    ("sqlalchemy", "TimeoutError"): SAFE,  # no connection from the pool in time
    ("sqlalchemy", "DisconnectionError"): SAFE,  # found dead at checkout, before use
    # -- redis-py
    ("redis", "AuthenticationError"): PERMANENT,
    ("redis", "AuthorizationError"): PERMANENT,
    ("redis", "ExternalAuthProviderError"): PERMANENT,
    ("redis", "MaxConnectionsError"): SAFE,
    ("redis", "BusyLoadingError"): SAFE,
    ("redis", "TryAgainError"): SAFE,
    ("redis", "ClusterDownError"): SAFE,
    ("redis", "ReadOnlyError"): SAFE,  # a replica after failover refused the write
    ("redis", "TimeoutError"): _connecting,
    ("redis", "ConnectionError"): _connecting,
}


def library_kind(exc: BaseException, inner: Inner) -> Kind | None:
    """The kind the rules for the libraries above give, or None when none knows the error."""
    status = http_status(exc)
    if status is not None:
        return status_kind(status)
    kind = sqlstate_kind(exc)
    if kind is not None:
        return kind
    for cls in type(exc).__mro__:
        rule = RULES.get(_key(cls))
        if rule is None:
            continue
        if isinstance(rule, str):
            if rule == AMBIGUOUS and refused(exc):
                return SAFE
            return rule
        kind = rule(exc, inner)
        if kind is not None:
            return kind
    return None
