"""llm-semantic-cache observability and the openai embeddings provider, end to end.

One `aigov serve` (started by the stand-in, `--metrics-listen` on a free 127.0.0.1 port, `-v` so
debug logging is on too), real Redis with RediSearch, real MiniLM on the `local` route. The
`oai` routes embed through aigov.embeddings.OpenAIEmbedder against the mock LLM's /v1/embeddings,
with `embeddings.api_key: {vault://env/EMBEDDINGS_KEY}` resolved by the stand-in like Kong's env
vault. Checked:

- the Prometheus exposition counts exactly the traffic sent (ai_llm_requests_total{cache_status},
  ai_cache_fetch_latency / ai_cache_embeddings_latency observation counts, tokens saved);
- the key reaches the embeddings endpoint (the mock's auth fingerprint) and appears in no log
  line, no Redis value and no metric.
"""
from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from aigov.demo.run import metric_sum, scrape
from aigov.devredis import free_port
from aigov.mockllm import auth_fingerprint
from aigov.prices import default_prices, nano_to_usd
from kongsim.gateway import aigov_entries
from kongsim.process import PluginServerEntry
from kongsim.pytest_plugin import AIGOV_PLUGINS, GatewayHandle, make_prefix, start_gateway

REPO = Path(__file__).resolve().parent.parent
MODEL = "gpt-4o-mini"
EMBED_MODEL = "text-embedding-3-small"
LOCAL_EMBED = "all-MiniLM-L6-v2"
API_KEY = "sk-emb-" + uuid.uuid4().hex  # unique: any occurrence in a log can only be a leak
USER_KEY = "key-dana-observability"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.name, record.getMessage()))


def _entries(prefix: str, metrics_addr: str) -> list[PluginServerEntry]:
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return aigov_entries(AIGOV_PLUGINS, prefix, pythonpath=str(REPO), extra_env=env,
                         serve_args=["-v", "--metrics-listen", metrics_addr])


def _cache(redis_port: int, namespace: str, embeddings: dict[str, Any] | None = None,
           **conf: Any) -> dict[str, Any]:
    return {"name": "llm-semantic-cache", "config": {
        "embeddings": embeddings or {"provider": "local"},
        "vectordb": {"strategy": "redis", "namespace": namespace,
                     "redis": {"host": "127.0.0.1", "port": redis_port, "timeout_ms": 2000}},
        **conf}}


@pytest.fixture(scope="module")
def observed(redis_server: Any, mock_llm: Any) -> Iterator[dict[str, Any]]:
    if not redis_server.running:
        redis_server.start()
    redis_port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    ns = f"obs-{uuid.uuid4().hex[:6]}"
    oai = {"provider": "openai", "model": EMBED_MODEL, "url": f"{mock_llm.url}/v1/embeddings",
           "api_key": "{vault://env/EMBEDDINGS_KEY}", "timeout_ms": 2000}
    down = {**oai, "url": f"http://127.0.0.1:{free_port()}/v1/embeddings"}  # nothing listens there
    auth = {"name": "key-auth", "config": {"key_names": ["apikey"]}}
    routes = {
        "local": [_cache(redis_port, ns)],
        "oai": [_cache(redis_port, ns + "-oai", oai)],
        "oaisem": [_cache(redis_port, ns + "-oaisem", oai, exact_caching=False)],
        "oaidown": [_cache(redis_port, ns + "-oaidown", down)],
    }
    config = {"_format_version": "3.0",
              "consumers": [{"username": "dana", "keyauth_credentials": [{"key": USER_KEY}]}],
              "services": [{"name": "llm", "url": mock_llm.url, "routes": [
                  {"name": name, "paths": [f"/{name}"], "strip_path": True, "plugins": [auth] + plugins}
                  for name, plugins in routes.items()]}]}
    records = _Records()
    kongsim_logger = logging.getLogger("kongsim")
    old_level = kongsim_logger.level
    kongsim_logger.setLevel(logging.DEBUG)
    kongsim_logger.addHandler(records)
    prefix = make_prefix()
    metrics_port = free_port()
    gw = start_gateway(config, server=_entries(prefix, f"127.0.0.1:{metrics_port}"), prefix=prefix,
                       environ={**os.environ, "EMBEDDINGS_KEY": API_KEY})
    try:
        # load MiniLM in the plugin server before the measured traffic
        _post(gw, "local", _chat(f"warm-up {uuid.uuid4().hex}"))
        assert gw.wait_logs(20)
        yield {"gw": gw, "metrics_url": f"http://127.0.0.1:{metrics_port}/metrics", "records": records,
               "namespace": ns}
    finally:
        gw.close()
        kongsim_logger.removeHandler(records)
        kongsim_logger.setLevel(old_level)


