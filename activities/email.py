"""Email: render a Jinja2 template in the recipient's language and send it over SMTP, once.

A template is `core/templates/email/{name}.txt`, one for every language: its texts are English
gettext messages (`{% trans %}`, `_()`), translated by the `emails` catalogs of `core/locale/`
(activities/i18n.py). Its first line is `Subject: …`, the rest is the plain-text body. The
HTML part is the same paragraphs in `_layout.html`, autoescaped, so each message is worded
once. A paragraph written as a `{% trans %}` block ends with `{% endtrans +%}`: the `+`
keeps the line break that `trim_blocks` would otherwise take.
"""

from __future__ import annotations

import functools
import hashlib
import json
import smtplib
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email import encoders
from email.charset import QP, Charset
from email.header import Header
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formatdate
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jinja2
from jinja2.runtime import Context
from sqlalchemy import insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities import i18n
from activities.db import ReferralEventRow, SentEmail
from activities.ledger import balances
from activities.receipts import referrer_copy
from core import TEMPLATES, receipts
from core.settings import SmtpSettings
from workflows.models.referral import EmailRequest
from workflows.models.values import Action
from workflows.referral import SEND_EMAIL


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str


@jinja2.pass_context
def _local(context: Context, moment: datetime | None, with_time: bool = False) -> str:
    """In the program's time zone; staff get the time too, referrers the date."""
    if moment is None:
        return "—"
    value = moment.astimezone(context["zone"])
    if with_time:
        return value.strftime("%Y-%m-%d %H:%M %Z")
    return i18n.format_date(value.date(), context["lang"])


@jinja2.pass_context
def _deadline_day(context: Context, moment: datetime) -> str:
    """A deadline at 00:00 local is reached at the end of the previous day."""
    return _local(context, moment - timedelta(seconds=1))


