"""Database URLs: whether one reads unambiguously, and how to show one without its
credentials. Below settings, sources and state, which all show URLs."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

# What a database URL that cannot be read reliably is told; it never quotes the URL.
URL_HINT = (
    "percent-encode any '/', '?', '#', '@' or '%' in the user name and password"
    " (e.g. '?' as %3F, '#' as %23, '@' as %40)"
)


def describe_url(url: str) -> str:
    """A URL without its user and password, safe for logs and errors: the parts
    shown come after the URL's only "@", so no piece of a password is among them."""
    scheme = url.split("://", 1)[0] if "://" in url else "?"
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]{0,20}", scheme):
        scheme = "?"
    if not unambiguous_url(url):
        return f"{scheme}://(unparsable URL)"
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{scheme}://{parts.hostname or ''}{port}{parts.path}"


def unambiguous_url(url: str) -> bool:
    """Whether a database URL reads unambiguously as scheme://user:password@host:port/...

    A password holding a raw "/", "?" or "#" ends the host part early, leaving its
    "@" in the path, query or fragment; a raw "@" makes two of them. Drivers then
    misread the URL and quote the pieces, password included, in their errors.
    """
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a port that is not a number
    except ValueError:
        return False
    return parts.netloc.count("@") <= 1 and "@" not in parts.path + parts.query + parts.fragment
