"""Optional API keys for the HTTP router.

Keys come from an environment variable (``VISURAY_API_KEYS``, comma- or newline-separated: how a
Kubernetes secret is usually exposed with ``envFrom``/``valueFrom``) and/or from a file (one key per line:
a secret mounted as a volume, which rotates without a restart of the pod's spec). No key configured means
the service is open, as before. A client sends ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``;
a missing or wrong key is a 401 JSON answer. ``/healthz`` stays open so that load balancers and Serve's
own health checks need no secret.

Keys are compared with :func:`hmac.compare_digest` against every configured key (no early exit), so the
time an answer takes says nothing about how much of a key was right.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

API_KEYS_ENV = "VISURAY_API_KEYS"
API_KEY_HEADER = "x-api-key"
OPEN_PATHS = frozenset({"/healthz"})  # probes from load balancers and Kubernetes carry no secret


def parse_api_keys(text: str) -> tuple[str, ...]:
    """Keys separated by commas or newlines; blanks and ``#`` comment lines are ignored."""
    keys = []
    for line in text.replace(",", "\n").splitlines():
        key = line.strip()
        if key and not key.startswith("#"):
            keys.append(key)
    return tuple(dict.fromkeys(keys))


def load_api_keys(
    file: str | Path | None = None, env_var: str = API_KEYS_ENV, environ: Mapping[str, str] | None = None
) -> tuple[str, ...]:
    """The keys from ``env_var`` and ``file`` together; a configured file that is missing is an error
    (a service that silently opens up because its secret failed to mount is worse than one that fails)."""
    environ = os.environ if environ is None else environ
    keys = list(parse_api_keys(environ.get(env_var, "")))
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"API key file {path} does not exist (is the secret mounted?)")
        keys += parse_api_keys(path.read_text())
    return tuple(dict.fromkeys(keys))


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries: ``X-API-Key`` or ``Authorization: Bearer``."""
    key = headers.get(API_KEY_HEADER)
    if key:
        return key.strip()
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


@dataclass(frozen=True)
class ApiKeyGuard:
    """Decides whether a request may pass; disabled (everything passes) when it holds no key."""

    keys: tuple[str, ...] = ()
    open_paths: frozenset[str] = OPEN_PATHS

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def accepts(self, key: str | None) -> bool:
        """Constant-time comparison with every configured key (all of them, whatever matches)."""
        if not self.enabled:
            return True
        if key is None:
            return False
        given = key.encode()
        matched = False
        for expected in self.keys:
            matched |= hmac.compare_digest(given, expected.encode())
        return matched

    def denial(self, path: str, headers: Mapping[str, str]) -> str | None:
        """None when the request may pass, otherwise the reason for a 401."""
        if not self.enabled or path in self.open_paths:
            return None
        key = presented_key(headers)
        if key is None:
            return "an API key is required: send it as the X-API-Key header (or Authorization: Bearer)"
        if not self.accepts(key):
            return "the API key is not valid"
        return None


def guard_from(file: str | None, env_var: str, extra_open_paths: Iterable[str] = ()) -> ApiKeyGuard:
    """The guard for a router replica (reads the environment and the file where the replica runs)."""
    return ApiKeyGuard(load_api_keys(file, env_var), OPEN_PATHS | frozenset(extra_open_paths))
