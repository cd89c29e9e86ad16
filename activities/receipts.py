"""The receipt log in the database: appends, the referrer's copy, the public keys, the chain
check and key rotation (core/receipts.py builds and checks one receipt; docs/receipts.md).

An append runs in its caller's transaction, with what it records (a claim, a release, an
event), so a receipt exists exactly when what it proves does. It first updates the log's
head row: appends queue on that row's lock (SQLite: the database's write lock), so the
numbers are contiguous and the chain never forks, however many processes append. The time
is the database's, read under that lock, and never earlier than the receipt before.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from activities.db import (
    ReceiptDisclosureRow,
    ReceiptHeadRow,
    ReceiptKeyRow,
    ReceiptRow,
    ReferralRow,
)
from core import receipts
from core.encryption import KeyRing

# The payload key ring that seals receipt signing keys: configured once per process by
# whatever appends (the worker, the web app, the CLI); see `configure`.
_ring: KeyRing | None = None
_unsealed: dict[str, Ed25519PrivateKey] = {}
log = logging.getLogger(__name__)


class ReceiptKeyUnavailable(RuntimeError):
    """This process cannot sign: no key ring was configured, or the current receipt key is
    sealed with a payload key its ring lacks (a misconfiguration, logged; the intake answers
    503 and keeps what was typed, an activity retries)."""


def configure(ring: KeyRing) -> None:
    """The key ring that seals and unseals the receipt signing keys in this process."""
    global _ring
    _ring = ring


def _the_ring() -> KeyRing:
    if _ring is None:
        raise _unavailable("receipts: no payload key ring configured to unseal the signing key")
    return _ring


def _unavailable(message: str) -> ReceiptKeyUnavailable:
    log.error("%s", message)
    return ReceiptKeyUnavailable(message)


@dataclass(frozen=True)
class Registration:
    """What a registration's receipts commit to, and the facts its first receipt states."""

    program: str
    rules_sha256: str
    contact_by: datetime
    values: dict[str, str]  # committed name -> clear value
    salts: dict[str, str]

    @classmethod
    def new(
        cls, program: str, rules: dict[str, Any], contact_by: datetime, domain: str, email: str
    ) -> Registration:
        values = {"prospect_domain": domain, "referrer_email": email.strip().lower()}
        return cls(
            program=program,
            rules_sha256=receipts.sha256_hex(receipts.canonical(rules)),
            contact_by=contact_by,
            values=values,
            salts={name: receipts.new_salt() for name in values},
        )

    @property
    def commitments(self) -> dict[str, str]:
        return receipts.commitments_of(self.values, self.salts)

    @property
    def disclosures(self) -> dict[str, dict[str, str]]:
        return receipts.disclosed(self.values, self.salts)


def instant(moment: datetime | None) -> str | None:
    """A receipt's time: UTC, microseconds, `Z`."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _database_now(session: Session) -> datetime:
    if session.get_bind().dialect.name == "postgresql":
        moment = session.connection().execute(text("SELECT clock_timestamp()")).scalar_one()
        return moment.astimezone(UTC)
    raw = session.connection().execute(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')"))
    return datetime.fromisoformat(raw.scalar_one()).replace(tzinfo=UTC)


def _hold_head(session: Session, step: int) -> None:
    """Take the head's lock (a write, so SQLite's too), moving it on by `step`."""
    moved = session.connection().execute(
        text("UPDATE receipt_head SET seq = seq + :step WHERE id = 1"), {"step": step}
    )
    if moved.rowcount == 0:  # a database made without the migration's first row
        session.add(ReceiptHeadRow(id=1, seq=step, entry_hash=receipts.GENESIS))
        session.flush()


def append(
    session: Session,
    kind: str,
    *,
    source: str,
    referral_id: str | None,
    program: str,
    rules_sha256: str,
    commitments: dict[str, str],
    decision: dict[str, Any],
    contact_by: datetime | None = None,
) -> dict[str, Any]:
    """Append one receipt in `session`'s transaction (the caller commits) and return it; a
    second append from the same `source` returns the first."""
    existing = session.exec(select(ReceiptRow).where(ReceiptRow.source == source)).first()
    if existing is not None:
        return json.loads(existing.body)
    # The first write: from here on this transaction holds the head, and so the log.
    _hold_head(session, 1)
    head = session.exec(select(ReceiptHeadRow).where(ReceiptHeadRow.id == 1)).one()
    session.refresh(head)
    at = _database_now(session)
    if head.at is not None:
        at = max(at, datetime.fromisoformat(head.at.replace("Z", "+00:00")))
    key_id, key = _signing_key(session, at)
    receipt = receipts.seal(
        {
            "v": receipts.VERSION,
            "program": program,
            "seq": head.seq,
            "kind": kind,
            "referral_id": referral_id,
            "at": instant(at),
            "rules_sha256": rules_sha256,
            "commitments": commitments,
            "decision": decision,
            "contact_by": instant(contact_by),
            "prev_entry_hash": head.entry_hash,
        },
        key_id,
        key,
    )
    session.add(
        ReceiptRow(
            seq=head.seq,
            kind=kind,
            referral_id=referral_id,
            source=source,
            body=receipts.canonical(receipt).decode(),
        )
    )
    head.entry_hash = receipt["entry_hash"]
    head.at = receipt["at"]
    session.add(head)
    session.flush()
    return receipt


def register(session: Session, referral_id: str, registration: Registration) -> dict[str, Any]:
    """The `registered` receipt of a referral, its disclosures kept for the referrer's copy."""
    session.merge(
        ReceiptDisclosureRow(
            referral_id=referral_id,
            disclosures=json.dumps(registration.disclosures),
        )
    )
    return append(
        session,
        receipts.REGISTERED,
        source=_registered(referral_id),
        referral_id=referral_id,
        program=registration.program,
        rules_sha256=registration.rules_sha256,
        commitments=registration.commitments,
        decision={"status": "received", "rule": receipts.FIRST_REGISTRATION_WINS},
        contact_by=registration.contact_by,
    )