def _chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


def _post(gw: GatewayHandle, route: str, body: Any, **headers: str) -> Any:
    kwargs: dict[str, Any] = {"body": body} if isinstance(body, bytes) else {"json": body}
    return gw.request("POST", f"/{route}/v1/chat/completions", headers={"apikey": USER_KEY, **headers},
                      timeout=60, **kwargs)


def test_prometheus_counts_match_the_traffic(observed: dict[str, Any]) -> None:
    gw, url = observed["gw"], observed["metrics_url"]
    before = scrape(url)
    sent: list[tuple[Any, str]] = []   # (request body, expected X-Cache-Status)
    for text in ("How many moons does Mars have?", "What is the speed of sound in air?",
                 "Who wrote the novel Moby Dick?"):
        sent.append((_chat(text), "Miss"))
    sent += [(_chat("How many moons does Mars have?"), "Hit"),          # exact layer
             (_chat("Who wrote the novel Moby Dick?"), "Hit"),          # exact layer
             (_chat("How many moons does the planet Mars have?"), "Hit"),  # semantic layer
             (b"{not json", "Bypass")]
    replies = []
    for body, _ in sent:
        replies.append(_post(gw, "local", body))
        assert gw.wait_logs(15)  # each miss is stored before the next lookup
    no_store = _post(gw, "local", _chat("Never keep this one"), **{"Cache-Control": "no-store"})
    assert gw.wait_logs(15)
    got = [r.header("X-Cache-Status") for r in replies] + [no_store.header("X-Cache-Status")]
    assert got == [want for _, want in sent] + ["Bypass"], got
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    mine = {"vector_db": "redis", "embeddings_model": LOCAL_EMBED}
    assert delta("ai_llm_requests_total", cache_status="miss", **mine) == 3
    assert delta("ai_llm_requests_total", cache_status="hit", **mine) == 3
    # the malformed body and the no-store request (ai_model "" and gpt-4o-mini)
    assert delta("ai_llm_requests_total", cache_status="bypass", **mine) == 2
    assert delta("ai_llm_requests_total", cache_status="failed", **mine) == 0
    # one fetch-latency observation per lookup, labelled by its outcome
    assert delta("ai_cache_fetch_latency_count", cache_status="miss", **mine) == 3
    assert delta("ai_cache_fetch_latency_count", cache_status="hit", **mine) == 3
    assert delta("ai_cache_fetch_latency_sum", **mine) > 0
    # embeddings: the three misses and the semantic hit; exact hits and bypasses embed nothing,
    # and a stored miss reuses its lookup vector
    assert delta("ai_cache_embeddings_latency_count", embeddings_model=LOCAL_EMBED) == 4
    assert delta("ai_cache_embeddings_latency_sum", embeddings_model=LOCAL_EMBED) > 0
    hits = [r for r, (_, want) in zip(replies, sent) if want == "Hit"]
    saved_prompt = sum(r.json()["usage"]["prompt_tokens"] for r in hits)
    saved_completion = sum(r.json()["usage"]["completion_tokens"] for r in hits)
    assert saved_prompt > 0 and saved_completion > 0
    assert delta("ai_cache_tokens_saved_total", ai_model=MODEL, token_type="prompt_tokens") == saved_prompt
    assert delta("ai_cache_tokens_saved_total", ai_model=MODEL, token_type="completion_tokens") == saved_completion
    # and what those tokens would have cost at the shipped table's price of the answering model
    price = default_prices().lookup(MODEL)
    expected_usd = sum(nano_to_usd(price.cost_nano(r.json()["usage"]["prompt_tokens"],
                                                   r.json()["usage"]["completion_tokens"])) for r in hits)
    assert expected_usd > 0
    assert delta("ai_cache_cost_saved_total", ai_model=MODEL) == pytest.approx(expected_usd, rel=1e-9)


