"""The semantic cache's logic, shared by the plugin handler and `aigov eval cache`.

lookup: exact layer (hash of scope + normalized prompt) -> embedding -> KNN in the scope ->
threshold -> verifier. save: only complete, storable answers (see `storable`).
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from aigov import metrics
from aigov.cache.key import CacheScope
from aigov.cache.policies import CacheEntry, CacheStore, StoreUnavailable
from aigov.cache.verifier import verify
from aigov.embeddings import Embedder, EmbeddingError, embedder_from_config
from aigov.llm_response import LLMResponse
from aigov.schema import control_char_error, has_control_char

log = logging.getLogger("aigov.cache")

DEFAULT_THRESHOLD = 0.82   # chosen on STS-B train / GPTCache pairs with the verifier on (README)
# The finish reasons an OpenAI-compatible answer can carry (store_finish_reasons picks among them).
FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter", "function_call")
# The redis store keeps FLOAT16 vectors: the cosine of identical texts comes back up to ~1e-4
# below 1 (float32 in memory: 1e-7), and threshold 1.0 must still hit.
SIMILARITY_EPSILON = 2e-4
BEYOND_WINDOW = "beyond_model_window"  # refusal reason: the embedding model read only a prefix
SEARCH_K = 4               # candidates checked by the verifier before giving up
# The first query asks for the nearest entry only (a smaller reply, one entry to decode); the
# other SEARCH_K - 1 are fetched only when the verifier refuses it, so the outcome is the same
# as one query for SEARCH_K.
FIRST_K = 1
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class CacheConfigError(ValueError):
    """A plugin config the cache refuses. The handler catches it at instance start and answers
    every request with a JSON 500 naming the field (StartInstance failing would be opaque)."""


@dataclass
class CacheSettings:
    strategy: str = "memory"
    threshold: float = DEFAULT_THRESHOLD
    namespace: str = "aigov"
    max_entries: int = 10000
    max_memory_mb: int = 256
    redis: dict[str, Any] = field(default_factory=dict)
    embeddings: dict[str, Any] = field(default_factory=dict)
    cache_ttl: int = 300
    scope: str = "consumer"
    message_countback: int = 1
    exact_caching: bool = True
    verifier: bool = True
    store_finish_reasons: tuple[str, ...] = ("stop",)
    max_body_bytes: int = 1024 * 1024
    max_temperature: float | None = 1.0
    stop_on_failure: bool = False
    admin_path: str | None = None
    admin_key: str | None = None

    @classmethod
    def from_config(cls, conf: dict[str, Any] | None) -> "CacheSettings":
        conf = conf or {}
        vdb = conf.get("vectordb") or {}
        if not isinstance(vdb, dict):
            raise CacheConfigError("vectordb must be a record")
        if vdb.get("distance_threshold") is not None or conf.get("distance_threshold") is not None:
            raise CacheConfigError(
                "distance_threshold is not supported: vectordb.threshold is a cosine SIMILARITY in [0, 1] "
                "(higher is stricter); a Kong/RedisVL distance d corresponds to threshold 1 - d")
        threshold = vdb.get("threshold", DEFAULT_THRESHOLD)
        if threshold is None:
            threshold = DEFAULT_THRESHOLD
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise CacheConfigError(f"vectordb.threshold must be a number, got {threshold!r}")
        if not 0.0 <= float(threshold) <= 1.0:
            raise CacheConfigError(
                f"vectordb.threshold {threshold} is outside [0, 1]: it is a cosine similarity (higher is "
                "stricter), not a distance")
        if float(threshold) < 0.5:
            # 0.1-0.3 are typical *distances* (Kong ai-semantic-cache, RedisVL): as a similarity
            # they would match almost anything, so refuse rather than serve wrong answers.
            raise CacheConfigError(
                f"vectordb.threshold {threshold} looks like a distance: it is a cosine similarity in "
                f"[0.5, 1] (higher is stricter); for a distance d use threshold {1 - float(threshold):.2f}")
        strategy = vdb.get("strategy") or "memory"
        if strategy not in ("memory", "redis"):
            raise CacheConfigError(f"vectordb.strategy must be memory or redis, got {strategy!r}")
        namespace = vdb.get("namespace") or "aigov"
        if not _NAMESPACE_RE.fullmatch(str(namespace)):  # fullmatch: `$` would pass "ns\n"
            raise CacheConfigError("vectordb.namespace must be 1-64 characters of A-Z a-z 0-9 _ -")
        emb = conf.get("embeddings") or {}
        provider = emb.get("provider") or "local"
        if provider not in ("local", "openai"):
            raise CacheConfigError(f"embeddings.provider must be local or openai, got {provider!r}")
        missing = [f"embeddings.{name}" for name in ("url", "model") if not emb.get(name)]
        if provider == "openai" and missing:
            raise CacheConfigError(f"embeddings.provider openai needs {' and '.join(missing)}")
        bad_secret = next((where for where, v in (("embeddings.api_key", emb.get("api_key")),
                                                  ("admin_key", conf.get("admin_key"))) if has_control_char(v)), None)
        if bad_secret:
            raise CacheConfigError(control_char_error(bad_secret))
        scope = conf.get("scope") or "consumer"
        if scope not in ("consumer", "global"):
            raise CacheConfigError(f"scope must be consumer or global, got {scope!r}")

        def pos_int(name: str, value: Any, default: int, lo: int = 1) -> int:
            if value is None:
                return default
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise CacheConfigError(f"{name} must be an integer >= {lo}, got {value!r}")
            return value

        max_temp = conf.get("max_temperature", 1.0)
        if max_temp is not None and (isinstance(max_temp, bool) or not isinstance(max_temp, (int, float))):
            raise CacheConfigError("max_temperature must be a number")
        reasons = conf.get("store_finish_reasons")
        if reasons is None:
            reasons = ["stop"]
        if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
            raise CacheConfigError("store_finish_reasons must be a list of strings")
        unknown = [r for r in reasons if r not in FINISH_REASONS]
        if unknown or not reasons:  # a typo ("lenght") or [] would store nothing, silently
            raise CacheConfigError(f"store_finish_reasons must name some of {', '.join(FINISH_REASONS)}"
                                   + (f"; unknown: {', '.join(map(repr, unknown))}" if unknown else ""))
        admin_path = conf.get("admin_path") or None
        if admin_path and not conf.get("admin_key"):
            raise CacheConfigError("admin_path needs admin_key (the X-Cache-Admin-Key a purge request must carry)")
        return cls(
            strategy=strategy, threshold=float(threshold), namespace=str(namespace),
            max_entries=pos_int("vectordb.max_entries", vdb.get("max_entries"), 10000),
            max_memory_mb=pos_int("vectordb.max_memory_mb", vdb.get("max_memory_mb"), 256),
            redis=dict(vdb.get("redis") or {}), embeddings=dict(emb),
            cache_ttl=pos_int("cache_ttl", conf.get("cache_ttl"), 300),
            scope=scope, message_countback=pos_int("message_countback", conf.get("message_countback"), 1),
            exact_caching=conf.get("exact_caching") is not False, verifier=conf.get("verifier") is not False,
            store_finish_reasons=tuple(reasons),
            max_body_bytes=pos_int("max_body_bytes", conf.get("max_body_bytes"), 1024 * 1024),
            max_temperature=None if max_temp is None else float(max_temp),
            stop_on_failure=bool(conf.get("stop_on_failure")), admin_path=admin_path,
            admin_key=conf.get("admin_key") or None,
        )

    @property
    def embeddings_model(self) -> str:
        if (self.embeddings.get("provider") or "local") == "local":
            return "all-MiniLM-L6-v2"
        return str(self.embeddings.get("model"))


@dataclass
class Lookup:
    status: str                      # "Hit" | "Miss"
    entry: CacheEntry | None = None
    similarity: float | None = None  # semantic hits only
    layer: str | None = None         # "exact" | "semantic"
    vector: np.ndarray | None = None  # the query embedding (reused when the answer is stored)
    rejected: list[str] = field(default_factory=list)  # verifier reasons of refused candidates
    embed_ms: float = 0.0
    fetch_ms: float = 0.0


def make_store(settings: CacheSettings) -> CacheStore:
    if settings.strategy == "redis":
        from aigov.cache.policies.redis import RedisStore
        from aigov.redis_client import layer_from_config

        return RedisStore(layer_from_config(settings.redis), settings.namespace, settings.embeddings_model)
    from aigov.cache.policies.memory import shared_memory_store

    return shared_memory_store(settings.namespace, settings.max_entries, settings.max_memory_mb * 1024 * 1024)


class SemanticCache:
    """Lookup and save through one store and one (process-wide) embedder."""

    def __init__(self, settings: CacheSettings, store: CacheStore | None = None,
                 embedder: Embedder | None = None) -> None:
        self.settings = settings
        self._store = store
        self._embedder = embedder

    @property
    def store(self) -> CacheStore:
        if self._store is None:
            self._store = make_store(self.settings)
        return self._store

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = embedder_from_config(self.settings.embeddings)
        return self._embedder

    def embed(self, text: str) -> np.ndarray:
        started = time.perf_counter()
        try:
            vec = self.embedder.embed([text])[0]
        except EmbeddingError:
            raise
        except Exception as exc:  # noqa: BLE001 - any embedder failure is an EmbeddingError
            raise EmbeddingError(f"{type(exc).__name__}: {exc}") from exc
        metrics.CACHE_EMBEDDINGS_LATENCY.labels(self.settings.embeddings_model).observe(
            (time.perf_counter() - started) * 1000)
        return vec

    def lookup(self, scope: CacheScope, prompt: str, key: str,
               vector: np.ndarray | Callable[[], np.ndarray] | None = None) -> Lookup:
        """Raises StoreUnavailable / EmbeddingError; the caller maps them to Failed."""
        started = time.perf_counter()
        min_similarity = self.settings.threshold - SIMILARITY_EPSILON
        whole: bool | None = None  # does the model read all of the prompt (asked once)
        if vector is not None and not callable(vector):
            # The vector is known: the exact probe and the KNN query share one round trip.
            vec, embed_ms = np.asarray(vector, dtype=np.float32), 0.0
            if self.settings.exact_caching:
                entry, candidates = self.store.get_exact_and_search(scope, key, vec, FIRST_K, min_similarity)
                if entry is not None:
                    return Lookup("Hit", entry, None, "exact", fetch_ms=(time.perf_counter() - started) * 1000)
            else:
                candidates = self.store.search(scope, vec, FIRST_K, min_similarity)
        else:
            # Exact probe first: an exact hit never pays for the embedding.
            if self.settings.exact_caching:
                entry = self.store.get_exact(scope, key)
                if entry is not None:
                    return Lookup("Hit", entry, None, "exact", fetch_ms=(time.perf_counter() - started) * 1000)
            t0 = time.perf_counter()
            vec = self.embed(prompt) if vector is None else vector()  # None or a callable here
            embed_ms = (time.perf_counter() - t0) * 1000
            whole = self._reads_whole(prompt)
            candidates = self.store.search(scope, vec, FIRST_K, min_similarity) if whole else []
        if whole is None:
            whole = self._reads_whole(prompt)
        result = Lookup("Miss", vector=vec, embed_ms=embed_ms)
        if not whole:
            # The model saw only the start of this prompt: entries that share that start would
            # match at similarity 1.0 whatever the rest says. Exact hits only (probed above).
            result.rejected.append(BEYOND_WINDOW)
            result.fetch_ms = (time.perf_counter() - started) * 1000 - embed_ms
            return result
        hit = self._first_verified(prompt, candidates, result.rejected)
        if hit is None and result.rejected and len(candidates) == FIRST_K < SEARCH_K:
            # The nearest entry was refused: look at the next ones (fewer round trips on average
            # than always fetching SEARCH_K, since most lookups stop at the first candidate).
            refused = {entry.key for entry, _ in candidates}
            more = [(e, s) for e, s in self.store.search(scope, vec, SEARCH_K, min_similarity)
                    if e.key not in refused]
            hit = self._first_verified(prompt, more, result.rejected)
        if hit is not None:
            entry, sim = hit
            result = Lookup("Hit", entry, min(1.0, sim), "semantic", vector=vec, embed_ms=embed_ms,
                            rejected=result.rejected)
        result.fetch_ms = (time.perf_counter() - started) * 1000 - embed_ms
        return result

    def _first_verified(self, prompt: str, candidates: list[tuple[CacheEntry, float]],
                        rejected: list[str]) -> tuple[CacheEntry, float] | None:
        """The best candidate the verifier accepts; the refusal reasons go into `rejected`."""
        for entry, sim in candidates:
            if not self._reads_whole(entry.prompt):  # stored before this check, or another node's
                rejected.append(BEYOND_WINDOW)
                continue
            if self.settings.verifier:
                verdict = verify(prompt, entry.prompt)
                if not verdict.ok:
                    rejected.append(verdict.reason)
                    continue
            return entry, sim
        return None

    def _reads_whole(self, text: str) -> bool:
        reads_whole = getattr(self.embedder, "reads_whole", None)
        return True if reads_whole is None else bool(reads_whole(text))

    def save(self, scope: CacheScope, key: str, prompt: str, vector: np.ndarray,
             completion: dict[str, Any], usage: dict[str, Any] | None, model: str | None,
             now: float | None = None) -> CacheEntry:
        now = time.time() if now is None else now
        entry = CacheEntry(key=key, prompt=prompt, response=completion, model=model, usage=usage,
                           created_at=now, expires_at=now + self.settings.cache_ttl)
        self.store.put(scope, vector, entry)
        return entry


def no_store_requested(cache_control: str | None) -> bool:
    return bool(cache_control) and "no-store" in cache_control.lower()


def storable(settings: CacheSettings, resp: LLMResponse, response_cache_control: str | None = None,
             body_size: int = 0) -> tuple[bool, str]:
    """Whether an upstream answer may be cached, and why not. Never stores: non-200, a
    finish_reason outside store_finish_reasons, tool calls, cut streams, no-store, big bodies."""
    if resp.status != 200:
        return False, f"status {resp.status}"
    if body_size > settings.max_body_bytes:
        return False, f"body {body_size} bytes over max_body_bytes"
    if no_store_requested(response_cache_control):
        return False, "response Cache-Control no-store"
    if not resp.complete or resp.completion is None:
        return False, resp.error or ("interrupted stream" if resp.streamed else "incomplete response")
    if not resp.finish_reasons or any(r not in settings.store_finish_reasons for r in resp.finish_reasons):
        return False, f"finish_reason {resp.finish_reasons}"
    if resp.has_tool_calls:
        return False, "tool calls"
    if not resp.text:
        return False, "empty answer"
    return True, ""


def completion_for_storage(completion: dict[str, Any]) -> dict[str, Any]:
    """The non-stream chat.completion to keep (streams arrive reassembled by aigov.sse)."""
    out = json.loads(json.dumps(completion))
    out["object"] = "chat.completion"
    return out
