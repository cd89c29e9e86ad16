"""The referral workflow's behaviour flags, one `workflow.patched` id each (docs/rollout.md).

Outside workflows/referral.py, which the sandbox runs again for every referral it caches:
this module is passed through, and its dataclass built once per worker.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from temporalio import workflow


@dataclass(frozen=True)
class Features:
    """Behaviour added since release 0.1.0, one `workflow.patched` id each.

    Decided once, as a run starts: a run replaying a history recorded before a patch
    finds no marker and keeps the old behaviour for its whole life; a new run records
    every marker and has them all."""

    # Each change is written to the database, in order; an update returns once it is.
    system_of_record: bool
    # A Temporal cancellation runs the business `cancel`; staff hear of every cancellation.
    business_cancel: bool
    # Permanent email failures are recorded and reported; database writes retry visibly.
    effect_failures: bool
    # A request id already applied (update id, or signal `request_id`) is not applied again.
    request_ids: bool
    # Ledger event keys name the business event, not a history position.
    business_event_keys: bool
    # At most MAX_REFUSALS_KEPT refused signals stay in the history.
    refusal_cap: bool
    # Search attributes hold no personal data: a keyed hash of the referrer, not the address.
    private_search_attributes: bool
    # From `accept`, a protection window: warning, expiry, extensions (ProtectedUntil).
    protection_window: bool
    # After payout the referral stays open for refunds (clawback) until the window ends.
    clawback_window: bool
    # The ledger keeps append-only commission lines (accrual, payable, paid, clawback, void).
    commission_lines: bool
    # Emails carry what their templates read, not the whole referral; `act` answers with
    # where the referral stands (ActResult), not the whole referral.
    slim_payloads: bool

    @classmethod
    def decide(cls) -> Features:
        return cls(**{f.name: workflow.patched(f.name.replace("_", "-")) for f in fields(cls)})