def _environment() -> jinja2.Environment:
    """One environment for every email, whatever its language: the language, the time zone
    and the referral come with each render (sends run in parallel threads)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES / "email"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
    )
    i18n.install(env)
    env.filters.update(local=_local, deadline_day=_deadline_day)
    return env


_ENVIRONMENT = _environment()


def render_email(
    request: EmailRequest, status_url: str | None = None, facts: dict[str, Any] | None = None
) -> RenderedEmail:
    """`status_url`: the referrer's signed status link, built here and never carried in a
    payload (anyone who can read a payload could open the page); `facts`: what only the
    database knows when the email is sent (a referrer's balance)."""
    referral = request.referral
    context = {
        "lang": request.language,
        "zone": ZoneInfo(referral.contact_calendar.timezone),
        "r": referral,
        "extra": request.extra,
        "status_url": status_url,
        "facts": facts or {},
        # What was typed into the public form goes only to an address known to be the
        # referrer's: the form must not make our sender a relay for anyone's text and links.
        "verified": bool((facts or {}).get("referrer_verified")),
    }
    source = _ENVIRONMENT.get_template(f"{request.template}.txt").render(context)
    first, _, body = source.strip().partition("\n")
    if not first.startswith("Subject:"):
        raise ValueError(f"template {request.template} must start with a 'Subject:' line")
    subject = first.removeprefix("Subject:").strip()
    text = body.strip() + "\n"
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    html = _ENVIRONMENT.get_template("_layout.html").render(
        subject=subject, paragraphs=paragraphs, r=referral, lang=request.language
    )
    return RenderedEmail(subject=subject, text=text, html=html)


def render_payee_email(template: str, language: str, facts: dict[str, Any]) -> RenderedEmail:
    """An email to a payee about a payout run (no referral of its own): `facts` are what the
    template prints."""
    context = {"lang": language, "facts": facts, "r": None}
    source = _ENVIRONMENT.get_template(f"{template}.txt").render(context)
    first, _, body = source.strip().partition("\n")
    subject = first.removeprefix("Subject:").strip()
    text = body.strip() + "\n"
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    html = _ENVIRONMENT.get_template("_layout.html").render(
        subject=subject, paragraphs=paragraphs, r=None, lang=language
    )
    return RenderedEmail(subject=subject, text=text, html=html)


def message_id(key: str, sender: str) -> str:
    domain = sender.rpartition("@")[2] or "referral-desk.invalid"
    return f"<{hashlib.sha256(key.encode()).hexdigest()[:40]}@{domain}>"


# Text parts in UTF-8, quoted-printable: mostly ASCII, they stay readable in the raw message.
_UTF8 = Charset("utf-8")
_UTF8.body_encoding = QP

# The sent-email log's columns, read and written without the ORM (a row per email).
_SENT: Any = SentEmail.__table__.c  # type: ignore[attr-defined]

# An attachment: its file name, media type and content.
Attachment = tuple[str, str, bytes]


def _header(value: str) -> str:
    """A header's value, encoded (RFC 2047) when it is not ASCII. A line break would end the
    header and start another, written by whoever typed the value: refused."""
    if "\r" in value or "\n" in value:
        raise ValueError(f"a header may not contain a line break: {value!r}")
    return value if value.isascii() else Header(value, _UTF8).encode()


def _attachment(filename: str, media_type: str, content: bytes) -> MIMEBase:
    main, _, sub = media_type.partition("/")
    part = MIMEBase(main, sub)
    part.set_payload(content)
    encoders.encode_base64(part)
    part.add_header("Content-Disposition", "attachment", filename=filename)
    return part


def compose(
    headers: Mapping[str, str],
    rendered: RenderedEmail,
    language: str,
    attachments: Sequence[Attachment] = (),
) -> Message:
    """The message: its text and HTML as alternatives, then its attachments. Built from the
    email package's compat32 classes, which take a header as it is given: the default policy
    parses each one, which cost more than rendering and sending the email together."""
    # A Charset where typeshed expects its name: the email package takes either.
    parts = [
        MIMEText(rendered.text, "plain", _UTF8),  # type: ignore[arg-type]
        MIMEText(rendered.html, "html", _UTF8),  # type: ignore[arg-type]
    ]
    message: Message = MIMEMultipart("alternative", _subparts=parts)
    if attachments:
        files = [_attachment(*attachment) for attachment in attachments]
        message = MIMEMultipart("mixed", _subparts=[message, *files])
    for name, value in {**headers, "Content-Language": language}.items():
        message[name] = _header(value)
    return message


def message_headers(key: str, sender: str, to: Sequence[str], subject: str) -> dict[str, str]:
    return {
        "Subject": subject,
        "From": sender,
        "To": ", ".join(to),
        "Date": formatdate(localtime=False),
        "Message-ID": message_id(key, sender),
        "X-Idempotency-Key": key,
    }


def build_message(
    request: EmailRequest, rendered: RenderedEmail, attachments: Sequence[Attachment] = ()
) -> Message:
    headers = message_headers(request.key, request.sender, request.to, rendered.subject)
    headers["X-Referral-Id"] = request.referral.referral_id
    return compose(headers, rendered, request.language, attachments)


PERMANENT_EMAIL_FAILURE = "PermanentEmailFailure"  # the workflow does not retry this type


def permanent(error: smtplib.SMTPException) -> ApplicationError | None:
    """The non-retryable error for an SMTP refusal that no retry can change (5xx for this
    message or recipient), or None when trying again later may work (4xx, connection, auth)."""
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in error.recipients.values()]
        if codes and all(code >= 500 for code in codes):
            details = "; ".join(
                f"{to}: {code} {reply.decode(errors='replace')}"
                for to, (code, reply) in error.recipients.items()
            )
            return ApplicationError(
                f"recipient refused: {details}", type=PERMANENT_EMAIL_FAILURE, non_retryable=True
            )
        return None
    if isinstance(error, smtplib.SMTPAuthenticationError):
        return None  # our credentials: fixed by an operator, then the retries succeed
    if isinstance(error, smtplib.SMTPResponseException) and error.smtp_code >= 500:
        reply = error.smtp_error
        reply = reply.decode(errors="replace") if isinstance(reply, bytes) else reply
        return ApplicationError(
            f"message refused: {error.smtp_code} {reply}",
            type=PERMANENT_EMAIL_FAILURE,
            non_retryable=True,
        )
    return None


