"""The referral workflow's behaviour flags, decided by `workflow.patched` once, as a run starts
(docs/rollout.md).

Until release 0.6 each behaviour had a patch id of its own (its field's name, dashed). From
release 0.7 on, a release has one patch id (`RELEASES`): a new run records only the newest, and
its marker stands for every behaviour of that release and of the releases before it.

Outside workflows/referral.py, which the sandbox runs again for every referral it caches:
this module is passed through, and its dataclass built once per worker.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from temporalio import workflow

# One patch id per release from 0.7 on, newest first, each with the `Features` fields it added.
# A behaviour change goes under the next release's id: add its field, and name it here.
Releases = tuple[tuple[str, tuple[str, ...]], ...]
RELEASES: Releases = (
    ("release-0.8", ("signed_actors",)),
    ("release-0.7", ("batched_refusals", "bounded_history")),
)
# The patch id of `upgrade` carrying a run recorded since the system of record over to a new
# run with every behaviour (from 0.8; before, the signal did nothing to such a run). Asked for
# when the signal arrives, not as a run starts (docs/rollout.md).
CARRY_OVER = "carry-over"


@dataclass(frozen=True)
class Features:
    """Behaviour added since release 0.1.0.

    Decided once, as a run starts: a run replaying a history recorded before a patch
    finds no marker and keeps the old behaviour for its whole life; a new run records
    the newest release's marker and has them all."""

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
    # Refused signals reach the system of record in batches: with the next applied change, by
    # the hundred, or a minute after the first, not one database write each (0.7).
    batched_refusals: bool
    # Once its history grows long (Temporal suggests it), the run continues as new from its
    # state at a quiet point, so a flood of signals cannot reach the history limit (0.7).
    bounded_history: bool
    # An `action` signal (whose sender is never authenticated) cannot move money, and does
    # the rest only as the program allows (0.8). Updates are checked in every run: their
    # validator does not replay.
    signed_actors: bool

    @classmethod
    def decide(cls, releases: Releases = RELEASES) -> Features:
        """The newest release whose marker the run has (a new run records the newest); a run
        started before a release replays without its marker, so `patched` answers False and
        records nothing. A run started before 0.7 asks for each behaviour's own id, in the
        order it did then. `releases`: those the code knows (an older release's code knew
        fewer, which a test of a rollback needs)."""
        names = [f.name for f in fields(cls)]
        # What the releases after the run's own added; from the start, what releases the code
        # does not know added (an older release's code had no such behaviour).
        newer = {name for _, added in RELEASES for name in added}
        newer -= {name for _, added in releases for name in added}
        for release, added in releases:
            if workflow.patched(release):
                return cls(**{name: name not in newer for name in names})
            newer.update(added)
        return cls(
            **{
                name: name not in newer and workflow.patched(behaviour_patch_id(name))
                for name in names
            }
        )


def behaviour_patch_id(name: str) -> str:
    """A behaviour's own patch id, before release 0.7: its field's name, dashed."""
    return name.replace("_", "-")


def patch_markers() -> dict[str, tuple[str, ...]]:
    """Every patch id a run may have recorded, oldest first, each with the markers any one of
    which gives a run its behaviour (its own, and those of the releases that include it). A
    run with none of them takes the id's old branch; once no run can, the id can be retired."""
    releases = [release for release, _ in reversed(RELEASES)]  # oldest first
    added = {name for _, names in RELEASES for name in names}
    markers = {
        behaviour_patch_id(f.name): (behaviour_patch_id(f.name), *releases)
        for f in fields(Features)
        if f.name not in added
    }
    for position, release in enumerate(releases):
        markers[release] = tuple(releases[position:])
    # A run has no use for carrying over once it has the newest release's behaviours.
    markers[CARRY_OVER] = (CARRY_OVER, releases[-1])
    return markers
