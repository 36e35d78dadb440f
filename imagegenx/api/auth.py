"""API-key check: sha256 digests compared in constant time."""
from __future__ import annotations

import hmac
from collections.abc import Iterable

from imagegenx.settings import hash_api_key


def match_key(presented: str | None, digests: Iterable[str]) -> str | None:
    """The digest of ``presented`` if it is an accepted key, else None.

    Every stored digest is compared (no early exit), so timing does not tell
    which keys exist.
    """
    if not presented:
        return None
    candidate = hash_api_key(presented)
    found = None
    for digest in digests:
        if hmac.compare_digest(candidate, digest):
            found = digest
    return found
