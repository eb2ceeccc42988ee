"""The semantic router: plugin config → routes → a cached, trained RouterModel → decisions.

Used by the plugin handler and by `aigov eval router` / `aigov calibrate router`, so the figures
those commands print are the plugin's own decisions.

Caching: a model depends only on the utterances, the negatives, the model-shaping thresholds and
the embedding model id, so it is keyed by a hash of exactly those. The cache is module level
(instance churn after a config change or across N workers reuses it) and optionally on disk
(`cache_dir`), so a restarted plugin server loads the same arrays and makes the same decisions
without re-embedding.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import stat
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from aigov import cooperative
from aigov.request import CREDENTIAL_HEADERS, canonical_json, sha256_hex
from aigov.routing import model as rmodel
from aigov.schema import control_char_error, has_control_char

log = logging.getLogger("aigov.routing")

REJECT = "reject"
REASONS = ("matched", "default", "forced", "error")  # a decision; refusals are counted apart (handler)
MAX_CACHED_MODELS = 16
# Headers that frame or address the request: set by a target, they break every request (a
# Transfer-Encoding the body does not have, a Content-Length that lies, another Host).
FRAMING_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive",
                             "te", "trailer", "upgrade", "proxy-connection", "expect"})
BUILD_RETRY_S = 5.0  # after a failed build (embedder down), wait before trying again


class RouterConfigError(ValueError):
    """The plugin config cannot be routed with (the message says which field and why)."""


@dataclass(frozen=True)
class Target:
    upstream: str | None = None
    host: str | None = None
    port: int | None = None
    scheme: str | None = None
    path: str | None = None
    model: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    api_key: str | None = field(default=None, repr=False)  # never in repr / logs
    auth_header: str = "Authorization"
    auth_prefix: str | None = None

    def credential_value(self) -> str | None:
        if not self.api_key:
            return None
        prefix = self.auth_prefix
        if prefix is None:  # Authorization carries a scheme; api-key style headers do not
            prefix = "Bearer " if self.auth_header.lower() == "authorization" else ""
        return prefix + self.api_key


@dataclass(frozen=True)
class Route:
    name: str
    utterances: tuple[str, ...]
    negative_utterances: tuple[str, ...]
    target: Target


@dataclass
class RouterSettings:
    routes: list[Route]
    default_route: str  # a route name or REJECT
    negative_utterances: list[str]
    embed_text: str = "last_user"
    embed_turns: int = 1
    min_confidence: float | None = None
    target_oos_recall: float = rmodel.DEFAULT_TARGET_OOS_RECALL
    top_k: int | None = None
    calibrated_for_model: str | None = None
    on_model_mismatch: str = "error"
    force_route_header: str | None = None
    strip_client_auth: bool = True
    reject_status: int = 400
    max_body_bytes: int = 1024 * 1024
    build_timeout_ms: int = 30000
    cache_dir: str | None = None

    def route(self, name: str) -> Route | None:
        for r in self.routes:
            if r.name == name:
                return r
        return None

    @property
    def credential_headers(self) -> set[str]:
        """Every header any target puts its key in: cleared before the chosen target's is set."""
        # The client's own credentials too: key-auth's `apikey` reaches the upstream unless
        # hide_credentials is set, and providers read x-api-key / api-key.
        names = set(CREDENTIAL_HEADERS)
        for r in self.routes:
            names.add(r.target.auth_header.lower())
        return names

    def model_key(self, model_id: str) -> str:
        """Hash of everything that shapes the trained model (targets and keys are not in it)."""
        return sha256_hex({
            "format": rmodel.MODEL_FORMAT, "model_id": model_id,
            "routes": [[r.name, list(r.utterances), list(r.negative_utterances)] for r in self.routes],
            "negatives": list(self.negative_utterances), "target_oos_recall": self.target_oos_recall,
            "top_k": self.top_k,
        })


