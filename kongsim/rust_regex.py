"""Kong's route regexes, which the ATC router (Kong/atc-router, the Rust `regex` crate) runs,
translated to Python's `re` at load, or refused there.

Kong 3.x's default router flavour, traditional_compatible, turns a regex path `~/re/(?<id>\\d+)`
into `http.path ~ "^/re/(?P<id>\\d+)"` (kong/router/transform.lua path_val_transform: the `~`
dropped, `^` prepended, every "?<" made "?P<") and a `~*` header value into a lower-cased
unanchored regex (get_expression). Kong accepts a regex path only if PCRE compiles it
(kong/db/schema/typedefs.lua validate_path_with_regexes: `ngx.re.find("", path, "aj")`) and the
Rust regex crate does too (kong/db/schema/entities/routes.lua validate_route: router.validate).

`translate` gives the Python pattern with the same meaning, and raises `Unsupported` with a
reason for what Kong refuses (look-around, backreferences, atomic groups, `\\Z`, ...) and for
what the stand-in cannot evaluate with `re` (Unicode classes `\\p{..}`, a flag group such as
`(?i)` in the middle of a pattern, `\\<`, `\\b{start}`, ...). What differs and is translated:
`\\z` (Python's `\\Z`), `$` outside multi-line mode (Rust's end of text, Python's `\\Z`: a
Python `$` also matches before a final newline), `\\x{..}` / `\\u{..}` / `\\U{..}`, ASCII classes
`[[:alpha:]]`, and a possessive-looking `a++` (PCRE accepts it, Rust reads it as `(a+)+`).
"""
from __future__ import annotations

import re
import warnings

__all__ = ["Unsupported", "translate", "compile_path", "compile_header"]


class Unsupported(ValueError):
    """The regex is refused by Kong, or cannot be evaluated by the stand-in (the message says)."""


KONG_REFUSES = "Kong refuses it at load (its Rust regex engine does not support {what})"
CANNOT = "valid for Kong, but the Kong stand-in (Python's re) cannot evaluate {what}"
PCRE_REFUSES = ("Kong refuses it at load (PCRE, which Kong's schema also compiles a route regex "
                "with, does not accept {what})")

# regex-syntax's ASCII classes, as Python class items (ranges)
_POSIX = {
    "alnum": "0-9A-Za-z", "alpha": "A-Za-z", "ascii": "\\x00-\\x7F", "blank": "\\t ",
    "cntrl": "\\x00-\\x1F\\x7F", "digit": "0-9", "graph": "!-~", "lower": "a-z",
    "print": " -~", "punct": "!-/:-@\\[-`{-~", "space": "\\t\\n\\x0B\\x0C\\r ", "upper": "A-Z",
    "word": "0-9A-Za-z_", "xdigit": "0-9A-Fa-f",
}
_COUNTED = re.compile(r"\{(\d+)(,(\d*))?\}")
_HEX = "0123456789abcdefABCDEF"


def translate(src: str) -> str:
    """The Python `re` pattern for a Rust regex (see the module doc); `Unsupported` if none."""
    return _Translator(src).run()


def compile_path(path: str) -> re.Pattern[str]:
    """A Kong regex path (with its leading `~`) as transform.lua hands it to the ATC router:
    `^` prepended as text (so in `~/a|/b` it anchors the first alternative only), for search()."""
    return _compile(path[1:].replace("?<", "?P<"), "^")


def compile_header(value: str) -> re.Pattern[str]:
    """A `~*` header value: transform.lua lower-cases the whole regex (value:lower()), which
    the router then searches for in the lower-cased header value."""
    return _compile(value[2:].lower())


def _compile(src: str, prefix: str = "") -> re.Pattern[str]:
    py = prefix + translate(src)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. FutureWarning: a set operation Rust reads
            return re.compile(py)
    except (re.error, FutureWarning, DeprecationWarning) as exc:
        raise Unsupported(f"not a regex the Kong stand-in can evaluate ({exc})") from None


