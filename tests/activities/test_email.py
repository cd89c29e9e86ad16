"""The email activity against a real SMTP server on loopback and a real database."""

from __future__ import annotations

import dataclasses
import smtplib
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope
from aiosmtpd.smtp import Session as SmtpSession
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.db import SentEmail, make_engine
from activities.email import (
    MESSAGES_PER_CONNECTION,
    PERMANENT_EMAIL_FAILURE,
    EmailActivities,
    RenderedEmail,
    build_message,
    deliver,
    message_id,
)
from activities.records import save_referral
from activities.schema import upgrade
from core.settings import SmtpSettings
from devstack.factories import state_at
from devstack.ports import free_port
from devstack.servers import MailSink
from starter.mail_sink import MaildirHandler
from workflows.models.program import ProgramRules
from workflows.models.referral import EmailRequest, HistoryEntry, ReferralRecord, Stage


def request(rules: ProgramRules, key: str, template: str = "referrer_submitted") -> EmailRequest:
    return EmailRequest(
        key=key,
        to=["claire.martin@conseil-martin.example"],
        sender=str(rules.sender),
        language="fr",
        template=template,
        referral=state_at(Stage.SUBMITTED, rules),
    )


def sent_to(sink: MailSink, key: str) -> list[str]:
    return [str(m["Message-ID"]) for m in sink.messages() if m["X-Idempotency-Key"] == key]


def test_sends_multipart_french_email_with_deterministic_id(
    rules: ProgramRules, engine: Engine, mail_sink: MailSink
) -> None:
    activities = EmailActivities(engine, mail_sink.settings())
    key = f"R-TEST000001/referrer/submitted/{engine.url.get_backend_name()}-1"
    result = ActivityEnvironment().run(activities.send_email, request(rules, key))
    assert result == message_id(key, str(rules.sender))
    [message] = [m for m in mail_sink.messages() if m["X-Idempotency-Key"] == key]
    assert message["To"] == "claire.martin@conseil-martin.example"
    assert message["Content-Language"] == "fr"
    assert "R-TEST000001" in message["Subject"]
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and html is not None
    # Nobody has been in touch with this address yet: nothing typed into the form in it.
    assert "Fromagerie Bellevue" not in text.get_content() + html.get_content()
    assert "Claire" not in text.get_content() + message["Subject"]
    assert '<html lang="fr">' in html.get_content()


def test_once_contacted_the_referrer_gets_the_referrals_details(
    rules: ProgramRules, engine: Engine, mail_sink: MailSink
) -> None:
    activities = EmailActivities(engine, mail_sink.settings())
    backend = engine.url.get_backend_name()
    referral = state_at(Stage.CONTACTED, rules)
    referral.referral_id = f"R-VERIFY{uuid.uuid4().hex[:6].upper()}"
    submitted = referral.history[0].model_copy(update={"seq": 0})
    contacted = HistoryEntry(
        at=submitted.at + timedelta(days=1), action="contacted", actor="bob", seq=1
    )
    save_referral(
        engine,
        ReferralRecord(
            state=referral.model_copy(update={"history": []}), events=[submitted, contacted]
        ),
    )
    key = f"{referral.referral_id}/referrer/declined/{backend}"
    declined = request(rules, key, "referrer_declined").model_copy(update={"referral": referral})
    ActivityEnvironment().run(activities.send_email, declined)
    [message] = [m for m in mail_sink.messages() if m["X-Idempotency-Key"] == key]
    assert "Fromagerie Bellevue" in message["Subject"]


def test_a_retried_send_does_not_send_twice(
    rules: ProgramRules, engine: Engine, mail_sink: MailSink
) -> None:
    activities = EmailActivities(engine, mail_sink.settings())
    key = f"R-TEST000001/referrer/contacted/{engine.url.get_backend_name()}-2"
    env = ActivityEnvironment()
    first = env.run(activities.send_email, request(rules, key, "referrer_contacted"))
    second = env.run(activities.send_email, request(rules, key, "referrer_contacted"))
    assert first == second
    assert sent_to(mail_sink, key) == [first]


def test_smtp_outage_raises_and_records_nothing(
    rules: ProgramRules, engine: Engine, mail_sink: MailSink
) -> None:
    down = EmailActivities(engine, SmtpSettings(host="127.0.0.1", port=free_port()))
    key = f"R-TEST000001/referrer/approved/{engine.url.get_backend_name()}-3"
    with pytest.raises(OSError):
        ActivityEnvironment().run(down.send_email, request(rules, key, "referrer_approved"))
    with Session(engine) as session:
        assert session.get(SentEmail, key) is None
    # Once SMTP is back, the retry delivers exactly one message.
    up = EmailActivities(engine, mail_sink.settings())
    ActivityEnvironment().run(up.send_email, request(rules, key, "referrer_approved"))
    assert len(sent_to(mail_sink, key)) == 1


