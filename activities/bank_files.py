"""A run's bank file: a SEPA credit transfer (ISO 20022 pain.001, built with sepaxml and
validated against the schema before anyone sees it), or, for a currency SEPA does not carry,
a CSV for the bank's bulk-payment upload (docs/payouts.md). Pure."""

from __future__ import annotations

import csv
import io
from datetime import date
from decimal import Decimal

from pydantic import BaseModel
from sepaxml import SepaTransfer
from sepaxml.validation import ValidationError as SepaSchemaError

from workflows.models.program import PayingCompany
from workflows.models.values import minor_unit_digits


class Transfer(BaseModel):
    """One payment of the file: a payee's item."""

    name: str
    iban: str
    bic: str | None
    amount: Decimal
    currency: str
    statement_number: str  # the end-to-end id: the payee's bank shows it
    description: str


class BankFileError(Exception):
    """The file cannot be made as the bank would take it; the message says why."""


def sepa_transfer(
    company: PayingCompany,
    transfers: list[Transfer],
    execution_date: date,
    schema: str,
    message_id: str,
) -> bytes:
    """One payment information block (batch booking off: each payee sees their own line)."""
    if not transfers:
        raise BankFileError("a bank file needs at least one payment")
    if any(t.currency != "EUR" for t in transfers):
        raise BankFileError("a SEPA credit transfer is in EUR only")
    sepa = SepaTransfer(
        {
            "name": company.name,
            "IBAN": company.iban.replace(" ", ""),
            "BIC": company.bic.replace(" ", ""),
            "batch": True,
            "currency": "EUR",
        },
        schema=schema,
    )
    header = sepa._xml.find("CstmrCdtTrfInitn/GrpHdr/MsgId")
    if header is not None:  # the run's id rather than a random one: the bank's duplicate check
        header.text = message_id[:35]
    for transfer in transfers:
        payment = {
            "name": transfer.name,
            "IBAN": transfer.iban,
            "amount": int(transfer.amount.scaleb(minor_unit_digits("EUR"))),
            "execution_date": execution_date,
            "description": transfer.description,
            "endtoend_id": transfer.statement_number,
        }
        if transfer.bic:
            payment["BIC"] = transfer.bic
        sepa.add_payment(payment)
    try:
        return bytes(sepa.export(validate=True, pretty_print=True))
    except SepaSchemaError as error:
        raise BankFileError(
            f"the SEPA file does not validate against {schema}: {error.__cause__}"
        ) from error


CSV_FIELDS = ("statement_number", "name", "iban", "bic", "amount", "currency", "description")


def transfer_csv(transfers: list[Transfer], execution_date: date) -> bytes:
    """For the bank's bulk upload of payments the SEPA file cannot carry (other currencies)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=(*CSV_FIELDS, "execution_date"), lineterminator="\n")
    writer.writeheader()
    for transfer in transfers:
        row = transfer.model_dump(include=set(CSV_FIELDS), mode="json")
        writer.writerow({**row, "execution_date": execution_date.isoformat()})
    return out.getvalue().encode("utf-8")
