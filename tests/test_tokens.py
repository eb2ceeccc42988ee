"""aigov.tokens against real tiktoken with the offline encoding files."""
from __future__ import annotations

import base64
import gzip
import hashlib
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken_ext.openai_public as openai_public

from aigov import tokens

REPO = Path(__file__).resolve().parent.parent

# OpenAI cookbook "How to count tokens with tiktoken": these messages were billed by the API as
# 129 prompt tokens on gpt-3.5-turbo / gpt-4 and 124 on gpt-4o / gpt-4o-mini.
COOKBOOK_MESSAGES = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that translates "
                                  "corporate jargon into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant",
     "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user",
     "content": "Let's circle back when we have more bandwidth to touch base on opportunities for "
                "increased leverage."},
    {"role": "system", "name": "example_assistant",
     "content": "Let's talk later when we're less busy about how to do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the "
                                "client deliverable."},
]


def test_our_urls_and_hashes_are_the_ones_tiktoken_uses() -> None:
    source = Path(openai_public.__file__).read_text()
    for spec in tokens.ENCODING_FILES.values():
        assert spec.url in source and spec.sha256 in source
    assert tokens.ENCODING_FILES["cl100k_base"].cache_name == "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"
    assert tokens.ENCODING_FILES["o200k_base"].cache_name == "fb374d419588a4632f3f557e76b4b70aebbca790"


def test_install_writes_verified_files_and_repairs_a_corrupt_one(tmp_path: Path) -> None:
    target = tokens.install_encodings(tmp_path)
    for spec in tokens.ENCODING_FILES.values():
        assert hashlib.sha256((target / spec.cache_name).read_bytes()).hexdigest() == spec.sha256
    corrupt = tmp_path / tokens.ENCODING_FILES["cl100k_base"].cache_name
    corrupt.write_bytes(b"garbage")
    tokens.install_encodings(tmp_path)
    assert hashlib.sha256(corrupt.read_bytes()).hexdigest() == tokens.ENCODING_FILES["cl100k_base"].sha256
    assert not list(tmp_path.glob("*.tmp"))


def test_tiktoken_loads_from_our_cache_with_downloads_disabled(tmp_path: Path) -> None:
    # A fresh process whose only source is the directory we populate: any download attempt raises.
    code = (
        "import tiktoken.load as L\n"
        "def no_network(*a, **k): raise SystemExit('tiktoken tried to download')\n"
        "L.read_file = no_network\n"
        "from aigov import tokens\n"
        "print(tokens.ensure_offline_encodings())\n"
        "print(tokens.count_text('hello world', 'gpt-4'), tokens.count_text('hello world', 'gpt-4o'))\n"
    )
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "fresh"), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    cache_dir, counts = result.stdout.splitlines()
    assert cache_dir == str(tmp_path / "fresh")
    assert counts == "2 2"


def test_default_cache_dir_without_home_is_private_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    # Kong spawns the plugin server with a near-empty environment.
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    path = tokens._default_cache_dir()
    assert str(path).startswith("/tmp") and str(os.getuid()) in path.name


def test_shipped_gz_matches_tiktoken_hash() -> None:
    for spec in tokens.ENCODING_FILES.values():
        data = gzip.decompress(tokens._shipped_file(spec.name).read_bytes())
        assert hashlib.sha256(data).hexdigest() == spec.sha256


@pytest.mark.parametrize("model, encoding", [
    ("gpt-4o", "o200k_base"), ("gpt-4o-2024-08-06", "o200k_base"), ("gpt-4o-mini", "o200k_base"),
    ("chatgpt-4o-latest", "o200k_base"), ("gpt-4.1", "o200k_base"), ("gpt-4.1-nano-2025-04-14", "o200k_base"),
    ("gpt-5", "o200k_base"), ("gpt-5-mini", "o200k_base"), ("gpt-5.1", "o200k_base"),
    ("o1", "o200k_base"), ("o1-mini", "o200k_base"), ("o3-mini-2025-01-31", "o200k_base"),
    ("o4-mini", "o200k_base"), ("openai/gpt-4o", "o200k_base"), ("ft:gpt-4o-mini:org::abc", "o200k_base"),
    ("gpt-4", "cl100k_base"), ("gpt-4-0613", "cl100k_base"), ("gpt-4-turbo", "cl100k_base"),
    ("gpt-3.5-turbo", "cl100k_base"), ("gpt-3.5-turbo-0125", "cl100k_base"), ("gpt-35-turbo", "cl100k_base"),
    ("text-embedding-3-small", "cl100k_base"), ("text-embedding-3-large", "cl100k_base"),
    ("GPT-4O", "o200k_base"),
    # documented default for unknown or missing model names
    ("llama-3-70b", "o200k_base"), ("", "o200k_base"), (None, "o200k_base"), (42, "o200k_base"),
])
def test_encoding_choice(model: object, encoding: str) -> None:
    assert tokens.encoding_for(model).name == encoding