class _Translator:
    def __init__(self, src: str) -> None:
        self.src = src
        self.i = 0
        self.out: list[str] = []
        self.multiline = [False]  # Rust's `m` flag, per open group
        self.groups: list[int] = []  # out index of each open group
        self.atom: int | None = None  # out index where the last repeatable item starts
        self.repeated = False  # the last item already carries a quantifier

    def run(self) -> str:
        src = self.src
        while self.i < len(src):
            c = src[self.i]
            if c == "\\":
                frag, assertion = self._escape(in_class=False)
                self._item(frag, repeatable=not assertion)
            elif c == "[":
                self._item(self._class())
            elif c == "(":
                self._open()
            elif c == ")":
                if not self.groups:
                    raise Unsupported("unbalanced ')'")
                start = self.groups.pop()
                self.multiline.pop()
                self.out.append(")")
                self.i += 1
                self.atom, self.repeated = start, False
            elif c == "|":
                self.out.append("|")
                self.i += 1
                self.atom, self.repeated = None, False
            elif c in "*+?{":
                self._quantifier()
            elif c == "$":
                # Rust: end of text (or of a line under `m`); Python's `$` also matches before
                # a final "\n", its `\Z` does not
                self.out.append("$" if self.multiline[-1] else r"\Z")
                self.i += 1
                self.atom, self.repeated = None, False
            elif c == "^":
                self.out.append("^")
                self.i += 1
                self.atom, self.repeated = None, False
            else:
                self.i += 1
                self._item(c)
        if self.groups:
            raise Unsupported("unclosed group '('")
        return "".join(self.out)

    def _item(self, frag: str, repeatable: bool = True) -> None:
        self.atom = len(self.out) if repeatable else None
        self.repeated = False
        self.out.append(frag)

    # --- groups ----------------------------------------------------------------------------
    def _open(self) -> None:
        src, i = self.src, self.i
        multiline = self.multiline[-1]
        if not src.startswith("(?", i):
            frag, self.i = "(", i + 1
        elif src.startswith("(?P<", i) and not src.startswith(("(?P<=", "(?P<!"), i):
            end = src.find(">", i)
            if end < 0:
                raise Unsupported("unclosed group name")
            frag, self.i = src[i:end + 1], end + 1
        elif src.startswith("(?<", i) and not src.startswith(("(?<=", "(?<!"), i):
            # Rust's other spelling of a named group (a header regex; paths had "?<" replaced)
            end = src.find(">", i)
            if end < 0:
                raise Unsupported("unclosed group name")
            frag, self.i = "(?P<" + src[i + 3:end + 1], end + 1
        elif src.startswith("(?:", i):
            frag, self.i = "(?:", i + 3
        elif src.startswith(("(?=", "(?!", "(?<=", "(?<!", "(?P<=", "(?P<!"), i):
            raise Unsupported(KONG_REFUSES.format(what="look-around assertions"))
        elif src.startswith(("(?P=", "(?P>", "(?&", "(?R)", "(?(", "(?+"), i) or \
                re.compile(r"\(\?\d").match(src, i):
            raise Unsupported(KONG_REFUSES.format(what="backreferences, recursion or "
                                                  "conditionals"))
        elif src.startswith("(?>", i):
            raise Unsupported(KONG_REFUSES.format(what="atomic groups"))
        elif src.startswith("(?#", i):
            raise Unsupported(KONG_REFUSES.format(what="comment groups"))
        else:
            m = re.compile(r"\(\?([A-Za-z-]*)([:)])").match(src, i)
            if m is None:
                raise Unsupported(f"unsupported group syntax at {src[i:i + 4]!r}")
            if m.group(2) == ")":
                raise Unsupported(CANNOT.format(
                    what=f"an inline flag group such as ({m.group(0)[1:]} in the middle of a "
                         "pattern (a Kong regex path always starts with ~/); write a scoped "
                         f"group instead, e.g. (?{m.group(1)}:...)"))
            flags, multiline = self._flags(m.group(1), multiline)
            frag, self.i = f"(?{flags}:", m.end()
        self.groups.append(len(self.out))
        self.multiline.append(multiline)
        self.out.append(frag)
        self.atom, self.repeated = None, False

    @staticmethod
    def _flags(spec: str, multiline: bool) -> tuple[str, bool]:
        on, _, off = spec.partition("-")
        for ch in on + off:
            if ch not in "imsUuRx":
                raise Unsupported(KONG_REFUSES.format(what=f"the flag '{ch}'"))
        if "U" in on + off or "R" in on + off or "x" in on + off:
            raise Unsupported(CANNOT.format(what="the flags U (swap greed), R (CRLF mode) or "
                                            "x (verbose)"))
        if "u" in off:
            raise Unsupported(CANNOT.format(what="(?-u:...), Rust's byte-oriented matching"))
        on = on.replace("u", "")  # Unicode mode is the default on both sides
        if "m" in on:
            multiline = True
        if "m" in off:
            multiline = False
        return on + ("-" + off if off else ""), multiline

    # --- quantifiers -----------------------------------------------------------------------
    def _quantifier(self) -> None:
        src = self.src
        if src[self.i] == "{":
            m = _COUNTED.match(src, self.i)
            if m is None:
                raise Unsupported(KONG_REFUSES.format(
                    what="a '{' that starts no counted repetition {n}, {n,} or {n,m} (escape "
                         "a literal one as \\{)"))
            q, self.i = m.group(0), m.end()
        else:
            q, self.i = src[self.i], self.i + 1
        if self.atom is None:
            raise Unsupported("a repetition operator follows nothing repeatable")
        if self.repeated:
            # PCRE (Kong's other check) refuses a quantifier after a complete quantifier
            raise Unsupported(PCRE_REFUSES.format(what="a quantifier on a quantifier"))
        nxt = src[self.i] if self.i < len(src) else ""
        if nxt == "?":  # lazy
            q += "?"
            self.i += 1
            self.out.append(q)
        elif nxt == "+":
            # PCRE reads a possessive quantifier; Rust a repetition of the repetition, (a+)+
            self.i += 1
            self.out[self.atom:] = ["(?:", *self.out[self.atom:], q, ")+"]
        else:
            self.out.append(q)
        self.repeated = True

    # --- escapes ---------------------------------------------------------------------------
    def _escape(self, in_class: bool) -> tuple[str, bool]:
        """(Python fragment, is an assertion) for the escape at self.i."""
        src, i = self.src, self.i
        if i + 1 >= len(src):
            raise Unsupported("a trailing backslash")
        c = src[i + 1]
        self.i = i + 2
        if c in "dDsSwW" or c in "aftnrv":
            return "\\" + c, False
        if c == "x" or c == "u" or c == "U":
            return self._codepoint(c), False
        if c in "pP":
            raise Unsupported(CANNOT.format(what=f"Unicode classes such as \\{c}{{L}}"))
        if not in_class:
            if c in "AB":
                return "\\" + c, True
            if c == "b":
                if src.startswith("{", self.i):
                    raise Unsupported(CANNOT.format(what="\\b{...} word-boundary assertions"))
                return "\\b", True
            if c == "z":
                return "\\Z", True  # Rust's end of text is Python's \Z
            if c == "Z":
                raise Unsupported(KONG_REFUSES.format(what="\\Z; \\z is the end of the text"))
            if c in "<>":
                raise Unsupported(CANNOT.format(what=f"the word-boundary assertion \\{c}"))
        if c.isdigit():
            raise Unsupported(KONG_REFUSES.format(what="backreferences or octal escapes"))
        if c.isascii() and c.isalpha():
            raise Unsupported(KONG_REFUSES.format(what=f"the escape \\{c}"))
        if not c.isascii():
            raise Unsupported(KONG_REFUSES.format(what=f"escaping the non-ASCII {c!r}"))
        return "\\" + c, False  # an escaped punctuation character: the character itself

    def _codepoint(self, kind: str) -> str:
        src = self.src
        if src.startswith("{", self.i):
            end = src.find("}", self.i)
            digits = src[self.i + 1:end] if end > 0 else ""
            if end < 0 or not digits or any(d not in _HEX for d in digits) or len(digits) > 8:
                raise Unsupported(f"a malformed \\{kind}{{...}} escape")
            self.i = end + 1
        else:
            width = {"x": 2, "u": 4, "U": 8}[kind]
            digits = src[self.i:self.i + width]
            if len(digits) != width or any(d not in _HEX for d in digits):
                raise Unsupported(f"a malformed \\{kind} escape (it takes {width} hex digits "
                                  "or braces)")
            self.i += width
        cp = int(digits, 16)
        if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
            raise Unsupported(KONG_REFUSES.format(what=f"the code point U+{cp:X}"))
        return f"\\U{cp:08X}"

    # --- classes ---------------------------------------------------------------------------
    def _class(self) -> str:
        src = self.src
        out = ["["]
        self.i += 1
        if src.startswith("^", self.i):
            out.append("^")
            self.i += 1
        if src.startswith("]", self.i):  # a leading ] is literal, in Rust as in Python
            out.append("\\]")
            self.i += 1
        while self.i < len(src):
            c = src[self.i]
            if c == "]":
                self.i += 1
                out.append("]")
                return "".join(out)
            if c == "\\":
                if src.startswith("\\b", self.i):
                    raise Unsupported(KONG_REFUSES.format(what="\\b in a class"))
                out.append(self._escape(in_class=True)[0])
                continue
            if c == "[":
                m = re.compile(r"\[:(\^?)([a-z]+):\]").match(src, self.i)
                if m and not m.group(1) and m.group(2) in _POSIX:
                    out.append(_POSIX[m.group(2)])
                    self.i = m.end()
                    continue
                raise Unsupported(CANNOT.format(what="nested or negated classes such as "
                                                "[a[b]] or [[:^alpha:]]"))
            if src.startswith(("&&", "--", "~~"), self.i):
                raise Unsupported(CANNOT.format(what="class set operations (&&, --, ~~)"))
            # escape what Python would read as a (future) set operation; a range's '-' stays
            out.append("\\" + c if c in "|&~" else c)
            self.i += 1
        raise Unsupported("unclosed character class '['")
