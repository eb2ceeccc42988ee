"""Cache stores: `memory` (in-process numpy, the embedded default) and `redis` (RediSearch)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from aigov.cache.key import CacheScope


class StoreUnavailable(RuntimeError):
    """The store cannot answer (Redis down, RediSearch missing, index mismatch)."""


@dataclass
class CacheEntry:
    key: str                       # the entry id (= its exact-layer key)
    prompt: str                    # the semantic text it was stored under (the verifier reads it)
    response: dict[str, Any]       # an OpenAI chat.completion object
    model: str | None
    usage: dict[str, Any] | None
    created_at: float
    expires_at: float
    meta: dict[str, Any] = field(default_factory=dict)

    def ttl_left(self, now: float | None = None) -> int:
        return max(0, int(self.expires_at - (now or time.time())))

    def age(self, now: float | None = None) -> int:
        return max(0, int((now or time.time()) - self.created_at))

    def to_json_dict(self) -> dict[str, Any]:
        return {"key": self.key, "prompt": self.prompt, "response": self.response, "model": self.model,
                "usage": self.usage, "created_at": self.created_at, "expires_at": self.expires_at,
                "meta": self.meta}

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> "CacheEntry":
        return cls(key=d["key"], prompt=d["prompt"], response=d["response"], model=d.get("model"),
                   usage=d.get("usage"), created_at=float(d["created_at"]), expires_at=float(d["expires_at"]),
                   meta=d.get("meta") or {})


class CacheStore(Protocol):
    name: str

    def get_exact(self, scope: CacheScope, key: str) -> CacheEntry | None: ...

    def search(self, scope: CacheScope, vector: np.ndarray, k: int,
               min_similarity: float) -> list[tuple[CacheEntry, float]]:
        """Up to k entries of this scope with cosine similarity >= min_similarity, best first."""

    def get_exact_and_search(self, scope: CacheScope, key: str, vector: np.ndarray, k: int,
                             min_similarity: float
                             ) -> tuple[CacheEntry | None, list[tuple[CacheEntry, float]]]:
        """get_exact, and on a miss search, in one store round trip (the query vector is known)."""

    def put(self, scope: CacheScope, vector: np.ndarray, entry: CacheEntry) -> None: ...

    def purge(self) -> int:
        """Drop every entry of the store's namespace; returns how many were removed."""