def test_encoding_choice_agrees_with_tiktoken_for_known_models() -> None:
    import tiktoken

    for model in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-5", "o1", "o3", "gpt-4", "gpt-3.5-turbo",
                  "text-embedding-3-small", "gpt-4-0613", "gpt-4o-2024-05-13"):
        assert tokens.encoding_for(model).name == tiktoken.encoding_for_model(model).name, model


def test_unhashable_model_does_not_raise() -> None:
    assert tokens.encoding_for({"bad": "model"}).name == tokens.DEFAULT_ENCODING  # type: ignore[arg-type]


def test_count_text_known_values() -> None:
    assert tokens.count_text("hello world", "gpt-4") == 2
    assert tokens.count_text("hello world", "gpt-4o") == 2
    assert tokens.encoding_for("gpt-4").encode("hello world") == [15339, 1917]
    assert tokens.encoding_for("gpt-4o").encode("hello world") == [24912, 2375]
    assert tokens.count_text("", "gpt-4o") == 0
    assert tokens.count_text(None, "gpt-4o") == 0
    assert tokens.count_text(b"hello world", "gpt-4o") == 2
    assert tokens.count_text(b"\xff\xfe", "gpt-4o") >= 1  # invalid UTF-8 is replaced, not raised


def test_special_token_text_is_counted_not_rejected() -> None:
    # tiktoken's encode() raises on "<|endoftext|>" in text; user prompts may contain it.
    assert tokens.count_text("<|endoftext|>", "gpt-4") > 1


def test_cookbook_chat_counts() -> None:
    assert tokens.count_chat_messages(COOKBOOK_MESSAGES, "gpt-4") == 129
    assert tokens.count_chat_messages(COOKBOOK_MESSAGES, "gpt-3.5-turbo-0125") == 129
    assert tokens.count_chat_messages(COOKBOOK_MESSAGES, "gpt-4o") == 124
    assert tokens.count_chat_messages(COOKBOOK_MESSAGES, "gpt-4o-mini") == 124


def test_chat_overhead_formula() -> None:
    one = [{"role": "user", "content": "hello world"}]
    # 3 per message + "user" (1) + "hello world" (2) + 3 reply priming
    assert tokens.count_chat_messages(one, "gpt-4o") == 3 + 1 + 2 + 3
    named = [{"role": "user", "name": "bob", "content": "hello world"}]
    assert tokens.count_chat_messages(named, "gpt-4o") == 9 + tokens.count_text("bob", "gpt-4o") + 1
    assert tokens.count_chat_messages([], "gpt-4o") == 3


def _png(width: int, height: int) -> str:
    header = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", width, height) + b"\x08\x02\0\0\0"
    return "data:image/png;base64," + base64.b64encode(header + b"\0" * 64).decode()


def test_image_tokens_follow_openais_published_examples() -> None:
    assert tokens.image_tokens("gpt-4o", 1024, 1024) == 765             # 4 tiles of 768 x 768
    assert tokens.image_tokens("gpt-4o", 2048, 4096) == 1105            # 768 x 1536: 6 tiles
    assert tokens.image_tokens("gpt-4o", 4096, 4096, "low") == 85
    assert tokens.image_tokens("gpt-4o-2024-08-06", 32, 32) == 85 + 170  # one tile, never scaled up
    assert tokens.image_tokens("gpt-4o-mini", 1024, 1024) == 2833 + 4 * 5667
    assert tokens.image_tokens("gpt-4.1-mini", 1024, 1024) == math.ceil(1024 * 1.62)   # 32 x 32 patches
    assert tokens.image_tokens("gpt-4.1-mini", 1800, 2400) == math.ceil(1452 * 1.62)   # scaled to 1452
    assert tokens.image_tokens("some-local-model", 1024, 1024) == 765   # unknown models: gpt-4o's rule


@pytest.mark.parametrize("model", ["gpt-4.1-mini", "o4-mini", "gpt-5-nano", "gpt-4o"])
@pytest.mark.parametrize("size", [(60000, 10), (100000, 1), (1, 100000), (1, 1)])
def test_a_thin_image_is_never_free(model: str, size: tuple[int, int]) -> None:
    # Scaled to fit 1536 patches, a side under 32 px rounded down to 0 whole patches: 0 tokens.
    assert tokens.image_tokens(model, *size) > 0


