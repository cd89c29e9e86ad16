"""Self-billed statements and credit notes, as PDF, in the payee's language (docs/payouts.md).

A statement is an invoice the vendor issues in the payee's name under their mandate (CGI art.
289 I-2; annex II art. 242 nonies A): both parties' identities, a unique number in a
chronological series, "Autofacturation", one line per referral, clawbacks recovered, totals
with VAT where the payee's regime has it, the regime's legal mention, and where it is paid
(the IBAN masked). Pure: the export activity hands in everything printed.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Literal

from fpdf import FPDF
from pydantic import BaseModel
from text_unidecode import unidecode

from core.payees import PayeeProfile, VatRegime, mask_iban
from workflows.models.program import PayingCompany
from workflows.models.values import Language

# What each regime prints, in French (the law's words) then, for English statements, glossed.
LEGAL_MENTIONS: dict[VatRegime, str] = {
    VatRegime.FR_VAT: "",
    VatRegime.FRANCHISE: "TVA non applicable, art. 293 B du CGI",
    VatRegime.EU_REVERSE_CHARGE: "Autoliquidation (art. 196 de la directive 2006/112/CE)",
    VatRegime.OUTSIDE_EU: "Autoliquidation par le preneur (art. 283-2 du CGI)",
    VatRegime.NOT_REGISTERED: "Opération non soumise à la TVA : bénéficiaire non assujetti",
}
GLOSSES: dict[VatRegime, str] = {
    VatRegime.FRANCHISE: "VAT not applicable (French VAT exemption for small businesses)",
    VatRegime.EU_REVERSE_CHARGE: "Reverse charge: VAT due by the customer",
    VatRegime.OUTSIDE_EU: "Reverse charge: VAT due by the customer",
    VatRegime.NOT_REGISTERED: "Not subject to VAT: the payee is not a taxable person",
}

LABELS: dict[str, dict[Language, str]] = {
    "statement": {"fr": "Facture (autofacturation)", "en": "Self-billed invoice"},
    "credit_note": {"fr": "Avoir (autofacturation)", "en": "Self-billed credit note"},
    "self_billing": {
        "fr": "Autofacturation : facture établie par {company} au nom et pour le compte de "
        "{payee}, mandat {mandate}.",
        "en": "Autofacturation (self-billing): invoice issued by {company} in the name and on "
        "behalf of {payee}, mandate {mandate}.",
    },
    "number": {"fr": "Numéro", "en": "Number"},
    "date": {"fr": "Date", "en": "Date"},
    "supplier": {"fr": "Fournisseur (mandant)", "en": "Supplier (principal)"},
    "customer": {"fr": "Client (mandataire)", "en": "Customer (agent)"},
    "siret": {"fr": "SIRET", "en": "SIRET"},
    "vat_id": {"fr": "N° TVA", "en": "VAT number"},
    "referral": {"fr": "Référence", "en": "Referral"},
    "prospect": {"fr": "Client apporté", "en": "Prospect"},
    "product": {"fr": "Produit", "en": "Product"},
    "basis": {"fr": "Base", "en": "Basis"},
    "rate": {"fr": "Taux", "en": "Rate"},
    "commission": {"fr": "Commission", "en": "Commission"},
    "recovered": {
        "fr": "Reprise de commission (remboursement client), référence {referral}",
        "en": "Commission clawed back (customer refund), referral {referral}",
    },
    "base": {"fr": "Total HT", "en": "Total excl. VAT"},
    "vat": {"fr": "TVA {rate} %", "en": "VAT {rate}%"},
    "total": {"fr": "Total TTC à payer", "en": "Total to pay"},
    "total_no_vat": {"fr": "Net à payer", "en": "Net to pay"},
    "payment": {
        "fr": "Paiement par virement le {day} sur le compte {iban} ({bic}), référence {number}.",
        "en": "Paid by transfer on {day} to account {iban} ({bic}), reference {number}.",
    },
    "credits": {
        "fr": "Avoir sur la facture {original}, annulée : {reason}. Les commissions restent "
        "dues et seront payées dans un prochain virement.",
        "en": "Credit note for invoice {original}, cancelled: {reason}. The commissions are "
        "still due and will be paid in a later transfer.",
    },
}


class StatementLine(BaseModel):
    referral_id: str
    prospect_company: str
    product: str
    basis: Decimal
    rate: Decimal
    commission: Decimal


class StatementRecovery(BaseModel):
    referral_id: str
    amount: Decimal  # positive: what is deducted


class Statement(BaseModel):
    """Everything a statement or credit note prints."""

    kind: Literal["statement", "credit_note"]
    number: str
    issued_on: date
    currency: str
    company: PayingCompany
    payee: PayeeProfile
    mandate_reference: str
    lines: list[StatementLine]
    recoveries: list[StatementRecovery] = []
    base: Decimal
    vat_rate: Decimal | None = None
    vat: Decimal = Decimal(0)
    total: Decimal
    execution_date: date | None = None
    # A credit note: the statement it cancels, and why.
    original: str | None = None
    reason: str | None = None

    @property
    def legal_mention(self) -> str:
        return LEGAL_MENTIONS[self.payee.vat_regime]


def _latin1(text: str) -> str:
    """The PDF's built-in fonts cover Latin-1: other characters are spelled out."""
    return "".join(c if ord(c) < 256 else unidecode(c) for c in text)


