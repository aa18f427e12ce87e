"""What requests cost: token usage as the service reports it, and the dated price table.

The package ships list prices (``klstream/backends/prices.json``: per model, input, cached input,
output and Batch Mode prices, each with its source and date). ``--prices FILE`` (same layout)
replaces or adds models. A model is priced by its own entry, else by the longest entry it
extends with a dash (``gemini-2.5-flash-preview-09-2025`` by ``gemini-2.5-flash``). A run records
the entry it used in ``run.json``, which the ``costs`` view (``sql/views.sql``) reads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from klstream.errors import PriceTableError

PRICE_FIELDS = (
    "input",
    "cached_input",
    "output",
    "batch_input",
    "batch_cached_input",
    "batch_output",
)
TOKENS_PER_PRICE_UNIT = 1_000_000


@dataclass(frozen=True)
class Price:
    """USD per 1,000,000 tokens of one model, with where and when the figures were read."""

    model: str
    input: float
    cached_input: float
    output: float
    batch_input: float
    batch_cached_input: float
    batch_output: float
    source: str
    date: str

    def usd(self, usage: Usage, batch: bool = False) -> float:
        """The list price of ``usage``: uncached input, cached input, output (thoughts too)."""
        uncached = usage.prompt_tokens - usage.cached_tokens
        output = usage.candidates_tokens + usage.thoughts_tokens
        if batch:
            rates = (self.batch_input, self.batch_cached_input, self.batch_output)
        else:
            rates = (self.input, self.cached_input, self.output)
        total = uncached * rates[0] + usage.cached_tokens * rates[1] + output * rates[2]
        return total / TOKENS_PER_PRICE_UNIT

    def recorded(self) -> dict[str, Any]:
        """The entry as ``run.json`` keeps it."""
        return asdict(self)


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

    return Usage(
        count("promptTokenCount"),
        count("cachedContentTokenCount"),
        count("candidatesTokenCount"),
        count("thoughtsTokenCount"),
    )


def _entries(document: Any, origin: str) -> dict[str, Price]:
    models = document.get("models") if isinstance(document, dict) else None
    if not isinstance(models, dict):
        raise PriceTableError(f"{origin}: expected an object with a `models` object")
    table: dict[str, Price] = {}
    for name, entry in models.items():
        if not isinstance(entry, dict):
            raise PriceTableError(f"{origin}: models.{name} is not an object")
        values: dict[str, float] = {}
        for key in PRICE_FIELDS:
            value = entry.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise PriceTableError(
                    f"{origin}: models.{name}.{key} must be a price >= 0, got {value!r}"
                )
            values[key] = float(value)
        source, date = entry.get("source"), entry.get("date")
        if not isinstance(source, str) or not isinstance(date, str):
            raise PriceTableError(f"{origin}: models.{name} needs a `source` and a `date`")
        table[name] = Price(name, **values, source=source, date=date)
    return table


def load_prices(override: Path | None = None) -> dict[str, Price]:
    """The shipped table, with the models of ``override`` (a file of the same layout) on top."""
    shipped = resources.files("klstream.backends").joinpath("prices.json").read_text("utf-8")
    table = _entries(json.loads(shipped), "klstream/backends/prices.json")
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


def cost_line(
    requests: int, positions: int, usage: Usage, price: Price | None, decoding: str
) -> str:
    """One line: requests per position, tokens by kind, and their list price."""
    per_position = f"{requests / positions:.3f}" if positions else "n/a"
    output = usage.candidates_tokens + usage.thoughts_tokens
    line = (
        f"cost: {requests:,} requests ({per_position} per position, {decoding} decoding), "
        f"input {usage.prompt_tokens:,} tokens ({100 * usage.cached_share:.1f}% cached), "
        f"output {output:,} tokens ({usage.thoughts_tokens:,} thinking)"
    )
    if price is None:
        return f"{line}; no price known for this model"
    return (
        f"{line}; ${price.usd(usage):.4f} at {price.model}'s list prices of {price.date} "
        f"(${price.usd(usage, batch=True):.4f} in batch)"
    )
