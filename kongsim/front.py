"""How nginx (OpenResty 1.25.3, Kong 3.9's) reads a request head, for the stand-in's HTTP front.

http.server's own parsing differs from nginx's where clients notice: it answers 431 past 100
headers and for a line over 64 KB, drops the connection with a traceback on a malformed
request line, and accepts control characters. This module follows nginx instead:

* the request line: src/http/ngx_http_parse.c ngx_http_parse_request_line (since nginx 1.21.1
  a space or control character in the target is a 400; a major version above 1 is a 505; an
  HTTP/0.9 request must be GET) and ngx_http_parse_complex_uri (a bad %-escape, %00, or a
  "/.." above the root is a 400);
* header lines: ngx_http_parse_header_line. A name with a character other than letters, digits,
  "-" and "_" is dropped (ignore_invalid_headers, on by default; Kong's templates leave it);
  "_" is valid because kong/templates/nginx_kong.lua sets `underscores_in_headers on;`; a space
  or control character in a name, a NUL in a value, or a folded line is a 400;
* buffers: src/http/ngx_http_request.c ngx_http_alloc_large_header_buffer with nginx's
  defaults, which Kong keeps (kong.conf.default nginx_http_client_header_buffer_size = 1k,
  nginx_http_large_client_header_buffers = 4 8k): a request line that does not fit one 8k
  buffer is a 414; a header line that does not, or a head that needs a fifth large buffer, is
  a 494, which Kong's error handler answers as 400 (kong/error_handlers.lua). There is no limit
  on the number of headers as such;
* ngx_http_process_request_header and the headers_in handlers: a second Host, Content-Length,
  Transfer-Encoding, Authorization, Expect, If-* or Content-Range, an invalid Host, an HTTP/1.1
  request without Host, an invalid Content-Length, Transfer-Encoding on HTTP/1.0 or with
  Content-Length are 400; a Transfer-Encoding other than chunked is 501; CONNECT and TRACE 405.

Error answers are what Kong gives: the statuses in nginx_kong.lua's error_page list go to
kong/error_handlers.lua (the body follows Accept, then Content-Type, then error_default_type
text/plain: "Bad request\\nrequest_id: ..."); others are nginx's own page.
"""
from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any, BinaryIO, Sequence

CLIENT_HEADER_BUFFER_SIZE = 1024  # client_header_buffer_size 1k
LARGE_BUFFERS, LARGE_BUFFER_SIZE = 4, 8192  # large_client_header_buffers 4 8k
REQUEST_HEADER_TOO_LARGE = 494  # NGX_HTTP_REQUEST_HEADER_TOO_LARGE

# src/http/ngx_http_request.c ngx_http_headers_in: headers nginx keeps one of (a second is 400)
UNIQUE_HEADERS = frozenset({"host", "if-modified-since", "if-unmodified-since", "if-match",
                            "if-none-match", "content-length", "content-range", "if-range",
                            "transfer-encoding", "expect", "authorization"})