def certificate(folder: Path, name: str, *alternative_names: str) -> tuple[Path, Path]:
    """A self-signed certificate for `name` (and its subject alternative names), as a test
    relay presents it; returns (cert, key)."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    san = ",".join(alternative_names) or f"DNS:{name}"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", f"/CN={name}", "-addext", f"subjectAltName={san}",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_starttls_verifies_the_relay_then_logs_in(
    rules: ProgramRules, engine: Engine, tmp_path: Path
) -> None:
    """A real submission server: STARTTLS required before AUTH, the credentials checked. Its
    certificate is self-signed: refused until its CA is configured, and one for another name
    is refused even then (whoever sits in between would read every sign-in link and the
    password)."""
    cert, key = certificate(tmp_path, "relay", "IP:127.0.0.1", "DNS:localhost")
    other_cert, other_key = certificate(tmp_path, "mail.elsewhere.example")
    logins: list[tuple[str, ...]] = []

    def authenticator(
        server: object, session: object, envelope: object, mechanism: str, auth_data: Any
    ) -> AuthResult:
        login = tuple(
            v.decode() if isinstance(v, bytes) else v for v in (auth_data.login, auth_data.password)
        )
        logins.append(login)
        return AuthResult(success=login == ("desk-mailer", "s3cret"), handled=False)

    def relay(chain: tuple[Path, Path]) -> tuple[Controller, int]:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(*chain)
        port = free_port()
        controller = Controller(
            MaildirHandler(tmp_path / "mail"),
            hostname="127.0.0.1",
            port=port,
            tls_context=tls,
            require_starttls=True,
            authenticator=authenticator,
            auth_required=True,
        )
        controller.start()
        return controller, port

    def submission_relay(port: int, ca_file: Path | None = None) -> SmtpSettings:
        return SmtpSettings(
            "127.0.0.1", port, "desk-mailer", "s3cret", tls="starttls", ca_file=ca_file
        )

    def send(smtp: SmtpSettings, suffix: str) -> None:
        key = f"R-TEST000001/referrer/qualifying/{engine.url.get_backend_name()}-{suffix}"
        ActivityEnvironment().run(
            EmailActivities(engine, smtp).send_email, request(rules, key, "referrer_qualifying")
        )

    controller, port = relay((cert, key))
    impostor, impostor_port = relay((other_cert, other_key))
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            send(submission_relay(port), "unverified")
        assert logins == []  # refused before the password was sent
        with pytest.raises(ssl.SSLCertVerificationError, match="match"):
            send(submission_relay(impostor_port, ca_file=other_cert), "name")
        assert logins == []
        trusted = submission_relay(port, ca_file=cert)
        send(trusted, "tls")
        wrong = dataclasses.replace(trusted, password="nope")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            send(wrong, "wrong")
    finally:
        controller.stop()
        impostor.stop()
    assert logins[0] == ("desk-mailer", "s3cret")
    assert set(logins[1:]) == {("desk-mailer", "nope")}  # smtplib tries each mechanism offered
    assert len(list((tmp_path / "mail" / "new").iterdir())) == 1


def test_implicit_tls_verifies_the_relay_then_sends(
    rules: ProgramRules, engine: Engine, tmp_path: Path
) -> None:
    """A relay that speaks TLS from the first byte (SMTPS, port 465 in production): its
    certificate verified as for STARTTLS, then the message sent."""
    cert, key = certificate(tmp_path, "relay", "IP:127.0.0.1", "DNS:localhost")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    port = free_port()
    controller = Controller(
        MaildirHandler(tmp_path / "mail"), hostname="127.0.0.1", port=port, ssl_context=tls
    )
    controller.start()

    def send(ca_file: Path | None, suffix: str) -> None:
        smtp = SmtpSettings("127.0.0.1", port, tls="implicit", ca_file=ca_file)
        key = f"R-TEST000001/referrer/qualifying/{engine.url.get_backend_name()}-smtps-{suffix}"
        ActivityEnvironment().run(
            EmailActivities(engine, smtp).send_email, request(rules, key, "referrer_qualifying")
        )

    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            send(None, "unverified")
        send(cert, "verified")
    finally:
        controller.stop()
    assert len(list((tmp_path / "mail" / "new").iterdir())) == 1


class Relay(MaildirHandler):
    """A relay that refuses some recipients (by domain: 550 for good, 451 for now) and can
    answer QUIT as a server shutting down does, after it has accepted the message."""

    def __init__(self, path: Path, *, quit_reply: str | None = None) -> None:
        super().__init__(path)
        self.quit_reply = quit_reply
        self.sessions = 0  # EHLOs: one per SMTP session the client opened
        self._open: list[SMTP] = []

    async def handle_EHLO(
        self, server: SMTP, session: SmtpSession, envelope: Envelope, hostname: str, responses: Any
    ) -> Any:
        self.sessions += 1
        session.host_name = hostname
        self._open.append(server)
        return responses

    def drop_sessions(self) -> None:
        """Close every client connection, as a relay restarting or timing out idle ones."""
        for server in self._open:
            if server.transport is not None:
                server.loop.call_soon_threadsafe(server.transport.close)
        self._open.clear()
        time.sleep(0.2)

    async def handle_RCPT(
        self, server: SMTP, session: SmtpSession, envelope: Envelope, address: str, options: Any
    ) -> str:
        if address.endswith("@gone.example"):
            return "550 5.1.1 mailbox unknown"
        if address.endswith("@busy.example"):
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_QUIT(self, server: SMTP, session: SmtpSession, envelope: Envelope) -> Any:
        return self.quit_reply or MISSING


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[tuple[Relay, SmtpSettings]]:
    handler = Relay(tmp_path / "relay", quit_reply="421 4.3.2 Service shutting down")
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    yield handler, SmtpSettings("127.0.0.1", port)
    controller.stop()


def test_a_refused_recipient_is_a_permanent_failure_and_451_is_not(
    rules: ProgramRules, engine: Engine, relay: tuple[Relay, SmtpSettings]
) -> None:
    handler, settings = relay
    activities = EmailActivities(engine, settings)
    gone = request(rules, "R-TEST000001/referrer/won/gone").model_copy(
        update={"to": ["claire@gone.example"]}
    )
    with pytest.raises(ApplicationError) as refused:
        ActivityEnvironment().run(activities.send_email, gone)
    assert refused.value.type == PERMANENT_EMAIL_FAILURE and refused.value.non_retryable
    assert "claire@gone.example: 550 5.1.1 mailbox unknown" in refused.value.message
    busy = gone.model_copy(
        update={"key": "R-TEST000001/referrer/won/busy", "to": ["c@busy.example"]}
    )
    with pytest.raises(smtplib.SMTPRecipientsRefused):  # retried by Temporal
        ActivityEnvironment().run(activities.send_email, busy)
    with Session(engine) as session:
        assert session.get(SentEmail, gone.key) is None and session.get(SentEmail, busy.key) is None


def test_a_message_accepted_before_a_failed_quit_counts_as_sent(
    rules: ProgramRules, engine: Engine, relay: tuple[Relay, SmtpSettings]
) -> None:
    """The relay accepts the data, then answers QUIT 421 (shutting down): the message is
    the relay's, so the send succeeded and is not repeated; a kept session retired with the
    same answer fails nothing either."""
    handler, settings = relay
    message = build_message(
        request(rules, "R-TEST000001/referrer/lost/quit"),
        RenderedEmail(subject="Lost", text="lost\n", html="<p>lost</p>"),
    )
    deliver(settings, message)  # one message, one session, QUIT answered 421
    assert len(handler.maildir) == 1
    activities = EmailActivities(engine, settings)
    env = ActivityEnvironment()
    for number in range(MESSAGES_PER_CONNECTION + 1):  # the last one retires the kept session
        key = f"R-TEST000001/referrer/lost/{engine.url.get_backend_name()}-quit-{number}"
        first = env.run(activities.send_email, request(rules, key, "referrer_lost"))
        assert first == message_id(key, str(rules.sender))
    assert len(handler.maildir) == MESSAGES_PER_CONNECTION + 2
    assert handler.sessions == 3


def test_one_session_carries_many_messages_and_a_dropped_one_is_replaced(
    rules: ProgramRules, engine: Engine, relay: tuple[Relay, SmtpSettings]
) -> None:
    """Messages from one thread share an SMTP session; when the relay drops it between two
    messages (a restart, an idle timeout), the next message opens a new one, and every
    message arrives once."""
    handler, settings = relay
    activities = EmailActivities(engine, settings)
    env = ActivityEnvironment()
    backend = engine.url.get_backend_name()

    def send(number: int) -> None:
        key = f"R-TEST000001/referrer/won/{backend}-session-{number}"
        env.run(activities.send_email, request(rules, key, "referrer_won"))

    for number in range(5):
        send(number)
    assert handler.sessions == 1 and len(handler.maildir) == 5
    handler.drop_sessions()
    for number in range(5, 8):
        send(number)
    assert handler.sessions == 2 and len(handler.maildir) == 8
    keys = [m["X-Idempotency-Key"] for m in handler.maildir]
    assert len(set(keys)) == 8


def test_a_sent_message_whose_record_fails_is_not_sent_again(
    rules: ProgramRules, tmp_path: Path, mail_sink: MailSink
) -> None:
    """The database refuses the record of a delivered email: the activity still succeeds
    (Temporal records the send), rather than fail and have the retry deliver it twice."""
    engine = make_engine(f"sqlite:///{tmp_path / 'full.db'}")
    upgrade(engine)
    with engine.begin() as connection:
        connection.execute(
            text(
                "CREATE TRIGGER disk_full BEFORE INSERT ON sent_email "
                "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
            )
        )
    key = "R-TEST000001/referrer/rejected/full"
    result = ActivityEnvironment().run(
        EmailActivities(engine, mail_sink.settings()).send_email,
        request(rules, key, "referrer_rejected"),
    )
    assert result == message_id(key, str(rules.sender))
    assert sent_to(mail_sink, key) == [result]
