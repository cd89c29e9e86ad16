"""A prospect's identity is its registrable domain, from the Public Suffix List.

`https://www.shop.acme.co.uk/x` and `acme.co.uk` are one prospect; `a.github.io` and
`b.github.io` are two. The list is the snapshot bundled with the `publicsuffixlist` package:
nothing is downloaded at run time, and a release of the package updates it.
"""

from __future__ import annotations

from functools import cache

from publicsuffixlist import PublicSuffixList

from workflows.models.values import normalize_domain


@cache
def _suffixes() -> PublicSuffixList:
    return PublicSuffixList()


def registrable_domain(website_or_host: str) -> str:
    """The domain a company registered: one label below its public suffix."""
    host = normalize_domain(website_or_host)
    return _suffixes().privatesuffix(host) or host


def email_domain(address: str) -> str:
    return registrable_domain(address.rpartition("@")[2])


def public_sector_suffix(website: str, suffixes: list[str]) -> str | None:
    """The suffix of the program's public-sector list the website falls under, if any."""
    host = normalize_domain(website)
    for suffix in suffixes:
        suffix = suffix.strip(".").lower()
        if host == suffix or host.endswith("." + suffix):
            return suffix
    return None
