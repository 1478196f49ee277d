"""Seeded, deterministic fault injection for the fake WalkMe server."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass
class Faults:
    """Seeded fault injection; every rate is a probability in [0, 1] and defaults to off.

    Faults hit segment calls only, unless ``faults_on_token`` is set. Fields may be
    changed at runtime; assign a new ``Faults`` to ``WalkMeSandbox.faults`` to reseed.
    """

    seed: int = 0
    error_rate: float = 0.0
    throttle_rate: float = 0.0
    retry_after: float = 1.0
    # None: pick delta-seconds or HTTP-date at random for each 429.
    retry_after_http_date: bool | None = False
    drop_rate: float = 0.0
    delay: float = 0.0
    faults_on_token: bool = False

    def __post_init__(self) -> None:
        for name in ("error_rate", "throttle_rate", "drop_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"Faults.{name} must be within [0, 1], got {rate!r}")
        if self.retry_after < 0 or self.delay < 0:
            raise ValueError("Faults.retry_after and Faults.delay must not be negative")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Faults:
        """Build from JSON-like data; unknown keys and wrong types raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fault fields: {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name == "faults_on_token":
                ok = isinstance(value, bool)
            elif name == "retry_after_http_date":
                ok = value is None or isinstance(value, bool)
            elif name == "seed":
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok:
                raise ValueError(f"Faults.{name}: invalid value {value!r}")
            values[name] = value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, the same keys ``from_dict`` accepts."""
        return dataclasses.asdict(self)
