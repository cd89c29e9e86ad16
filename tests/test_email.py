"""The email activity against a real SMTP server on loopback and a real database."""

from __future__ import annotations

import smtplib
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from sqlalchemy.engine import Engine
from sqlmodel import Session
from temporalio.testing import ActivityEnvironment

from activities.db import SentEmail
from activities.email import EmailActivities, SmtpSettings, message_id
from starter.mail_sink import MaildirHandler
from tests.conftest import MailSink, free_port
from tests.factories import state_at
from workflows.models import EmailRequest, ProgramRules, Stage


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
    assert "Fromagerie Bellevue" in text.get_content()
    assert "Fromagerie Bellevue SAS" in html.get_content()
    assert '<html lang="fr">' in html.get_content()


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


def test_starttls_and_login_when_configured(
    rules: ProgramRules, engine: Engine, tmp_path: Path
) -> None:
    """A real submission server: STARTTLS required before AUTH, and the credentials checked."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-keyout", str(tmp_path / "key.pem"),
         "-out", str(tmp_path / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    logins: list[tuple[str, ...]] = []

    def authenticator(
        server: object, session: object, envelope: object, mechanism: str, auth_data: Any
    ) -> AuthResult:
        login = tuple(
            v.decode() if isinstance(v, bytes) else v for v in (auth_data.login, auth_data.password)
        )
        logins.append(login)
        return AuthResult(success=login == ("desk-mailer", "s3cret"), handled=False)

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
    try:
        settings = SmtpSettings("127.0.0.1", port, "desk-mailer", "s3cret", starttls=True)
        key = f"R-TEST000001/referrer/qualifying/{engine.url.get_backend_name()}-tls"
        ActivityEnvironment().run(
            EmailActivities(engine, settings).send_email,
            request(rules, key, "referrer_qualifying"),
        )
        wrong = SmtpSettings("127.0.0.1", port, "desk-mailer", "nope", starttls=True)
        with pytest.raises(smtplib.SMTPAuthenticationError):
            ActivityEnvironment().run(
                EmailActivities(engine, wrong).send_email,
                request(rules, key + "-wrong", "referrer_qualifying"),
            )
    finally:
        controller.stop()
    assert logins[0] == ("desk-mailer", "s3cret")
    assert set(logins[1:]) == {("desk-mailer", "nope")}  # smtplib tries each mechanism offered
    assert len(list((tmp_path / "mail" / "new").iterdir())) == 1