def refuse_duplicate(
    engine: Engine,
    registration: Registration,
    earlier_referral_id: str,
    protected_until: datetime | None,
) -> dict[str, Any]:
    """The refusal of a registration for a prospect another open referral registered first:
    its rule, that registration's number and time, and its protection's end, never its
    referrer. Returns the refused referrer's copy (nothing of theirs is kept here)."""
    with Session(engine) as session:
        earlier = registered_receipt(session, earlier_referral_id)
        receipt = append(
            session,
            receipts.REFUSED_DUPLICATE,
            source=f"refused/{secrets.token_hex(16)}",
            referral_id=None,
            program=registration.program,
            rules_sha256=registration.rules_sha256,
            commitments=registration.commitments,
            decision={
                "status": "refused",
                "rule": receipts.FIRST_REGISTRATION_WINS,
                "earlier_seq": earlier["seq"] if earlier else None,
                "earlier_at": earlier["at"] if earlier else None,
                "protected_until": instant(protected_until),
            },
        )
        session.commit()
    return {**receipt, "disclosures": registration.disclosures}


def _registered(referral_id: str) -> str:
    """The source of a referral's `registered` receipt: at most one each."""
    return f"{referral_id}/{receipts.REGISTERED}"


def registered_receipt(session: Session, referral_id: str) -> dict[str, Any] | None:
    row = session.exec(
        select(ReceiptRow).where(ReceiptRow.source == _registered(referral_id))
    ).first()
    return None if row is None else json.loads(row.body)


def follow_up(
    session: Session, referral_id: str, kind: str, source: str, decision: dict[str, Any]
) -> dict[str, Any] | None:
    """A later receipt of a registered referral (accepted, extended, expired, released), with
    the commitments and rules of its registration; None for a referral registered before
    receipts existed."""
    registered = registered_receipt(session, referral_id)
    if registered is None:
        return None
    return append(
        session,
        kind,
        source=source,
        referral_id=referral_id,
        program=registered["program"],
        rules_sha256=registered["rules_sha256"],
        commitments=registered["commitments"],
        decision=decision,
    )


def release(session: Session, referral_id: str) -> dict[str, Any] | None:
    """The `released` receipt: the prospect is free again, and why (the referral's stage, or
    `not_started` for one whose workflow never started)."""
    row = session.get(ReferralRow, referral_id)
    reason = "not_started" if row is None else row.stage
    if row is not None and row.stage in ("won", "commission_payable", "commission_paid"):
        reason = "clawback_window_closed"
    return follow_up(
        session,
        referral_id,
        receipts.RELEASED,
        f"{referral_id}/{receipts.RELEASED}",
        {"status": "released", "reason": reason},
    )


def forget_disclosures(session: Session, referral_id: str) -> None:
    """Erasure: the referral's clear values and salts go; its receipts stay and still check."""
    row = session.get(ReceiptDisclosureRow, referral_id)
    if row is not None:
        session.delete(row)


# --- signing keys --------------------------------------------------------------------------


def _seal(ring: KeyRing, key_id: str, seed: bytes) -> tuple[str, bytes]:
    ring_id, ring_key = ring.current
    nonce = secrets.token_bytes(12)
    return ring_id, nonce + AESGCM(ring_key).encrypt(nonce, seed, f"receipt:{key_id}".encode())


