"""List pagination (AIP-158): page_size + an opaque page_token.

The token is signed with the server's secret and bound to the method, the caller and the filter, so a
token from another list, another caller or a changed filter is refused (INVALID_ARGUMENT on page_token)
instead of silently returning someone else's page.

A list may page by key instead of by offset (keyset paging): the token then carries the sort key of the last
row served, and the next page is the rows after it, a short index range at any depth (ListInstances).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass

from reddwarf.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class Page:
    offset: int
    size: int
    # Keyset paging: the sort key of the last row of the page before (None: the first page, or an offset list).
    after: tuple[str, ...] | None = None


class Paginator:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _sign(self, payload: bytes) -> str:
        return hmac.new(self._secret, payload, hashlib.sha256).hexdigest()[:32]

    def page(self, method: str, caller: str, page_size: int, page_token: str, filter: str = "") -> Page:
        if page_size < 0:
            raise InvalidArgument("page_size must not be negative", field="page_size")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        if not page_token:
            return Page(0, size)
        try:
            raw = base64.urlsafe_b64decode(page_token.encode() + b"=" * (-len(page_token) % 4))
            body, _, sig = raw.rpartition(b".")
            data = json.loads(body)
            ok = hmac.compare_digest(sig.decode(), self._sign(body))
        except (ValueError, UnicodeDecodeError):
            ok, data = False, {}
        if not ok or data.get("m") != method or data.get("c") != caller or data.get("f") != filter:
            raise InvalidArgument("page_token is not a token from this list (same method, caller and "
                                  "filter); start again without it", field="page_token")
        after = data.get("k")
        if after is not None and not (isinstance(after, list) and all(isinstance(v, str) for v in after)):
            raise InvalidArgument("page_token is malformed; start again without it", field="page_token")
        return Page(int(data["o"]), size, tuple(after) if after is not None else None)

    def next_token(self, method: str, caller: str, page: Page, has_more: bool, filter: str = "",
                   after: tuple[str, ...] | None = None) -> str:
        """Token for the page after this one, or "" after the last page. Query `page.size + 1` rows to know
        whether there is more. `after`: the sort key of this page's last row, for a list paged by key."""
        if not has_more:
            return ""
        fields: dict[str, object] = {"m": method, "c": caller, "f": filter, "o": page.offset + page.size}
        if after is not None:
            fields["k"] = list(after)
        body = json.dumps(fields, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(body + b"." + self._sign(body).encode()).decode().rstrip("=")
