"""Credentials in URLs never reach logs, errors, MLflow or printed configs.

A URL carries credentials in its userinfo (``http://user:pass@host/v1``) and in query parameters
(``?token=...``, ``?api_key=...``, a presigned S3 URL's ``X-Amz-Signature`` / ``X-Amz-Credential``
/ ``X-Amz-Security-Token``). :func:`redact_url` replaces each with ``***``; :func:`redact_urls` does
it for every URL inside a text (a log line, an error, a YAML dump). :func:`split_credentials`
takes the userinfo off a URL so that a client can be handed it the supported way instead (MLflow:
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

REDACTED = "***"

# A query parameter is secret when its name contains one of these words: ``token``, ``api_key``,
# ``X-Amz-Signature``, ``X-Amz-Credential``, ``sig`` are; ``X-Amz-Date``, ``page`` are not.
SECRET_QUERY_KEY = re.compile(
    r"token|key|sig|secret|password|passwd|pwd|credential|auth|session", re.IGNORECASE
)
# A URL inside free text: a scheme, then anything up to whitespace, a quote or a closing bracket.
URL_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s'\"<>)\]}]+")


def redact_url(url: str) -> str:
    """``url`` with its userinfo and secret query values replaced by ``***``; other URLs unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        # With a password, the user name stays (it says whose credentials they were); a lone
        # userinfo is usually a token (https://TOKEN@host) and goes entirely.
        netloc = f"{user}:{REDACTED}@{host}" if has_password else f"{REDACTED}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(SECRET_QUERY_KEY.search(key) and value for key, value in pairs):
            query = "&".join(
                f"{quote(key, safe='-_.~')}="
                + (REDACTED if SECRET_QUERY_KEY.search(key) and value else quote(value, safe="-_.~/:"))
                for key, value in pairs
            )
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_urls(text: str) -> str:
    """Every URL in ``text`` passed through :func:`redact_url`."""
    return URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``(url without userinfo, username, password)``; the names are None when the URL has none."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url, None, None
    if "@" not in parts.netloc:
        return url, None, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    clean = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return clean, unquote(user) or None, unquote(password) or None
