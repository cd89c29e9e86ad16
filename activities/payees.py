"""Payee profiles in the database: read, saved with an audit line per change, erased with
the referrer (core/payees.py checks them; docs/payouts.md)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pydantic import ValidationError
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, delete, select

from activities.db import PayeeEventRow, PayeeRow
from core.errors import Refused
from core.payees import MandateAcceptance, PayeeProfile, mask_iban


def load_payee(engine: Engine, email: str) -> PayeeProfile | None:
    with Session(engine) as session:
        row = session.get(PayeeRow, email.strip().lower())
    return PayeeProfile.model_validate_json(row.profile) if row else None


@dataclass(frozen=True)
class SavedPayee:
    profile: PayeeProfile
    # The account it replaced (masked), or None: who is told of the change.
    previous_iban: str | None


def save_payee(
    engine: Engine, profile: PayeeProfile, actor: str, at: datetime, note: str | None = None
) -> SavedPayee:
    """Create or replace `profile`. A new IBAN starts the cooldown and clears a bank
    rejection; the mandate is kept (it is given by `accept_mandate` only)."""
    email = profile.email
    with Session(engine) as session:
        row = session.get(PayeeRow, email)
        before = PayeeProfile.model_validate_json(row.profile) if row else None
        changed: list[str] = []
        previous = None
        if before is None:
            changed.append("created")
            # A first account is not a change: the cooldown is for a payee's account replaced.
            profile = profile.model_copy(update={"iban_changed_at": None, "mandate": None})
        else:
            fields = profile.model_dump(exclude={"mandate", "iban_changed_at", "bank_rejection"})
            old = before.model_dump(exclude={"mandate", "iban_changed_at", "bank_rejection"})
            changed = [name for name in fields if fields[name] != old[name]]
            update: dict[str, object] = {
                "mandate": before.mandate,
                "iban_changed_at": before.iban_changed_at,
                "bank_rejection": before.bank_rejection,
            }
            if before.iban != profile.iban:
                previous = mask_iban(before.iban)
                update |= {"iban_changed_at": at, "bank_rejection": None}
            profile = profile.model_copy(update=update)
        if not changed:
            return SavedPayee(profile, None)
        detail = ", ".join(changed)
        if previous is not None:
            detail += f" (account {previous} -> {mask_iban(profile.iban)})"
        _write(session, profile, at)
        session.add(
            PayeeEventRow(
                email=email, at=at, actor=actor, change="profile", detail=_with(detail, note)
            )
        )
        session.commit()
    return SavedPayee(profile, previous)


def accept_mandate(
    engine: Engine, email: str, acceptance: MandateAcceptance, at: datetime
) -> PayeeProfile:
    """Record the self-billing mandate `email` accepted (portal) or signed (paper)."""
    with Session(engine) as session:
        row = session.get(PayeeRow, email.strip().lower())
        if row is None:
            raise Refused(f"{email} has no payee profile: set one first")
        profile = PayeeProfile.model_validate_json(row.profile)
        profile = profile.model_copy(update={"mandate": acceptance})
        _write(session, profile, at)
        session.add(
            PayeeEventRow(
                email=profile.email,
                at=at,
                actor=acceptance.accepted_by,
                change="mandate",
                detail=_with(
                    f"{acceptance.reference} ({acceptance.channel}, {acceptance.language})",
                    acceptance.reason,
                ),
            )
        )
        session.commit()
    return profile


def reject_bank_details(session: Session, email: str, why: str, at: datetime) -> None:
    """In the caller's transaction: the bank refused a payment to this payee's account, so
    their items are held until it changes."""
    row = session.get(PayeeRow, email.strip().lower())
    if row is None:
        return
    profile = PayeeProfile.model_validate_json(row.profile)
    _write(session, profile.model_copy(update={"bank_rejection": why}), at)
    session.add(
        PayeeEventRow(
            email=profile.email,
            at=at,
            actor="bank",
            change="rejected",
            detail=f"{mask_iban(profile.iban)}: {why}",
        )
    )


def payee_events(engine: Engine, email: str) -> list[PayeeEventRow]:
    with Session(engine) as session:
        query = (
            select(PayeeEventRow)
            .where(PayeeEventRow.email == email.strip().lower())
            .order_by(col(PayeeEventRow.at), col(PayeeEventRow.id))
        )
        return list(session.exec(query))


def all_payees(engine: Engine) -> dict[str, PayeeProfile | ValidationError]:
    """Every profile, by address; one that no longer validates (a bank's code withdrawn from
    the registry, say) as the error that says why."""
    found: dict[str, PayeeProfile | ValidationError] = {}
    with Session(engine) as session:
        for row in session.exec(select(PayeeRow)):
            try:
                found[row.email] = PayeeProfile.model_validate_json(row.profile)
            except ValidationError as error:
                found[row.email] = error
    return found


def iban_owners(engine: Engine) -> dict[str, set[str]]:
    """Which payees each account is on file for."""
    owners: dict[str, set[str]] = {}
    with Session(engine) as session:
        for email, iban in session.exec(select(PayeeRow.email, PayeeRow.iban)):
            owners.setdefault(iban, set()).add(email)
    return owners


def erase_payee(session: Session, email: str) -> None:
    """In the erasure's transaction: the profile and its change log go with the referrer."""
    email = email.strip().lower()
    session.exec(delete(PayeeRow).where(col(PayeeRow.email) == email))
    session.exec(delete(PayeeEventRow).where(col(PayeeEventRow.email) == email))


def _write(session: Session, profile: PayeeProfile, at: datetime) -> None:
    row = session.get(PayeeRow, profile.email) or PayeeRow(
        email=profile.email, iban=profile.iban, profile="", updated_at=at
    )
    row.iban = profile.iban
    row.profile = profile.model_dump_json()
    row.updated_at = at
    session.add(row)


def _with(detail: str, note: str | None) -> str:
    return f"{detail}: {note}" if note else detail