def test_openai_embedder_with_vault_key(observed: dict[str, Any], mock_llm: Any, redis_server: Any) -> None:
    gw, url = observed["gw"], observed["metrics_url"]
    before = scrape(url)
    seen_before = {r["request_id"] for r in list(mock_llm.stats.recent)}

    q = "What is the tallest mountain in Africa?"
    first = _post(gw, "oai", _chat(q))
    assert first.status == 200 and first.header("X-Cache-Status") == "Miss"
    assert gw.wait_logs(15)
    assert _post(gw, "oai", _chat(q)).header("X-Cache-Status") == "Hit"
    # the vectors come from the endpoint: identical text is a semantic hit at similarity ~1 ...
    assert _post(gw, "oaisem", _chat(q)).header("X-Cache-Status") == "Miss"
    assert gw.wait_logs(15)
    sem = _post(gw, "oaisem", _chat(q))
    assert sem.header("X-Cache-Status") == "Hit" and float(sem.header("X-Cache-Similarity")) >= 0.9999
    # ... and they are the mock's hash vectors, not MiniLM: a close paraphrase is far away
    para = _post(gw, "oaisem", _chat("Which is the tallest mountain in Africa?"))
    assert para.header("X-Cache-Status") == "Miss"
    assert gw.wait_logs(15)

    embeds = [r for r in list(mock_llm.stats.recent)
              if r["path"] == "/v1/embeddings" and r["request_id"] not in seen_before]
    # oai: the miss (exact hit embeds nothing); oaisem: miss, hit, paraphrase
    assert len(embeds) == 4, embeds
    assert {(r["auth_header"], r["auth_sha256"], r["status"]) for r in embeds} == \
        {("authorization", auth_fingerprint(f"Bearer {API_KEY}"), 200)}
    after = scrape(url)
    assert metric_sum(after, "ai_cache_embeddings_latency_count", embeddings_model=EMBED_MODEL) - \
        metric_sum(before, "ai_cache_embeddings_latency_count", embeddings_model=EMBED_MODEL) == 4

    # the endpoint down: Failed, the request still answered (fail open)
    down = _post(gw, "oaidown", _chat(q))
    assert down.status == 200 and down.header("X-Cache-Status") == "Failed"
    assert down.json()["choices"][0]["message"]["content"]
    assert gw.wait_logs(15)

    # the key is nowhere: no log line (the stand-in would mask it as [REDACTED], so neither may
    # appear in what the plugin server or the PDK log wrote), no Redis value, no metric
    lines = observed["records"].lines
    server_lines = [m for name, m in lines if name == "kongsim.process" and m.startswith("[llm-")]
    kong_log_lines = [m for name, m in lines if name == "kongsim.pdk"]
    assert server_lines, "the plugin server's output was not captured"
    assert any("embeddings" in m and "failed" in m for m in kong_log_lines), kong_log_lines[-5:]
    assert not [m for _, m in lines if API_KEY in m]
    assert not [m for m in server_lines + kong_log_lines if "[REDACTED]" in m]
    client = redis_server.client()
    try:
        for key in client.scan_iter(match=f"aigov:cache:{observed['namespace']}-oai*", count=500):
            kind = client.type(key)
            raw = client.get(key) if kind == b"string" else b"".join(
                v for k, v in client.hgetall(key).items() if k != b"vec")
            assert API_KEY.encode() not in raw
    finally:
        client.close()
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        assert API_KEY not in resp.read().decode()
