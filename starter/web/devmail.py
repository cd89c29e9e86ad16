"""Dev stack only (served on loopback, see `served_app`): what the SMTP sink caught, at
`/dev/mail`. Sign-in links are blanked out: whoever reaches the page must not be able to sign
in as anyone, staff included; a developer opens them from the message file, named on the page.
"""

from __future__ import annotations

import mailbox
import re
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from starter.web.deps import SiteDep


def _read_mail(maildir: Path) -> list[tuple[str, EmailMessage]]:
    box = mailbox.Maildir(maildir, create=False)
    found = []
    for key in box.keys():
        parsed = message_from_bytes(box.get_bytes(key), policy=policy.default)
        if isinstance(parsed, EmailMessage):
            found.append((key, parsed))

    def sent_at(item: tuple[str, EmailMessage]) -> tuple[datetime, tuple[int, ...]]:
        """Date header, then the delivery time in the Maildir key (finer than a second)."""
        try:
            date = parsedate_to_datetime(str(item[1]["Date"]))
        except (TypeError, ValueError):
            date = datetime.min
        if date.tzinfo is None:  # "-0000" dates parse naive; they are UTC
            date = date.replace(tzinfo=UTC)
        delivered = re.match(r"(\d+)\.M(\d+)P\d+Q(\d+)", item[0])
        return date, tuple(int(n) for n in delivered.groups()) if delivered else ()

    return sorted(found, key=sent_at, reverse=True)


SIGN_IN_LINK = re.compile(r"https?://[^\s\"'<>]+/sign-in/[^\s\"'<>]+")


def without_sign_in_links(text: str, key: str) -> str:
    return SIGN_IN_LINK.sub(f"[sign-in link: open it from the message file new/{key}]", text)


router = APIRouter(include_in_schema=False)


def sink_maildir(site: SiteDep) -> Path:
    assert site.maildir is not None, "the dev mail routes are included with a maildir only"
    return site.maildir


Maildir = Annotated[Path, Depends(sink_maildir)]


@router.get("/dev/mail", response_class=HTMLResponse)
async def mail_list(request: Request, site: SiteDep, maildir: Maildir) -> HTMLResponse:
    messages = _read_mail(maildir) if (maildir / "new").exists() else []
    return site.templates.TemplateResponse(
        request, "dev_mail.html", {"lang": "en", "messages": messages, "message": None}
    )


@router.get("/dev/mail/{key}", response_class=HTMLResponse)
async def mail_message(request: Request, site: SiteDep, maildir: Maildir, key: str) -> HTMLResponse:
    found = dict(_read_mail(maildir)) if (maildir / "new").exists() else {}
    message = found.get(key)
    if message is None:
        return HTMLResponse("no such message", status_code=404)
    text_part = message.get_body(("plain",))
    html_part = message.get_body(("html",))
    return site.templates.TemplateResponse(
        request,
        "dev_mail.html",
        {
            "lang": "en",
            "messages": None,
            "message": message,
            "text": without_sign_in_links(text_part.get_content() if text_part else "", key),
            "html": without_sign_in_links(html_part.get_content() if html_part else "", key),
        },
    )
