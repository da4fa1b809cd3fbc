"""What the viewer server checks before it acts on a request.

    hosts = allowed_hosts("127.0.0.1", extra=["mybox.lan"])
    check_host(headers, hosts)          # DNS rebinding: the Host header must be a name we serve
    check_write(headers)                # writes: a JSON content type from this very origin
    length = body_length(headers, max_body)           # Content-Length checked and capped
    with budget.hold(length):                         # bytes held across all connections
        body = read_json_body(rfile, length)          # depth capped
    public_message(text, root)          # what a client sees names no absolute path

A web page the user visits can make the browser send requests to 127.0.0.1, and a domain
rebound to 127.0.0.1 can even read the answers. The Host check stops the second; the
content-type and Origin/Referer checks stop cross-site form posts and `fetch` calls (a JSON
content type needs a CORS preflight, which this server never grants). Each body is capped,
and so is the sum of the bodies being held at once (BodyBudget): 64 connections each sending
the largest body allowed cannot make the server hold 64 of them. Each check raises
ViewerError with the status to answer.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import Message
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from wiremap.attribution.viewer.graphfile import ViewerError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
MAX_JSON_DEPTH = 32
BODY_WAIT_S = 2.0  # a body that does not fit the budget waits this long, then gets 503
RETRY_AFTER_S = 1  # what that 503 tells the client to wait
_PORT = re.compile(r"[0-9]{1,5}")
_LENGTH = re.compile(r"[0-9]{1,15}")
# an absolute path's folders ("/home/u/graphs/", "C:\\Users\\u\\"): shown as "…/"
_POSIX_DIRS = re.compile(r"(?<![\w.~:/-])/(?:[^\s/'\"(),;:]+/)+")
_WINDOWS_DIRS = re.compile(r"\b[A-Za-z]:\\(?:[^\s\\'\"(),;:]+\\)+")


def split_host(value: str) -> tuple[str, int | None] | None:
    """(host, port) of a Host header or URL netloc, lowercased, no brackets; None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep:
            return None
    else:
        host, _, port = value.partition(":")
        rest = f":{port}" if port or value.endswith(":") else ""
    if rest and not (rest.startswith(":") and _PORT.fullmatch(rest[1:])):
        return None
    host = host.rstrip(".")
    return (host, int(rest[1:]) if rest else None) if host else None


def allowed_hosts(bound: str, extra: tuple[str, ...] | list[str] = ()) -> frozenset[str]:
    """Host names this server answers to: loopback names, the bound host, and `extra`."""
    names = set(LOOPBACK_NAMES)
    for name in (bound, *extra):
        parsed = split_host(name if ":" not in name or name.startswith("[") else f"[{name}]")
        if name not in WILDCARD_HOSTS and parsed:
            names.add(parsed[0])
    return frozenset(names)


def check_host(headers: Message, allowed: frozenset[str]) -> tuple[str, int | None]:
    """The request's (host, port); refuses a missing, repeated or unknown Host header."""
    values = headers.get_all("Host") or []
    if len(values) != 1:
        raise ViewerError(400, "send exactly one Host header")
    parsed = split_host(values[0])
    if parsed is None:
        raise ViewerError(400, "malformed Host header")
    if parsed[0] not in allowed:
        raise ViewerError(
            403,
            f"this server does not answer to the host name {parsed[0][:100]!r}; open it as "
            "http://127.0.0.1:<port>/ or start it with --allow-host NAME",
        )
    return parsed


def check_write(headers: Message, host: tuple[str, int | None]) -> None:
    """A write must carry a JSON body and, from a browser, come from this server's own page."""
    ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ViewerError(415, "send the body with Content-Type: application/json")
    if (headers.get("Sec-Fetch-Site") or "").lower() == "cross-site":
        raise ViewerError(403, "cross-site requests are refused")
    for header in ("Origin", "Referer"):
        value = headers.get(header)
        if value is None:
            continue
        if not _same_origin(value, host):
            raise ViewerError(403, f"refused a write from another origin ({header} header)")
        return  # Origin decides when present; Referer only when the browser sent no Origin


def _same_origin(url: str, host: tuple[str, int | None]) -> bool:
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return False
    other = split_host(parts.netloc) if parts.scheme == "http" else None
    if other is None:
        return False  # "null", https://, file:, or garbage: not this page
    return other[0] == host[0] and (other[1] or 80) == (host[1] or 80)


def body_length(headers: Message, max_body: int) -> int:
    """The request body's declared length, refused if missing, malformed or over `max_body`."""
    if headers.get("Transfer-Encoding") is not None:
        raise ViewerError(411, "chunked bodies are not accepted; send a Content-Length header")
    values = headers.get_all("Content-Length") or []
    if not values:
        raise ViewerError(411, "send a Content-Length header with the JSON body")
    if len(set(values)) != 1 or not _LENGTH.fullmatch(values[0].strip()):
        raise ViewerError(400, "malformed Content-Length header: give one decimal byte count")
    length = int(values[0])
    if length > max_body:
        raise ViewerError(413, f"request body over {max_body} bytes refused")
    return length


def read_json_body(rfile: BinaryIO, length: int) -> dict[str, Any]:
    """The JSON object in the next `length` bytes of `rfile` (see `parse_json_object`)."""
    raw = rfile.read(length)
    if len(raw) < length:
        raise ViewerError(400, "the body ended before its Content-Length")
    return parse_json_object(raw)


class BodyBudget:
    """The request-body bytes all connections together may hold at once.

    A body's declared length is reserved before a byte of it is read and given back when
    its request has been answered (the parsed body lives that long). A body that does not
    fit waits up to `wait` seconds for others to finish, then is refused with 503 and a
    Retry-After header; nothing of it has been read.
    """

    def __init__(self, total: int, wait: float = BODY_WAIT_S):
        self.total, self.wait, self.held = total, wait, 0
        self._free = threading.Condition()

    @contextmanager
    def hold(self, n: int) -> Iterator[None]:
        with self._free:
            if not self._free.wait_for(lambda: self.held + n <= self.total, self.wait):
                raise ViewerError(
                    503,
                    f"the server is busy reading other requests' bodies ({self.total} bytes "
                    f"at once at most); send this one again in {RETRY_AFTER_S} s",
                    retry_after=RETRY_AFTER_S,
                )
            self.held += n
        try:
            yield
        finally:
            with self._free:
                self.held -= n
                self._free.notify_all()


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A JSON object from bytes: no NaN/Infinity, nested at most MAX_JSON_DEPTH levels."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except json.JSONDecodeError as err:
        where = f"line {err.lineno}, column {err.colno}"
        raise ViewerError(400, f"malformed JSON body ({err.msg} at {where})") from None
    except (UnicodeDecodeError, ValueError):
        raise ViewerError(400, "malformed JSON body (not UTF-8, or NaN/Infinity)") from None
    except RecursionError:
        raise ViewerError(400, f"JSON body nested deeper than {MAX_JSON_DEPTH} levels") from None
    if json_depth(body) > MAX_JSON_DEPTH:
        raise ViewerError(400, f"JSON body nested deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(body, dict):
        raise ViewerError(400, "the JSON body must be an object")
    return body


def _refuse_constant(name: str):
    raise ValueError(name)


def json_depth(obj: Any) -> int:
    """Nesting depth of lists/dicts (a scalar is 0), without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def public_message(text: str, root: Path | None = None) -> str:
    """`text` with the served folder shown by name and other absolute paths' folders cut."""
    if root is not None:
        text = text.replace(str(root), root.name)
    text = _POSIX_DIRS.sub("…/", text)
    return _WINDOWS_DIRS.sub("…\\\\", text)
