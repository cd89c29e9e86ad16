"""Business-day instants of the contact SLA (DESIGN.md section 3)."""

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import holidays
import pytest

from starter.contact_window import business_day, contact_window
from workflows.models.program import CalendarRules, ContactRules

PARIS = ZoneInfo("Europe/Paris")
FR = CalendarRules(country="FR", timezone="Europe/Paris")
RULES = ContactRules(reminder_business_days=3, deadline_business_days=5)


def end_of(day: str) -> datetime:
    """00:00 Paris time at the end of `day`."""
    local = datetime.fromisoformat(day).replace(tzinfo=PARIS) + timedelta(days=1)
    return local.astimezone(UTC)


@pytest.mark.parametrize(
    ("received", "reminder_day", "deadline_day"),
    [
        ("2026-11-30T10:00", "2026-12-03", "2026-12-07"),  # Monday
        ("2026-12-05T10:00", "2026-12-09", "2026-12-11"),  # Saturday
        ("2026-12-24T10:00", "2026-12-30", "2027-01-04"),  # 25 Dec and 1 Jan are holidays
        ("2026-11-27T23:30", "2026-12-02", "2026-12-04"),  # Friday night, Paris time
        ("2026-07-13T09:00", "2026-07-17", "2026-07-21"),  # 14 July
    ],
)
def test_fr_contact_window(received: str, reminder_day: str, deadline_day: str) -> None:
    received_at = datetime.fromisoformat(received).replace(tzinfo=PARIS)
    window = contact_window(received_at, FR, RULES)
    assert window.reminder_at == end_of(reminder_day)
    assert window.deadline == end_of(deadline_day)
    assert window.received_at == received_at.astimezone(UTC)
    assert (window.country, window.timezone) == ("FR", "Europe/Paris")
    assert window.holidays_version == holidays.__version__


def test_reminder_and_deadline_are_local_midnight() -> None:
    window = contact_window(datetime(2026, 12, 24, 9, tzinfo=UTC), FR, RULES)
    assert window.reminder_at.astimezone(PARIS).isoformat() == "2026-12-31T00:00:00+01:00"
    assert window.deadline.astimezone(PARIS).isoformat() == "2027-01-05T00:00:00+01:00"


def test_receipt_counts_in_the_program_time_zone() -> None:
    # 23:30 UTC on Sunday is already Monday in Paris: day 1 is Tuesday.
    received = datetime(2026, 11, 29, 23, 30, tzinfo=UTC)
    window = contact_window(received, FR, RULES)
    assert window.reminder_at == end_of("2026-12-03")


def test_other_calendar_country() -> None:
    # Friday 26 Dec 2025 is a holiday in Germany, not in France.
    assert business_day(date(2025, 12, 24), 1, "FR") == date(2025, 12, 26)
    assert business_day(date(2025, 12, 24), 1, "DE") == date(2025, 12, 29)
    berlin = ZoneInfo("Europe/Berlin")
    de = CalendarRules(country="DE", timezone="Europe/Berlin")
    window = contact_window(datetime(2025, 12, 24, 12, tzinfo=UTC), de, RULES)
    assert window.deadline.astimezone(berlin).isoformat() == "2026-01-06T00:00:00+01:00"


def test_business_day_crosses_year_end() -> None:
    assert business_day(date(2026, 12, 31), 1, "FR") == date(2027, 1, 4)
