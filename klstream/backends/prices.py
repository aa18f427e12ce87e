"""What requests cost: token usage as the service reports it, and the dated price table.

The package ships list prices (``klstream/backends/prices.json``: per model, input, cached input,
output and Batch Mode prices, each with its source and date, the date the model was retired
where it is known, and the prices of prompts over 200,000 tokens where they differ).
``--prices FILE`` (same layout; files written for earlier releases, without the optional keys,
still read) replaces or adds models. A model is priced by its own entry, else by the longest
entry it extends with a dash (``gemini-2.5-flash-preview-09-2025`` by ``gemini-2.5-flash``). A
run records the entry it used in ``run.json``, which the ``costs`` view (``sql/views.sql``)
reads. :func:`entry_warnings` says when an entry is too old to trust or its model is retired.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, fields
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any

from klstream.errors import PriceTableError
from klstream.numbers import thousands

PRICE_FIELDS = (
    "input",
    "cached_input",
    "output",
    "batch_input",
    "batch_cached_input",
    "batch_output",
)
TOKENS_PER_PRICE_UNIT = 1_000_000
PRICE_CEILING = 1_000.0
"""USD per 1,000,000 tokens above which a price is a typo, not a price (the dearest Gemini
model costs $18)."""
LONG_CONTEXT_TOKENS = 200_000
"""Prompt length above which Gemini's Pro models bill at their long-context prices."""
STALE_AFTER_DAYS = 183
"""Age of an entry after which a run warns that its prices may have changed."""
SHIPPED = "klstream/backends/prices.json"


@dataclass(frozen=True)
class Rates:
    """USD per 1,000,000 tokens: input, cached input, output (thinking included), online and in
    Batch Mode."""

    input: float
    cached_input: float
    output: float
    batch_input: float
    batch_cached_input: float
    batch_output: float


@dataclass(frozen=True)
class LongContext(Rates):
    """The rates of requests whose prompt exceeds ``above_tokens``."""

    above_tokens: int


@dataclass(frozen=True)
class Price(Rates):
    """One model's prices, with where and when the figures were read."""

    model: str
    source: str
    date: str
    retired: str | None = None
    """When the service stopped serving the model (``YYYY-MM-DD``), where known."""
    until: str | None = None
    """The last day these prices hold, where a change is announced (``note`` says to what)."""
    note: str | None = None
    long_context: LongContext | None = None

    def usd(self, usage: Usage, batch: bool = False) -> float:
        """The list price of ``usage``: uncached input, cached input, output (thoughts too),
        the requests with long prompts at the long-context rates where the entry has them."""
        long = (
            usage.long_prompt_tokens - usage.long_cached_tokens,
            usage.long_cached_tokens,
            usage.long_output_tokens,
        )
        every = (
            usage.prompt_tokens - usage.cached_tokens,
            usage.cached_tokens,
            usage.candidates_tokens + usage.thoughts_tokens,
        )
        short = tuple(a - b for a, b in zip(every, long, strict=True))
        total = _usd(short, self, batch) + _usd(long, self.long_context or self, batch)
        return total / TOKENS_PER_PRICE_UNIT

    def recorded(self) -> dict[str, Any]:
        """The entry as ``run.json`` keeps it."""
        return asdict(self)


def _usd(tokens: tuple[int, ...], rates: Rates, batch: bool) -> float:
    """Uncached input, cached input and output tokens at ``rates``, in USD per million."""
    if batch:
        prices = (rates.batch_input, rates.batch_cached_input, rates.batch_output)
    else:
        prices = (rates.input, rates.cached_input, rates.output)
    return sum(count * price for count, price in zip(tokens, prices, strict=True))


