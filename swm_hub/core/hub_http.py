"""The ways a request to the Hub fails, told apart by exception type, for the pull and push stages.

huggingface_hub 1.x sends its requests with httpx and 2.x with httpx2, a fork whose classes have the same
names. swm-hub depends on neither: the HTTP library here is the one that huggingface_hub's own
``HfHubHTTPError`` derives from, so these are the classes the installed huggingface_hub raises, whichever
of the two it is (and whatever else happens to be installed beside it).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import ModuleType

from huggingface_hub.errors import HfHubHTTPError

__all__ = ["HTTP_ERRORS", "chain", "http_status", "transport_reason"]


def _http_library() -> ModuleType:
    base = next(cls for cls in HfHubHTTPError.__mro__ if cls.__name__ == "HTTPError")
    return importlib.import_module(base.__module__.partition(".")[0])


_HTTP = _http_library()

HTTP_ERRORS: tuple[type[Exception], ...] = (_HTTP.HTTPError,)
"""Every failure of a request: no connection, no complete answer, an error status (``HfHubHTTPError`` too)."""
_UNREACHABLE: tuple[type[Exception], ...] = (
    _HTTP.ConnectError,
    _HTTP.ConnectTimeout,
    _HTTP.ProxyError,
    _HTTP.UnsupportedProtocol,
)
_TIMED_OUT: tuple[type[Exception], ...] = (_HTTP.TimeoutException,)
_DROPPED: tuple[type[Exception], ...] = (
    _HTTP.RemoteProtocolError,
    _HTTP.ReadError,
    _HTTP.WriteError,
    _HTTP.CloseError,
)


def transport_reason(error: BaseException, endpoint: str) -> str | None:
    """What to do about a request that got no complete answer; None for any other error.

    A connection that never opened (refused, no route, proxy, SSL) is checked first: ``ConnectTimeout`` is
    also a timeout, but what helps there is the network, not patience.
    """
    name = type(error).__name__
    if isinstance(error, _UNREACHABLE):
        return f"cannot reach the Hub at {endpoint} ({name}): check your connection, proxy and HF_ENDPOINT"
    if isinstance(error, _TIMED_OUT):
        return f"the Hub at {endpoint} did not answer in time ({name}): try again, on a steadier connection"
    if isinstance(error, _DROPPED):
        return (
            f"the connection to the Hub at {endpoint} was dropped mid-transfer ({name}): try again, on a "
            "steadier connection"
        )
    return None


def http_status(error: BaseException) -> int | None:
    """The status of an error answer (``HfHubHTTPError`` or the library's own status error), else None."""
    if isinstance(error, HfHubHTTPError | _HTTP.HTTPStatusError):
        status: int = error.response.status_code
        return status
    return None


def chain(error: BaseException) -> Iterator[BaseException]:
    """The error, then its causes and contexts: huggingface_hub wraps what went wrong in other errors.

    ``snapshot_download`` raises ``LocalEntryNotFoundError`` from the error that kept it from the Hub, and
    ``create_commit`` a ``RuntimeError`` from a failed upload; a retried request chains each attempt.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