class _Deadline:
    """Keeps every socket operation of one SMTP exchange within an overall deadline."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        remaining = self._end - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("SMTP exchange exceeded its deadline")
        return remaining

    def apply(self, client: smtplib.SMTP) -> None:
        if client.sock is not None:
            client.sock.settimeout(self.left())


@functools.lru_cache(maxsize=8)
def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verifies the relay's certificate and name: against the system's CAs, or only `ca_file`
    (a private CA). Without it, whoever sits between us and the relay would read every
    sign-in link and the SMTP password."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


def _open(smtp: SmtpSettings, deadline: _Deadline) -> smtplib.SMTP:
    if smtp.tls == "implicit":
        client: smtplib.SMTP = smtplib.SMTP_SSL(
            smtp.host, smtp.port, timeout=deadline.left(), context=tls_context(smtp.ca_file)
        )
    else:
        client = smtplib.SMTP(smtp.host, smtp.port, timeout=deadline.left())
    try:
        if smtp.tls == "starttls":
            deadline.apply(client)
            client.starttls(context=tls_context(smtp.ca_file))
        if smtp.user:
            deadline.apply(client)
            client.login(smtp.user, smtp.password or "")
    except BaseException:
        client.close()
        raise
    return client


def _send(client: smtplib.SMTP, message: Message, deadline: _Deadline) -> None:
    try:
        deadline.apply(client)
        client.send_message(message)
    except BaseException:
        client.close()
        raise


def _quit(client: smtplib.SMTP, deadline: _Deadline) -> None:
    """The message is the server's once it answered the data with 250: whatever QUIT gets
    afterwards (421 from a server shutting down, a reset, a timeout) must not fail the send,
    or the retry would deliver it twice. (`with SMTP()` raises unless QUIT gets 221.)"""
    try:
        deadline.apply(client)
        client.quit()
    except (smtplib.SMTPException, OSError):
        client.close()


def deliver(smtp: SmtpSettings, message: Message) -> None:
    """One SMTP exchange on its own connection, bounded by `smtp.deadline_seconds` as a whole."""
    deadline = _Deadline(smtp.deadline_seconds)
    client = _open(smtp, deadline)
    _send(client, message, deadline)
    _quit(client, deadline)


# A connection kept between messages is replaced after this long unused (servers drop idle
# clients after a few minutes) or after this many messages (relays limit them per session).
CONNECTION_IDLE_SECONDS = 30.0
MESSAGES_PER_CONNECTION = 100


class SmtpConnection(threading.local):
    """One SMTP session per sending thread, kept between messages: connecting, the greeting,
    EHLO, STARTTLS and login cost more round trips than the message itself.

    A kept session is checked with NOOP before each message; one that fails it, or any error
    while sending, is dropped and the next message opens a new one. A message is sent once
    per call, as with `deliver`: nothing here sends it again."""

    def __init__(self, smtp: SmtpSettings) -> None:
        self._smtp = smtp
        self._client: smtplib.SMTP | None = None
        self._sent = 0
        self._used_at = 0.0

    def deliver(self, message: Message) -> None:
        """Bounded by `smtp.deadline_seconds` as a whole, the NOOP included."""
        deadline = _Deadline(self._smtp.deadline_seconds)
        client = self._kept(deadline)
        if client is None:
            client = _open(self._smtp, deadline)
            self._sent = 0
        _send(client, message, deadline)
        self._client, self._sent, self._used_at = client, self._sent + 1, time.monotonic()

    def _kept(self, deadline: _Deadline) -> smtplib.SMTP | None:
        client, self._client = self._client, None
        if client is None:
            return None
        idle = time.monotonic() - self._used_at
        if idle > CONNECTION_IDLE_SECONDS or self._sent >= MESSAGES_PER_CONNECTION:
            _quit(client, deadline)
            return None
        try:
            deadline.apply(client)
            code, _ = client.noop()
        except (smtplib.SMTPException, OSError):
            client.close()
            return None
        if code != 250:
            _quit(client, deadline)
            return None
        return client


class EmailActivities:
    def __init__(
        self,
        engine: Engine,
        smtp: SmtpSettings,
        status_link: Callable[[str], str] | None = None,
        verify_url: str | None = None,
    ) -> None:
        """`status_link(referral_id)`: the referrer's status page link, for their emails;
        `verify_url`: the public page that checks a receipt."""
        self._engine = engine
        self._connection = SmtpConnection(smtp)
        self._status_link = status_link
        self._verify_url = verify_url

    def _facts(self, request: EmailRequest) -> dict[str, Any]:
        """Whether a referrer's address is known to be theirs; finance's payout email states
        what the referrer owes us from earlier clawbacks."""
        if request.template == "referrer_submitted":
            return {"referrer_verified": False, "receipt": self._receipt(request)}
        if request.template.startswith("referrer_"):
            return {"referrer_verified": self._referrer_verified(request)}
        commission = request.referral.commission
        if request.template != "staff_commission_payable" or commission is None:
            return {}
        owed = sum(
            (
                b.owed_to_us
                for b in balances(
                    self._engine,
                    str(request.referral.referrer.email),
                    exclude_referral=request.referral.referral_id,
                )
                if b.currency == commission.currency
            ),
            Decimal(0),
        )
        return {"owed_by_referrer": owed} if owed else {}

    def _receipt(self, request: EmailRequest) -> dict[str, Any] | None:
        """The acknowledgement's receipt (the referrer's copy), what the email says of it and
        its attachment; None for a referral registered before receipts."""
        copy = referrer_copy(self._engine, request.referral.referral_id)
        if copy is None:
            return None
        return {
            "seq": copy["seq"],
            "at": receipts.readable(copy["at"]),
            "fingerprint": receipts.fingerprint(copy),
            "verify_url": self._verify_url,
            "json": json.dumps(copy, indent=2, ensure_ascii=False) + "\n",
        }

    def _referrer_verified(self, request: EmailRequest) -> bool:
        """The referrer's address is theirs once our team has been in touch with them (the
        referral was `contacted`). Before that, anyone could have typed it into the public
        form, so what they typed is not sent to it (see referrer_submitted.txt)."""
        if request.template == "referrer_submitted":
            return False
        with Session(self._engine) as session:
            contacted = session.exec(
                select(ReferralEventRow.id).where(
                    ReferralEventRow.referral_id == request.referral.referral_id,
                    ReferralEventRow.action == Action.CONTACTED.value,
                    ReferralEventRow.outcome == "applied",
                )
            ).first()
        return contacted is not None

    @activity.defn(name=SEND_EMAIL)
    def send_email(self, request: EmailRequest) -> str:
        """Send once per key; returns the Message-ID. A transient failure raises (Temporal
        retries); a permanent refusal raises a non-retryable PermanentEmailFailure."""
        sent = self._sent(request.key)
        if sent is not None:
            return sent
        link = None
        if self._status_link is not None and request.template.startswith("referrer_"):
            link = self._status_link(request.referral.referral_id)
        facts = self._facts(request)
        rendered = render_email(request, link, facts)
        receipt = facts.get("receipt")
        attachments: list[Attachment] = []
        if receipt is not None:
            filename = f"receipt-{receipt['seq']}.json"
            attachments.append((filename, "application/json", receipt["json"].encode()))
        message = build_message(request, rendered, attachments)
        return self._send_once(request.key, request.to, rendered.subject, message)

    def send_to_payee(
        self,
        key: str,
        to: str,
        sender: str,
        language: str,
        template: str,
        facts: dict[str, Any],
        attachments: list[Attachment],
    ) -> str:
        """A payout run's email to one payee, once per key, with `attachments` (file name,
        media type, content): their statement or credit note."""
        sent = self._sent(key)
        if sent is not None:
            return sent
        rendered = render_payee_email(template, language, facts)
        headers = message_headers(key, sender, [to], rendered.subject)
        message = compose(headers, rendered, language, attachments)
        return self._send_once(key, [to], rendered.subject, message)

    def _sent(self, key: str) -> str | None:
        """The Message-ID of the email sent with `key`, if one was."""
        with self._engine.connect() as connection:
            query = select(_SENT.message_id).where(_SENT.key == key)
            return connection.execute(query).scalar()

    def _send_once(self, key: str, to: list[str], subject: str, message: Message) -> str:
        try:
            self._connection.deliver(message)
        except smtplib.SMTPException as error:
            refusal = permanent(error)
            if refusal is not None:
                raise refusal from error
            raise
        sent_id = str(message["Message-ID"])
        row = {"key": key, "message_id": sent_id, "recipients": ", ".join(to), "subject": subject}
        try:
            with self._engine.begin() as connection:
                connection.execute(insert(SentEmail).values(**row, sent_at=datetime.now(UTC)))
        except SQLAlchemyError as error:
            # Sent already: failing now would have Temporal send it again. The activity's
            # completion records the send; the row only spares a resend if that is lost too.
            activity.logger.warning("email %s sent but not recorded: %s", key, error)
        else:
            activity.logger.info("email %s sent", key)  # the key names no one
        return sent_id
