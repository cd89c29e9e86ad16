"""Every email template renders in both languages, escapes its HTML and keeps staff notes internal.

Pure rendering: no Temporal, no SMTP. The referral states are built directly from the models,
one per stage, as the workflow would snapshot them when the email is queued.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
from markupsafe import escape

from activities.email import TEMPLATES, RenderedEmail, render_email, render_payee_email
from activities.i18n import format_date
from devstack.settings import ROOT
from workflows.models.ledger import Commission, CommissionStatus, Payment, Refund
from workflows.models.referral import (
    Contact,
    ContactWindow,
    EmailRequest,
    HistoryEntry,
    Opportunity,
    Prospect,
    ReferralState,
    Referrer,
    Stage,
)
from workflows.models.values import Language

EMAIL_DIR = TEMPLATES / "email"
LANGUAGES = ("fr", "en")

REFERRAL_ID = "R-7KQ2M9XW4T"
COMPANY = "Dupont & <Fils>"
COMPANY_HTML = "Dupont &amp; &lt;Fils&gt;"
DOMAIN = "dupont-fils.example"
PRODUCT_NAME = "CloudSuite Financials"
REFERRER_EMAIL = "claire.martin@conseil-martin.example"
STATUS_URL = "https://referrals.example/status/R-7KQ2M9XW4T?token=abc&lang=fr"

# Staff-only material that must never reach the referrer.
SECRET_NOTE = "SECRET-NOTE budget owner hostile, competitor cheaper"
SECRET_REASON = "SECRET-REASON duplicate of an existing account"
SECRET_ACTOR = "agent.secret-actor"

# Received Monday 2025-03-03 (Paris); reminder after 3 business days, deadline after 5:
# the deadline instant is 00:00 Paris at the end of Monday 2025-03-10.
RECEIVED = datetime(2025, 3, 3, 9, 15, tzinfo=UTC)
REMINDER_AT = datetime(2025, 3, 6, 23, 0, tzinfo=UTC)
DEADLINE = datetime(2025, 3, 10, 23, 0, tzinfo=UTC)
DEADLINE_DAY = date(2025, 3, 10)


def day(value: date, language: Language) -> str:
    """A date as the emails write it in a sentence."""
    return format_date(value, language)


PAYMENT_DUE = datetime(2025, 5, 2, 14, 0, tzinfo=UTC)

REFERRER_TEMPLATES = {
    "referrer_submitted": Stage.SUBMITTED,
    "referrer_contacted": Stage.CONTACTED,
    "referrer_qualifying": Stage.QUALIFYING,
    "referrer_approved": Stage.APPROVED,
    "referrer_won": Stage.WON,
    "referrer_commission_payable": Stage.COMMISSION_PAYABLE,
    "referrer_commission_paid": Stage.COMMISSION_PAID,
    "referrer_declined": Stage.DECLINED,
    "referrer_rejected": Stage.REJECTED,
    "referrer_lost": Stage.LOST,
    "referrer_cancelled": Stage.CANCELLED,
    "referrer_expired": Stage.EXPIRED,
}
# Referrer emails about something other than a new stage.
REFERRER_NOTICES = {
    "referrer_protection_warning": Stage.APPROVED,
    "referrer_protection_extended": Stage.APPROVED,
    "referrer_refund": Stage.COMMISSION_PAID,
}
STAFF_TEMPLATES = {
    "staff_new_referral": Stage.SUBMITTED,
    "staff_contact_reminder": Stage.SUBMITTED,
    "staff_contact_escalation": Stage.SUBMITTED,
    "staff_sales_handoff": Stage.QUALIFYING,
    "staff_deal_won": Stage.WON,
    "staff_commission_payable": Stage.COMMISSION_PAYABLE,
    "staff_payment_overdue": Stage.WON,
    "staff_referral_cancelled": Stage.CANCELLED,
    "staff_email_failed": Stage.QUALIFYING,
    "staff_protection_warning": Stage.APPROVED,
    "staff_refund": Stage.COMMISSION_PAID,
}
TEMPLATE_STAGES = {**REFERRER_TEMPLATES, **REFERRER_NOTICES, **STAFF_TEMPLATES}
# What the workflow passes besides the referral, for the templates that need it.
TEMPLATE_EXTRA = {
    "staff_email_failed": {
        "to": REFERRER_EMAIL,
        "template": "referrer_qualifying",
        "reason": "recipient refused: 550 5.1.1 <user> unknown",
    }
}


def template_names() -> set[str]:
    """The messages about one referral (partials and the layout start with `_`; a payout
    run's emails to payees, `payee_`, are tested below)."""
    return {p.stem for p in EMAIL_DIR.glob("*.txt") if not p.name.startswith(("_", PAYEE_PREFIX))}


PAYEE_PREFIX = "payee_"


def _window() -> ContactWindow:
    return ContactWindow(
        received_at=RECEIVED,
        reminder_at=REMINDER_AT,
        deadline=DEADLINE,
        country="FR",
        timezone="Europe/Paris",
        holidays_version="0.60",
    )


def _entry(day: int, month: int, action: str, note: str | None = None) -> HistoryEntry:
    return HistoryEntry(
        at=datetime(2025, month, day, 10, 0, tzinfo=UTC),
        action=action,
        actor=SECRET_ACTOR,
        note=note,
    )


def make_state(stage: Stage, *, language: Language = "fr", minimal: bool = False) -> ReferralState:
    """A realistic referral snapshot at `stage`; `minimal` leaves every optional field empty."""
    window = _window()
    state = ReferralState(
        referral_id=REFERRAL_ID,
        stage=stage,
        referrer=Referrer(
            name="Claire Martin",
            email=REFERRER_EMAIL,
            company="Conseil Martin & Associés",
            phone=None if minimal else "+33 6 12 34 56 78",
            language=language,
        ),
        prospect=Prospect(
            company=COMPANY,
            website=f"https://www.{DOMAIN}/",
            country="FR",
            industry=None if minimal else "Agroalimentaire",
            sector="private",
        ),
        prospect_domain=DOMAIN,
        contact=Contact(
            name="Julien Roche",
            email=f"j.roche@{DOMAIN}",
            title=None if minimal else "Directeur administratif et financier",
            phone=None if minimal else "+33 4 72 00 00 00",
        ),
        opportunity=Opportunity(
            product="cloudsuite-financials",
            estimated_annual_value=None if minimal else Decimal("180000.00"),
            currency=None if minimal else "EUR",
            notes=None if minimal else "Remplacement d'un ERP vieillissant sur trois sites.",
        ),
        product_name=PRODUCT_NAME,
        submitted_at=window.received_at,
        contact_reminder_at=window.reminder_at,
        contact_deadline=window.deadline,
        contact_calendar=window,
        history=[HistoryEntry(at=RECEIVED, action="submitted", actor="referrer")],
    )
    history = state.history
    path = {
        Stage.SUBMITTED: [],
        Stage.CONTACTED: [Stage.CONTACTED],
        Stage.QUALIFYING: [Stage.CONTACTED, Stage.QUALIFYING],
        Stage.APPROVED: [Stage.CONTACTED, Stage.QUALIFYING, Stage.APPROVED],
        Stage.WON: [Stage.CONTACTED, Stage.QUALIFYING, Stage.APPROVED, Stage.WON],
        Stage.COMMISSION_PAYABLE: [
            Stage.CONTACTED,
            Stage.QUALIFYING,
            Stage.APPROVED,
            Stage.WON,
            Stage.COMMISSION_PAYABLE,
        ],
        Stage.COMMISSION_PAID: [
            Stage.CONTACTED,
            Stage.QUALIFYING,
            Stage.APPROVED,
            Stage.WON,
            Stage.COMMISSION_PAYABLE,
            Stage.COMMISSION_PAID,
        ],
        Stage.DECLINED: [Stage.CONTACTED, Stage.DECLINED],
        Stage.REJECTED: [Stage.CONTACTED, Stage.QUALIFYING, Stage.REJECTED],
        Stage.LOST: [Stage.CONTACTED, Stage.QUALIFYING, Stage.APPROVED, Stage.LOST],
        Stage.CANCELLED: [
            Stage.CONTACTED,
            Stage.QUALIFYING,
            Stage.APPROVED,
            Stage.WON,
            Stage.CANCELLED,
        ],
        Stage.EXPIRED: [Stage.CONTACTED, Stage.QUALIFYING, Stage.APPROVED, Stage.EXPIRED],
    }[stage]
    for step in path:
        if step is Stage.CONTACTED:
            history.append(_entry(4, 3, "contacted", SECRET_NOTE))
        elif step is Stage.QUALIFYING:
            history.append(_entry(5, 3, "accept", SECRET_NOTE))
            state.protected_until = datetime(2025, 9, 1, 22, 0, tzinfo=UTC)
        elif step is Stage.APPROVED:
            history.append(_entry(14, 3, "approve", SECRET_NOTE))
        elif step is Stage.WON:
            history.append(_entry(2, 4, "won", "amount 120000.00 EUR; payment terms 30 days"))
            state.payment_terms_days = 30
            state.payment_due_at = PAYMENT_DUE
            state.commission = Commission(
                basis_amount=Decimal("120000.00"),
                rate=Decimal("0.10"),
                amount=Decimal("12000.00"),
                currency="EUR",
            )
            # Between the deal and full payment: one partial payment, two overdue reminders.
            state.payments.append(
                Payment(
                    at=datetime(2025, 5, 20, 9, 0, tzinfo=UTC),
                    amount=Decimal("40000.00"),
                    reference="VIR-2025-0520",
                )
            )
            state.commission.customer_paid = Decimal("40000.00")
            state.payment_reminders_sent = 2
        elif step is Stage.COMMISSION_PAYABLE:
            assert state.commission is not None
            history.append(_entry(12, 6, "payment", "amount 80000.00 EUR; reference VIR-2025-0612"))
            state.payments.append(
                Payment(
                    at=datetime(2025, 6, 12, 9, 0, tzinfo=UTC),
                    amount=Decimal("80000.00"),
                    reference="VIR-2025-0612",
                )
            )
            state.commission.customer_paid = Decimal("120000.00")
            state.commission.status = CommissionStatus.PAYABLE
        elif step is Stage.COMMISSION_PAID:
            assert state.commission is not None
            history.append(_entry(20, 6, "payout", "reference PAYOUT-2025-0042"))
            state.commission.status = CommissionStatus.PAID
            state.commission.payout_reference = "PAYOUT-2025-0042"
            state.commission.paid_amount = Decimal("12000.00")
            # Within the clawback window, the customer got a credit note.
            state.refunds.append(
                Refund(
                    at=datetime(2025, 7, 2, 9, 0, tzinfo=UTC),
                    amount=Decimal("30000.00"),
                    reference="AVOIR-2025-07",
                    reason=SECRET_REASON,
                    clawback=Decimal("3000.00"),
                )
            )
            state.commission.customer_refunded = Decimal("30000.00")
            state.commission.clawed_back = Decimal("3000.00")
        elif step is Stage.EXPIRED:
            history.append(_entry(2, 9, "expire", "protection ended 2025-09-01"))
        elif step in (Stage.DECLINED, Stage.REJECTED, Stage.LOST, Stage.CANCELLED):
            history.append(_entry(21, 6, step.value, SECRET_REASON))
            if step is Stage.CANCELLED and state.commission is not None:
                state.commission.status = CommissionStatus.VOID
    if stage is Stage.SUBMITTED:
        state.contact_reminder_sent = True
        state.contact_sla_breached = True
    if minimal and state.commission is not None:
        state.payment_terms_days = None
    return ReferralState.model_validate(state.model_dump())


def render(
    template: str,
    language: Language,
    *,
    extra: dict[str, str] | None = None,
    minimal: bool = False,
    status_url: str | None = None,
    verified: bool = True,
) -> RenderedEmail:
    """`verified`: our team has been in touch with the referrer (their address is theirs)."""
    state = make_state(TEMPLATE_STAGES[template], language=language, minimal=minimal)
    return render_email(
        EmailRequest(
            key=f"{REFERRAL_ID}/{template}",
            to=["someone@example.com"],
            sender="referrals@example.com",
            language=language,
            template=template,
            referral=state,
            extra=extra or TEMPLATE_EXTRA.get(template, {}),
        ),
        status_url,
        {"referrer_verified": verified},
    )


ALL_CASES = [(name, lang) for lang in LANGUAGES for name in sorted(template_names())]
REFERRER_CASES = [(n, lang) for n, lang in ALL_CASES if n.startswith("referrer_")]
STAFF_CASES = [(n, lang) for n, lang in ALL_CASES if n.startswith("staff_")]


# --- the set of templates ---------------------------------------------------------------------


def test_one_template_per_email_for_every_language() -> None:
    # Languages differ by catalog (locale/<lang>/LC_MESSAGES/emails.po), not by template.
    assert not [path for path in EMAIL_DIR.iterdir() if path.is_dir()]
    assert (EMAIL_DIR / "_layout.html").is_file()


def test_every_expected_template_exists() -> None:
    assert template_names() == set(TEMPLATE_STAGES)


def test_every_stage_has_a_referrer_template() -> None:
    # The workflow sends `referrer_{stage}` on every stage change.
    assert {f"referrer_{stage.value}" for stage in Stage} == set(REFERRER_TEMPLATES)


# --- every template, both languages -------------------------------------------------------------


@pytest.mark.parametrize(("template", "language"), ALL_CASES)
def test_renders_subject_text_and_escaped_html(template: str, language: Language) -> None:
    email = render(template, language)

    assert email.subject
    assert "\n" not in email.subject
    assert REFERRAL_ID in email.subject or COMPANY in email.subject
    assert REFERRAL_ID in email.text
    assert email.text.endswith("\n") and not email.text.startswith("\n")
    assert "\n\n\n" not in email.text
    assert "None" not in email.text and "None" not in email.subject

    # Plain text keeps the raw name; HTML escapes it everywhere (title, heading, body).
    assert COMPANY in email.subject
    assert COMPANY in email.text
    assert COMPANY_HTML in email.html
    assert "&lt;Fils&gt;" in email.html
    assert "<Fils>" not in email.html

    assert email.html.lstrip().lower().startswith("<!doctype html>")
    assert f'<html lang="{language}">' in email.html
    assert f"<title>{escape(email.subject)}</title>" in email.html
    footer = email.html.rsplit("</p>", 1)[-1]
    assert "Referral Desk" in footer and REFERRAL_ID in footer
    for external in ("<img", "<link", "<script", "src=", "url("):  # self-contained
        assert external not in email.html


# The emails a referrer can get before our team has been in touch with them: the form
# could have been filled in by anyone, with anyone's address.
UNVERIFIED_CASES = [
    (name, lang)
    for name, lang in REFERRER_CASES
    if name in ("referrer_submitted", "referrer_declined", "referrer_cancelled")
]


@pytest.mark.parametrize(("template", "language"), UNVERIFIED_CASES)
def test_an_unverified_address_gets_none_of_what_was_typed(
    template: str, language: Language
) -> None:
    """Otherwise the public form relays anyone's text and links, from our sender, to any
    address typed into it."""
    state = make_state(TEMPLATE_STAGES[template], language=language)
    typed = [
        state.referrer.name,
        str(state.referrer.company),
        state.prospect.company,
        state.prospect_domain,
        state.contact.name,
        str(state.opportunity.notes),
    ]
    status_url = "https://referrals.example.com/status/abc"
    email = render(template, language, status_url=status_url, verified=False)
    for text in typed:
        assert text not in email.subject and text not in email.text, text
        assert escape(text) not in email.html, text
    assert REFERRAL_ID in email.subject and status_url in email.text
    links = re.findall(r"https?://[^\s<>\"]+", email.text + email.html)
    assert set(links) == {status_url}
    verified = render(template, language, status_url=status_url)
    assert COMPANY in verified.subject and "Claire Martin" in verified.text


@pytest.mark.parametrize(("template", "language"), ALL_CASES)
def test_the_email_snapshot_renders_as_the_whole_referral(
    template: str, language: Language
) -> None:
    """Emails carry `ReferralState.email_snapshot()` (slim payloads): every template must
    read nothing that the snapshot leaves out."""
    state = make_state(TEMPLATE_STAGES[template], language=language)
    snapshot = state.email_snapshot()
    assert snapshot.consent is None and len(snapshot.history) <= len(state.history)

    def rendered(referral: ReferralState) -> RenderedEmail:
        request = EmailRequest(
            key=f"{REFERRAL_ID}/{template}",
            to=["someone@example.com"],
            sender="referrals@example.com",
            language=language,
            template=template,
            referral=referral,
            extra=TEMPLATE_EXTRA.get(template, {}),
        )
        return render_email(request, "https://referrals.example/status/t")

    assert rendered(snapshot) == rendered(state)


@pytest.mark.parametrize(("template", "language"), ALL_CASES)
def test_renders_with_every_optional_field_empty(template: str, language: Language) -> None:
    email = render(template, language, minimal=True)
    assert REFERRAL_ID in email.text
    assert "None" not in email.text
    assert "\n\n\n" not in email.text


# --- referrer emails --------------------------------------------------------------------------


@pytest.mark.parametrize(("template", "language"), REFERRER_CASES)
def test_referrer_emails_keep_staff_notes_internal(template: str, language: Language) -> None:
    email = render(template, language)
    for secret in ("SECRET", SECRET_NOTE, SECRET_REASON, SECRET_ACTOR):
        assert secret not in email.subject
        assert secret not in email.text
        assert secret not in email.html


@pytest.mark.parametrize(("template", "language"), REFERRER_CASES)
def test_referrer_emails_link_the_status_page_when_known(template: str, language: Language) -> None:
    with_link = render(template, language, status_url=STATUS_URL)
    assert STATUS_URL in with_link.text
    assert STATUS_URL.replace("&", "&amp;") in with_link.html
    without = render(template, language)
    assert "referrals.example/status" not in without.text


@pytest.mark.parametrize("language", LANGUAGES)
def test_submitted_acknowledgement(language: Language) -> None:
    email = render("referrer_submitted", language, status_url=STATUS_URL)
    assert STATUS_URL in email.text
    # the last day allowed, not the 00:00 instant after it
    assert day(DEADLINE_DAY, language) in email.text
    assert day(date(2025, 3, 11), language) not in email.text
    assert PRODUCT_NAME in email.text
    if language == "fr":
        assert f"au plus tard le {day(DEADLINE_DAY, language)}" in email.text
        assert "secteur public" in email.text
        assert "3 à 5 jours ouvrés" in email.text
    else:
        assert f"by {day(DEADLINE_DAY, language)}" in email.text
        assert "public-sector" in email.text
        assert "3 to 5 business days" in email.text


def eur(english: str, language: Language) -> str:
    """An amount as the email shows it: `€12,000.00` in English, `12 000,00 €` in French."""
    if language == "fr":
        return english.replace(",", "\u202f").replace(".", ",") + "\xa0€"
    return f"€{english}"


@pytest.mark.parametrize("language", LANGUAGES)
def test_money_and_references_reach_the_referrer(language: Language) -> None:
    assert eur("12,000.00", language) in render("referrer_won", language).text
    assert eur("12,000.00", language) in render("referrer_commission_payable", language).text
    paid = render("referrer_commission_paid", language).text
    assert eur("12,000.00", language) in paid
    assert "PAYOUT-2025-0042" in paid


# --- staff emails -------------------------------------------------------------------------------


@pytest.mark.parametrize(("template", "language"), STAFF_CASES)
def test_staff_emails_identify_the_referral(template: str, language: Language) -> None:
    email = render(template, language)
    assert DOMAIN in email.text
    assert PRODUCT_NAME in email.text
    assert "Claire Martin" in email.text
    assert REFERRER_EMAIL in email.text
    assert "Conseil Martin & Associés" in email.text
    assert "Conseil Martin &amp; Associés" in email.html
    # Ends with the command to run next.
    last = email.text.strip().splitlines()[-1]
    assert last.startswith("$ referrals ") and REFERRAL_ID in last
    assert "<code" in email.html


@pytest.mark.parametrize("language", LANGUAGES)
def test_staff_emails_carry_the_numbers(language: Language) -> None:
    new = render("staff_new_referral", language).text
    assert day(DEADLINE_DAY, language) in new and day(date(2025, 3, 11), language) not in new
    assert f"$ referrals contacted {REFERRAL_ID}" in new
    assert "Julien Roche" in new and f"j.roche@{DOMAIN}" in new
    assert eur("180,000.00", language) in new
    assert "Remplacement d'un ERP" in new

    assert day(DEADLINE_DAY, language) in render("staff_contact_reminder", language).text
    assert day(DEADLINE_DAY, language) in render("staff_contact_escalation", language).text

    handoff = render("staff_sales_handoff", language).text
    assert f"$ referrals approve {REFERRAL_ID}" in handoff
    assert f"$ referrals reject {REFERRAL_ID}" in handoff

    won = render("staff_deal_won", language).text
    assert eur("120,000.00", language) in won and eur("12,000.00", language) in won
    assert day(date(2025, 5, 2), language) in won
    assert f"$ referrals payment {REFERRAL_ID}" in won

    payable = render("staff_commission_payable", language).text
    assert eur("12,000.00", language) in payable and eur("120,000.00", language) in payable
    assert f"$ referrals payout {REFERRAL_ID} --reference" in payable

    overdue = render("staff_payment_overdue", language)
    assert day(date(2025, 5, 2), language) in overdue.text
    assert (
        eur("40,000.00", language) in overdue.text and eur("120,000.00", language) in overdue.text
    )
    assert eur("80,000.00", language) in overdue.text
    assert ("n° 2" if language == "fr" else "#2") in overdue.subject
    assert f"$ referrals payment {REFERRAL_ID}" in overdue.text


def test_templates_directory_is_the_one_rendered() -> None:
    assert EMAIL_DIR == ROOT / "core" / "templates" / "email"


# --- a payout run's emails to payees ------------------------------------------------------------

PAYEE_FACTS = {
    "name": "Conseil Durand SARL",
    "number": "AF-2027-000042",
    "credit_note": "AV-2027-000003",
    "net": Decimal("1380.00"),
    "currency": "EUR",
    "recovered": Decimal("120.00"),
    "execution_date": date(2027, 3, 2),
    "account": "FR76 •••• 0185",
    "reason": "AC04: account closed",
}


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("template", ["payee_remittance", "payee_payment_failed"])
def test_payee_emails_say_what_was_paid_or_returned_in_the_payees_language(
    template: str, language: Language
) -> None:
    assert {p.stem for p in EMAIL_DIR.glob(f"{PAYEE_PREFIX}*.txt")} == {
        "payee_remittance",
        "payee_payment_failed",
    }
    email = render_payee_email(template, language, PAYEE_FACTS)
    assert "AF-2027-000042" in email.subject and "FR76 •••• 0185" in email.text
    assert "Conseil Durand SARL" in email.text and "<html" in email.html
    french = language == "fr"
    if template == "payee_remittance":
        assert ("1\u202f380,00" if french else "1,380.00") in email.text
        assert ("120,00" if french else "120.00") in email.text  # the clawback deducted
        assert ("Paiement de commissions" if french else "Commission payment") in email.subject
    else:
        assert "AV-2027-000003" in email.text and "AC04: account closed" in email.text
        assert ("rejeté" if french else "returned") in email.subject
    assert ("Cordialement" if french else "Kind regards") in email.text
