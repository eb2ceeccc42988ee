"""Kong's request-path normalisation and upstream-path escaping (kong/tools/uri.lua).

Kong routes on, and `kong.request.get_path()` returns, the raw path normalised as RFC 3986
section 6 says (kong/pdk/request.lua, kong/router/utils.lua `strip_uri_args`):

* a percent-encoded byte that is not a reserved character is decoded (`%70` is `p`, `%20` a
  space); a reserved one keeps its escape with the hex digits in upper case (`%2f` is `%2F`);
* dot segments are removed (`/a/./b/../c` is `/a/c`), also when written `%2E`;
* repeated slashes are merged (`//` is `/`).

`kong.request.get_raw_path()` returns the path as sent. The path Kong sends upstream is the
router's (normalised, after strip_path) with every byte outside a safe set percent-escaped
again (kong/runloop/handler.lua: `var.upstream_uri = escape(match_t.upstream_uri)`).

Paths here are `str` holding one character per byte (the request line read as ISO-8859-1, as
http.server does), so decoding `%C3%B8` gives the two bytes of UTF-8 `ø`.
"""
from __future__ import annotations

import re

# RFC 3986 reserved characters, plus "%" itself: their escapes are kept (in upper case).
RESERVED = frozenset(b"!*'();:@&=+$,/?%#[]")
_TRIPLET = re.compile(r"%([0-9A-Fa-f]{2})")
# What may go upstream unescaped: reserved, unreserved, "%" (an escape already made).
_UNSAFE = re.compile(r"[^!#$&'()*+,/:;=?@\[\]A-Za-z0-9\-_.~%]")


def _decode_triplet(m: re.Match[str]) -> str:
    byte = int(m.group(1), 16)
    return m.group(0).upper() if byte in RESERVED else chr(byte)


def normalize(path: str, merge_slashes: bool = True) -> str:
    """The path as Kong normalises it (see the module doc)."""
    if path in ("", "/"):
        return path
    if "%" in path:
        path = _TRIPLET.sub(_decode_triplet, path)
    if "." not in path and (not merge_slashes or "//" not in path):
        return path
    # RFC 3986 5.2.4, remove_dot_segments, with empty segments merged as Kong merges them.
    out: list[str] = []
    rest = path
    while rest:
        if rest.startswith("../"):
            rest = rest[3:]
        elif rest.startswith("./"):
            rest = rest[2:]
        elif rest.startswith("/./"):
            rest = rest[2:]
        elif rest == "/.":
            rest = "/"
        elif rest.startswith("/../") or rest == "/..":
            rest = rest[3:] or "/"
            if out:
                out.pop()
        elif rest in (".", ".."):
            rest = ""
        elif merge_slashes and rest.startswith("//"):
            rest = rest[1:]
        else:
            cut = rest.find("/", 1)
            if cut < 0:
                out.append(rest)
                rest = ""
            else:
                out.append(rest[:cut])
                rest = rest[cut:]
    return "".join(out)


def escape(path: str) -> str:
    """Percent-escape (upper-case hex) every byte that is not safe in a request line."""
    if not _UNSAFE.search(path):
        return path
    return _UNSAFE.sub(_escape_char, path)


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group(0)  # one byte, or a character of an in-process path beyond Latin-1 (its UTF-8)
    return "".join(f"%{b:02X}" for b in (ch.encode("latin-1") if ord(ch) < 256 else ch.encode("utf-8")))


def wire_text(path: str) -> str:
    """A byte-per-character path as the str a plugin server receives for Kong's Lua string:
    the bytes read as UTF-8, with undecodable bytes kept (surrogateescape, which kongsim.rpc
    packs back into the same bytes)."""
    try:
        return path.encode("latin-1").decode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return path  # already text (an in-process request built with non-Latin-1 characters)


def byte_form(text: str) -> str:
    """wire_text's inverse: text (a plugin's string, a kong.yml path) as the one-character-per-
    byte form request paths have here (its UTF-8 bytes, surrogate-escaped bytes as they were)."""
    return text.encode("utf-8", "surrogateescape").decode("latin-1")