def _strings(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RouterConfigError(f"{where} must be an array of strings")
    out = []
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise RouterConfigError(f"{where}[{i}] must be a string")
        if v.strip():
            out.append(v)
    return out


def _headers(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if value is None or value == []:  # an empty Lua table arrives as []
        return ()
    if not isinstance(value, dict):
        raise RouterConfigError(f"{where} must be a map of header name to value")
    return tuple(sorted((str(k), str(v)) for k, v in value.items()))


def settings_from_config(conf: dict[str, Any]) -> RouterSettings:
    """Validate the plugin config (beyond what Kong's schema can express) into RouterSettings."""
    embeddings = conf.get("embeddings")
    if isinstance(embeddings, dict) and has_control_char(embeddings.get("api_key")):
        raise RouterConfigError(control_char_error("embeddings.api_key"))
    raw_routes = conf.get("routes")
    if not isinstance(raw_routes, list) or not raw_routes:
        raise RouterConfigError("routes must list at least one route")
    routes: list[Route] = []
    seen: set[str] = set()
    for i, r in enumerate(raw_routes):
        if not isinstance(r, dict):
            raise RouterConfigError(f"routes[{i}] must be a record")
        name = r.get("name")
        if not isinstance(name, str) or not name:
            raise RouterConfigError(f"routes[{i}].name is required")
        if name == REJECT:
            raise RouterConfigError(f"routes[{i}].name {REJECT!r} is reserved for default_route")
        if name in seen:
            raise RouterConfigError(f"route name {name!r} appears twice")
        seen.add(name)
        utterances = _strings(r.get("utterances"), f"routes[{i}].utterances")
        if not utterances:
            raise RouterConfigError(f"route {name!r} needs at least one utterance")
        t = r.get("target") or {}
        if not isinstance(t, dict):
            raise RouterConfigError(f"routes[{i}].target must be a record")
        if t.get("upstream") and t.get("host"):
            raise RouterConfigError(f"route {name!r}: target sets both upstream and host; choose one")
        port = t.get("port")
        if t.get("host") and port is None:
            port = 443 if t.get("scheme") == "https" else 80
        extra = t.get("headers") if isinstance(t.get("headers"), dict) else {}
        header_names = [t.get("auth_header") or "Authorization", *extra]
        dotted = [h for h in header_names if isinstance(h, str) and "." in h]
        if dotted:
            # Kong's log serializer nests dotted keys: such a header could not be masked there.
            raise RouterConfigError(f"route {name!r}: header name {dotted[0]!r} contains '.', which "
                                    "cannot be masked in Kong's log entry")
        framing = [h for h in header_names if isinstance(h, str) and h.lower() in FRAMING_HEADERS]
        if framing:
            raise RouterConfigError(f"route {name!r}: header {framing[0]!r} frames or addresses the "
                                    "request (Kong and the upstream set it); a target cannot set it")
        sent = {"api_key": t.get("api_key"), "auth_prefix": t.get("auth_prefix"),
                **{f"headers.{k}": v for k, v in extra.items()}}
        controlled = [where for where, v in sent.items() if has_control_char(v)]
        if controlled:
            # The schema checks literal values; a vault reference is resolved after it, and a
            # secret read from a file often ends in a newline. The value itself is never shown.
            raise RouterConfigError(f"route {name!r}: " + control_char_error(f"target.{controlled[0]}"))
        target = Target(upstream=t.get("upstream") or None, host=t.get("host") or None,
                        port=int(port) if port is not None else None, scheme=t.get("scheme") or None,
                        path=t.get("path") or None, model=t.get("model") or None,
                        headers=_headers(t.get("headers"), f"routes[{i}].target.headers"),
                        api_key=t.get("api_key") or None,
                        auth_header=t.get("auth_header") or "Authorization",
                        auth_prefix=t.get("auth_prefix"))
        routes.append(Route(name=name, utterances=tuple(utterances),
                            negative_utterances=tuple(_strings(r.get("negative_utterances"),
                                                               f"routes[{i}].negative_utterances")),
                            target=target))
    default_route = conf.get("default_route")
    if not isinstance(default_route, str) or not default_route:
        raise RouterConfigError("default_route is required: a route name, or 'reject'")
    if default_route != REJECT and default_route not in seen:
        raise RouterConfigError(f"default_route {default_route!r} is not one of the routes "
                                f"({', '.join(sorted(seen))}) nor 'reject'")
    th = conf.get("thresholds") or {}
    if not isinstance(th, dict):
        th = {}
    embed_text = conf.get("embed_text") or "last_user"
    if embed_text not in ("last_user", "last_n_turns"):
        raise RouterConfigError("embed_text must be last_user or last_n_turns")
    mismatch = conf.get("on_model_mismatch") or "error"
    if mismatch not in ("error", "warn"):
        raise RouterConfigError("on_model_mismatch must be error or warn")
    return RouterSettings(
        routes=routes, default_route=default_route,
        negative_utterances=_strings(conf.get("negative_utterances"), "negative_utterances"),
        embed_text=embed_text,
        embed_turns=max(1, int(conf.get("embed_turns") or 1)) if embed_text == "last_n_turns" else 1,
        min_confidence=th.get("min_confidence"),
        target_oos_recall=float(th.get("target_oos_recall") or rmodel.DEFAULT_TARGET_OOS_RECALL),
        top_k=th.get("top_k") or None,
        calibrated_for_model=conf.get("calibrated_for_model") or None,
        on_model_mismatch=mismatch,
        force_route_header=conf.get("force_route_header") or None,
        strip_client_auth=conf.get("strip_client_auth", True) is not False,
        reject_status=int(conf.get("reject_status") or 400),
        max_body_bytes=int(conf.get("max_body_bytes") or 1024 * 1024),
        build_timeout_ms=int(conf.get("build_timeout_ms") or 30000),
        cache_dir=conf.get("cache_dir") or os.environ.get("AIGOV_ROUTER_CACHE_DIR") or None,
    )


# ---------------------------------------------------------------------------------------------
# model building and caching


def training_data(settings: RouterSettings) -> tuple[list[str], list[int], list[str]]:
    """(utterances, their route index, negatives): route-level negatives join the global ones."""
    texts: list[str] = []
    labels: list[int] = []
    negatives = list(settings.negative_utterances)
    for i, r in enumerate(settings.routes):
        texts.extend(r.utterances)
        labels.extend([i] * len(r.utterances))
        negatives.extend(r.negative_utterances)
    return texts, labels, negatives


def build_model(settings: RouterSettings, embedder: Any) -> rmodel.RouterModel:
    """Embed the route data in bulk and fit (slow: seconds; callers cache the result)."""
    texts, labels, negatives = training_data(settings)
    encode = getattr(embedder, "encode_direct", None) or embedder.embed
    vecs = np.asarray(encode(texts + negatives), dtype=np.float32)
    return rmodel.fit([r.name for r in settings.routes], vecs[:len(texts)], np.asarray(labels),
                      vecs[len(texts):], top_k=settings.top_k,
                      target_oos_recall=settings.target_oos_recall, model_id=embedder.model_id)


def _safe_cache_dir(path: str) -> Path | None:
    """The cache directory, created 0700; refused when another user owns it (cache poisoning)."""
    p = Path(path)
    try:
        p.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = p.stat()
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            log.warning("router cache dir %s is owned by another user: not used", p)
            return None
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            log.warning("router cache dir %s is group/world-writable: not used", p)
            return None
        return p
    except OSError as exc:
        log.warning("router cache dir %s unusable: %s", p, exc)
        return None


def load_from_disk(cache_dir: str, key: str) -> rmodel.RouterModel | None:
    d = _safe_cache_dir(cache_dir)
    if d is None:
        return None
    npz, meta_path = d / f"router-{key}.npz", d / f"router-{key}.json"
    if not npz.exists() or not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key:
            return None
        with np.load(npz, allow_pickle=False) as data:  # never unpickle a file from disk
            arrays = {k: data[k] for k in data.files}
        return rmodel.RouterModel.from_arrays(arrays, meta)
    except (OSError, ValueError, KeyError, rmodel.RouterModelError) as exc:
        log.warning("router cache entry %s unreadable, rebuilding: %s", key[:12], exc)
        return None


def save_to_disk(cache_dir: str, key: str, m: rmodel.RouterModel) -> bool:
    d = _safe_cache_dir(cache_dir)
    if d is None:
        return False
    arrays, meta = m.to_arrays()
    meta["key"] = key
    try:
        # Write then rename, so a concurrent reader (another worker/process) never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, d / f"router-{key}.npz")
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".json.tmp")
        with os.fdopen(fd, "w") as f:
            f.write(canonical_json(meta))
        os.replace(tmp, d / f"router-{key}.json")
        return True
    except OSError as exc:
        log.warning("router cache entry %s not written: %s", key[:12], exc)
        return False


class _Slot:
    """One model being built or built: waiters block on `done` (bounded by their timeout)."""

    def __init__(self) -> None:
        # A future rather than an Event: on the plugin server's loop the wait parks the handler
        # (aigov.cooperative) instead of blocking every other request during the build.
        self.done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.model: rmodel.RouterModel | None = None
        self.error: str | None = None
        self.failed_at = 0.0
        self.source = ""  # "built" | "disk"


_SLOTS: "OrderedDict[str, _Slot]" = OrderedDict()
_SLOTS_LOCK = threading.Lock()


class ModelNotReady(RuntimeError):
    """The route model is still being built, or its build failed (the reason is the message)."""


def get_model(settings: RouterSettings, embedder: Any, wait_s: float) -> tuple[rmodel.RouterModel, str]:
    """The trained model for these settings, building it once per process (in a thread).

    Returns (model, source) with source "memory" | "disk" | "built". Raises ModelNotReady when
    it is not ready within `wait_s` (the build goes on in the background) or the build failed.
    """
    key = settings.model_key(embedder.model_id)
    # In memory a build belongs to its embedder (get_embedder keeps one per url, model and key):
    # two routes naming the same embedding model on different endpoints share the disk entry,
    # but one endpoint being down must not fail the other's build for BUILD_RETRY_S.
    slot_key = f"{key}|{id(embedder)}"
    start_build = False
    with _SLOTS_LOCK:
        slot = _SLOTS.get(slot_key)
        if slot is not None and slot.error is not None and time.monotonic() - slot.failed_at > BUILD_RETRY_S:
            slot = None  # retry a failed build after the back-off
        if slot is None:
            slot = _Slot()
            _SLOTS[slot_key] = slot
            start_build = True
            while len(_SLOTS) > MAX_CACHED_MODELS:
                _SLOTS.popitem(last=False)
        else:
            _SLOTS.move_to_end(slot_key)
    if start_build:
        threading.Thread(target=_build_into, args=(slot, key, settings, embedder),
                         name="aigov-router-build", daemon=True).start()
    try:
        cooperative.wait_future(slot.done, max(0.0, wait_s))
    except concurrent.futures.TimeoutError:
        raise ModelNotReady("route model still building") from None
    if slot.model is None:
        raise ModelNotReady(slot.error or "route model build failed")
    return slot.model, ("memory" if not start_build else slot.source)


def _build_into(slot: _Slot, key: str, settings: RouterSettings, embedder: Any) -> None:
    try:
        m = load_from_disk(settings.cache_dir, key) if settings.cache_dir else None
        if m is not None:
            slot.source = "disk"
        else:
            t0 = time.monotonic()
            m = build_model(settings, embedder)
            slot.source = "built"
            log.info("router model %s built in %.2fs (%d routes)", key[:12], time.monotonic() - t0,
                     len(settings.routes))
            if settings.cache_dir:
                save_to_disk(settings.cache_dir, key, m)
        slot.model = m
    except Exception as exc:  # noqa: BLE001 - a failed build is reported to every waiter
        slot.error = f"route model build failed: {type(exc).__name__}: {exc}"
        slot.failed_at = time.monotonic()
        log.warning(slot.error)
    finally:
        slot.done.set_result(None)


def clear_model_cache() -> None:
    """Forget every in-memory model (tests; the disk cache is untouched)."""
    with _SLOTS_LOCK:
        _SLOTS.clear()


# ---------------------------------------------------------------------------------------------
# decisions


@dataclass
class Decision:
    route: Route | None  # None: rejected (default_route is "reject")
    reason: str  # matched | default | forced | error
    score: float | None  # the model's confidence for its best route (None when not scored)
    best: str | None = None  # the best-scoring route, even when below the threshold
    detail: str = ""  # why (for logs): "below threshold", "embedder down", "invalid_json", ...

    @property
    def route_name(self) -> str:
        return self.route.name if self.route else REJECT


def _same_model(named: str, model_id: str) -> bool:
    """calibrated_for_model names the embedder's model, in any case, with or without the hub
    organisation on either side ("all-MiniLM-L6-v2" for "sentence-transformers/all-MiniLM-L6-v2",
    and the other way round: a remote embedder may serve the model under its short name). Two
    organisations must agree: "someone/all-MiniLM-L6-v2" is another model (a fine-tune, say)."""
    a, b = named.strip().lower(), model_id.strip().lower()
    if a == b:
        return True
    (org_a, _, name_a), (org_b, _, name_b) = a.rpartition("/"), b.rpartition("/")
    return name_a == name_b and not (org_a and org_b)


class Router:
    """Decisions for one config: thresholds resolved against the embedding model in use."""

    def __init__(self, settings: RouterSettings, embedder: Any) -> None:
        self.settings = settings
        self.embedder = embedder
        self.model_id: str = embedder.model_id
        self.mismatch: str | None = None
        cal = settings.calibrated_for_model
        if cal and not _same_model(cal, self.model_id):
            self.mismatch = (f"thresholds were calibrated for embedding model {cal!r} but the "
                             f"embedder is {self.model_id!r}: recalibrate (aigov calibrate router) "
                             f"and update calibrated_for_model")
        # A threshold tuned for another model is meaningless: with warn, the self-calibrated
        # threshold from the route data replaces it.
        self.configured_threshold = settings.min_confidence if self.mismatch is None else None

    @property
    def config_error(self) -> str | None:
        """The error every request must get (on_model_mismatch=error), else None."""
        return self.mismatch if self.mismatch and self.settings.on_model_mismatch == "error" else None

    def default(self, reason: str, score: float | None = None, best: str | None = None,
                detail: str = "") -> Decision:
        s = self.settings
        return Decision(None if s.default_route == REJECT else s.route(s.default_route), reason, score, best, detail)

    def model(self, wait_s: float | None = None) -> tuple[rmodel.RouterModel, str]:
        wait = self.settings.build_timeout_ms / 1000.0 if wait_s is None else wait_s
        return get_model(self.settings, self.embedder, wait)

    def threshold(self, m: rmodel.RouterModel) -> float:
        return float(self.configured_threshold) if self.configured_threshold is not None else m.threshold

    def decide_vectors(self, m: rmodel.RouterModel, vectors: np.ndarray) -> list[Decision]:
        """Decisions for already-embedded prompts (the plugin passes one; eval passes many)."""
        scores = m.score(vectors)
        limit = self.threshold(m)
        out = []
        for idx, conf in zip(scores.route_index.tolist(), scores.confidence.tolist()):
            best = self.settings.routes[idx]
            if conf >= limit:
                out.append(Decision(best, "matched", conf, best.name))
            else:
                out.append(self.default("default", conf, best.name, "below threshold"))
        return out

    def decide_text(self, text: str, wait_s: float | None = None) -> Decision:
        """Embed and decide one prompt; any embedder/model failure → the default with reason error."""
        if not text.strip():
            return self.default("default", detail="no prompt text")
        try:
            m, _ = self.model(wait_s)
        except ModelNotReady as exc:
            return self.default("error", detail=str(exc))
        try:
            vec = self.embedder.embed([text])
        except Exception as exc:  # noqa: BLE001 - EmbeddingError or a broken endpoint reply
            return self.default("error", detail=f"embedder failed: {type(exc).__name__}")
        try:
            return self.decide_vectors(m, np.asarray(vec, dtype=np.float32))[0]
        except Exception as exc:  # noqa: BLE001 - e.g. a remote model redeployed with another dimension
            return self.default("error", detail=f"scoring failed: {type(exc).__name__}: {exc}"[:200])

    def forced(self, name: str) -> Decision | None:
        r = self.settings.route(name.strip())
        return Decision(r, "forced", None, r.name) if r else None


def prompt_text(chat: Any, settings: RouterSettings) -> str:
    """What is embedded: the last user message, or the last N user turns (embed_turns)."""
    return chat.prompt_text(settings.embed_turns if settings.embed_text == "last_n_turns" else 1)


def routes_from_pairs(pairs: Sequence[tuple[str, str | None]], per_route: int | None = None) -> dict[str, Any]:
    """A plugin-shaped config from (text, route-or-None) training lines (eval/calibrate)."""
    utter: "OrderedDict[str, list[str]]" = OrderedDict()
    negatives: list[str] = []
    for text, route in pairs:
        if route is None:
            negatives.append(text)
            continue
        bucket = utter.setdefault(route, [])
        if per_route is None or len(bucket) < per_route:
            bucket.append(text)
    routes = [{"name": n, "utterances": u, "target": {}} for n, u in utter.items()]
    if not routes:
        raise RouterConfigError("the training data has no routed lines")
    return {"routes": routes, "negative_utterances": negatives, "default_route": REJECT}
