"""Quota logic independent of Kong: config, which counters a request touches, estimates,
settlement amounts, headers and error bodies.

Units: token counters count tokens; cost counters count nano-USD (aigov.prices), so both are
exact integers in Redis and in memory.

A request touches one counter per (limit, metric) that applies to it. In `access` all of them
are checked and reserved at once (the store does this atomically); after the response the
reservation is settled, by request id and exactly once, to the real usage (or released).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Protocol, Sequence

from aigov.prices import (PriceError, Price, PriceTable, base_models, default_prices, nano_to_usd,
                          normalize_model, usd_to_nano)
from aigov.quota.windows import WINDOWS, window_at

METRICS = ("tokens", "cost")
IDENTIFIER_SOURCES = ("consumer", "credential", "header", "ip")
DEFAULT_KEY_PREFIX = "aigov:quota"
# The most one request is charged, in tokens or nano-USD ($1M): with the limits' bounds (the
# schema's), no counter nears 2^63 however absurd the usage an upstream reports.
MAX_REQUEST_AMOUNT = 10**15
# Counters outlive their window a little so a settle that lands just after the boundary still
# finds the counter it reserved on.
COUNTER_GRACE_S = 120


class QuotaConfigError(ValueError):
    """The plugin config cannot be enforced; the message says what to fix."""


@dataclass(frozen=True)
class LimitSpec:
    window: str
    tokens: int | None = None
    cost_usd: float | None = None
    name: str | None = None
    per_model: bool = False
    per_route: bool = False
    models: tuple[str, ...] = ()  # empty: applies to every model

    def applies_to(self, model: str | None) -> bool:
        # A fine-tune or a dated snapshot may be priced apart from its base model, but a limit
        # on the base model covers it: "models: [gpt-4o]" must not be stepped round by asking
        # for ft:gpt-4o-... or gpt-4o-2024-05-13.
        return not self.models or (model is not None and (
            model in self.models or any(base in self.models for base in base_models(model))))


@dataclass(frozen=True)
class QuotaConfig:
    limits: tuple[LimitSpec, ...]
    prices: PriceTable
    identifier_sources: tuple[str, ...] = ("consumer", "credential", "ip")
    identifier_header: str | None = None
    limit_by: str = "consumer"           # "global": every caller shares one set of counters
    policy: str = "memory"
    redis: Mapping[str, Any] | None = None
    key_prefix: str = DEFAULT_KEY_PREFIX
    on_store_failure: str = "fail_open"
    on_malformed_request: str = "pass"
    unknown_model: str = "block"
    default_price: Price | None = None
    completion_estimate_tokens: int = 512
    reservation_ttl_s: int = 600
    hide_client_headers: bool = False
    log_statistics: bool = False          # the aigov.quota log-serializer entry (handler._serialize)
    stream_usage: str = "as_sent"         # "request": ask the provider for a stream's usage chunk

    @classmethod
    def from_plugin_config(cls, conf: Mapping[str, Any]) -> "QuotaConfig":
        """Build from the Kong plugin config (defaults filled by Kong). Raises QuotaConfigError."""
        problems: list[str] = []
        limits: list[LimitSpec] = []
        # Counted from 1, as Kong's schema errors count array elements (config.limits[1]).
        for i, item in enumerate(conf.get("limits") or [], start=1):
            if not isinstance(item, Mapping):
                problems.append(f"limits[{i}] must be an object")
                continue
            window = item.get("window")
            tokens, cost = item.get("tokens"), item.get("cost_usd")
            if window not in WINDOWS:
                problems.append(f"limits[{i}].window must be one of {', '.join(WINDOWS)}, got {window!r}")
            if tokens is None and cost is None:
                problems.append(f"limits[{i}] needs 'tokens' and/or 'cost_usd'")
            if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0):
                problems.append(f"limits[{i}].tokens must be a positive integer, got {tokens!r}")
            if cost is not None and (isinstance(cost, bool) or not isinstance(cost, (int, float)) or cost <= 0):
                problems.append(f"limits[{i}].cost_usd must be a positive number of USD, got {cost!r}")
            models = tuple(m.strip().lower() for m in (item.get("models") or []) if isinstance(m, str) and m.strip())
            limits.append(LimitSpec(window=str(window), tokens=tokens, cost_usd=cost, name=item.get("name") or None,
                                    per_model=bool(item.get("per_model")), per_route=bool(item.get("per_route")),
                                    models=models))
        sources = tuple(conf.get("identifier_sources") or ("consumer", "credential", "ip"))
        for s in sources:
            if s not in IDENTIFIER_SOURCES:
                problems.append(f"identifier_sources: unknown source {s!r} (use {', '.join(IDENTIFIER_SOURCES)})")
        if "header" in sources and not conf.get("identifier_header"):
            problems.append("identifier_sources has 'header' but identifier_header is not set")
        try:
            prices = default_prices().with_overrides(conf.get("prices") or [])
        except PriceError as exc:
            problems.append(str(exc))
            prices = default_prices()
        # applies_to() compares the price table's name of the requested model: name the limit's
        # models the same way, so "gpt-4o-mini-2024-07-18" or "openai/gpt-4o" match their family.
        limits = [replace(lim, models=tuple(prices.resolve(m) or normalize_model(m) for m in lim.models))
                  for lim in limits]
        default_price = None
        unknown = conf.get("unknown_model") or "block"
        if unknown not in ("block", "default_price"):
            problems.append(f"unknown_model must be block or default_price, got {unknown!r}")
        given_default = conf.get("default_price")
        # Kong fills an absent record with its sub-fields' defaults: all None means "not set".
        if isinstance(given_default, Mapping) and any(v is not None for v in given_default.values()):
            try:
                default_price = Price.from_mapping("default_price", conf["default_price"])
            except PriceError as exc:
                problems.append(str(exc))
        if unknown == "default_price" and default_price is None and not any("default_price" in p for p in problems):
            problems.append("unknown_model is default_price but default_price {input, output} is not set")
        if unknown == "block":
            # A listed model without a price is refused before any limit is looked at, so the
            # limit could never apply (a typo such as "gpt-4o-mnii" would disable it silently).
            for i, lim in enumerate(limits, start=1):
                for name in lim.models:
                    if prices.lookup(name) is None:
                        problems.append(f"limits[{i}].models: {name!r} is not in the price table, so with "
                                        "unknown_model=block this limit never applies; fix the name, add its "
                                        "price to prices, or set unknown_model=default_price")
        policy = conf.get("policy") or "memory"
        if policy not in ("memory", "redis"):
            problems.append(f"policy must be memory or redis, got {policy!r}")
        ttl = conf.get("reservation_ttl_seconds") or 600
        estimate = conf.get("completion_estimate_tokens")
        stream_usage = conf.get("stream_usage") or "as_sent"
        if stream_usage not in ("as_sent", "request"):
            problems.append(f"stream_usage must be as_sent or request, got {stream_usage!r}")
        if problems:
            raise QuotaConfigError("llm-token-quota config: " + "; ".join(problems))
        return cls(limits=tuple(limits), prices=prices, identifier_sources=sources,
                   identifier_header=conf.get("identifier_header") or None,
                   limit_by=conf.get("limit_by") or "consumer", policy=policy, redis=conf.get("redis"),
                   key_prefix=conf.get("key_prefix") or DEFAULT_KEY_PREFIX,
                   on_store_failure=conf.get("on_store_failure") or "fail_open",
                   on_malformed_request=conf.get("on_malformed_request") or "pass",
                   unknown_model=unknown, default_price=default_price,
                   completion_estimate_tokens=int(512 if estimate is None else estimate),
                   reservation_ttl_s=int(ttl), hide_client_headers=bool(conf.get("hide_client_headers")),
                   log_statistics=bool(conf.get("log_statistics")), stream_usage=stream_usage)


# ---------------------------------------------------------------- identity and counters

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:@=-]{1,80}$")


# `consumer` label values the quota gives callers that are not a Kong consumer's own name.
NON_CONSUMER_LABELS = frozenset({"anonymous", "global", "other"})


def consumer_metric_name(name: str) -> str:
    """A Kong consumer's `consumer` label: its name, as Kong's prometheus plugin labels it, unless
    the name is one the quota gives other callers ("anonymous", "global", the overflow "other",
    a "header:..." tag, a consumer's "custom_id:..."): then "consumer:" + name, so two callers
    never share a series."""
    prefix, colon, _ = name.partition(":")
    if name in NON_CONSUMER_LABELS or colon and (prefix in IDENTIFIER_SOURCES or prefix == "custom_id"):
        return f"consumer:{name}"
    return name


def identity_tag(source: str, value: str, secret: bool = False) -> str:
    """The hash-tag part of the keys for one caller. Client-supplied values (headers) may hold
    anything, including '{' '}' that would break the Cluster hash tag, so unsafe or long values,
    and every `secret` one, are replaced by a digest. The digest's '#' is a character a value
    kept as it is cannot hold, so no client can type another caller's hashed tag."""
    raw = f"{source}:{value}"
    if not secret and _SAFE_ID.match(raw):
        return raw
    return f"{source}:#{hashlib.sha256(value.encode('utf-8', 'surrogatepass')).hexdigest()[:32]}"


@dataclass
class Counter:
    """One counter a request touches (JSON-able: it travels in kong.ctx.shared)."""

    key: str
    metric: str          # tokens | cost
    window: str
    limit: int           # tokens, or nano-USD
    reset_at: int        # unix seconds: end of the window
    expire_at: int       # unix seconds: when the counter key may disappear
    header: str          # header suffix: "Minute", "Cost-Day", "Day-<name>"
    label: str           # human name: "400 tokens per minute"

    def to_list(self) -> list[Any]:
        return [self.key, self.metric, self.window, self.limit, self.reset_at, self.expire_at, self.header, self.label]

    @classmethod
    def from_list(cls, items: Sequence[Any]) -> "Counter":
        key, metric, window, limit, reset_at, expire_at, header, label = items
        return cls(str(key), str(metric), str(window), int(limit), int(reset_at), int(expire_at), str(header), str(label))


def _scope_part(value: str | None) -> str:
    if not value:
        return "all"
    return value if re.match(r"^[A-Za-z0-9._-]{1,64}$", value) else "h" + hashlib.sha256(value.encode()).hexdigest()[:16]


UNPRICED_MODEL_SCOPE = "unpriced"  # the per_model counter every unpriced model name shares


def plan_counters(config: QuotaConfig, tag: str, model: str | None, route: str | None, now: float,
                  priced: bool = True) -> list[Counter]:
    """The counters this request must fit in, deduplicated by key (the tighter limit wins).

    `priced` False: the model is not in the price table (charged at default_price). Its name is
    the client's choice, so a per_model limit counts every such name on one shared counter,
    unless the limit lists the name in `models`: otherwise each made-up name would open a fresh
    budget on an upstream that serves any name."""
    by_key: dict[str, Counter] = {}
    for spec in config.limits:
        if not spec.applies_to(model):
            continue
        window = window_at(spec.window, now)
        model_scope = model if priced or (spec.models and model in spec.models) else UNPRICED_MODEL_SCOPE
        scope = f"{_scope_part(model_scope if spec.per_model else None)}:{_scope_part(route if spec.per_route else None)}"
        for metric, amount in (("tokens", spec.tokens), ("cost", spec.cost_usd)):
            if amount is None:
                continue
            limit = int(amount) if metric == "tokens" else usd_to_nano(float(amount))
            name = f":{_scope_part(spec.name)}" if spec.name else ""
            key = f"{config.key_prefix}:{{{tag}}}:{metric}{name}:{spec.window}:{scope}:{window.start}"
            header = spec.window.capitalize() if metric == "tokens" else f"Cost-{spec.window.capitalize()}"
            if spec.name:
                header += "-" + re.sub(r"[^A-Za-z0-9-]", "-", spec.name)
            label = (f"{int(amount)} tokens per {spec.window}" if metric == "tokens"
                     else f"${float(amount):g} per {spec.window}")
            if spec.per_model and model:
                label += f" for model {model}" if model_scope == model else " for models not in the price table"
            if spec.per_route and route:
                label += f" on route {route}"
            if spec.name:
                label = f"{spec.name} ({label})"
            counter = Counter(key, metric, spec.window, limit, window.end,
                              window.end + COUNTER_GRACE_S, header, label)
            if key not in by_key or limit < by_key[key].limit:
                by_key[key] = counter
    return list(by_key.values())


# ---------------------------------------------------------------- amounts

@dataclass
class Charge:
    """What one request costs: token figures and nano-USD, each at most MAX_REQUEST_AMOUNT."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_nano: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    source: str = "estimate"   # estimate | usage | counted | released | cache_hit

    def __post_init__(self) -> None:
        # An upstream may report absurd usage (a quadrillion tokens at $10/1M is 10^19 nano-USD):
        # a figure past the bound would overflow Redis's INCRBY mid-script and leave the counters
        # half settled, so every figure is clamped to it.
        for name in ("prompt_tokens", "completion_tokens", "total_tokens", "cost_nano", "cached_tokens",
                     "reasoning_tokens"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_REQUEST_AMOUNT:
                setattr(self, name, min(max(int(value), 0), MAX_REQUEST_AMOUNT))

    def amount_for(self, counter: Counter) -> int:
        return self.total_tokens if counter.metric == "tokens" else self.cost_nano

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def zero(cls, source: str) -> "Charge":
        return cls(0, 0, 0, 0, source=source)


def charge_from_usage(price: Price, prompt: int, completion: int, total: int = 0, cached: int = 0,
                      reasoning: int = 0, source: str = "usage") -> Charge:
    """A charge from usage figures: the provider's total wins when it exceeds prompt + completion."""
    metered = max(int(total), int(prompt) + int(completion))
    return Charge(int(prompt), int(completion), metered,
                  price.cost_nano(prompt, completion, cached, reasoning, total), int(cached), int(reasoning), source)


# ---------------------------------------------------------------- stores

@dataclass
class ReserveResult:
    admitted: bool
    values: list[int]                 # counter values after the call (reservations included)
    blocked: int | None = None        # index of the first counter that did not fit
    duplicate: bool = False           # this request id already holds (or settled) a reservation


@dataclass
class SettleResult:
    status: str                       # settled | duplicate | orphan (no reservation left: charged directly)
    values: list[int] = field(default_factory=list)


class QuotaStore(Protocol):
    name: str

    def reserve(self, tag: str, request_id: str, counters: Sequence[Counter], amounts: Sequence[int],
                now: float, reservation_ttl_s: int) -> ReserveResult: ...

    def settle(self, tag: str, request_id: str, counters: Sequence[Counter], amounts: Sequence[int],
               now: float, reservation_ttl_s: int) -> SettleResult: ...

    def values(self, tag: str, counters: Sequence[Counter], now: float) -> list[int]: ...


def meta_keys(prefix: str, tag: str) -> tuple[str, str, str]:
    """Reservation hash, pending zset (deadline per request id) and settled zset of one caller:
    the same hash tag as its counters, so one script touches one Cluster slot."""
    base = f"{prefix}:{{{tag}}}"
    return f"{base}:res", f"{base}:pending", f"{base}:done"


# ---------------------------------------------------------------- client-facing output

def rate_limit_headers(counters: Sequence[Counter], values: Sequence[int], now: float) -> dict[str, str]:
    """Kong-style X-AI-RateLimit-{Limit,Remaining,Reset}-<suffix>; cost figures in USD.

    Two limits can share a suffix (one per model and one overall on the same window): the
    headers then show the binding one, the one with the least left, as the client will hit it.
    """
    headers: dict[str, str] = {}
    least_left: dict[str, int] = {}
    for counter, value in zip(counters, values):
        remaining = max(0, counter.limit - int(value))
        if counter.header in least_left and least_left[counter.header] <= remaining:
            continue
        least_left[counter.header] = remaining
        if counter.metric == "cost":
            # 9 decimals: counters are whole nano-USD, so the header is the counter, not a rounding
            limit_s, remaining_s = f"{nano_to_usd(counter.limit):.9f}", f"{nano_to_usd(remaining):.9f}"
        else:
            limit_s, remaining_s = str(counter.limit), str(remaining)
        headers[f"X-AI-RateLimit-Limit-{counter.header}"] = limit_s
        headers[f"X-AI-RateLimit-Remaining-{counter.header}"] = remaining_s
        headers[f"X-AI-RateLimit-Reset-{counter.header}"] = str(max(1, int(counter.reset_at - now + 0.999)))
    return headers


def openai_error(message: str, type_: str, code: str, **extra: Any) -> str:
    """An OpenAI-error-shaped JSON body."""
    err: dict[str, Any] = {"message": message, "type": type_, "param": None, "code": code}
    err.update(extra)
    return json.dumps({"error": err})


def rejection_body(counter: Counter, value: int, amount: int, now: float) -> tuple[str, int | None]:
    """The 429 body and its Retry-After seconds for the first limit that did not fit; None when
    waiting cannot help (the request alone is larger than the limit, in any window)."""
    reset_in = max(1, int(counter.reset_at - now + 0.999))
    remaining = max(0, counter.limit - int(value))
    if counter.metric == "cost":
        need, left = f"${nano_to_usd(amount):.6f}", f"${nano_to_usd(remaining):.6f}"
    else:
        need, left = f"{amount} tokens", f"{remaining} tokens"
    if amount > counter.limit:
        retry_after = None
        msg = (f"LLM quota exceeded: {counter.label}; the request alone (up to {need}, its prompt and "
               "the completion it may ask for) is larger than the limit, so retrying cannot succeed: "
               "lower max_tokens or the prompt.")
    else:
        retry_after = reset_in
        msg = (f"LLM quota exceeded: {counter.label}; the request needs up to {need}, {left} left. "
               f"The {counter.window} window resets in {reset_in}s.")
    body = openai_error(msg, "rate_limit_exceeded", "quota_exceeded",
                        limit=counter.label, window=counter.window, metric=counter.metric,
                        reset_at=counter.reset_at, retry_after=retry_after)
    return body, retry_after