class FrontError(Exception):
    """nginx finalizes the request with `status` before Kong's phases; `headers` are the header
    lines parsed so far (Kong's error handler reads Accept from them)."""

    def __init__(self, status: int, reason: str,
                 headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = list(headers)


@dataclasses.dataclass
class RequestHead:
    method: str
    target: str  # origin form, one character per byte (ISO-8859-1), as http.server gives it
    version: str  # "HTTP/1.1"
    headers: list[tuple[str, str]]
    keepalive: bool


# --- the request line -----------------------------------------------------------------------

def _is_ctl(ch: int) -> bool:
    return ch < 0x20 or ch == 0x7F


def parse_request_line(data: bytes, complete: bool = True) -> tuple[str, str, int, int] | None:
    """(method, target, major, minor) of a request line (its CRLF or LF included when
    `complete`), None if `data` is an incomplete line with no error yet; FrontError(400/505)."""
    bad = FrontError(400, "client sent invalid request")
    n = len(data)
    i = 0
    while i < n and data[i] in b"\r\n":  # sw_start skips CR/LF before the request line
        i += 1
    start = i
    while i < n and (0x41 <= data[i] <= 0x5A or data[i] in b"_-"):
        i += 1
    if i == n:
        if not complete:
            return None
        raise FrontError(400, "client sent invalid method")
    if data[i] != 0x20 or i == start:
        raise FrontError(400, "client sent invalid method")
    method = data[start:i].decode("ascii")
    while i < n and data[i] == 0x20:
        i += 1
    if i == n:
        if complete:
            raise bad
        return None
    uri_start = uri_end = -1
    target_prefix = b""
    ch = data[i]
    if ch == 0x2F:  # "/"
        uri_start = i
    elif (ch | 0x20) in range(0x61, 0x7B):  # an absolute URI: schema://host[:port]
        j = i
        while j < n and ((data[j] | 0x20) in range(0x61, 0x7B) or data[j] in b"0123456789+-."):
            j += 1
        tail = data[j:j + 3]
        if not b"://".startswith(tail):
            raise bad
        if len(tail) < 3:
            return _again(complete, bad)
        j += 3
        if j < n and data[j] == 0x5B:  # "[" an IP literal
            j += 1
            while j < n and data[j] != 0x5D:
                c = data[j]
                if not ((c | 0x20) in range(0x61, 0x7B) or c in b"0123456789:-._~!$&'()*+,;="):
                    raise bad
                j += 1
            if j == n:
                return _again(complete, bad)
            j += 1
        else:
            while j < n and ((data[j] | 0x20) in range(0x61, 0x7B) or data[j] in b"0123456789.-"):
                j += 1
        if j < n and data[j] == 0x3A:  # ":" port
            j += 1
            while j < n and data[j] in b"0123456789":
                j += 1
        if j == n:
            return _again(complete, bad)
        c = data[j]
        if c == 0x2F:
            uri_start = j
        elif c == 0x3F:  # "?": an empty path
            uri_start = j
            target_prefix = b"/"
        elif c == 0x20:
            uri_start = uri_end = j  # the target is "/"
            target_prefix = b"/"
        else:
            raise bad
        i = j
    else:
        raise bad
    minor = 9
    major = 0
    if uri_end < 0:
        i = uri_start
        while i < n and data[i] not in b" \r\n":
            if _is_ctl(data[i]):
                raise bad
            i += 1
        if i == n:
            return _again(complete, bad)
        uri_end = i
    target = (target_prefix + data[uri_start:uri_end]).decode("latin-1")
    while i < n and data[i] == 0x20:  # sw_http_09
        i += 1
    if i == n:
        return _again(complete, bad)
    if data[i] in b"\r\n":
        if method != "GET":
            raise FrontError(400, "client sent invalid method in HTTP/0.9 request")
        if _line_end(data, i, bad, complete) is None:
            return None
        return method, target, 0, 9
    for expected in b"HTTP/":
        if i == n:
            return _again(complete, bad)
        if data[i] != expected:
            raise bad
        i += 1
    if i == n:
        return _again(complete, bad)
    if not 0x31 <= data[i] <= 0x39:
        raise bad
    major = data[i] - 0x30
    i += 1
    if major > 1:
        raise FrontError(505, "client sent unsupported HTTP version")
    while i < n and data[i] != 0x2E:
        if not 0x30 <= data[i] <= 0x39:
            raise bad
        major = major * 10 + data[i] - 0x30
        if major > 1:
            raise FrontError(505, "client sent unsupported HTTP version")
        i += 1
    if i == n:
        return _again(complete, bad)
    i += 1  # "."
    if i == n:
        return _again(complete, bad)
    if not 0x30 <= data[i] <= 0x39:
        raise bad
    minor = data[i] - 0x30
    i += 1
    while i < n and 0x30 <= data[i] <= 0x39:
        if minor > 99:
            raise bad
        minor = minor * 10 + data[i] - 0x30
        i += 1
    while i < n and data[i] == 0x20:  # sw_spaces_after_digit
        i += 1
    if i == n:
        return _again(complete, bad)
    if data[i] not in b"\r\n":
        raise bad
    if _line_end(data, i, bad, complete) is None:
        return None
    return method, target, major, minor


def _again(complete: bool, err: FrontError) -> None:
    if complete:
        raise err
    return None


def _line_end(data: bytes, i: int, bad: FrontError, complete: bool) -> bool | None:
    """A CR must be followed by LF (sw_almost_done); LF ends the line."""
    if data[i] == 0x0D:
        if i + 1 == len(data):
            return _again(complete, bad)
        if data[i + 1] != 0x0A:
            raise bad
    return True


def check_complex_uri(target: str) -> None:
    """src/http/ngx_http_parse.c ngx_http_parse_complex_uri (merge_slashes on): the path up to
    the first "?" (or "#") is %-decoded; an escape that is not two hex digits, a %00, or a
    ".." segment above the root is a 400. A decoded "?", "#" or "%" is an ordinary character."""
    path = target
    for sep in ("?", "#"):
        cut = path.find(sep)
        if cut >= 0:
            path = path[:cut]
    if "%" in path:
        parts = path.split("%")
        decoded = [parts[0]]
        for part in parts[1:]:
            hexpart = part[:2]
            if len(hexpart) < 2 or any(c not in "0123456789abcdefABCDEF" for c in hexpart):
                raise FrontError(400, "client sent invalid request")
            byte = int(hexpart, 16)
            if byte == 0:
                raise FrontError(400, "client sent invalid request")
            decoded.append(chr(byte) + part[2:])
        path = "".join(decoded)
    if "." not in path:
        return
    depth = 0
    for segment in path.split("/")[1:]:
        if segment == "..":
            if depth == 0:
                raise FrontError(400, "client sent invalid request")
            depth -= 1
        elif segment not in ("", "."):
            depth += 1


# --- header lines ---------------------------------------------------------------------------

def _name_char(ch: int) -> bool:
    """ngx_http_parse_header_line's lowcase[] table, plus "_" (underscores_in_headers on)."""
    return (0x30 <= ch <= 0x39 or 0x41 <= ch <= 0x5A or 0x61 <= ch <= 0x7A
            or ch == 0x2D or ch == 0x5F)


def parse_header_line(data: bytes, complete: bool = True) -> tuple[bytes, bytes, bool] | None:
    """(name, value, invalid) of a header line with its CRLF/LF (b"", b"", False for the empty
    line that ends the head); None if incomplete without error; FrontError(400)."""
    bad = FrontError(400, "client sent invalid header line")
    n = len(data)
    if n == 0:
        return None
    if data[0] == 0x0D:  # sw_header_almost_done: only LF may follow
        if n == 1:
            return _again(complete, bad)
        if data[1] != 0x0A:
            raise bad
        return b"", b"", False
    if data[0] == 0x0A:
        return b"", b"", False
    first = data[0]
    if first <= 0x20 or first == 0x7F or first == 0x3A:  # a folded line, or no name
        raise bad
    invalid = False
    i = 0
    while i < n:
        ch = data[i]
        if ch == 0x3A or ch in b"\r\n":
            break
        if not _name_char(ch):
            if ch <= 0x20 or ch == 0x7F:
                raise bad
            invalid = True
        i += 1
    if i == n:
        return _again(complete, bad)
    name = data[:i]
    value = b""
    if data[i] == 0x3A:
        i += 1
        while i < n and data[i] == 0x20:
            i += 1
        start = i
        while i < n and data[i] not in b"\r\n":
            if data[i] == 0:
                raise bad
            i += 1
        if i == n:
            return _again(complete, bad)
        value = data[start:i].rstrip(b" ")
    # sw_almost_done: CRs, then LF
    while i < n and data[i] == 0x0D:
        i += 1
    if i == n:
        return _again(complete, bad)
    if data[i] != 0x0A:
        raise bad
    return name, value, invalid


def _valid_host(value: str) -> bool:
    """src/http/ngx_http_request.c ngx_http_validate_host."""
    dot_pos = None
    state = "usual"
    host_len = len(value)
    for i, ch in enumerate(value):
        if ch == ".":
            if dot_pos == i - 1:
                return False
            dot_pos = i
        elif ch == ":":
            if state == "usual":
                host_len = i
                state = "rest"
        elif ch == "[":
            if i == 0:
                state = "literal"
        elif ch == "]":
            if state == "literal":
                host_len = i + 1
                state = "rest"
        elif ch == "/" or ord(ch) <= 0x20 or ord(ch) == 0x7F:
            return False
    if dot_pos is not None and dot_pos == host_len - 1:
        host_len -= 1
    return host_len > 0


# --- the head -------------------------------------------------------------------------------

class _Buffers:
    """The header buffers a request head occupies (ngx_http_alloc_large_header_buffer): lines
    fill the 1k buffer; one that does not fit what is left moves, whole, into a new 8k buffer,
    of which there are 4."""

    def __init__(self) -> None:
        self.free = CLIENT_HEADER_BUFFER_SIZE
        self.large = 0

    def fits(self, length: int) -> bool:
        if length <= self.free:
            self.free -= length
            return True
        if self.large == LARGE_BUFFERS or length > LARGE_BUFFER_SIZE:
            return False
        self.large += 1
        self.free = LARGE_BUFFER_SIZE - length
        return True


def read_request_head(rfile: BinaryIO) -> RequestHead | None:
    """Read one request head from `rfile`; None when the client closed before a complete one
    (nginx answers nothing then); FrontError for what nginx refuses. A socket timeout
    (client_header_timeout) propagates."""
    buffers = _Buffers()
    while True:
        line = rfile.readline(LARGE_BUFFER_SIZE + 1)
        if not line:
            return None
        if line not in (b"\r\n", b"\n"):
            break
    if not line.endswith(b"\n"):
        if len(line) <= LARGE_BUFFER_SIZE:
            return None  # the client closed mid-line
        parse_request_line(line[:LARGE_BUFFER_SIZE], complete=False)  # an error comes first
        raise FrontError(414, "client sent too long URI")
    if not buffers.fits(len(line)):
        parse_request_line(line[:LARGE_BUFFER_SIZE], complete=False)
        raise FrontError(414, "client sent too long URI")
    parsed = parse_request_line(line)
    assert parsed is not None
    method, target, major, minor = parsed
    check_complex_uri(target)
    version = f"HTTP/{major}.{minor}"
    headers: list[tuple[str, str]] = []
    if (major, minor) == (0, 9):
        return RequestHead(method, target, "HTTP/0.9", headers, keepalive=False)
    seen: set[str] = set()
    connection = None
    while True:
        line = rfile.readline(LARGE_BUFFER_SIZE + 1)
        if not line:
            return None
        if not line.endswith(b"\n") and len(line) <= LARGE_BUFFER_SIZE:
            return None
        if not line.endswith(b"\n") or not buffers.fits(len(line)):
            try:
                parse_header_line(line[:LARGE_BUFFER_SIZE], complete=False)
            except FrontError as exc:
                exc.headers = headers
                raise
            raise FrontError(REQUEST_HEADER_TOO_LARGE, "client sent too long header line",
                             headers)
        try:
            result = parse_header_line(line)
        except FrontError as exc:
            exc.headers = headers
            raise
        assert result is not None
        raw_name, raw_value, invalid = result
        if not raw_name and not raw_value and line in (b"\r\n", b"\n"):
            break
        if invalid:
            continue  # ignore_invalid_headers: "client sent invalid header line", dropped
        name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
        lname = name.lower()
        if lname in UNIQUE_HEADERS:
            if lname in seen:
                raise FrontError(400, f'client sent duplicate header line: "{name}"', headers)
            seen.add(lname)
            if lname == "host" and not _valid_host(value):
                raise FrontError(400, "client sent invalid host header", headers)
        if lname == "connection":
            low = value.lower()
            connection = "close" if "close" in low else "keep-alive" if "keep-alive" in low \
                else connection
        headers.append((name, value))
    _check_head(method, major, minor, headers)
    keepalive = (major, minor) > (1, 0) if connection is None else connection == "keep-alive"
    return RequestHead(method, target, version, headers, keepalive)


def _check_head(method: str, major: int, minor: int, headers: list[tuple[str, str]]) -> None:
    """ngx_http_process_request_header."""
    first: dict[str, str] = {}
    for k, v in headers:
        first.setdefault(k.lower(), v)
    if "host" not in first and (major, minor) > (1, 0):
        raise FrontError(400, 'client sent HTTP/1.1 request without "Host" header', headers)
    length = first.get("content-length")
    if length is not None and (not length or not length.isdigit() or not length.isascii()
                               or int(length) >= 2 ** 63):
        raise FrontError(400, 'client sent invalid "Content-Length" header', headers)
    te = first.get("transfer-encoding")
    if te is not None:
        if (major, minor) < (1, 1):
            raise FrontError(400, 'client sent HTTP/1.0 request with "Transfer-Encoding" header',
                             headers)
        if te.lower() != "chunked":
            raise FrontError(501, 'client sent unknown "Transfer-Encoding"', headers)
        if length is not None:
            raise FrontError(400, 'client sent "Content-Length" and "Transfer-Encoding" headers '
                             "at the same time", headers)
    if method in ("CONNECT", "TRACE"):
        raise FrontError(405, f"client sent {method} method", headers)


# --- error answers --------------------------------------------------------------------------

# kong/templates/nginx_kong.lua error_page: these go to kong/error_handlers.lua
KONG_HANDLED = frozenset({400, 404, 405, 408, 411, 412, 413, 414, 417, 494, 500, 502, 503, 504})
# kong/error_handlers.lua BODIES
BODIES = {400: "Bad request", 404: "Not found", 405: "Method not allowed", 408: "Request timeout",
          411: "Length required", 412: "Precondition failed", 413: "Payload too large",
          414: "URI too long", 417: "Expectation failed",
          494: "Request header or cookie too large", 500: "An unexpected error occurred",
          502: "An invalid response was received from the upstream server",
          503: "The upstream server is currently unavailable",
          504: "The upstream server is timing out"}
# kong/tools/http.lua MIME_TYPES and ERROR_TEMPLATES
_MIME = {"application/grpc": "", "text/html": "text/html; charset=utf-8",
         "application/json": "application/json; charset=utf-8",
         "text/plain": "text/plain; charset=utf-8",
         "application/xml": "application/xml; charset=utf-8",
         "application": "application/json; charset=utf-8", "text": "text/plain; charset=utf-8",
         "default": "application/json; charset=utf-8"}
_TEMPLATES = {
    "": "",
    "text/html; charset=utf-8": ('<!doctype html>\n<html>\n  <head>\n    <meta charset="utf-8">\n'
                                 "    <title>Error</title>\n  </head>\n  <body>\n"
                                 "    <h1>Error</h1>\n    <p>%s.</p>\n    <p>request_id: %s</p>\n"
                                 "  </body>\n</html>\n"),
    "application/json; charset=utf-8": '{\n  "message":"%s",\n  "request_id":"%s"\n}',
    "text/plain; charset=utf-8": "%s\nrequest_id: %s\n",
    "application/xml; charset=utf-8": ('<?xml version="1.0" encoding="UTF-8"?>\n<error>\n'
                                       "  <message>%s</message>\n  <requestid>%s</requestid>\n"
                                       "</error>\n"),
}
_ACCEPT = re.compile(r"""
    ((?:[a-z0-9][a-z0-9\-!#$&^_+.]+|\*) / (?:[a-z0-9][a-z0-9\-!#$&^_+.]+|\*))
    (?:
      \s*;\s*
      q = ( 1(?:\.0{0,3}|) | 0(?:\.\d{0,3}|) )
      | \s*;\s* [a-z0-9][a-z0-9\-!#$&^_+.]+ (?:=[^;]*|)
    )*""", re.X | re.I)
ERROR_DEFAULT_TYPE = "text/plain"  # kong/templates/kong_defaults.lua error_default_type


def _mime_type(content_header: str) -> str:
    """kong/tools/http.lua get_mime_type (use_default)."""
    content_header = content_header.strip().split(";")[0]
    entries = content_header.split("/")
    mime = None
    if len(entries) > 1:
        if entries[1] == "*":
            mime = _MIME["default"] if entries[0] == "*" else _MIME.get(entries[0])
        else:
            mime = _MIME.get(content_header)
    return mime if mime is not None else _MIME["default"]


def _response_type(accept: str) -> str:
    """kong/tools/http.lua get_response_type."""
    content_type = _MIME["default"]
    max_quality = 0.0
    for value in accept.split(","):
        m = _ACCEPT.match(value.strip())
        if m:
            q = float(m.group(2)) if m.group(2) else 1.0
            if q > max_quality:
                max_quality = q
                content_type = _mime_type(m.group(1))
    return content_type


def error_response(status: int, headers: Sequence[tuple[str, str]] = (),
                   request_id: str | None = None) -> tuple[int, list[tuple[str, str]], bytes]:
    """(status, headers, body) of nginx's answer to a request it refused before Kong's phases."""
    request_id = request_id or uuid.uuid4().hex
    if status not in KONG_HANDLED:
        reason = {501: "Not Implemented", 505: "HTTP Version Not Supported"}.get(status, "Error")
        # src/http/ngx_http_special_response.c, server_tokens off (OpenResty's name)
        body = (f"<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
                f"<center><h1>{status} {reason}</h1></center>\r\n"
                "<hr><center>openresty</center>\r\n</body>\r\n</html>\r\n").encode()
        return status, [("Content-Type", "text/html")], body
    first: dict[str, str] = {}
    for k, v in headers:
        first.setdefault(k.lower(), v)
    accept = first.get("accept")
    if accept is None:
        accept = first.get("content-type", ERROR_DEFAULT_TYPE)
    message = BODIES[status]
    if status == REQUEST_HEADER_TOO_LARGE:
        status = 400  # "Kong is obliged to convert it back to `400 Bad Request`"
    out: list[tuple[str, str]] = []
    if accept.find("application/grpc") == 0:
        body = json.dumps({"message": message}).encode()
        out.append(("Content-Type", "application/json; charset=utf-8"))
    else:
        mime = _response_type(accept)
        template: Any = _TEMPLATES.get(mime, "")
        body = (template % (message, request_id) if template else "").encode()
        out.append(("Content-Type", mime))
    out.append(("X-Kong-Request-Id", request_id))
    return status, out, body
