"""Business-day arithmetic for the contact SLA.

Computed once, at submission, outside the workflow: the workflow receives
plain instants, so it needs neither `holidays` nor time-zone data, and a later
`holidays` release never changes a running referral.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

import holidays

from workflows.models.program import CalendarRules, ContactRules
from workflows.models.referral import ContactWindow


@lru_cache(maxsize=64)
def public_holidays(country: str, first_year: int, last_year: int) -> frozenset[date]:
    """Building a country's calendar costs more than the rest of a submission: once a process
    for each span of years."""
    years = range(first_year, last_year + 1)
    return frozenset(holidays.country_holidays(country, years=years))


def business_day(start: date, count: int, country: str) -> date:
    """The `count`-th business day after `start` (day 1 is the first business day after it)."""
    closed = public_holidays(country, start.year, start.year + 1 + count // 200)
    day = start
    remaining = count
    while remaining:
        day += timedelta(days=1)
        if day.weekday() < 5 and day not in closed:
            remaining -= 1
    return day


def end_of_day(day: date, zone: ZoneInfo) -> datetime:
    """00:00 local time at the end of `day`, as a UTC instant."""
    return datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone).astimezone(UTC)


def contact_window(
    received_at: datetime, calendar: CalendarRules, rules: ContactRules
) -> ContactWindow:
    zone = ZoneInfo(calendar.timezone)
    local_day = received_at.astimezone(zone).date()
    reminder_day = business_day(local_day, rules.reminder_business_days, calendar.country)
    deadline_day = business_day(local_day, rules.deadline_business_days, calendar.country)
    return ContactWindow(
        received_at=received_at.astimezone(UTC),
        reminder_at=end_of_day(reminder_day, zone),
        deadline=end_of_day(deadline_day, zone),
        country=calendar.country,
        timezone=calendar.timezone,
        holidays_version=holidays.__version__,
    )