def test_image_sizes_are_read_from_data_url_headers() -> None:
    assert tokens.image_size(_png(640, 480)) == (640, 480)
    gif = b"GIF89a" + struct.pack("<HH", 300, 200) + b"\0" * 10
    assert tokens.image_size("data:image/gif;base64," + base64.b64encode(gif).decode()) == (300, 200)
    jpeg = (b"\xff\xd8\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0" + b"\0" * 9
            + b"\xff\xc0" + struct.pack(">HBHH", 17, 8, 1200, 1600) + b"\x03" + b"\0" * 9)
    assert tokens.image_size("data:image/jpeg;base64," + base64.b64encode(jpeg).decode()) == (1600, 1200)
    webp = b"RIFF" + b"\0" * 4 + b"WEBPVP8X" + b"\0" * 8 + (799).to_bytes(3, "little") + (599).to_bytes(3, "little")
    assert tokens.image_size("data:image/webp;base64," + base64.b64encode(webp).decode()) == (800, 600)
    for unknown in ("https://example.com/cat.png", "data:image/png;base64,!!!!", "data:text/plain,hi", 5, None):
        assert tokens.image_size(unknown) is None


def test_content_parts_count_their_text_and_an_estimate_per_image() -> None:
    # Before, an image counted 0: a stream without usage got any number of images for free.
    as_string = [{"role": "user", "content": "describe this picture please"}]

    def with_image(image: dict | str, kind: str = "image_url") -> list:
        return [{"role": "user", "content": [
            {"type": "text", "text": "describe this "}, {"type": kind, "image_url": image},
            {"type": "text", "text": "picture please"}]}]

    text_only = tokens.count_chat_messages(as_string, "gpt-4o")
    url = "https://example.com/cat.png"  # size unknown: taken as 1024 x 1024
    assert tokens.count_chat_messages(with_image({"url": url}), "gpt-4o") == text_only + 765
    assert tokens.count_chat_messages(with_image({"url": url, "detail": "low"}), "gpt-4o") == text_only + 85
    assert tokens.count_chat_messages(with_image({"url": _png(512, 512)}), "gpt-4o") == text_only + 85 + 170
    assert tokens.count_chat_messages(with_image({"url": url}), "gpt-4o-mini") == \
        tokens.count_chat_messages(as_string, "gpt-4o-mini") + 25501
    # A reviewer's case: 14 small images were reserved as 14 x 765 and refused on a 10k limit.
    small = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png(32, 32)}}] * 14}]
    assert tokens.count_chat_messages(small, "gpt-4o") == tokens.count_chat_messages(
        [{"role": "user", "content": []}], "gpt-4o") + 14 * 255
    # A part that is not an image (audio, a file, a malformed image) adds no estimate.
    for part in ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                 {"type": "file", "file": {"file_id": "f"}}, {"type": "image_url", "image_url": 5}):
        assert tokens.count_chat_messages([{"role": "user", "content": [part]}], "gpt-4o") == \
            tokens.count_chat_messages([{"role": "user", "content": []}], "gpt-4o")