def _unseal(row: ReceiptKeyRow) -> Ed25519PrivateKey:
    cached = _unsealed.get(row.key_id)
    if cached is not None:
        return cached
    if row.sealed_private is None or row.sealed_with is None:
        raise _unavailable(f"receipt key {row.key_id} is retired: it signs no more")
    ring_key = _the_ring().key(row.sealed_with)
    if ring_key is None:
        raise _unavailable(
            f"receipt key {row.key_id} is sealed with payload key {row.sealed_with!r}, not in "
            "this process's key ring (REFERRALS_ENCRYPTION_KEYS): keep that key in the ring "
            "until `referrals keys rotate --receipts` has replaced the receipt key"
        )
    sealed = row.sealed_private
    seed = AESGCM(ring_key).decrypt(sealed[:12], sealed[12:], f"receipt:{row.key_id}".encode())
    key = _unsealed[row.key_id] = Ed25519PrivateKey.from_private_bytes(seed)
    return key


def _new_key(session: Session, at: datetime) -> tuple[str, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    key_id = f"rk-{at:%Y%m%d}-{secrets.token_hex(3)}"
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    sealed_with, sealed = _seal(_the_ring(), key_id, seed)
    session.add(
        ReceiptKeyRow(
            key_id=key_id,
            public_key=receipts.public_key_text(key.public_key()),
            sealed_private=sealed,
            sealed_with=sealed_with,
            created_at=at,
        )
    )
    _unsealed[key_id] = key
    return key_id, key


def _current_key(session: Session) -> ReceiptKeyRow | None:
    """The key that signs: the one not retired."""
    return session.exec(
        select(ReceiptKeyRow).where(col(ReceiptKeyRow.retired_at).is_(None))
    ).first()


def _signing_key(session: Session, at: datetime) -> tuple[str, Ed25519PrivateKey]:
    """The key that signs now (the head is held); the log's first receipt creates it."""
    row = _current_key(session)
    if row is None:
        return _new_key(session, at)
    return row.key_id, _unseal(row)


def signing_problem(engine: Engine) -> str | None:
    """Why this process could not sign a receipt now, or None: what readiness checks, so a
    process deployed with a payload key ring that lacks the receipt key's takes no traffic."""
    if _ring is None:
        return "no payload key ring configured"
    with Session(engine) as session:
        row = _current_key(session)
    if row is None or row.key_id in _unsealed:
        return None  # the first receipt creates the key; an unsealed one signs
    if row.sealed_with is None or _ring.key(row.sealed_with) is None:
        return (
            f"receipt key {row.key_id} is sealed with payload key {row.sealed_with!r}, not in "
            "the key ring"
        )
    return None


async def signing_answers(engine: Engine, seconds: float = 3.0) -> str:
    """ "ok" when this process can sign receipts, else why not (a probe's answer)."""
    try:
        problem = await asyncio.wait_for(asyncio.to_thread(signing_problem, engine), seconds)
    except Exception as error:  # noqa: BLE001 - any failure is "unavailable"
        return f"unavailable: {type(error).__name__}"
    return "ok" if problem is None else f"cannot sign: {problem}"


def rotate_key(engine: Engine) -> tuple[str, str | None]:
    """A new signing key; the one before is retired and its private half wiped (its public
    half stays published, so what it signed still verifies). Returns (new, retired)."""
    with Session(engine) as session:
        _hold_head(session, 0)
        now = datetime.now(UTC)
        current = _current_key(session)
        retired = None
        if current is not None:
            current.retired_at = now
            current.sealed_private = None
            current.sealed_with = None
            session.add(current)
            _unsealed.pop(current.key_id, None)
            retired = current.key_id
        key_id, _ = _new_key(session, now)
        session.commit()
    return key_id, retired


def public_keys(engine: Engine) -> list[ReceiptKeyRow]:
    with Session(engine) as session:
        return list(session.exec(select(ReceiptKeyRow).order_by(col(ReceiptKeyRow.created_at))))


def verifying_keys(engine: Engine) -> dict[str, Ed25519PublicKey]:
    return {row.key_id: receipts.parse_public_key(row.public_key) for row in public_keys(engine)}


# --- reading -------------------------------------------------------------------------------


def receipt(engine: Engine, seq: int) -> dict[str, Any] | None:
    with Session(engine) as session:
        row = session.get(ReceiptRow, seq)
    return None if row is None else json.loads(row.body)


def verify_with_log(engine: Engine, document: dict[str, Any]) -> receipts.Verdict:
    """`document` checked with every key we published, and against the receipt of the same
    number in our log, so an alteration is named field by field."""
    seq = document.get("seq")
    logged = receipt(engine, seq) if isinstance(seq, int) and seq > 0 else None
    return receipts.verify(document, verifying_keys(engine), logged)


def receipts_of(engine: Engine, referral_id: str) -> list[dict[str, Any]]:
    with Session(engine) as session:
        rows = session.exec(
            select(ReceiptRow)
            .where(ReceiptRow.referral_id == referral_id)
            .order_by(col(ReceiptRow.seq))
        ).all()
    return [json.loads(row.body) for row in rows]


def registered_among(engine: Engine, referral_ids: list[str]) -> set[str]:
    """Which of `referral_ids` have a registration receipt (none from before receipts)."""
    if not referral_ids:
        return set()
    with Session(engine) as session:
        found = session.exec(
            select(ReceiptRow.referral_id).where(
                ReceiptRow.kind == receipts.REGISTERED,
                col(ReceiptRow.referral_id).in_(referral_ids),
            )
        ).all()
    return {referral_id for referral_id in found if referral_id is not None}


def referrer_copy(engine: Engine, referral_id: str) -> dict[str, Any] | None:
    """The referrer's copy of their registration: the receipt and the disclosures that open
    its commitments; without the disclosures once the referral is erased."""
    with Session(engine) as session:
        registered = registered_receipt(session, referral_id)
        row = session.get(ReceiptDisclosureRow, referral_id)
    if registered is None:
        return None
    if row is None:
        return registered
    return {**registered, "disclosures": json.loads(row.disclosures)}


def head(engine: Engine) -> dict[str, Any] | None:
    """The last receipt, as signed: its number, hash and signature pin the whole log."""
    with Session(engine) as session:
        row = session.exec(select(ReceiptRow).order_by(col(ReceiptRow.seq).desc())).first()
    return None if row is None else json.loads(row.body)


@dataclass(frozen=True)
class ChainReport:
    checked: int
    last: int | None
    problem: str | None  # the first broken link, named


def _rows(engine: Engine, start: int, batch: int = 500) -> Iterator[ReceiptRow]:
    after = start - 1
    while True:
        with Session(engine) as session:
            rows = session.exec(
                select(ReceiptRow)
                .where(col(ReceiptRow.seq) > after)
                .order_by(col(ReceiptRow.seq))
                .limit(batch)
            ).all()
        if not rows:
            return
        yield from rows
        after = rows[-1].seq


def chain_check(engine: Engine, start: int = 1) -> ChainReport:
    """Every receipt from number `start`: whole, numbered in turn, chained to the one before,
    hashed and signed right; then the head. Stops at the first broken link."""
    keys = verifying_keys(engine)
    with Session(engine) as session:
        before = session.get(ReceiptRow, start - 1) if start > 1 else None
        stored_head = session.get(ReceiptHeadRow, 1)
    if start > 1 and before is None:
        return ChainReport(0, None, f"receipt {start - 1} (before --from {start}) is missing")
    previous = receipts.GENESIS
    if before is not None:
        try:
            previous = receipts.parse(before.body)["entry_hash"]
        except (receipts.ReceiptError, KeyError):
            return ChainReport(0, None, f"receipt {start - 1}: not a receipt")
    expected, checked = start, 0
    for row in _rows(engine, start):
        problem = _link_problem(row, expected, previous, keys)
        if problem is not None:
            return ChainReport(checked, expected - 1 if checked else None, problem)
        previous = json.loads(row.body)["entry_hash"]
        expected, checked = expected + 1, checked + 1
    last = expected - 1 if expected > start or start > 1 else None
    if stored_head is not None and (stored_head.seq, stored_head.entry_hash) != (
        last or 0,
        previous,
    ):
        return ChainReport(
            checked,
            last,
            f"the head says receipt {stored_head.seq} ({stored_head.entry_hash[:16]}), the log "
            f"ends at {last or 0} ({previous[:16]})",
        )
    return ChainReport(checked, last, None)


def _link_problem(
    row: ReceiptRow, expected: int, previous: str, keys: dict[str, Ed25519PublicKey]
) -> str | None:
    if row.seq != expected:
        return f"receipt {expected} is missing (the next is {row.seq})"
    try:
        document = receipts.parse(row.body)
    except receipts.ReceiptError as error:
        return f"receipt {row.seq}: {error}"
    if document.get("seq") != row.seq:
        return f"receipt {row.seq}: it says it is number {document.get('seq')!r}"
    if (document.get("kind"), document.get("referral_id")) != (row.kind, row.referral_id):
        return f"receipt {row.seq}: its kind or referral differ from the log's index"
    if document.get("prev_entry_hash") != previous:
        return f"receipt {row.seq}: not chained to receipt {row.seq - 1} (prev_entry_hash)"
    verdict = receipts.verify(document, keys)
    if not verdict.valid:
        return f"receipt {row.seq}: {verdict.problem}"
    return None