@dataclass
class Usage:
    """Token counts summed over answers (the service's ``usageMetadata``)."""

    prompt_tokens: int = 0
    """Every input token, cached ones included (``promptTokenCount``)."""
    cached_tokens: int = 0
    """Input tokens served from the cache (``cachedContentTokenCount``)."""
    candidates_tokens: int = 0
    """Generated answer tokens (``candidatesTokenCount``)."""
    thoughts_tokens: int = 0
    """Thinking tokens, billed as output (``thoughtsTokenCount``)."""
    long_prompt_tokens: int = 0
    """Of ``prompt_tokens``, those of answers whose prompt exceeded :data:`LONG_CONTEXT_TOKENS`
    (billed at long-context rates); likewise their cached input and their output (answer and
    thoughts)."""
    long_cached_tokens: int = 0
    long_output_tokens: int = 0

    def add(self, other: Usage) -> None:
        for name in USAGE_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def cached_share(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


USAGE_FIELDS = tuple(f.name for f in fields(Usage))
"""The token counts of :class:`Usage`, by name."""


def usage_of(metadata: Any) -> Usage:
    """Read a ``usageMetadata`` JSON object; absent counts are 0 (proto3 JSON leaves them out)."""
    if not isinstance(metadata, dict):
        return Usage()

    def count(key: str) -> int:
        value = metadata.get(key)
        return value if isinstance(value, int) and value > 0 else 0

    usage = Usage(
        count("promptTokenCount"),
        count("cachedContentTokenCount"),
        count("candidatesTokenCount"),
        count("thoughtsTokenCount"),
    )
    if usage.prompt_tokens > LONG_CONTEXT_TOKENS:
        usage.long_prompt_tokens = usage.prompt_tokens
        usage.long_cached_tokens = usage.cached_tokens
        usage.long_output_tokens = usage.candidates_tokens + usage.thoughts_tokens
    return usage


def _rates(entry: dict[str, Any], where: str) -> dict[str, float]:
    """The six prices of an entry (or of its long-context tier), each a sane number."""
    values: dict[str, float] = {}
    for key in PRICE_FIELDS:
        value = entry.get(key)
        # Written so that NaN, infinities and integers too large for a float all fail.
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (0 <= value <= PRICE_CEILING)
        ):
            raise PriceTableError(
                f"{where}.{key} must be a price in USD per 1,000,000 tokens from 0 to "
                f"{PRICE_CEILING:,.0f}, got {value!r}"
            )
        values[key] = float(value)
    return values


def _day(entry: dict[str, Any], key: str, where: str) -> str | None:
    """An optional ``YYYY-MM-DD`` field."""
    value = entry.get(key)
    if value is None:
        return None
    try:
        date.fromisoformat(value if isinstance(value, str) else "")
    except ValueError:
        raise PriceTableError(
            f"{where}.{key} must be a date written YYYY-MM-DD, got {value!r}"
        ) from None
    return str(value)


def _long_context(entry: dict[str, Any], where: str) -> LongContext | None:
    tier = entry.get("long_context")
    if tier is None:
        return None
    above = tier.get("above_tokens") if isinstance(tier, dict) else None
    if isinstance(above, bool) or not isinstance(above, int) or above < 1:
        raise PriceTableError(
            f"{where}.long_context needs `above_tokens` (a prompt length in tokens) and the six "
            f"prices, got {tier!r}"
        )
    return LongContext(**_rates(tier, f"{where}.long_context"), above_tokens=above)


def _entries(document: Any, origin: str) -> dict[str, Price]:
    models = document.get("models") if isinstance(document, dict) else None
    if not isinstance(models, dict):
        raise PriceTableError(f"{origin}: expected an object with a `models` object")
    table: dict[str, Price] = {}
    for name, entry in models.items():
        where = f"{origin}: models.{name}"
        if not isinstance(entry, dict):
            raise PriceTableError(f"{where} is not an object")
        source, day, note = entry.get("source"), entry.get("date"), entry.get("note")
        if not isinstance(source, str) or not isinstance(day, str):
            raise PriceTableError(f"{where} needs a `source` and a `date`")
        table[name] = Price(
            **_rates(entry, where),
            model=name,
            source=source,
            date=day,
            retired=_day(entry, "retired", where),
            until=_day(entry, "until", where),
            note=note if isinstance(note, str) else None,
            long_context=_long_context(entry, where),
        )
    return table


@functools.cache
def shipped_prices() -> dict[str, Price]:
    """The table the package ships (read once; callers must not change it)."""
    text = resources.files("klstream.backends").joinpath("prices.json").read_text("utf-8")
    return _entries(json.loads(text), SHIPPED)


