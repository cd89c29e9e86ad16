"""CSV cells a spreadsheet shows as text. A cell that starts with a formula character runs
as a formula when the file is opened (CSV injection): a referrer's name typed into the
public form as `=HYPERLINK(…)` must reach staff as text. Every CSV export goes through here.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

# A spreadsheet runs a cell that starts with one of these as a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_text(text: str) -> str:
    """`text`, with a leading quote when a spreadsheet would take it for a formula; a plain
    number (a negative amount) is left as it is, since it cannot be one."""
    if not text.startswith(FORMULA_STARTS) or _number(text):
        return text
    return f"'{text}"


def spreadsheet_row(row: dict[str, Any]) -> dict[str, Any]:
    """`row` with every text cell neutralised; numbers, dates and empty cells unchanged."""
    return {k: spreadsheet_text(v) if isinstance(v, str) else v for k, v in row.items()}


def _number(text: str) -> bool:
    try:
        Decimal(text)
    except InvalidOperation:
        return False
    return text.strip() == text and text.lstrip("+-")[:1].isdigit()
