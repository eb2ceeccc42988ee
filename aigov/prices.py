"""THE price table: USD per 1M tokens per model, shipped defaults plus config overrides.

Defaults live in aigov/data/prices.json with the date they were checked ("as_of"). Costs are
computed in integer nano-USD (1e-9 USD) so that counters in Redis stay exact integers: a price of
$P per 1M tokens is P * 1000 nano-USD per token, and even $0.005 per 1M (gpt-5-nano cached input)
is a whole 5 nano-USD per token.

A price is "implausible" when it is below MIN_PLAUSIBLE_PER_1M (it is almost certainly a
per-token or per-1K number, e.g. 0.0000025 for gpt-4o input) or above MAX_PLAUSIBLE_PER_1M.
Zero is allowed in the library (an explicit free model is not a silent $0); the plugin schema
requires at least MIN_PLAUSIBLE_PER_1M.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

DATA_FILE = Path(__file__).resolve().parent / "data" / "prices.json"
MIN_PLAUSIBLE_PER_1M = 0.001
MAX_PLAUSIBLE_PER_1M = 10_000.0
NANO_PER_USD = 1_000_000_000
PRICE_FIELDS = ("input", "cached_input", "output", "reasoning")

# Dated snapshots ("gpt-4o-mini-2024-07-18", "gpt-3.5-turbo-0125") fall back to their family.
_DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})$")


class PriceError(ValueError):
    """A price table or override that cannot be used; the message says which model and field."""


def check_price(model: str, field_name: str, value: Any) -> float:
    """Validate one price (USD per 1M tokens) and return it as a float, or raise PriceError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PriceError(f"price {field_name!r} of model {model!r} must be a number of USD per 1M tokens, got {value!r}")
    value = float(value)
    if value < 0:
        raise PriceError(f"price {field_name!r} of model {model!r} is negative ({value})")
    if 0 < value < MIN_PLAUSIBLE_PER_1M:
        raise PriceError(
            f"price {field_name!r} of model {model!r} is {value:g} USD per 1M tokens, which is implausibly low: "
            f"prices are USD per 1M tokens, not per token (did you mean {value * 1_000_000:g}?)")
    if value > MAX_PLAUSIBLE_PER_1M:
        raise PriceError(
            f"price {field_name!r} of model {model!r} is {value:g} USD per 1M tokens, over the plausible "
            f"maximum of {MAX_PLAUSIBLE_PER_1M:g}: prices are USD per 1M tokens")
    return value


@dataclass(frozen=True)
class Price:
    """USD per 1M tokens. cached_input defaults to input; reasoning (None) is billed as output."""

    input: float
    output: float
    cached_input: float | None = None
    reasoning: float | None = None

    @classmethod
    def from_mapping(cls, model: str, spec: Mapping[str, Any]) -> "Price":
        if not isinstance(spec, Mapping):
            raise PriceError(f"price of model {model!r} must be an object with input/output, got {spec!r}")
        missing = [k for k in ("input", "output") if spec.get(k) is None]
        if missing:
            raise PriceError(f"price of model {model!r} lacks {', '.join(missing)} (USD per 1M tokens)")
        optional = {k: check_price(model, k, spec[k]) for k in ("cached_input", "reasoning") if spec.get(k) is not None}
        return cls(input=check_price(model, "input", spec["input"]),
                   output=check_price(model, "output", spec["output"]), **optional)

    def cost_nano(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
                  reasoning_tokens: int = 0, total_tokens: int = 0) -> int:
        """Cost in nano-USD of a usage record (OpenAI semantics).

        cached_tokens are part of prompt_tokens and billed at cached_input; reasoning_tokens are
        part of completion_tokens. A provider total above prompt + completion is hidden reasoning
        and is billed at the reasoning (else output) rate, so what we meter is what is billed.
        """
        prompt = max(0, int(prompt_tokens))
        completion = max(0, int(completion_tokens))
        cached = min(max(0, int(cached_tokens)), prompt)
        reasoning = min(max(0, int(reasoning_tokens)), completion)
        hidden = max(0, int(total_tokens) - prompt - completion)
        cached_rate = self.input if self.cached_input is None else self.cached_input
        reasoning_rate = self.output if self.reasoning is None else self.reasoning
        usd_per_1m_tokens = ((prompt - cached) * self.input + cached * cached_rate
                             + (completion - reasoning) * self.output + (reasoning + hidden) * reasoning_rate)
        # USD/1M * tokens -> nano-USD: * 1e9 / 1e6 = * 1000.
        return int(round(usd_per_1m_tokens * 1000))

    def estimate_nano(self, prompt_tokens: int, completion_tokens: int) -> int:
        """Worst-case cost of a request before the call (no cache discount)."""
        return self.cost_nano(prompt_tokens, completion_tokens)


