"""A/B routes: a route name maps to weighted adapters; a request naming the route gets one arm.

    support: {v1: 0.9, v2: 0.1}

The arm is sticky per `user`: u = sha256(route, user) as a number in [0, 1) picks the arm whose
cumulative-weight interval holds u, so a user keeps their arm while the weights stay, and when a
weight grows only users of the arms after it move. Without `user` the arm is drawn at random.
Admins replace or delete routes at run time (PUT/DELETE /v1/routes/NAME).
"""
from __future__ import annotations

import bisect
import hashlib
import random
import threading


class RouteError(ValueError):
    pass


class Router:
    def __init__(self) -> None:
        self._routes: dict[str, tuple[list[str], list[float], dict[str, float]]] = {}
        self._lock = threading.Lock()

    def set(self, name: str, arms: dict[str, float]) -> None:
        if not arms:
            raise RouteError(f"route '{name}' needs at least one arm, e.g. {{\"v1\": 0.9, \"v2\": 0.1}}")
        bad = [a for a, w in arms.items() if not (w >= 0) or w == float("inf")]
        if bad:
            raise RouteError(f"route '{name}': the weight of '{bad[0]}' must be a finite number >= 0")
        total = sum(arms.values())
        if total <= 0:
            raise RouteError(f"route '{name}': the weights sum to 0; give at least one arm a positive weight")
        names, cum, acc = list(arms), [], 0.0
        for a in names:
            acc += arms[a] / total
            cum.append(acc)
        cum[-1] = 1.0
        with self._lock:
            self._routes[name] = (names, cum, {a: arms[a] / total for a in names})

    def delete(self, name: str) -> bool:
        with self._lock:
            return self._routes.pop(name, None) is not None

    def get(self, name: str) -> dict[str, float] | None:
        r = self._routes.get(name)
        return dict(r[2]) if r else None

    def all(self) -> dict[str, dict[str, float]]:
        return {n: dict(r[2]) for n, r in list(self._routes.items())}

    def using(self, adapter: str) -> list[str]:
        """Routes with `adapter` as an arm."""
        return sorted(n for n, r in list(self._routes.items()) if adapter in r[2])

    def choose(self, name: str, user: str | None) -> str:
        names, cum, _ = self._routes[name]
        if user:
            h = hashlib.sha256(f"{name}\x00{user}".encode("utf-8", "surrogatepass")).digest()
            u = int.from_bytes(h[:8], "big") / 2**64
        else:
            u = random.random()
        return names[min(bisect.bisect_right(cum, u), len(names) - 1)]
