"""The one clock. `now()` is naive UTC, as the database columns and leases store it; `now_aware()` is for
the places that compare with timezone-aware values (X.509 validity)."""
from __future__ import annotations

import datetime as dt


def now() -> dt.datetime:
    """The current time in UTC, without tzinfo."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def now_aware() -> dt.datetime:
    """The current time in UTC, with tzinfo=UTC."""
    return dt.datetime.now(dt.UTC)