def normalize_model(model: str) -> str:
    name = model.strip().lower()
    if name.startswith("ft:"):
        # A fine-tune keeps its "ft:" name: OpenAI bills fine-tuned inference above its base
        # model's price, so it is priced only by an entry of its own (see _ft_candidates).
        return name
    return name.rsplit("/", 1)[-1]  # "openai/gpt-4o" as ai-proxy's X-Kong-LLM-Model writes it


def base_models(name: str) -> tuple[str, ...]:
    """The models a normalised name is a version of, whatever its own price: a fine-tune's base
    with and without its date ("ft:gpt-4o-mini-2024-07-18:org::id" -> "gpt-4o-mini-2024-07-18",
    "gpt-4o-mini"), a dated snapshot's family ("gpt-4o-2024-05-13" -> "gpt-4o"); () for a name
    that is none of these."""
    base = name[3:].split(":", 1)[0] if name.startswith("ft:") else name
    return tuple(b for b in dict.fromkeys((base, _DATE_SUFFIX.sub("", base))) if b and b != name)


def _ft_candidates(name: str) -> tuple[str, ...]:
    """Price-table names for a fine-tune "ft:gpt-4o-mini-2024-07-18:org::id": itself, then its
    family "ft:gpt-4o-mini-2024-07-18" and "ft:gpt-4o-mini" (an override for every fine-tune of
    that base)."""
    base = name[3:].split(":", 1)[0]
    return (name, f"ft:{base}", f"ft:{_DATE_SUFFIX.sub('', base)}")


class PriceTable:
    def __init__(self, models: Mapping[str, Price], aliases: Mapping[str, str] | None = None,
                 as_of: str | None = None, source: str | None = None) -> None:
        self.models = {normalize_model(k): v for k, v in models.items()}
        self.aliases = {normalize_model(k): normalize_model(v) for k, v in (aliases or {}).items()}
        self.as_of = as_of
        self.source = source
        for alias, target in self.aliases.items():
            if target not in self.models:
                raise PriceError(f"price alias {alias!r} points to unknown model {target!r}")

    def resolve(self, model: str | None) -> str | None:
        """The table's name for `model` (exact, alias, then without a date suffix), else None."""
        if not isinstance(model, str) or not model.strip():
            return None
        name = normalize_model(model)
        candidates = _ft_candidates(name) if name.startswith("ft:") else (name, _DATE_SUFFIX.sub("", name))
        for candidate in candidates:
            if candidate in self.models:
                return candidate
            if candidate in self.aliases:
                return self.aliases[candidate]
        return None

    def lookup(self, model: str | None) -> Price | None:
        name = self.resolve(model)
        return self.models[name] if name else None

    def with_overrides(self, overrides: Iterable[Mapping[str, Any]] | None) -> "PriceTable":
        """A new table where each override {model, input, output, cached_input?, reasoning?} replaces
        (or adds) that model's price. All problems are reported at once."""
        models = dict(self.models)
        problems: list[str] = []
        for i, item in enumerate(overrides or []):
            model = item.get("model") if isinstance(item, Mapping) else None
            if not isinstance(model, str) or not model.strip():
                problems.append(f"prices[{i}]: 'model' must be a non-empty string")
                continue
            try:
                models[normalize_model(model)] = Price.from_mapping(model, item)
            except PriceError as exc:
                problems.append(f"prices[{i}]: {exc}")
        if problems:
            raise PriceError("; ".join(problems))
        return PriceTable(models, self.aliases, self.as_of, self.source)


def load_price_file(path: str | Path = DATA_FILE) -> PriceTable:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PriceError(f"cannot read price file {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise PriceError(f"price file {path} has no 'models' object")
    models = {name: Price.from_mapping(name, spec) for name, spec in data["models"].items()}
    return PriceTable(models, data.get("aliases") or {}, data.get("as_of"), data.get("source"))


@lru_cache(maxsize=1)
def default_prices() -> PriceTable:
    """The shipped table (read once per process)."""
    return load_price_file(DATA_FILE)


def nano_to_usd(nano: int | float) -> float:
    return float(nano) / NANO_PER_USD


def usd_to_nano(usd: float) -> int:
    return int(round(float(usd) * NANO_PER_USD))
