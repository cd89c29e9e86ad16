"""The referral workflow: one run carries one referral through the six steps.

Staff decisions arrive as updates (validated, so the CLI sees refusals) or as
signals (fire-and-forget; a refused one is recorded in the history). Both go
through `apply_action`. Handlers only change state and queue side effects;
the run method performs the effects in order and owns every timer.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey, SearchAttributeUpdate
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from workflows.models import (
        CommissionRecord,
        EmailRequest,
        HistoryEntry,
        ProgramRules,
        ProspectRelease,
        ReferralInput,
        ReferralState,
        Refusal,
        StaffAction,
        Stage,
    )
    from workflows.transitions import apply_action, check_action

STAGE_KEY = SearchAttributeKey.for_keyword("ReferralStage")
DOMAIN_KEY = SearchAttributeKey.for_keyword("ProspectDomain")
REFERRER_KEY = SearchAttributeKey.for_keyword("ReferrerEmail")
PRODUCT_KEY = SearchAttributeKey.for_keyword("Product")
SLA_KEY = SearchAttributeKey.for_bool("ContactSlaBreached")

# Side effects are retried until they succeed: an email or a ledger write is never dropped.
EFFECT_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=10),
)
EFFECT_TIMEOUT = timedelta(seconds=60)

# Who hears about a stage, besides the referrer (who hears about every one).
STAFF_NOTICE: dict[Stage, tuple[str, str]] = {
    Stage.SUBMITTED: ("desk", "staff_new_referral"),
    Stage.QUALIFYING: ("sales", "staff_sales_handoff"),
    Stage.WON: ("finance", "staff_deal_won"),
    Stage.COMMISSION_PAYABLE: ("finance", "staff_commission_payable"),
}


@workflow.defn
class ReferralWorkflow:
    @workflow.init
    def __init__(self, input: ReferralInput) -> None:
        submission = input.submission
        window = input.contact_window
        product = input.rules.product(submission.opportunity.product)
        self._rules: ProgramRules = input.rules
        self._indexed = input.index_search_attributes
        self._referrer_extra = {"status_url": input.status_url} if input.status_url else {}
        self._state = ReferralState(
            referral_id=input.referral_id,
            stage=Stage.SUBMITTED,
            referrer=submission.referrer,
            prospect=submission.prospect,
            prospect_domain=submission.prospect.domain,
            contact=submission.contact,
            opportunity=submission.opportunity,
            product_name=product.name if product else submission.opportunity.product,
            submitted_at=window.received_at,
            contact_reminder_at=window.reminder_at,
            contact_deadline=window.deadline,
            contact_calendar=window,
            history=[
                HistoryEntry(at=window.received_at, action="submitted", actor=input.submitted_by)
            ],
        )
        self._mail: deque[Callable[[], Awaitable[Any]]] = deque()
        self._records: deque[Callable[[], Awaitable[Any]]] = deque()
        self._version = 0
        self._published: tuple[Stage, bool] | None = None
        self._queue_stage_effects()

    @workflow.run
    async def run(self, input: ReferralInput) -> ReferralState:
        if self._indexed:
            workflow.upsert_search_attributes(
                [
                    DOMAIN_KEY.value_set(self._state.prospect_domain),
                    REFERRER_KEY.value_set(str(self._state.referrer.email)),
                    PRODUCT_KEY.value_set(self._state.opportunity.product),
                    *self._changing_search_attributes(),
                ]
            )
        pumps = [asyncio.create_task(self._pump(queue)) for queue in (self._mail, self._records)]
        while not self._state.is_terminal:
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
        self._publish()
        await workflow.wait_condition(lambda: not self._mail and not self._records)
        for pump in pumps:
            pump.cancel()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._state

    def _changed_since(self, seen: int) -> Callable[[], bool]:
        return lambda: self._version != seen

    async def _pump(self, queue: deque[Callable[[], Awaitable[Any]]]) -> None:
        """Perform one queue's side effects in order. Email and ledger have separate queues so
        an SMTP outage never holds up the ledger, and neither holds up timers."""
        while True:
            await workflow.wait_condition(lambda: bool(queue))
            await queue[0]()
            queue.popleft()

    # --- staff actions -----------------------------------------------------------------

    @workflow.update(name="act")
    def act(self, request: StaffAction) -> ReferralState:
        result = apply_action(self._state, request, self._rules, workflow.now())
        if isinstance(result, Refusal):  # the validator ran on this same state: not expected
            raise ApplicationError(result.reason, non_retryable=True)
        self._commit(request, result)
        return self._state

    @act.validator
    def _validate_act(self, request: StaffAction) -> None:
        refusal = check_action(self._state, request, self._rules)
        if refusal is not None:
            raise ValueError(refusal.reason)

    @workflow.signal(name="action")
    def action(self, request: StaffAction) -> None:
        result = apply_action(self._state, request, self._rules, workflow.now())
        if isinstance(result, Refusal):
            self._state.history.append(
                HistoryEntry(
                    at=workflow.now(),
                    action=request.action.value,
                    actor=request.actor,
                    note=f"refused: {result.reason}",
                    outcome="refused",
                )
            )
            self._version += 1
            return
        self._commit(request, result)

    @workflow.query(name="state")
    def state(self) -> ReferralState:
        return self._state

    # --- internals ---------------------------------------------------------------------

    def _commit(self, request: StaffAction, new: ReferralState) -> None:
        previous = self._state
        self._state = new
        self._version += 1
        if new.commission is not None:
            self._queue_ledger(request.action.value, request.actor, new.history[-1].note)
        if new.stage != previous.stage:
            self._queue_stage_effects()

    def _queue_stage_effects(self) -> None:
        state = self._state
        recipients = self._rules.recipients
        snapshot = state.model_copy(deep=True)
        self._queue_email(
            f"{state.referral_id}/referrer/{state.stage.value}",
            [str(state.referrer.email)],
            state.referrer.language,
            f"referrer_{state.stage.value}",
            snapshot,
            self._referrer_extra,
        )
        notice = STAFF_NOTICE.get(state.stage)
        if notice is not None:
            role, template = notice
            self._queue_staff_email(template, str(getattr(recipients, role)), snapshot)
        if state.is_terminal:
            release = ProspectRelease(domain=state.prospect_domain, referral_id=state.referral_id)
            self._records.append(
                lambda: workflow.execute_activity(
                    "release_prospect",
                    release,
                    start_to_close_timeout=EFFECT_TIMEOUT,
                    retry_policy=EFFECT_RETRY,
                )
            )

    def _queue_staff_email(
        self, template: str, to: str, snapshot: ReferralState, suffix: str = ""
    ) -> None:
        self._queue_email(
            f"{snapshot.referral_id}/{template}{suffix}",
            [to],
            self._rules.staff_language,
            template,
            snapshot,
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
        self._mail.append(
            lambda: workflow.execute_activity(
                "send_email",
                request,
                start_to_close_timeout=EFFECT_TIMEOUT,
                retry_policy=EFFECT_RETRY,
            )
        )

    def _queue_ledger(self, event: str, actor: str, note: str | None) -> None:
        state = self._state
        commission = state.commission
        assert commission is not None
        record = CommissionRecord(
            referral_id=state.referral_id,
            referrer_email=str(state.referrer.email),
            referrer_name=state.referrer.name,
            basis_amount=commission.basis_amount,
            rate=commission.rate,
            amount=commission.amount,
            currency=commission.currency,
            customer_paid=commission.customer_paid,
            status=commission.status,
            event_key=f"{state.referral_id}/{len(state.history)}",
            event=event,
            at=state.history[-1].at,
            actor=actor,
            note=note,
        )
        self._records.append(
            lambda: workflow.execute_activity(
                "record_commission",
                record,
                start_to_close_timeout=EFFECT_TIMEOUT,
                retry_policy=EFFECT_RETRY,
            )
        )

    def _next_timer(self) -> tuple[datetime, Callable[[], None]] | None:
        state = self._state
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
                at=workflow.now(), action=action, actor="system", note=note, outcome="system"
            )
        )
        self._version += 1

    def _contact_reminder(self) -> None:
        self._state.contact_reminder_sent = True
        self._system_event("contact_reminder", "referrer not contacted yet; desk reminded")
        self._queue_staff_email(
            "staff_contact_reminder",
            str(self._rules.recipients.desk),
            self._state.model_copy(deep=True),
        )

    def _contact_escalation(self) -> None:
        self._state.contact_sla_breached = True
        self._system_event("contact_sla_breached", "contact deadline passed; desk manager alerted")
        self._queue_staff_email(
            "staff_contact_escalation",
            str(self._rules.recipients.desk_manager),
            self._state.model_copy(deep=True),
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
            self._state.model_copy(deep=True),
            suffix=f"/{count}",
        )

    def _changing_search_attributes(self) -> list[SearchAttributeUpdate[Any]]:
        self._published = (self._state.stage, self._state.contact_sla_breached)
        return [
            STAGE_KEY.value_set(self._state.stage.value),
            SLA_KEY.value_set(self._state.contact_sla_breached),
        ]

    def _publish(self) -> None:
        """Keep the Temporal UI truthful: search attributes and current details."""
        if self._indexed and self._published != (
            self._state.stage,
            self._state.contact_sla_breached,
        ):
            workflow.upsert_search_attributes(self._changing_search_attributes())
        workflow.set_current_details(current_details(self._state, self._next_timer()))


def current_details(state: ReferralState, timer: tuple[datetime, Any] | None) -> str:
    lines = [f"**Stage:** {state.stage.value}"]
    if timer is not None:
        due, fire = timer
        what = fire.__name__.strip("_").replace("_", " ")
        lines.append(f"**Next:** {what} at {due:%Y-%m-%d %H:%M} UTC")
    if state.contact_sla_breached:
        lines.append("**Contact SLA:** breached")
    if state.commission is not None:
        c = state.commission
        lines.append(
            f"**Commission:** {c.amount} {c.currency} ({c.status.value}); "
            f"customer paid {c.customer_paid} of {c.basis_amount} {c.currency}"
        )
    return "\n".join(lines)
