"""The referral workflow: one run carries one referral through the six steps.

Staff decisions arrive as updates (validated, so the CLI sees refusals) or as
signals (fire-and-forget; a refused one is recorded in the history). Both go
through `apply_action`. Handlers only change state and queue side effects;
the run method performs the effects in order and owns every timer.

Referrals run for months, so the code that runs them changes under them: every
change of behaviour is a `Features` flag decided by `workflow.patched` when a run
starts (docs/rollout.md). A referral started before a change keeps the behaviour
it started with, replays exactly as it ran, and can be carried over to a new run
with the `upgrade` signal.

A referral's history must stay well under Temporal's limits however many signals an
integration sends: refused ones are written in batches, and once the history grows
long the run continues as new from its state at a quiet point (`bounded_history`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any, ClassVar

from temporalio import workflow
from temporalio.common import SearchAttributeUpdate
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from core import actor_assertions
    from core.actor_assertions import UNAUTHENTICATED, Refused, signed_surface
    from workflows.features import CARRY_OVER, RELEASES, Features, Releases
    from workflows.models.ledger import CommissionRecord
    from workflows.models.program import shared_rules
    from workflows.models.referral import (
        ActResult,
        EmailRequest,
        HistoryEntry,
        ProspectRelease,
        ReferralInput,
        ReferralRecord,
        ReferralState,
        Refusal,
        StaffAction,
        Stage,
    )
    from workflows.models.values import MONEY_ACTIONS, Action
    from workflows.policies import (
        DOMAIN_KEY,
        EFFECT_RETRY,
        EFFECT_TIMEOUT,
        EMAIL_ATTEMPT_TIMEOUT,
        EMAIL_RETRY,
        MAX_REFUSALS_KEPT,
        PRODUCT_KEY,
        PROTECTED_KEY,
        REFERRER_EMAIL_KEY,
        REFERRER_KEY,
        SLA_KEY,
        STAFF_NOTICE,
        STAGE_KEY,
        WRITE_PAUSE,
        WRITE_PAUSE_MAX,
        WRITE_RETRY,
        WRITE_TIMEOUT,
        current_details,
        email_failure_reason,
        failure_reason,
    )
    from workflows.transitions import (
        apply_action,
        check_action,
        commission_lines,
        expire,
        initial_state,
    )

# The activities a referral runs, named once: the definitions in activities/ use these names.
RECORD_REFERRAL = "record_referral"
RECORD_COMMISSION = "record_commission"
RELEASE_PROSPECT = "release_prospect"
SEND_EMAIL = "send_email"
# Refused signals (`batched_refusals`) are written with the next applied change, or by this many
# at once (a small write), or once the first has waited this long, whichever comes first.
REFUSALS_PER_WRITE = 100
REFUSALS_WRITE_DELAY = timedelta(minutes=1)
# While a long history waits for a quiet point, refusals are not written by the hundred (each
# write would put off the quiet point): up to this many go to the new run instead, a payload
# of a few hundred KiB.
REFUSALS_CARRIED_MAX = 1_000
# A run continues as new (`bounded_history`) when Temporal suggests it (by default at 4 096
# events or 4 MiB), and in any case by the server's warning levels (`limit.historyCount.warn`,
# `limit.historySize.warn`), or after half the signals a run may receive
# (`history.maximumSignalsPerExecution`, 10 000): where the namespace suggests it later or
# never, the run still has the rest of each limit to reach a quiet point.
CONTINUE_AS_NEW_EVENTS = 10_240
CONTINUE_AS_NEW_BYTES = 10 * 1024 * 1024
CONTINUE_AS_NEW_SIGNALS = 5_000


@workflow.defn
class ReferralWorkflow:
    # The releases whose patch ids this code knows (workflows/features.py).
    releases: ClassVar[Releases] = RELEASES

    @workflow.init
    def __init__(self, input: ReferralInput) -> None:
        self._features = Features.decide(self.releases)
        # The SDK keeps the input for the run's life: it holds the shared rules, not its own
        # decoded copy, and no second copy of a resumed referral (below).
        input.rules = self._rules = shared_rules(input.rules)
        self._input = input
        self._indexed = input.index_search_attributes
        self._mail: deque[Callable[[], Awaitable[Any]]] = deque()
        self._records: deque[Callable[[], Awaitable[Any]]] = deque()
        self._version = 0
        self._published: tuple[Any, ...] | None = None
        self._recorded_revision = -1
        self._queued_revision = -1
        self._queued_seq = -1
        # Refused entries no write has carried yet (`batched_refusals`); some may have left
        # the history already (MAX_REFUSALS_KEPT).
        self._unwritten_refusals: list[HistoryEntry] = []
        self._signals = 0  # `action` signals this run has received
        self._write_trouble: str | None = None
        self._upgrade_requested = False
        self._carry_over_requested = False
        resume, input.resume = input.resume, None
        if resume is not None and input.recorded_seq is not None:
            self._state = resume  # recorded already: no write
            self._queued_seq = input.recorded_seq
            self._unwritten_refusals = list(input.unwritten_refusals)
        elif resume is not None:
            self._state = resume
            for position, entry in enumerate(self._state.history):
                entry.seq = position if entry.seq is None else entry.seq
            self._record()
        else:
            self._state = initial_state(input)
            self._record()
            self._queue_stage_effects()

    @workflow.run
    async def run(self, input: ReferralInput) -> ReferralState:
        if self._indexed:
            if not self._features.private_search_attributes:
                referrer = REFERRER_EMAIL_KEY.value_set(str(self._state.referrer.email))
            else:
                referrer = REFERRER_KEY.value_set(input.referrer_key or "")
            workflow.upsert_search_attributes(
                [
                    DOMAIN_KEY.value_set(self._state.prospect_domain),
                    referrer,
                    PRODUCT_KEY.value_set(self._state.opportunity.product),
                    *self._changing_search_attributes(),
                ]
            )
        pumps = [asyncio.create_task(self._pump(queue)) for queue in (self._mail, self._records)]
        if self._features.batched_refusals:
            pumps.append(asyncio.create_task(self._write_refusals_when_due()))
        while True:
            try:
                await self._until_closed()
                break
            except asyncio.CancelledError:
                if not self._features.business_cancel:
                    raise
                self._cancel_from_temporal()
        self._publish()
        await self._settle(lambda: not self._mail and not self._records)
        for pump in pumps:
            pump.cancel()
        await self._settle(workflow.all_handlers_finished)
        if self._upgrade_requested:  # closed meanwhile too: the new run records how it ended
            workflow.continue_as_new(self._input.model_copy(update={"resume": self._state}))
        return self._state

    async def _until_closed(self) -> None:
        while not self._state.is_terminal and not self._upgrade_requested:
            if self._should_continue_as_new():  # checked and done in one go: nothing between
                workflow.continue_as_new(
                    self._input.model_copy(
                        update={
                            "resume": self._state,
                            "recorded_seq": self._queued_seq,
                            "unwritten_refusals": self._unwritten_refusals,
                        }
                    )
                )
            self._publish()
            seen = self._version
            timer = self._next_timer()
            if timer is None:
                await workflow.wait_condition(self._changed_since(seen))
                continue
            due, fire = timer
            wait = due - workflow.now()
            if wait > timedelta(0):
                try:
                    await workflow.wait_condition(self._changed_since(seen), timeout=wait)
                    continue
                except TimeoutError:
                    if self._version != seen:  # a handler ran in the same task: re-decide
                        continue
            fire()

    async def _settle(self, condition: Callable[[], bool]) -> None:
        """Wait for the last effects of a closed referral; a cancellation now changes nothing."""
        while True:
            try:
                await workflow.wait_condition(condition)
                return
            except asyncio.CancelledError:
                if not self._features.business_cancel:
                    raise

    def _changed_since(self, seen: int) -> Callable[[], bool]:
        return lambda: self._version != seen or self._should_continue_as_new()

    def _should_continue_as_new(self) -> bool:
        """The history has grown long and the run is at a quiet point: no effect queued or
        under way, no handler running, no transition half done (handlers and timers change the
        state in one step). Every effect is then done, and the new run starts from the state
        with nothing to redo; refused entries not yet written go along."""
        if self._mail or self._records or not workflow.all_handlers_finished():
            return False
        return self._carry_over_requested or self._history_is_long()

    def _history_is_long(self) -> bool:
        """Temporal suggests a new run, or the run has reached our own limits."""
        if not self._features.bounded_history:
            return False
        info = workflow.info()
        return (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() >= CONTINUE_AS_NEW_EVENTS
            or info.get_current_history_size() >= CONTINUE_AS_NEW_BYTES
            or self._signals >= CONTINUE_AS_NEW_SIGNALS
        )

    async def _pump(self, queue: deque[Callable[[], Awaitable[Any]]]) -> None:
        """Perform one queue's side effects in order. Email and ledger have separate queues so
        an SMTP outage never holds up the ledger, and neither holds up timers."""
        while True:
            await workflow.wait_condition(lambda: bool(queue))
            await queue[0]()
            queue.popleft()

    async def _write_refusals_when_due(self) -> None:
        """No refused entry waits longer than REFUSALS_WRITE_DELAY for its write (a new run
        starts the wait again for those it carries)."""
        while True:
            await workflow.wait_condition(lambda: bool(self._unwritten_refusals))
            try:
                await workflow.wait_condition(
                    lambda: not self._unwritten_refusals, timeout=REFUSALS_WRITE_DELAY
                )
            except TimeoutError:
                if self._unwritten_refusals:
                    self._record()

    # --- staff actions -----------------------------------------------------------------

    @workflow.update(name="act")
    async def act(self, request: StaffAction) -> ReferralState | ActResult:
        request = self._with_request_id(request)
        if not self._is_repeat(request):
            result = apply_action(self._state, request, self._rules, workflow.now())
            if isinstance(result, Refusal):  # the validator ran on this same state: not expected
                raise ApplicationError(result.reason, non_retryable=True)
            # The validator checked the assertion; its surface is read from the request, which
            # the history holds, so a replay records the same.
            self._commit(request, result, signed_surface(request))
        if self._features.system_of_record:  # staff read their own writes
            revision = self._queued_revision  # not refusals since, which wait for their batch
            await workflow.wait_condition(lambda: self._recorded_revision >= revision)
        if self._features.slim_payloads:
            state = self._state
            return ActResult(
                referral_id=state.referral_id, stage=state.stage, revision=state.revision
            )
        return self._state

    @act.validator
    def _validate_act(self, request: StaffAction) -> None:
        request = self._with_request_id(request)
        if self._is_repeat(request):
            return  # applied already: the update answers with the referral as it is
        self._check_actor(request)
        refusal = check_action(self._state, request, self._rules)
        if refusal is not None:
            raise ValueError(refusal.reason)

    def _check_actor(self, request: StaffAction) -> None:
        """Refuse an update whose actor is not proven as its action needs: money actions need
        an assertion the worker's trusted keys verify; others without one only as the program
        allows. Validators do not run when a history is replayed, and the history records
        whether the update was accepted: the keys of the day decide once."""
        action = request.action.value
        if request.assertion:
            keys = actor_assertions.trusted()
            try:
                if keys is None:
                    raise Refused(
                        "the workers trust no signing key (REFERRALS_ACTOR_KEYS) to check the "
                        "actor assertion with"
                    )
                keys.verify(workflow.info().workflow_id, request)
            except Refused as error:
                # Worth an operator's look: a forged or replayed assertion leaves no other trace.
                workflow.logger.warning(
                    "%s refused (request %s): %s", action, request.request_id, error
                )
                raise ValueError(f"{action} refused: {error}") from None
        elif request.action in MONEY_ACTIONS:
            workflow.logger.warning("%s refused (request %s): unsigned", action, request.request_id)
            raise ValueError(
                f"{action} moves money: it needs an actor signed by the surface that authenticated "
                "them (the staff web desk, or a toolbox's CLI with REFERRALS_STAFF_IDENTITY)"
            )
        elif (not_allowed := self._not_allowed_unauthenticated(request)) is not None:
            raise ValueError(not_allowed)

    @workflow.signal(name="action")
    def action(self, request: StaffAction) -> None:
        self._signals += 1
        if self._is_repeat(request):
            return
        unproven = self._unauthenticated_refusal(request)
        result = unproven or apply_action(self._state, request, self._rules, workflow.now())
        if isinstance(result, Refusal):
            refused = HistoryEntry(
                at=workflow.now(),
                action=request.action.value,
                actor=request.actor,
                note=f"refused: {result.reason}",
                outcome="refused",
                seq=self._state.next_seq(),
                # An unproven sender does not use up the request id: the same request, signed
                # and sent by update, still applies.
                request_id=None if unproven else request.request_id,
                surface=UNAUTHENTICATED,
            )
            self._state.history.append(refused)
            if self._features.refusal_cap:
                self._drop_old_refusals()
            if self._features.batched_refusals:
                self._hold_refusal(refused)
            else:
                self._changed()
            return
        self._commit(request, result, UNAUTHENTICATED)

    def _unauthenticated_refusal(self, request: StaffAction) -> Refusal | None:
        """A signal's sender is never proven (an assertion it carries could only be checked
        again, with other keys, when the history is replayed): it may not move money, and does
        the rest only as the program allows."""
        action = request.action.value
        if not self._features.signed_actors:
            return None
        if request.action in MONEY_ACTIONS:
            return Refusal(
                reason=f"{action} moves money: a signal cannot prove who sent it; staff "
                "record it from the desk or the CLI, signed"
            )
        not_allowed = self._not_allowed_unauthenticated(request)
        return None if not_allowed is None else Refusal(reason=not_allowed)

    def _not_allowed_unauthenticated(self, request: StaffAction) -> str | None:
        """Why the program refuses `request` from an unproven sender (update or signal)."""
        if request.action in self._rules.unauthenticated_actions:
            return None
        action = request.action.value
        return (
            f"{action} needs a signed actor: the program allows no unauthenticated {action} "
            "(unauthenticated_actions)"
        )

    @workflow.signal(name="upgrade")
    def upgrade(self) -> None:
        """Carry a referral started before a release over to a new run that has every
        behaviour of this worker's (continue-as-new, with its state). Sent by `referrals
        reconcile`. A run started before the system of record records itself on the way;
        a later one at its next quiet point, as a long history does (`CARRY_OVER`: until
        0.8 this signal did nothing to such a run)."""
        if not self._features.system_of_record:
            self._upgrade_requested = True
            self._version += 1
        elif not all(asdict(self._features).values()) and workflow.patched(CARRY_OVER):
            self._carry_over_requested = True
            self._version += 1

    @workflow.query(name="state")
    def state(self) -> ReferralState:
        return self._state

    # --- internals ---------------------------------------------------------------------

    def _with_request_id(self, request: StaffAction) -> StaffAction:
        """An update without a request id is identified by its update id."""
        if not self._features.request_ids or request.request_id:
            return request
        update = workflow.current_update_info()
        return request.model_copy(update={"request_id": update.id if update else None})

    def _is_repeat(self, request: StaffAction) -> bool:
        rid = request.request_id
        return bool(
            self._features.request_ids
            and rid
            and any(entry.request_id == rid for entry in self._state.history)
        )

    def _drop_old_refusals(self) -> None:
        history = self._state.history
        refused = [i for i, entry in enumerate(history) if entry.outcome == "refused"]
        drop = set(refused[: max(0, len(refused) - MAX_REFUSALS_KEPT)])
        if drop:
            self._state.history = [e for i, e in enumerate(history) if i not in drop]

    def _changed(self) -> None:
        self._version += 1
        self._state.revision += 1
        self._record()

    def _hold_refusal(self, refused: HistoryEntry) -> None:
        """A refusal changes no stage and no timer: the run loop is not woken, and its entry
        waits for a write that carries others (`_write_refusals_when_due`), except once the
        referral is closed, when the run is about to end."""
        self._state.revision += 1
        self._unwritten_refusals.append(refused)
        batch = REFUSALS_CARRIED_MAX if self._history_is_long() else REFUSALS_PER_WRITE
        if self._state.is_terminal or len(self._unwritten_refusals) >= batch:
            self._record()

    def _commit(self, request: StaffAction, new: ReferralState, surface: str | None = None) -> None:
        """`surface`: who proved the actor of a staff action (its history entry keeps it)."""
        new.history[-1].surface = surface
        previous = self._state
        if not self._features.protection_window:
            new.protected_until = None  # a referral from before protection never expires
        days = self._rules.clawback.days
        if self._features.clawback_window and request.action is Action.PAYOUT and days > 0:
            new.clawback_until = workflow.now() + timedelta(days=days)
            new.closed_at = None  # open for refunds until the window ends
        self._state = new
        self._changed()
        # No actor, note or reason in the log: they can name a person.
        workflow.logger.info("%s applied: stage %s", request.action.value, new.stage.value)
        if new.commission is not None:
            self._queue_ledger(request, new.history[-1].note, previous)
        if new.stage != previous.stage:
            self._queue_stage_effects()
        if self._features.protection_window and request.action is Action.EXTEND:
            self._queue_referrer_email(f"protection_extended/{new.protection_extensions}")
        if self._features.clawback_window and request.action is Action.REFUND:
            number = len(new.refunds)
            self._queue_referrer_email(f"refund/{number}")
            self._queue_staff_email(
                "staff_refund", str(self._rules.recipients.finance), self._snapshot(),
                suffix=f"/{number}",
            )  # fmt: skip

    def _cancel_from_temporal(self) -> None:
        request = StaffAction(
            action=Action.CANCEL, actor="temporal", reason="cancellation requested in Temporal"
        )
        result = apply_action(self._state, request, self._rules, workflow.now())
        if isinstance(result, Refusal):
            self._system_event(
                "temporal_cancel_refused",
                f"cancellation requested in Temporal, not applied: {result.reason}",
            )
        else:
            self._commit(request, result)

    def _record(self) -> None:
        """Queue the write of this change to the system of record (in order with the ledger)."""
        if not self._features.system_of_record:
            return
        state = self._state
        events = [
            entry.model_copy()
            for entry in state.history
            if entry.seq is not None and entry.seq > self._queued_seq
        ]
        if self._unwritten_refusals:  # those the history no longer keeps go too, in order
            kept = {entry.seq for entry in events}
            dropped = [e.model_copy() for e in self._unwritten_refusals if e.seq not in kept]
            events = sorted([*dropped, *events], key=lambda entry: entry.seq or 0)
            self._unwritten_refusals = []
        self._queued_seq = max([self._queued_seq, *(entry.seq or 0 for entry in events)])
        record = ReferralRecord(state=state.model_copy(update={"history": []}), events=events)
        revision = self._queued_revision = state.revision

        def recorded() -> None:
            self._recorded_revision = max(self._recorded_revision, revision)

        self._queue_write(RECORD_REFERRAL, record, recorded)

    def _queue_write(
        self, activity: str, argument: Any, done: Callable[[], None] | None = None
    ) -> None:
        async def write() -> None:
            if self._features.effect_failures:
                await self._write_until_done(activity, argument)
            else:
                await workflow.execute_activity(
                    activity,
                    argument,
                    start_to_close_timeout=EFFECT_TIMEOUT,
                    retry_policy=EFFECT_RETRY,
                )
            if done is not None:
                done()

        self._records.append(write)

    async def _write_until_done(self, activity: str, argument: Any) -> None:
        """A write retries until it succeeds; meanwhile the UI's details say it is failing."""
        failures = 0
        since = workflow.now()
        while True:
            try:
                await workflow.execute_activity(
                    activity,
                    argument,
                    start_to_close_timeout=WRITE_TIMEOUT,
                    retry_policy=WRITE_RETRY,
                )
                break
            except ActivityError as error:
                failures += 1
                self._write_trouble = (
                    f"{activity} failing since {since:%Y-%m-%d %H:%M:%S} UTC "
                    f"({failures * (WRITE_RETRY.maximum_attempts or 1)} attempts): "
                    f"{failure_reason(error)}"
                )
                self._publish_details()
                pause = min(WRITE_PAUSE * 2 ** (failures - 1), WRITE_PAUSE_MAX)
                await workflow.sleep(pause)
        if failures:
            self._write_trouble = None
            self._publish_details()

    def _queue_referrer_email(self, what: str) -> None:
        """An email to the referrer about `what` (a stage, `protection_warning/0`…): its key
        and, from its first part, its template."""
        state = self._state
        self._queue_email(
            f"{state.referral_id}/referrer/{what}",
            [str(state.referrer.email)],
            state.referrer.language,
            f"referrer_{what.split('/')[0]}",
            self._snapshot(),
        )

    def _snapshot(self) -> ReferralState:
        """The referral as an email queued now will show it."""
        if self._features.slim_payloads:
            return self._state.email_snapshot()
        return self._state.model_copy(deep=True)

    def _queue_stage_effects(self) -> None:
        state = self._state
        recipients = self._rules.recipients
        snapshot = self._snapshot()
        self._queue_referrer_email(state.stage.value)
        notice = STAFF_NOTICE.get(state.stage)
        if notice is not None:
            role, template = notice
            self._queue_staff_email(template, str(getattr(recipients, role)), snapshot)
        if state.stage is Stage.CANCELLED and self._features.business_cancel:
            self._queue_staff_email("staff_referral_cancelled", str(recipients.desk), snapshot)
            if state.commission is not None:
                self._queue_staff_email(
                    "staff_referral_cancelled", str(recipients.finance), snapshot, "/finance"
                )
        if state.is_terminal:
            release = ProspectRelease(domain=state.prospect_domain, referral_id=state.referral_id)
            self._queue_write(RELEASE_PROSPECT, release)

    def _queue_staff_email(
        self,
        template: str,
        to: str,
        snapshot: ReferralState,
        suffix: str = "",
        extra: dict[str, str] | None = None,
    ) -> None:
        self._queue_email(
            f"{snapshot.referral_id}/{template}{suffix}",
            [to],
            self._rules.staff_language,
            template,
            snapshot,
            extra,
        )

    def _queue_email(
        self,
        key: str,
        to: list[str],
        language: str,
        template: str,
        snapshot: ReferralState,
        extra: dict[str, str] | None = None,
    ) -> None:
        request = EmailRequest(
            key=key,
            to=to,
            sender=str(self._rules.sender),
            language=language,  # type: ignore[arg-type]
            template=template,
            referral=snapshot,
            extra=extra or {},
        )
        if not self._features.effect_failures:
            self._mail.append(
                lambda: workflow.execute_activity(
                    SEND_EMAIL,
                    request,
                    start_to_close_timeout=EFFECT_TIMEOUT,
                    retry_policy=EFFECT_RETRY,
                )
            )
            return

        async def send() -> None:
            try:
                await workflow.execute_activity(
                    SEND_EMAIL,
                    request,
                    start_to_close_timeout=EMAIL_ATTEMPT_TIMEOUT,
                    schedule_to_close_timeout=timedelta(hours=self._rules.email.retry_for_hours),
                    retry_policy=EMAIL_RETRY,
                )
            except ActivityError as error:
                self._email_failed(
                    request, email_failure_reason(error, self._rules.email.retry_for_hours)
                )

        self._mail.append(send)

    def _email_failed(self, request: EmailRequest, reason: str) -> None:
        """Recorded in the history; the desk is told, unless it is the desk's mail that fails."""
        to = ", ".join(request.to)
        self._system_event("email_failed", f"email to {to} failed ({request.template}): {reason}")
        desk = str(self._rules.recipients.desk)
        if desk in request.to:
            workflow.logger.error(
                "email %s to the desk (%s) failed and cannot be reported by email: %s",
                request.key,
                desk,
                reason,
            )
            return
        self._queue_email(
            f"{request.key}/failure-notice",
            [desk],
            self._rules.staff_language,
            "staff_email_failed",
            self._snapshot(),
            {"to": to, "template": request.template, "reason": reason},
        )

    def _ledger_key(self, request: StaffAction) -> str:
        state = self._state
        if not self._features.business_event_keys:
            return f"{state.referral_id}/{len(state.history)}"
        key = f"{state.referral_id}/{request.action.value}"
        if request.action in (Action.PAYMENT, Action.REFUND):  # one event per reference
            key += f"/{(request.reference or '').strip()}"
        return key

    def _queue_ledger(
        self, request: StaffAction, note: str | None, previous: ReferralState
    ) -> None:
        record = CommissionRecord.after(
            self._state,
            event=request.action.value,
            event_key=self._ledger_key(request),
            at=self._state.history[-1].at,
            actor=request.actor,
            note=note,
        )
        if self._features.commission_lines:
            record.lines = commission_lines(previous, self._state, request)
        self._queue_write(RECORD_COMMISSION, record)

    def _next_timer(self) -> tuple[datetime, Callable[[], None]] | None:
        state = self._state
        ends = state.protection_end
        if self._features.protection_window and ends is not None:
            warn = ends - timedelta(days=self._rules.protection.warning_days)
            if not state.protection_warning_sent and warn < ends:
                return warn, self._protection_warning
            return ends, self._protection_expiry
        if self._features.clawback_window and state.stage is Stage.COMMISSION_PAID:
            if state.clawback_until is not None and state.in_clawback_window:
                return state.clawback_until, self._clawback_window_end
        if state.stage is Stage.SUBMITTED:
            if not state.contact_reminder_sent:
                return state.contact_reminder_at, self._contact_reminder
            if not state.contact_sla_breached:
                return state.contact_deadline, self._contact_escalation
        if state.stage is Stage.WON and state.payment_due_at is not None:
            interval = timedelta(days=self._rules.payment.reminder_interval_days)
            return state.payment_due_at + interval * state.payment_reminders_sent, (
                self._payment_reminder
            )
        return None

    def _system_event(self, action: str, note: str) -> None:
        self._state.history.append(
            HistoryEntry(
                at=workflow.now(),
                action=action,
                actor="system",
                note=note,
                outcome="system",
                seq=self._state.next_seq(),
            )
        )
        self._changed()
        workflow.logger.info("%s: stage %s", action, self._state.stage.value)

    def _protection_warning(self) -> None:
        state = self._state
        state.protection_warning_sent = True
        assert state.protected_until is not None
        self._system_event(
            "protection_warning",
            f"protection ends {state.protected_until:%Y-%m-%d %H:%M} UTC; "
            "referrer and sales warned",
        )
        self._queue_referrer_email(f"protection_warning/{state.protection_extensions}")
        self._queue_staff_email(
            "staff_protection_warning",
            str(self._rules.recipients.sales),
            self._snapshot(),
            suffix=f"/{state.protection_extensions}",
        )

    def _protection_expiry(self) -> None:
        """The protection ran out before the deal was won or lost: the prospect is free."""
        self._state = expire(self._state, workflow.now())
        self._changed()
        self._queue_stage_effects()

    def _clawback_window_end(self) -> None:
        state = self._state
        state.clawback_closed = True
        state.closed_at = workflow.now()
        self._system_event("clawback_window_closed", "no more refunds can claw back; closed")
        release = ProspectRelease(domain=state.prospect_domain, referral_id=state.referral_id)
        self._queue_write(RELEASE_PROSPECT, release)

    def _contact_reminder(self) -> None:
        self._state.contact_reminder_sent = True
        self._system_event("contact_reminder", "referrer not contacted yet; desk reminded")
        self._queue_staff_email(
            "staff_contact_reminder",
            str(self._rules.recipients.desk),
            self._snapshot(),
        )

    def _contact_escalation(self) -> None:
        self._state.contact_sla_breached = True
        self._system_event("contact_sla_breached", "contact deadline passed; desk manager alerted")
        self._queue_staff_email(
            "staff_contact_escalation",
            str(self._rules.recipients.desk_manager),
            self._snapshot(),
        )

    def _payment_reminder(self) -> None:
        self._state.payment_reminders_sent += 1
        count = self._state.payment_reminders_sent
        self._system_event(
            "payment_reminder", f"customer payment overdue; finance reminded (#{count})"
        )
        self._queue_staff_email(
            "staff_payment_overdue",
            str(self._rules.recipients.finance),
            self._snapshot(),
            suffix=f"/{count}",
        )

    def _published_key(self) -> tuple[Any, ...]:
        key: tuple[Any, ...] = (self._state.stage, self._state.contact_sla_breached)
        if self._features.protection_window:
            key += (self._state.protection_end,)
        return key

    def _changing_search_attributes(self) -> list[SearchAttributeUpdate[Any]]:
        self._published = self._published_key()
        updates: list[SearchAttributeUpdate[Any]] = [
            STAGE_KEY.value_set(self._state.stage.value),
            SLA_KEY.value_set(self._state.contact_sla_breached),
        ]
        if self._features.protection_window:
            protected = self._state.protection_end
            updates.append(
                PROTECTED_KEY.value_set(protected) if protected else PROTECTED_KEY.value_unset()
            )
        return updates

    def _publish(self) -> None:
        """Keep the Temporal UI truthful: search attributes and current details."""
        if self._indexed and self._published != self._published_key():
            workflow.upsert_search_attributes(self._changing_search_attributes())
        self._publish_details()

    def _publish_details(self) -> None:
        workflow.set_current_details(
            current_details(self._state, self._next_timer(), self._write_trouble)
        )