def load_prices(override: Path | None = None) -> dict[str, Price]:
    """The shipped table, with the models of ``override`` (a file of the same layout) on top."""
    table = dict(shipped_prices())
    if override is not None:
        try:
            document = json.loads(override.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise PriceTableError(f"cannot read prices from {override}: {error}") from error
        table.update(_entries(document, str(override)))
    return table


def price_for(model: str, table: dict[str, Price]) -> Price | None:
    """The entry for ``model``: its own, else the longest one it extends with a dash."""
    name = model.removeprefix("models/")
    if name in table:
        return table[name]
    extended = [key for key in table if name.startswith(f"{key}-")]
    return table[max(extended, key=len)] if extended else None


def age_days(price: Price, today: date) -> int | None:
    """Days since the entry's figures were read; None when its date is not ``YYYY-MM-DD``
    (files written for earlier releases may say otherwise)."""
    try:
        return (today - date.fromisoformat(price.date)).days
    except ValueError:
        return None


def unpriced(model: str) -> str:
    """What a run of ``model`` without a price entry shows instead of USD."""
    return f"no price entry matches {model}: a run counts its tokens but shows no USD"


def entry_warnings(price: Price, today: date) -> list[str]:
    """Why the entry may not be what a run costs today: its model retired, its prices past
    their announced end, or read too long ago."""
    warnings = []
    if price.retired is not None:
        tense = "was retired" if date.fromisoformat(price.retired) <= today else "retires"
        warnings.append(
            f"{price.model} {tense} on {price.retired}: requests to it fail, or reach another "
            "model (the scores' served_model column says which)"
        )
    if price.until is not None and date.fromisoformat(price.until) < today:
        warnings.append(
            f"{price.model}'s prices held until {price.until}"
            + (f" ({price.note})" if price.note else "")
        )
    age = age_days(price, today)
    if age is None:
        warnings.append(f"{price.model}'s price entry is dated {price.date!r}, not YYYY-MM-DD")
    elif age > STALE_AFTER_DAYS:
        warnings.append(
            f"{price.model}'s prices were read on {price.date}, {age} days ago: they may have "
            "changed"
        )
    return warnings


def describe_entry(price: Price, today: date) -> list[str]:
    """The entry as ``klstream prices`` prints it: its prices, date, source, age, retirement."""
    age = age_days(price, today)
    lines = [
        f"{price.model}: {_rate_line(price)}",
        f"  read {price.date}"
        + ("" if age is None else f" ({age} days ago)")
        + f" from {price.source}",
        "  retired: " + (price.retired or "no (no retirement date known)"),
    ]
    tier = price.long_context
    if tier is not None:
        lines.insert(1, f"  prompts over {thousands(tier.above_tokens)} tokens: {_rate_line(tier)}")
    if price.until is not None:
        lines.append(f"  prices hold until {price.until}")
    if price.note:
        lines.append(f"  note: {price.note}")
    return lines


def _rate_line(rates: Rates) -> str:
    return (
        f"input ${rates.input:g}, cached ${rates.cached_input:g}, output ${rates.output:g}; "
        f"batch ${rates.batch_input:g}, ${rates.batch_cached_input:g}, ${rates.batch_output:g} "
        "per 1M tokens"
    )


def cost_line(
    requests: int, positions: int, usage: Usage, price: Price | None, decoding: str
) -> str:
    """One line: requests per position, tokens by kind, and their list price."""
    per_position = f"{requests / positions:.3f}" if positions else "n/a"
    output = usage.candidates_tokens + usage.thoughts_tokens
    line = (
        f"cost: {thousands(requests)} requests ({per_position} per position, {decoding} decoding), "
        f"input {thousands(usage.prompt_tokens)} tokens ({100 * usage.cached_share:.1f}% cached), "
        f"output {thousands(output)} tokens ({thousands(usage.thoughts_tokens)} thinking)"
    )
    if price is None:
        return f"{line}; no price known for this model"
    return (
        f"{line}; ${price.usd(usage):.4f} at {price.model}'s list prices of {price.date} "
        f"(${price.usd(usage, batch=True):.4f} in batch)"
    )
