"""``SYNCD_SCHEDULE`` (and a mapping's ``schedule``), parsed once into a value: an
interval or a 5-field cron."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

_INTERVAL = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_INTERVAL_DAYS = 366


@dataclass(frozen=True)
class Schedule:
    """``SYNCD_SCHEDULE``: an interval (``90s``, ``15m``, ``1h``, ``1d``) or 5-field cron."""

    text: str
    interval_seconds: int | None
    cron: CronTrigger | None = field(default=None, repr=False, compare=False)  # parsed once

    @classmethod
    def parse(cls, text: str) -> Schedule:
        match = _INTERVAL.match(text)
        if match:
            digits, unit = match.groups()
            if len(digits.lstrip("0")) > 9 or (
                int(digits) * _UNIT_SECONDS[unit] > MAX_INTERVAL_DAYS * 86400
            ):
                raise ValueError(f"an interval must be at most {MAX_INTERVAL_DAYS}d")
            seconds = int(digits) * _UNIT_SECONDS[unit]
            if seconds <= 0:
                raise ValueError("an interval must be longer than 0")
            return cls(text.strip(), seconds)
        if len(text.split()) != 5:
            raise ValueError(
                f"{text!r} is neither an interval like 90s, 15m, 1h nor a 5-field cron expression"
            )
        try:
            trigger = CronTrigger.from_crontab(text, timezone=UTC)
        except ValueError as exc:
            raise ValueError(f"bad cron expression {text!r}: {exc}") from None
        if trigger.get_next_fire_time(None, datetime.now(UTC)) is None:
            raise ValueError(f"cron expression {text!r} never fires (no such date)")
        return cls(text.strip(), None, trigger)

    @property
    def key(self) -> str:
        """What tells schedules apart: ``15m`` and ``900s`` are one, as are cron
        expressions that differ only in spacing."""
        if self.interval_seconds is not None:
            return f"{self.interval_seconds}s"
        return " ".join(self.text.split())

    def typical_interval(self) -> float:
        """Seconds between runs; for cron, the gap between its next two fire times."""
        if self.cron is None:
            assert self.interval_seconds is not None
            return float(self.interval_seconds)
        first = self.cron.get_next_fire_time(None, datetime.now(UTC))
        # parse() made sure it fires; a 5-field cron that fires once fires every year.
        assert first is not None
        second = self.cron.get_next_fire_time(first, first + timedelta(seconds=1))
        assert second is not None
        return float((second - first).total_seconds())

    def trigger(self) -> BaseTrigger:
        """APScheduler's trigger; an interval one counts from the moment it is made."""
        if self.cron is None:
            return IntervalTrigger(seconds=self.interval_seconds)
        return self.cron
