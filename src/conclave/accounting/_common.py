"""Small helpers shared by the accounting modules: time, money, URLs.

Money is integer micro-dollars everywhere in accounting (1 USD = 1,000,000):
integers add up exactly in SQL, in Lua (below 2**53) and in Python, where
floats would drift.  ``Decimal`` appears only at the edges, for display.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

MICROS_PER_USD = 1_000_000
#: the largest amount Lua (doubles) and JSON handle exactly: about 9 billion dollars
MAX_MICROS = 2**53 - 1

#: a clock returns an aware UTC datetime; injected in tests to cross day boundaries
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime, what: str = "timestamp") -> datetime:
    """An aware datetime converted to UTC; naive ones are refused, not guessed."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware (UTC), got naive {value.isoformat()}")
    return value.astimezone(UTC)


def usd(micros: int) -> str:
    """``$12.50``, ``$0.000350``: at least cents, no trailing zeros beyond them."""
    value = Decimal(micros) / MICROS_PER_USD
    text = f"{value:.6f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"${whole}.{frac.ljust(2, '0')}"


def micros_from_usd(amount: Decimal | str | int) -> int:
    """Exact conversion; refuses floats so no binary rounding sneaks into money."""
    if isinstance(amount, float):
        raise TypeError("pass money as Decimal, str or int, never float")
    value = Decimal(amount) * MICROS_PER_USD
    if value != value.to_integral_value():
        raise ValueError(f"{amount} USD has more than 6 decimal places")
    return int(value)


def redact_url(url: str) -> str:
    """The URL without user name and password, safe for logs and error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def short_error(exc: BaseException) -> str:
    """One line from a driver exception, for an error message (drivers never echo passwords,
    but a URL with credentials can appear, so any is redacted)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    words = [redact_url(w) if "://" in w else w for w in text.split(" ")]
    return " ".join(words)[:300]
