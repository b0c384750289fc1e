"""API keys from keys.yaml: who may use which adapters and routes, how often, and who is admin.

    keys:
      - key: "sk-acme-..."          # or  sha256: "<64 hex>"  (the key's sha256; then no secret in the file)
        name: acme                  # a label for logs (optional)
        adapters: ["acme-*"]        # globs over adapter names (and the base model's name)
        routes: ["support"]         # globs over A/B route names
        rate_limit: 60/min          # optional: N/s, N/min or N/hour (a token bucket of N)
        admin: false                # load/unload adapters, change routes, read /metrics
    routes:                         # optional: A/B routes at start-up (admins change them at run time)
      support: {acme-v1: 0.9, acme-v2: 0.1}

Only the sha256 of each key is kept in memory. A presented key is hashed and compared with
`hmac.compare_digest` against every entry (no early exit), so timing says nothing about which
keys exist or how much of one matched.
"""
from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator


class KeysFileError(ValueError):
    """keys.yaml cannot be used; the message names the file, the entry and the fix."""


class _KeySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str | None = None
    sha256: str | None = None
    name: str | None = None
    adapters: list[str] = []
    routes: list[str] = []
    rate_limit: str | int | None = None
    admin: bool = False

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v):
        if v is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", v):
            raise ValueError("sha256 must be 64 hex characters (`printf %s KEY | sha256sum`)")
        return v.lower() if v else v

    @model_validator(mode="after")
    def _one(self):
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of `key` (the secret) or `sha256` (its hash)")
        if self.key is not None and len(self.key) < 8:
            raise ValueError("a key must be at least 8 characters")
        return self


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[_KeySpec]
    routes: dict[str, dict[str, float]] = {}


def parse_rate(v: str | int | None) -> tuple[float, float] | None:
    """'60/min' -> (60, 60.0): N requests per period seconds; a bare number is per minute."""
    if v is None:
        return None
    if isinstance(v, int):
        n, per = float(v), 60.0
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*", v)
        if not m:
            raise ValueError(f"rate_limit '{v}': write N/s, N/min or N/hour")
        n, per = float(m.group(1)), float({"s": 1, "m": 60, "h": 3600}[m.group(2)[0]])
    if n <= 0:
        raise ValueError("rate_limit must be positive (leave it out for no limit)")
    return n, per


class RateLimiter:
    """Token bucket: `rate` requests per second on average, bursts up to one period's worth."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, max(burst, 1.0)
        self.tokens, self.t = self.burst, time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> float:
        """0 when allowed, else the seconds until the next request is."""
        with self._lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
            self.t = now
            if self.tokens >= 1:
                self.tokens -= 1
                return 0.0
            return (1 - self.tokens) / self.rate


@dataclass
class Tenant:
    name: str
    digest: bytes = b""
    adapters: list[str] = field(default_factory=lambda: ["*"])
    routes: list[str] = field(default_factory=lambda: ["*"])
    admin: bool = False
    limiter: RateLimiter | None = None

    def may_use_model(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, g) for g in self.adapters)

    def may_use_route(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, g) for g in self.routes)


OPEN = Tenant("open", admin=True)  # no --keys: every request may do everything (loopback only)


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class Tenants:
    def __init__(self, tenants: list[Tenant]) -> None:
        self.tenants = tenants

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant for an `Authorization: Bearer KEY` header, or None."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        d = digest(token.strip())
        found = None
        for t in self.tenants:  # all of them, always: the time does not depend on which one matches
            if hmac.compare_digest(d, t.digest):
                found = t
        return found


def load_keys(path: str) -> tuple[Tenants, dict[str, dict[str, float]]]:
    """(tenants, routes) from keys.yaml; a bad file is one KeysFileError naming the entry."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise KeysFileError(f"--keys {path}: file not found")
    try:
        raw = yaml.safe_load(p.read_text())
        spec = _KeysFile.model_validate(raw)
    except yaml.YAMLError as e:
        raise KeysFileError(f"{path} is not valid YAML: {e}") from None
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise KeysFileError(f"{path}: {where}: {err['msg']} (see examples/serve/keys.yaml)") from None
    tenants, seen = [], set()
    for i, k in enumerate(spec.keys):
        d = digest(k.key) if k.key is not None else bytes.fromhex(k.sha256)
        if d in seen:
            raise KeysFileError(f"{path}: keys.{i}: the same key appears twice; give each tenant its own key")
        seen.add(d)
        try:
            rate = parse_rate(k.rate_limit)
        except ValueError as e:
            raise KeysFileError(f"{path}: keys.{i}.rate_limit: {e}") from None
        limiter = RateLimiter(rate[0] / rate[1], burst=rate[0]) if rate else None
        tenants.append(Tenant(k.name or f"key{i}", d, list(k.adapters), list(k.routes), k.admin, limiter))
    return Tenants(tenants), spec.routes