def _money(amount: Decimal, currency: str) -> str:
    return f"{amount:,.2f} {currency}".replace(",", " ")


def render_statement(statement: Statement) -> bytes:
    lang = statement.payee.language
    sign = Decimal(-1) if statement.kind == "credit_note" else Decimal(1)

    def label(key: str, **values: object) -> str:
        return _latin1(LABELS[key][lang].format(**values))

    pdf = FPDF(format="A4")
    # Dated the day of issue: the same statement renders to the same bytes.
    pdf.set_creation_date(datetime.combine(statement.issued_on, time(), UTC))
    pdf.set_title(_latin1(f"{label(statement.kind)} {statement.number}"))
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_page()
    width = pdf.epw

    def text(line: str, size: float = 9, bold: bool = False, height: float = 5) -> None:
        pdf.set_font("Helvetica", "B" if bold else "", size)
        pdf.multi_cell(width, height, _latin1(line), new_x="LMARGIN", new_y="NEXT")

    text(f"{label(statement.kind)}  {statement.number}", size=14, bold=True, height=8)
    text("Autofacturation", bold=True)
    text(f"{label('number')}: {statement.number}    {label('date')}: {statement.issued_on}")
    pdf.ln(3)
    payee, company = statement.payee, statement.company
    for heading, name, address, country, siret, vat_id in (
        (
            label("supplier"),
            payee.legal_name,
            payee.address,
            payee.country,
            payee.siret,
            payee.vat_id,
        ),
        (
            label("customer"),
            company.name,
            company.address,
            company.country,
            company.siret,
            company.vat_id,
        ),
    ):
        text(heading, bold=True)
        text(f"{name}\n{address} ({country})")
        ids = [
            f"{label('siret')} {siret}" if siret else "",
            f"{label('vat_id')} {vat_id}" if vat_id else "",
        ]
        if any(ids):
            text("   ".join(i for i in ids if i))
        pdf.ln(2)
    text(
        label(
            "self_billing",
            company=company.name,
            payee=payee.legal_name,
            mandate=statement.mandate_reference,
        )
    )
    if statement.kind == "credit_note":
        text(label("credits", original=statement.original, reason=statement.reason), bold=True)
    pdf.ln(2)
    columns = ("referral", "prospect", "product", "basis", "rate", "commission")
    widths = (0.16, 0.24, 0.22, 0.15, 0.08, 0.15)
    pdf.set_font("Helvetica", "B", 8)
    for key, share in zip(columns, widths, strict=True):
        pdf.cell(width * share, 6, label(key), border="B")
    pdf.ln()
    pdf.set_font("Helvetica", "", 8)
    for line in statement.lines:
        cells = (
            line.referral_id,
            line.prospect_company,
            line.product,
            _money(line.basis, statement.currency),
            f"{line.rate * 100:.2f} %",
            _money(sign * line.commission, statement.currency),
        )
        for cell, share in zip(cells, widths, strict=True):
            pdf.cell(width * share, 6, _latin1(cell)[:40])
        pdf.ln()
    for recovery in statement.recoveries:
        pdf.cell(width * 0.85, 6, label("recovered", referral=recovery.referral_id))
        pdf.cell(width * 0.15, 6, _money(-sign * recovery.amount, statement.currency))
        pdf.ln()
    pdf.ln(2)
    totals = [(label("base"), statement.base)]
    if statement.vat_rate is not None:
        totals.append((label("vat", rate=f"{statement.vat_rate * 100:g}"), statement.vat))
        totals.append((label("total"), statement.total))
    else:
        totals.append((label("total_no_vat"), statement.total))
    for name, amount in totals:
        pdf.set_font("Helvetica", "B", 9)
        pdf.cell(width * 0.85, 6, name, align="R")
        pdf.cell(width * 0.15, 6, _money(sign * amount, statement.currency), align="R")
        pdf.ln()
    pdf.ln(3)
    if statement.legal_mention:
        text(statement.legal_mention, bold=True)
        if lang == "en" and payee.vat_regime in GLOSSES:
            text(GLOSSES[payee.vat_regime])
    if statement.kind == "statement" and statement.execution_date is not None:
        text(
            label(
                "payment",
                day=statement.execution_date,
                iban=mask_iban(payee.iban),
                bic=payee.bic or "",
                number=statement.number,
            )
        )
    return bytes(pdf.output())
