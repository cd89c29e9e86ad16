"""Reading the system of record: what the CLI, the staff desk and the portal show. Nothing
here reaches Temporal, so a command that only reads starts without loading the SDK."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select

from activities.db import ReferralEventRow, ReferralRow, as_utc
from workflows.models.referral import HistoryEntry, ReferralState, Stage


def load_referral(engine: Engine, referral_id: str) -> ReferralState | None:
    """The referral as last recorded, its whole history included, or None if unknown."""
    with Session(engine) as session:
        row = session.get(ReferralRow, referral_id)
        if row is None:
            return None
        events = session.exec(
            select(ReferralEventRow)
            .where(ReferralEventRow.referral_id == referral_id)
            .order_by(col(ReferralEventRow.seq))
        ).all()
    state = ReferralState.model_validate_json(row.state)
    state.history = [
        HistoryEntry(
            at=as_utc(event.at),
            action=event.action,
            actor=event.actor,
            note=event.note,
            outcome=event.outcome,  # type: ignore[arg-type]
            seq=event.seq,
            request_id=event.request_id,
            surface=event.surface,
        )
        for event in events
    ]
    return state


def _listed(query: Any, stage: Stage | None, referrer_email: str | None, open_only: bool) -> Any:
    if stage is not None:
        query = query.where(ReferralRow.stage == stage.value)
    if referrer_email is not None:
        query = query.where(ReferralRow.referrer_email == referrer_email.strip().lower())
    if open_only:
        query = query.where(col(ReferralRow.closed_at).is_(None))
    return query


def list_referrals(
    engine: Engine,
    *,
    stage: Stage | None = None,
    referrer_email: str | None = None,
    open_only: bool = False,
    limit: int | None = None,
    offset: int = 0,
) -> list[ReferralRow]:
    """Newest first (ties by id, so pages never overlap); `limit` rows from `offset`, or
    all. The `ix_referral_submitted_at` index serves the order, so a page costs what its
    rows cost, however many referrals there are."""
    query = _listed(
        select(ReferralRow).order_by(
            col(ReferralRow.submitted_at).desc(), col(ReferralRow.referral_id).desc()
        ),
        stage,
        referrer_email,
        open_only,
    )
    if limit is not None:
        query = query.limit(limit)
    if offset:
        query = query.offset(offset)
    with Session(engine) as session:
        return list(session.exec(query).all())


def count_referrals(
    engine: Engine,
    *,
    stage: Stage | None = None,
    referrer_email: str | None = None,
    open_only: bool = False,
) -> int:
    """How many referrals `list_referrals` would list without a limit."""
    query = _listed(select(func.count()).select_from(ReferralRow), stage, referrer_email, open_only)
    with Session(engine) as session:
        return int(session.exec(query).one())