def test_odd_messages_are_tolerated() -> None:
    odd = [None, "text", 3, {"content": None}, {"role": 5, "content": {"x": 1}},
           {"role": "assistant", "content": None,
            "tool_calls": [{"function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                           "junk", {"function": None}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    count = tokens.count_chat_messages(odd, "gpt-4o")
    # 4 dict messages × 3, priming 3, plus the texts that are there
    texts = ["assistant", "get_weather", "{\"city\":\"Paris\"}", "tool", "call_1", "sunny"]
    assert count == 4 * 3 + 3 + sum(tokens.count_text(t, "gpt-4o") for t in texts)
    assert tokens.count_chat_messages("not a list", "gpt-4o") == 3
    assert tokens.count_chat_messages(None, None) == 3


def test_tools_add_prompt_tokens_and_bad_tools_are_tolerated() -> None:
    messages = [{"role": "user", "content": "What's the weather like in Paris?"}]
    tools = [{"type": "function", "function": {
        "name": "get_current_weather", "description": "Get the current weather in a given location",
        "parameters": {"type": "object", "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "unit": {"type": "string", "description": "The unit of temperature to return",
                     "enum": ["celsius", "fahrenheit"]}},
            "required": ["location"]}}}]
    def expected_tool_tokens(model: str, func_init: int) -> int:
        # The cookbook's layout: "name:description", then per property "key:type:description"
        # (trailing periods dropped), with its per-function/property/enum constants.
        enc = tokens.encoding_for(model)
        n = lambda s: len(enc.encode(s))  # noqa: E731
        return (func_init + n("get_current_weather:Get the current weather in a given location") + 3
                + 3 + n("location:string:The city and state, e.g. San Francisco, CA")
                + 3 - 3 + 3 + n("celsius") + 3 + n("fahrenheit")
                + n("unit:string:The unit of temperature to return") + 12)

    base = tokens.count_chat_messages(messages, "gpt-4o")
    assert tokens.count_chat_messages(messages, "gpt-4o", tools=tools) - base == \
        expected_tool_tokens("gpt-4o", 7)
    assert (tokens.count_chat_messages(messages, "gpt-4", tools=tools)
            - tokens.count_chat_messages(messages, "gpt-4")) == expected_tool_tokens("gpt-4", 10)
    assert tokens.count_chat_messages(messages, "gpt-4o", tools=[None, "x", {"function": 3}]) == base
    assert tokens.count_chat_messages(messages, "gpt-4o", tools="nonsense") == base  # type: ignore[arg-type]


@pytest.mark.parametrize("body_bytes", [0, tokens.OFFLOAD_COUNT_BYTES + 1])
def test_off_loop_count_includes_tools_on_either_path(body_bytes: int) -> None:
    # Inline (small body) and on a thread (big body): the same count, tool definitions included.
    messages = [{"role": "user", "content": "what is the weather in Paris?"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    with_tools = tokens.count_chat_messages(messages, "gpt-4o", tools)
    assert with_tools > tokens.count_chat_messages(messages, "gpt-4o", None)
    assert tokens.count_chat_messages_off_loop(messages, "gpt-4o", tools, body_bytes) == with_tools


def test_billed_text_outside_message_content_is_counted() -> None:
    # Text a client can put where the provider reads it as prompt: each adds its own tokens.
    essay = "the quick brown fox jumps over the lazy dog " * 50
    n = len(tokens.encoding_for("gpt-4o").encode_ordinary(essay))
    base = [{"role": "user", "content": "hi"}]
    plain = tokens.count_chat_messages(base, "gpt-4o")
    legacy = base + [{"role": "assistant", "content": None,
                      "function_call": {"name": "f", "arguments": essay}}]
    refusal = base + [{"role": "assistant", "content": [{"type": "refusal", "refusal": essay}]}]
    assert tokens.count_chat_messages(legacy, "gpt-4o") >= plain + n
    assert tokens.count_chat_messages(refusal, "gpt-4o") >= plain + n
    assert tokens.count_chat_messages(base, "gpt-4o", None, [essay]) == plain + n
    nested = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "opts": {"type": "object", "properties": {"note": {"type": "string", "description": essay}}}}}}}]
    flat = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "opts": {"type": "object"}}}}}]
    assert tokens.count_tools(nested, "gpt-4o") >= tokens.count_tools(flat, "gpt-4o") + n
    # Keys besides type, description and enum add their JSON text, and only those.
    def weather(city: dict) -> list:
        return [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                 "parameters": {"type": "object", "properties": {"city": city,
                                                                 "unit": {"type": "string", "enum": ["c", "f"]}}}}}]
    simple = tokens.count_tools(weather({"type": "string", "description": "City"}), "gpt-4o")
    with_default = tokens.count_tools(weather({"type": "string", "description": "City", "default": "Paris"}), "gpt-4o")
    assert with_default == simple + len(tokens.encoding_for("gpt-4o").encode_ordinary('{"default": "Paris"}'))


def test_more_billed_shapes_are_counted() -> None:
    essay = "the quick brown fox jumps over the lazy dog " * 50
    n = len(tokens.encoding_for("gpt-4o").encode_ordinary(essay))
    base = [{"role": "user", "content": "hi"}]
    plain = tokens.count_chat_messages(base, "gpt-4o")
    refusal_field = base + [{"role": "assistant", "content": None, "refusal": essay}]
    object_args = base + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": {"text": essay}}}]}]
    assert tokens.count_chat_messages(refusal_field, "gpt-4o") >= plain + n
    assert tokens.count_chat_messages(object_args, "gpt-4o") >= plain + n
    defs = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "$defs": {"note": {"type": "string", "description": essay}}}}}]
    custom = [{"type": "custom", "custom": {"name": "grammar", "description": essay}}]
    bare = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert tokens.count_tools(defs, "gpt-4o") >= tokens.count_tools(bare, "gpt-4o") + n
    assert tokens.count_tools(custom, "gpt-4o") >= n
