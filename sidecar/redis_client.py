"""The sidecar's Redis connection: AUTH (ACL user, password file or URL) and TLS (`rediss://`), built from Config.

Secrets never leave this module in text: a URL is shown only through `redact_url`, errors only through
`describe_error`, and the password file's content lives only inside the client's connection pool.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sidecar.settings import ConfigError, redact_url

if TYPE_CHECKING:
    import redis.asyncio

    from sidecar.config import Config

TIMEOUT_S = 5.0
_AUTH_FAILED = re.compile(r"WRONGPASS|NOAUTH|invalid username-password|authentication required|"
                          r"already authenticated", re.IGNORECASE)
# Any URL with user info inside free text (an exception message, a log line): mask everything after the user.
_URL_WITH_USERINFO = re.compile(r"(rediss?|unix)://([^\s:@/]*):[^\s@]*@")

__all__ = ["client_options", "connect", "describe_error", "read_secret", "redact_url", "scrub"]


def scrub(text: str) -> str:
    """Masks the password of any Redis URL inside free text."""
    return _URL_WITH_USERINFO.sub(r"\1://\2:***@", text)


def describe_error(e: BaseException) -> str:
    """A redis-py/ssl error as one line without secrets, with the setting to check where the cause is known."""
    from redis.exceptions import AuthenticationError, AuthorizationError, NoPermissionError

    msg = scrub(f"{type(e).__name__}: {e}")
    if isinstance(e, AuthenticationError) or _AUTH_FAILED.search(msg):
        return f"authentication failed ({msg}): check MX_REDIS_USERNAME and MX_REDIS_PASSWORD_FILE"
    if isinstance(e, (AuthorizationError, NoPermissionError)) or "NOPERM" in msg:
        return f"the Redis user lacks a permission ({msg}): see README 'Redis AUTH/TLS' for the ACL it needs"
    if "SSL" in msg or "TLS" in msg or "certificate" in msg.lower():
        return f"TLS failed ({msg}): check MX_REDIS_TLS_CA_FILE (and the client certificate if the server asks for one)"
    return msg


def read_secret(path: str) -> str:
    """A Kubernetes Secret file's content, without the trailing newline an `echo` adds."""
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the secret file {path}: {type(e).__name__}") from None
    if not value:
        raise ConfigError(f"the secret file {path} is empty")
    return value


def client_options(cfg: Config) -> dict[str, Any]:
    """Keyword arguments for redis-py beyond the URL (holds the password: never log the result)."""
    opts: dict[str, Any] = {"socket_timeout": TIMEOUT_S, "socket_connect_timeout": TIMEOUT_S}
    if cfg.redis_username:
        opts["username"] = cfg.redis_username
    if cfg.redis_password_file:
        opts["password"] = read_secret(cfg.redis_password_file)
    if urlsplit(cfg.redis_url).scheme == "rediss":
        opts["ssl_cert_reqs"] = "required"  # and hostname checks (redis-py's default)
        if cfg.redis_tls_ca_file:
            opts["ssl_ca_certs"] = cfg.redis_tls_ca_file
        if cfg.redis_tls_cert_file:
            opts["ssl_certfile"] = cfg.redis_tls_cert_file
            opts["ssl_keyfile"] = cfg.redis_tls_key_file
    return opts


def connect(cfg: Config) -> redis.asyncio.Redis:
    """The client for MX_REDIS_URL with the AUTH/TLS settings. No I/O: the first command connects."""
    import redis.asyncio as aioredis

    opts = client_options(cfg)
    try:
        return aioredis.Redis.from_url(cfg.redis_url, **opts)
    except ValueError as e:
        raise ConfigError(f"MX_REDIS_URL={redact_url(cfg.redis_url)}: {scrub(str(e))}") from None
