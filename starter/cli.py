"""`referrals`: the staff CLI. Exit 0 done, 1 refused (one line on stderr), 2 usage error."""

from __future__ import annotations

import argparse
import asyncio
import csv
import getpass
import json
import os
import socket
import sys
import uuid
from collections.abc import Callable, Coroutine
from datetime import date, datetime, timedelta
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from pydantic import BaseModel

from core.actor_assertions import SIGNING_KEY_ENV, SigningKey
from core.errors import Refused, SettingsError
from core.links import referrer_key
from core.roles import Permission, Task, held, may, refusal, roles_of
from core.settings import STAFF_IDENTITY_ENV, Need, Settings
from starter.actions import (
    ACTION_FIELDS,
    DEFAULT_TIMEOUT_SECONDS,
    Kind,
    fields_of,
    staff_action,
)
from starter.spreadsheet import spreadsheet_row
from workflows.models.ledger import CommissionStatus
from workflows.models.referral import ReferralState, Stage
from workflows.models.values import Action, round_money
from workflows.transitions import allowed_actions

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from temporalio.client import Client

    from workflows.models.program import ProgramRules

# Every call to Temporal has a deadline; a staff action's is its own --timeout.
RPC_TIMEOUT = timedelta(seconds=10)
# `referrals list`: rows per page.
DEFAULT_LIST_LIMIT = 50


class Usage(Exception):
    """The command line itself is wrong (exit status 2, like argparse's own errors)."""


# --- output helpers -----------------------------------------------------------------------


def plain(value: Any, zone: ZoneInfo | None = None) -> Any:
    """JSON-ready: decimals as strings, instants ISO 8601 with the desk's offset."""
    if isinstance(value, BaseModel):
        return plain(value.model_dump(), zone)
    if isinstance(value, dict):
        return {k: plain(v, zone) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v, zone) for v in value]
    if isinstance(value, datetime):
        return (value.astimezone(zone) if zone else value).isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    return value


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def describe(state: ReferralState, workflow: str | None = None) -> str:
    zone = ZoneInfo(state.contact_calendar.timezone)

    def at(moment: datetime | None) -> str:
        return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z") if moment else "—"

    def end_of(moment: datetime) -> str:
        """Deadlines fall at 00:00 local: say which day they end."""
        return f"end of {(moment.astimezone(zone) - timedelta(seconds=1)):%a %Y-%m-%d}"

    s = state
    lines = [
        f"{s.referral_id}  stage: {s.stage.value}",
        f"  prospect     {s.prospect.company} ({s.prospect_domain}), {s.prospect.country}, "
        f"{s.prospect.sector} sector",
        f"  product      {s.product_name}",
        f"  referrer     {s.referrer.name} <{s.referrer.email}>, {s.referrer.company} "
        f"[{s.referrer.language}]",
        f"  contact      {s.contact.name} <{s.contact.email}>"
        + (f", {s.contact.title}" if s.contact.title else ""),
        f"  submitted    {at(s.submitted_at)}",
        f"  contact by   {end_of(s.contact_deadline)} (reminder at {end_of(s.contact_reminder_at)};"
        f" {s.contact_calendar.country} business days in {s.contact_calendar.timezone}, "
        f"holidays {s.contact_calendar.holidays_version})",
        f"  contact SLA  {'BREACHED' if s.contact_sla_breached else 'ok'}",
    ]
    if s.commission is not None:
        c = s.commission
        lines.append(
            f"  commission   {c.amount} {c.currency} ({c.rate * 100:.2f}% of {c.basis_amount}), "
            f"{c.status.value}; customer paid {c.customer_paid} of {c.basis_amount}"
            + (f"; clawed back {c.clawed_back}, net {c.net}" if c.clawed_back else "")
        )
        lines.append(
            f"  payment due  {at(s.payment_due_at)} ({s.payment_terms_days} days terms)"
            + (f", {s.payment_reminders_sent} reminder(s) sent" if s.payment_reminders_sent else "")
        )
    if s.protection_end is not None:
        extended = f", extended {s.protection_extensions}x" if s.protection_extensions else ""
        lines.append(f"  protected    until {at(s.protection_end)}{extended}")
    for r in s.refunds:
        currency = s.commission.currency if s.commission else ""
        lines.append(
            f"  refund       {at(r.at)} {r.amount} {currency} (ref. {r.reference}): "
            f"{r.reason}; commission clawed back {r.clawback}"
        )
    if s.in_clawback_window and s.clawback_until is not None:
        lines.append(f"  clawback     refunds claw back until {at(s.clawback_until)}")
    if s.consent is not None:
        lines.append(f"  consent      {s.consent.statement}, accepted {at(s.consent.accepted_at)}")
    if s.closed_at is not None:
        lines.append(f"  closed       {at(s.closed_at)}")
    if s.erased is not None:
        lines.append(
            f"  ERASED       {at(s.erased.at)} by {s.erased.by}: {s.erased.reason} "
            "(personal data replaced by a pseudonym)"
        )
    allowed = ", ".join(a.value for a in allowed_actions(s)) or "none (closed)"
    lines.append(f"  next         {allowed}")
    if workflow is not None and workflow != "running":
        lines.append(f"  WORKFLOW     {workflow}: run `referrals reconcile`")
    lines.append("  history")
    for entry in s.history:
        note = f" — {entry.note}" if entry.note else ""
        flag = " [refused]" if entry.outcome == "refused" else ""
        proof = f" ({entry.surface})" if entry.surface else ""  # who signed, or unauthenticated
        lines.append(f"    {at(entry.at)}  {entry.action}{flag} by {entry.actor}{proof}{note}")
    return "\n".join(lines)


# --- what a command reaches --------------------------------------------------------------
# Imported when a command needs them, not before: SQLAlchemy, the Temporal SDK and the
# program's rules each cost a command that does not use them a noticeable part of a second.


def database(settings: Settings) -> Engine:
    """The system of record, its schema checked."""
    from activities.schema import open_database

    return open_database(settings.database())


async def temporal(settings: Settings) -> Client:
    from core.temporal import connect

    return await connect(settings)


def program(settings: Settings) -> ProgramRules:
    from core.program import load_program

    return load_program(settings.program_path)


# --- Temporal calls -------------------------------------------------------------------------


def timeout_seconds(args: argparse.Namespace) -> float:
    return float(args.timeout)


async def workflow_status(settings: Settings, referral_id: str) -> str:
    """What Temporal says of an open referral's workflow: `running`, or what went wrong."""
    from temporalio.client import WorkflowExecutionStatus
    from temporalio.service import RPCError, RPCStatusCode

    try:
        client = await temporal(settings)
        description = await client.get_workflow_handle(referral_id).describe(
            rpc_timeout=RPC_TIMEOUT
        )
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            return "missing in Temporal"
        return f"unknown ({error.message})"
    except RuntimeError:
        return f"unknown (Temporal unreachable at {settings.temporal_address})"
    status = description.status
    if status == WorkflowExecutionStatus.RUNNING:
        return "running"
    return f"{status.name.lower() if status else 'unknown'} in Temporal"


# --- who acts -------------------------------------------------------------------------------


def os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (a bare container)
        return f"uid-{os.getuid()}"


def acting_as(args: argparse.Namespace, permission: Permission | None = None) -> str:
    """Who a command that records something records as acting (docs/operations.md, "Staff
    roles, and who acted"). With REFERRALS_STAFF_IDENTITY, that identity, only for what its
    roles allow (`permission`; None: any staff role will do); without, the claimed name
    (--actor, REFERRALS_ACTOR, else the login) and the operating-system user and host."""
    settings: Settings = args.settings
    claimed = args.actor or settings.actor
    identity = settings.staff_identity
    if identity is None:
        user = os_user()
        return f"{claimed or user} (via cli: {user}@{socket.gethostname()})"
    if claimed and claimed.strip().lower() != identity:
        raise Refused(
            f"refused: this CLI acts as {identity} ({STAFF_IDENTITY_ENV}), not {claimed}: "
            "drop --actor (and REFERRALS_ACTOR)"
        )
    roles = roles_of(program(settings).staff, identity)
    if permission is None and not roles:
        raise Refused(f"refused: {args.command} needs a staff role ({held(identity, roles)})")
    if permission is not None and not may(roles, permission):
        raise Refused(f"refused: {refusal(permission)} ({held(identity, roles)})")
    return identity


def cli_signer(settings: Settings) -> SigningKey | None:
    """The CLI vouches for its actor only when it knows who that is: the identity a toolbox is
    given (REFERRALS_STAFF_IDENTITY), or the one developer of a dev stack (its key file). A
    name claimed with --actor goes unsigned, and cannot move money."""
    if settings.staff_identity is not None or SIGNING_KEY_ENV in settings.from_dev_files:
        return settings.actor_signing_key
    return None


# --- commands -------------------------------------------------------------------------------


async def cmd_submit(args: argparse.Namespace) -> int:
    from activities.db import make_engine
    from starter.intake import SubmissionRefused, parse_submission, submit_referral

    settings: Settings = args.settings
    actor = acting_as(args)
    rules = program(settings)
    try:
        data = json.loads(Path(args.file).read_text(encoding="utf-8"))
    except OSError as error:
        raise Refused(f"cannot read {args.file}: {error.strerror}") from error
    except json.JSONDecodeError as error:
        raise Refused(f"{args.file} is not valid JSON: {error}") from error
    try:
        submission = parse_submission(data, rules)
    except SubmissionRefused as error:  # each field that does not read, on one line
        raise Refused(f"refused: {error}") from error
    client = await temporal(settings)
    referral_id = await submit_referral(
        client, make_engine(settings.database()), rules, submission, settings,
        submitted_by=actor,
    )  # fmt: skip
    print(referral_id)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """A page of referrals, newest first: `--limit` rows (50; 0 for all) of page `--page`.
    `--json` prints a plain list: every referral unless `--limit` or `--page` is given, as
    it always has for the scripts that read it."""
    from activities.db import as_utc
    from activities.queries import count_referrals, list_referrals

    if args.limit is not None and args.limit < 0:
        raise Usage("--limit must be 0 (all) or more")
    if args.page < 1:
        raise Usage("--page must be 1 or more")
    if args.limit == 0 and args.page > 1:
        raise Usage("--limit 0 lists every referral on one page: no --page")
    limit = args.limit
    if limit is None:
        limit = 0 if args.json and args.page == 1 else DEFAULT_LIST_LIMIT
    engine = database(args.settings)
    stage = Stage(args.stage) if args.stage else None
    offset = (args.page - 1) * limit
    rows: list[dict[str, Any]] = [
        {
            "referral_id": row.referral_id,
            "stage": row.stage,
            "prospect_company": row.prospect_company,
            "prospect_domain": row.prospect_domain,
            "product": row.product,
            "referrer_email": row.referrer_email,
            "contact_sla_breached": row.contact_sla_breached,
            "submitted_at": as_utc(row.submitted_at).isoformat(),
            "closed_at": as_utc(row.closed_at).isoformat() if row.closed_at else None,
        }
        for row in list_referrals(
            engine,
            stage=stage,
            referrer_email=args.referrer,
            limit=limit or None,
            offset=offset,
        )
    ]
    if args.json:
        print_json(rows)
        return 0
    total = (
        len(rows)
        if not limit or (offset == 0 and len(rows) < limit)
        else count_referrals(engine, stage=stage, referrer_email=args.referrer)
    )
    if not rows:
        where = f" in stage {args.stage}" if args.stage else ""
        print(f"no referrals{where}" + (f" on page {args.page} ({total} in all)" if total else ""))
        return 0
    print(f"{'REFERRAL':<14} {'STAGE':<19} {'PROSPECT':<30} {'PRODUCT':<24} REFERRER")
    for r in rows:
        sla = " (SLA breached)" if r["contact_sla_breached"] else ""
        print(
            f"{r['referral_id']:<14} {r['stage'] + sla:<19} "
            f"{r['prospect_domain']:<30} {r['product']:<24} {r['referrer_email']}"
        )
    shown = f"{offset + 1}-{offset + len(rows)}" if offset else f"{len(rows)}"
    footer = f"{shown} of {total} referrals"
    if offset + len(rows) < total:
        more = [f"--page {args.page + 1}"]
        if args.limit is not None:
            more.append(f"--limit {limit}")
        if args.stage:
            more.append(f"--stage {args.stage}")
        if args.referrer:
            more.append(f"--referrer {args.referrer}")
        footer += f"; next: referrals list {' '.join(more)}"
    print(footer)
    if args.referrer:  # Temporal holds no address, only its keyed hash
        secret = args.settings.referrer_key_secret
        print(f"in the Temporal UI: ReferrerKey = '{referrer_key(args.referrer, secret)}'")
    return 0


async def cmd_show(args: argparse.Namespace) -> int:
    """From the system of record; for an open referral, also whether its workflow runs."""
    from activities.queries import load_referral

    settings: Settings = args.settings
    state = await asyncio.to_thread(load_referral, database(settings), args.id)
    if state is None:
        raise Refused(f"unknown referral {args.id}")
    workflow = None if state.is_terminal else await workflow_status(settings, args.id)
    if args.json:
        shown = plain(state, ZoneInfo(state.contact_calendar.timezone))
        print_json({**shown, "workflow": workflow})
    else:
        print(describe(state, workflow))
    return 0


def action_command(action: Action) -> Callable[[argparse.Namespace], Coroutine[Any, Any, int]]:
    async def command(args: argparse.Namespace) -> int:
        from starter.staff_client import send_action

        actor = acting_as(args, action)  # before anything is sent: a refusal sends nothing
        request = staff_action(
            action,
            {field.name: getattr(args, field.name) for field in fields_of(action)},
            actor=actor,
            request_id=args.request_id or f"cli-{uuid.uuid4()}",
        )
        settings: Settings = args.settings
        client = await temporal(settings)
        state = await send_action(
            client,
            args.id,
            request,
            timeout_seconds(args),
            settings.database(),
            cli_signer(settings),
        )
        print(f"{state.referral_id}: {action.value} done, stage {state.stage.value}")
        return 0

    return command


def emit(
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
    header: str,
    line: str,
    empty: str = "nothing to show",
) -> None:
    """Rows as JSON, CSV, or a table (`header`, and `line` formatted with each row)."""
    if args.json:
        print_json(rows)
    elif args.csv:
        fields = list(rows[0]) if rows else []
        writer = csv.DictWriter(sys.stdout, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(spreadsheet_row(row) for row in rows)
    elif not rows:
        print(empty)
    else:
        print(header)
        for row in rows:
            print(line.format(**row))


def cmd_commission_lines(args: argparse.Namespace) -> int:
    """The ledger's append-only lines; entitlement lines sum to each referral's commission."""
    from sqlmodel import Session, select

    from activities.db import CommissionRow, as_utc
    from activities.ledger import ledger_lines

    engine = database(args.settings)
    with Session(engine) as session:  # the rate each referral's commission was earned at
        rates = {
            c.referral_id: str(c.rate.normalize()) for c in session.exec(select(CommissionRow))
        }
    rows = [
        {
            "referral_id": row.referral_id,
            "referrer_email": row.referrer_email,
            "kind": row.kind,
            "amount": str(round_money(row.amount, row.currency)),
            "currency": row.currency,
            "rate": rates.get(row.referral_id, ""),
            "reference": row.reference or "",
            "reason": row.reason or "",
            "at": as_utc(row.at).isoformat(),
            "actor": row.actor,
        }
        for row in ledger_lines(engine)
    ]
    emit(
        rows,
        args,
        f"{'AT':<26} {'REFERRAL':<14} {'KIND':<9} {'AMOUNT':>14} {'RATE':>6}  REFERENCE  REFERRER",
        "{at:<26} {referral_id:<14} {kind:<9} {amount:>10} {currency} {rate:>6}  {reference}  "
        "{referrer_email}",
    )
    return 0


def cmd_commission_balances(args: argparse.Namespace) -> int:
    """Each referrer's net standing per currency; a negative balance is owed to us."""
    from activities.ledger import balances

    rows = [
        {
            "referrer_email": b.referrer_email,
            "currency": b.currency,
            "earned": str(round_money(b.earned, b.currency)),
            "clawed_back": str(round_money(b.clawed_back, b.currency)),
            "paid": str(round_money(b.paid, b.currency)),
            "balance": str(round_money(b.balance, b.currency)),
            "owed_to_us": str(round_money(b.owed_to_us, b.currency)),
        }
        for b in balances(database(args.settings))
    ]
    emit(
        rows,
        args,
        f"{'REFERRER':<40} {'CUR':<4} {'EARNED':>12} {'CLAWED BACK':>12} {'PAID':>12} "
        f"{'BALANCE':>12} {'OWED TO US':>12}",
        "{referrer_email:<40} {currency:<4} {earned:>12} {clawed_back:>12} {paid:>12} "
        "{balance:>12} {owed_to_us:>12}",
    )
    return 0


def cmd_commissions(args: argparse.Namespace) -> int:
    from sqlmodel import Session, col, select

    from activities.db import CommissionRow

    if args.lines:
        return cmd_commission_lines(args)
    if args.by_referrer:
        return cmd_commission_balances(args)
    with Session(database(args.settings)) as session:
        query = select(CommissionRow).order_by(col(CommissionRow.updated_at).desc())
        if args.status:
            query = query.where(CommissionRow.status == args.status)
        rows = [
            {
                "referral_id": row.referral_id,
                "referrer_email": row.referrer_email,
                "referrer_name": row.referrer_name,
                "basis_amount": str(round_money(row.basis_amount, row.currency)),
                "rate": str(row.rate.normalize()),
                "amount": str(round_money(row.amount, row.currency)),
                "currency": row.currency,
                "customer_paid": str(round_money(row.customer_paid, row.currency)),
                "status": row.status,
                "updated_at": row.updated_at.isoformat()
                if row.updated_at.tzinfo
                else row.updated_at.isoformat() + "+00:00",
            }
            for row in session.exec(query)
        ]
    emit(
        rows,
        args,
        f"{'REFERRAL':<14} {'STATUS':<8} {'RATE':>6} {'AMOUNT':>14} {'PAID BY CUSTOMER':>18}  "
        "REFERRER",
        "{referral_id:<14} {status:<8} {rate:>6} {amount:>10} {currency}  {customer_paid:>18}  "
        "{referrer_email}",
        "no commissions" + (f" with status {args.status}" if args.status else ""),
    )
    return 0


def iso_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def cmd_report(args: argparse.Namespace) -> int:
    """The program's figures, as the staff dashboard shows them, from the system of record."""
    from starter.figures import as_text, program_figures

    rules = program(args.settings)
    if args.product is not None and rules.product(args.product) is None:
        known = ", ".join(p.id for p in rules.products)
        raise Refused(f"unknown product {args.product!r} (products: {known})")
    figures = program_figures(
        database(args.settings), rules, since=args.since, product=args.product
    )
    if args.json:
        print_json(figures.model_dump(mode="json"))
    else:
        print(as_text(figures))
    return 0


async def cmd_reconcile(args: argparse.Namespace) -> int:
    from activities.receipts import configure as configure_receipts
    from activities.reconcile import reconcile

    settings: Settings = args.settings
    configure_receipts(settings.key_ring())  # a release it repairs gets its receipt
    report = await reconcile(await temporal(settings), database(settings), settings.task_queue)
    for line in report.fixed:
        print(line)
    print(f"reconcile: {report.checked} open referrals checked, {len(report.fixed)} repairs")
    return 0


async def cmd_replay_check(args: argparse.Namespace) -> int:
    """Replay running referrals' histories on this code: a change that would break one
    must not be deployed (docs/rollout.md)."""
    from temporalio.worker import Replayer

    from worker import workflow_runner
    from workflows.referral import ReferralWorkflow

    client = await temporal(args.settings)
    replayer = Replayer(
        workflows=[ReferralWorkflow],
        workflow_runner=workflow_runner(),
        data_converter=client.data_converter,
    )
    query = "WorkflowType = 'ReferralWorkflow' AND ExecutionStatus = 'Running'"
    checked = 0
    async for execution in client.list_workflows(query, limit=args.limit, rpc_timeout=RPC_TIMEOUT):
        handle = client.get_workflow_handle(execution.id, run_id=execution.run_id)
        history = await handle.fetch_history()
        result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
        if result.replay_failure is not None:
            raise Refused(
                f"{execution.id} would break on this code: "
                + str(result.replay_failure).splitlines()[0]
            )
        checked += 1
    print(f"replay-check: {checked} running referrals replay on this code")
    return 0


async def cmd_patches(args: argparse.Namespace) -> int:
    """For each patch id, the referral runs Temporal still holds that take its old branch
    (they recorded none of the markers that give its behaviour, TemporalChangeVersion): a
    closed one counts too, as a query or a reset replays it. None: the id can be retired
    (docs/rollout.md)."""
    from core.temporal import connect_for_operations
    from workflows.features import patch_markers

    client = await connect_for_operations(args.settings)
    print(f"{'patch id':<28}{'running':>9}{'closed':>9}")
    for patch_id, markers in patch_markers().items():
        listed = ", ".join(f"'{marker}'" for marker in markers)
        old_branch = (
            f"WorkflowType = 'ReferralWorkflow' AND TemporalChangeVersion NOT IN ({listed})"
        )
        running, closed = [
            (
                await client.count_workflows(
                    f"{old_branch} AND ExecutionStatus {status}", rpc_timeout=RPC_TIMEOUT
                )
            ).count
            for status in ("= 'Running'", "!= 'Running'")
        ]
        verdict = "retire it" if running == closed == 0 else "in use"
        print(f"{patch_id:<28}{running:>9}{closed:>9}  {verdict}")
    return 0


async def cmd_erase(args: argparse.Namespace) -> int:
    from activities.erasure import Refused, erase_referral, referrals_of

    if (args.id is None) == (args.referrer is None):
        raise Usage("erase needs a referral id or --referrer EMAIL, not both")
    actor = acting_as(args, Task.ERASE)
    engine = database(args.settings)
    if args.id is not None:
        targets, still_open = [args.id], []
    else:
        found = await asyncio.to_thread(referrals_of, engine, args.referrer)
        targets = [rid for rid, is_open in found if not is_open]
        still_open = [rid for rid, is_open in found if is_open]
        if not found:
            raise Refused(f"no referral of {args.referrer} holds personal data")
    client = await temporal(args.settings)
    for referral_id in targets:
        try:
            line = await erase_referral(
                client,
                engine,
                referral_id,
                by=actor,
                reason=args.reason,
                task_queue=args.settings.task_queue,
                maildir=args.settings.dev_maildir,
            )
        except Refused as error:
            raise Refused(str(error)) from error
        print(line)
    if still_open:
        raise Refused(
            f"not erased, still open: {', '.join(still_open)}: cancel them, then erase again"
        )
    return 0


def cmd_webhooks(args: argparse.Namespace) -> int:
    from activities.db import as_utc
    from activities.webhooks import list_deliveries

    rows = [
        {
            "id": row.id,
            "event_type": row.event_type,
            "referral_id": row.referral_id,
            "endpoint_url": row.endpoint_url,
            "status": row.status,
            "attempts": row.attempts,
            "redeliveries": row.redeliveries,
            "last_outcome": row.last_outcome,
            "created_at": as_utc(row.created_at).isoformat(),
            "updated_at": as_utc(row.updated_at).isoformat(),
        }
        for row in list_deliveries(database(args.settings), failed_only=args.failed)
    ]
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no failed webhook deliveries" if args.failed else "no webhook deliveries")
        return 0
    print(f"{'ID':<36} {'EVENT':<29} {'REFERRAL':<14} {'STATUS':<9} {'TRIES':>5}  {'UPDATED':<25}")
    for r in rows:
        print(
            f"{r['id']:<36} {r['event_type']:<29} {r['referral_id']:<14} {r['status']:<9} "
            f"{r['attempts']:>5}  {r['updated_at']:<25}"
        )
        print(f"    to {r['endpoint_url']}; last: {r['last_outcome'] or '—'}")
    return 0


async def cmd_webhooks_redeliver(args: argparse.Namespace) -> int:
    from activities.webhooks import Refused, redeliver

    try:
        settings: Settings = args.settings
        engine = database(settings)
        workflow = await redeliver(await temporal(settings), engine, args.id, settings.task_queue)
    except Refused as error:
        raise Refused(str(error)) from error
    print(f"{args.id}: redelivery started ({workflow})")
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from activities.db import make_engine
    from activities.schema import upgrade

    engine = make_engine(args.settings.database())
    before, after = upgrade(engine)
    where = engine.url.render_as_string(hide_password=True)
    if before == after:
        print(f"{where}: already at the current schema ({after})")
    else:
        print(f"{where}: upgraded from {before or 'empty'} to {after}")
    return 0


async def cmd_temporal_setup(args: argparse.Namespace) -> int:
    """The namespace as the program needs it (core/provisioning.py): idempotent."""
    from core.provisioning import ProvisioningError, setup
    from core.temporal import connect_for_operations

    settings: Settings = args.settings
    if args.retention is not None and not 1 <= args.retention <= 3650:
        raise Usage("--retention must be between 1 and 3650 days")
    rules = program(settings)
    client = await connect_for_operations(settings)
    try:
        lines = await setup(client, rules, settings.task_queue, args.retention)
    except ProvisioningError as error:
        raise Refused(str(error)) from error
    for line in lines:
        print(line)
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from core.encryption import CURRENT_ENV, KEYS_ENV, new_key_entry, rotate_key_file
    from core.settings import DEV_KEY_FILE

    settings: Settings = args.settings
    if args.receipts:
        return rotate_receipt_key(settings)
    if KEYS_ENV in settings.from_dev_files or not settings.encryption_keys:
        key_id = rotate_key_file(DEV_KEY_FILE)
        print(
            f"added key {key_id} to {DEV_KEY_FILE}: new payloads are encrypted with it, older "
            "keys still decrypt; restart the worker, web app and codec server to encrypt with it"
        )
        return 0
    entry = new_key_entry()
    key_id = entry.partition(":")[0]
    print(
        f"keys come from {KEYS_ENV}: rotate in two rolling steps. 1. Add this entry to "
        f"{KEYS_ENV} of every process and restart them (it decrypts, nothing encrypts with it "
        f"yet): {entry}  2. Then set {CURRENT_ENV}={key_id} everywhere and restart them again."
    )
    return 0


def rotate_receipt_key(settings: Settings) -> int:
    from activities.receipts import configure, rotate_key

    settings.require(DB, KEYS)
    configure(settings.key_ring())  # seals the new key
    key_id, retired = rotate_key(database(settings))
    before = f"; {retired} is retired, its public key still published" if retired else ""
    print(f"receipts are signed with key {key_id} from now on{before}")
    return 0


def cmd_keys_actor(args: argparse.Namespace) -> int:
    """A surface's new signing key and its public entry (docs/operations.md, "Who acted")."""
    from core.actor_assertions import TRUSTED_KEYS_ENV, ActorKeyError

    try:
        key = SigningKey.new(args.key_id, args.surface)
    except ActorKeyError as error:
        raise Refused(str(error).removeprefix(f"{SIGNING_KEY_ENV}: ")) from None
    print(f"{SIGNING_KEY_ENV}={key.text()}")
    print(f"{TRUSTED_KEYS_ENV} entry, for every worker (comma-separated): {key.trusted_entry()}")
    return 0


def cmd_codec_server(args: argparse.Namespace) -> int:
    from starter.codec_server import CodecServerError, run_codec_server

    try:
        run_codec_server(args.settings, args.host, args.port)
    except CodecServerError as error:
        raise Refused(str(error)) from error
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from starter.dev import run_dev

    return run_dev(Path(args.config))


def cmd_web(args: argparse.Namespace) -> int:
    from core.metrics import MetricsSettingError
    from starter.web import WebSettingError, run_web

    args.settings.temporal_client()  # fail closed: a bad Temporal profile stops the start
    try:
        run_web(args.settings, args.host, args.port)
    except (MetricsSettingError, WebSettingError) as error:  # unusable, or unsafe
        raise Refused(str(error)) from error
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import worker

    args.settings.temporal_client()  # fail closed: a bad Temporal profile stops the start
    worker.main(args.settings)
    return 0


# --- parser ---------------------------------------------------------------------------------


# What each command cannot run without: checked before it starts, so a missing setting is named
# at once, whatever the command would have reached first.
DB, KEYS, SECRET = Need.DATABASE, Need.ENCRYPTION, Need.SECRET
TEMPORAL = (DB, KEYS)  # a staff action or a look at Temporal, and the database behind it


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="referrals", description="Referral Desk: run the referral program from a terminal."
    )
    parser.add_argument(
        "--actor",
        help="who is acting, recorded in the audit history with the login and host it came "
        f"from (default $REFERRALS_ACTOR or the login); with ${STAFF_IDENTITY_ENV} set, that "
        "identity is recorded instead and --actor may only name it",
    )
    parser.add_argument(
        "--request-id",
        help="identifies a staff action: repeating a command with the same id applies it once "
        "(default: a new id per call)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=settings.cli_timeout_s,
        help="seconds to wait for a worker to apply a staff action "
        f"(default $REFERRALS_CLI_TIMEOUT or {DEFAULT_TIMEOUT_SECONDS:g})",
    )
    parser.set_defaults(reads_only=False)  # a command that only reads says so (`add`)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        handler: Callable[..., Any],
        help: str,
        needs: tuple[Need, ...] = (),
        *,
        reads_only: bool = False,
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler, needs=needs, reads_only=reads_only)
        return sub

    sub = add("dev", cmd_dev, "run the local stack: Temporal dev server and UI, worker, mail sink")
    sub.add_argument("--config", default="temporal-dev.yaml", help="the stack's settings")
    add(
        "worker",
        cmd_worker,
        "run a worker on the referrals task queue",
        (DB, KEYS, SECRET, Need.ACTOR_KEYS),
    )
    sub = add(
        "web",
        cmd_web,
        "run the web app (intake, portal, staff desk)",
        (DB, KEYS, SECRET, Need.ACTOR_SIGNING),
    )
    sub.add_argument("--host", default="127.0.0.1")
    sub.add_argument("--port", type=int, default=8000)
    add(
        "submit", cmd_submit, "submit a referral from a JSON file", (DB, KEYS, SECRET)
    ).add_argument("file")
    sub = add(
        "list", cmd_list, "list referrals, newest first, a page at a time", (DB,), reads_only=True
    )
    sub.add_argument("--stage", choices=[s.value for s in Stage])
    sub.add_argument("--referrer", metavar="EMAIL", help="only this referrer's referrals")
    sub.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help=f"referrals per page, 0 for all (default {DEFAULT_LIST_LIMIT}; "
        "with --json and no --page, all)",
    )
    sub.add_argument("--page", type=int, default=1, metavar="K", help="page K (default 1)")
    sub.add_argument("--json", action="store_true", help="a JSON list of the rows")
    sub = add("show", cmd_show, "show one referral", TEMPORAL, reads_only=True)
    sub.add_argument("id")
    sub.add_argument("--json", action="store_true")

    def add_action(action: Action, help: str) -> argparse.ArgumentParser:
        sub = add(action.value, action_command(action), help, TEMPORAL)
        sub.add_argument("id")
        return sub

    for action, (help, fields) in ACTION_FIELDS.items():
        sub = add_action(action, help)
        for field in fields:
            sub.add_argument(
                field.option,
                required=field.required,
                type=int if field.kind is Kind.INTEGER else str,
                help=field.help,
            )
    sub = add(
        "commissions",
        cmd_commissions,
        "finance's export of the commission ledger",
        (DB,),
        reads_only=True,
    )
    sub.add_argument("--status", choices=[s.value for s in CommissionStatus])
    view = sub.add_mutually_exclusive_group()
    view.add_argument("--lines", action="store_true", help="the ledger's lines, oldest first")
    view.add_argument(
        "--by-referrer", action="store_true", help="each referrer's balance, per currency"
    )
    fmt = sub.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true")
    add(
        "reconcile",
        cmd_reconcile,
        "compare the database with Temporal and repair what differs",
        TEMPORAL,
    )
    sub = add(
        "report",
        cmd_report,
        "the program's figures: funnel, time in stage, commission",
        (DB,),
        reads_only=True,
    )
    sub.add_argument(
        "--since",
        type=iso_date,
        metavar="DATE",
        help="only referrals submitted on or after DATE (YYYY-MM-DD, in the program's time zone)",
    )
    sub.add_argument("--product", metavar="ID", help="only referrals for this product")
    sub.add_argument("--json", action="store_true")
    sub = add(
        "erase", cmd_erase, "erase a closed referral's personal data (or a referrer's)", TEMPORAL
    )
    sub.add_argument("id", nargs="?")
    sub.add_argument("--referrer", metavar="EMAIL", help="every closed referral of this referrer")
    sub.add_argument("--reason", required=True)
    sub = add(
        "replay-check",
        cmd_replay_check,
        "replay running referrals on this code",
        (KEYS,),
        reads_only=True,
    )
    sub.add_argument("--limit", type=int, default=1000, help="at most N referrals (1000)")
    add(
        "patches",
        cmd_patches,
        "the referral runs that still take each patch's old branch",
        reads_only=True,
    )
    sub = add(
        "webhooks",
        cmd_webhooks,
        "webhook deliveries, newest first (or redeliver one)",
        (DB,),
        reads_only=True,
    )
    sub.add_argument("--failed", action="store_true", help="only those that were given up")
    sub.add_argument("--json", action="store_true")
    redeliver_help = "send a webhook message again (same webhook-id, new attempts)"
    hooks = sub.add_subparsers(dest="webhooks_command", metavar="WEBHOOKS_COMMAND")
    sub = hooks.add_parser("redeliver", help=redeliver_help, description=redeliver_help)
    sub.set_defaults(handler=cmd_webhooks_redeliver, needs=TEMPORAL, reads_only=False)
    sub.add_argument("id", help="the delivery's id (its webhook-id, msg_…)")
    db = add("db", lambda _: 2, "manage the database").add_subparsers(
        dest="db_command", required=True, metavar="DB_COMMAND"
    )
    upgrade_help = "bring the database to the current schema (Alembic migrations)"
    db.add_parser("upgrade", help=upgrade_help).set_defaults(handler=cmd_db_upgrade, needs=(DB,))
    temporal = add("temporal", lambda _: 2, "provision the Temporal namespace").add_subparsers(
        dest="temporal_command", required=True, metavar="TEMPORAL_COMMAND"
    )
    setup_help = (
        "create or update what the program needs in its namespace: the namespace (self-hosted), "
        "its search attributes, the nightly Schedules; prints what it changed"
    )
    sub = temporal.add_parser("setup", help=setup_help, description=setup_help)
    sub.set_defaults(handler=cmd_temporal_setup, needs=())
    sub.add_argument(
        "--retention",
        type=int,
        metavar="DAYS",
        help="days Temporal keeps a closed workflow (default: leave it; 30 for a new namespace)",
    )
    keys = add("keys", lambda _: 2, "manage the payload and actor keys").add_subparsers(
        dest="keys_command", required=True, metavar="KEYS_COMMAND"
    )
    rotate_help = "add a key to the key file: it encrypts from now on, older keys still decrypt"
    sub = keys.add_parser("rotate", help=rotate_help)
    sub.set_defaults(handler=cmd_keys_rotate)
    sub.add_argument(
        "--receipts",
        action="store_true",
        help="rotate the receipt signing key instead: new receipts carry the new key id, the "
        "old one is retired (its public key stays published, so old receipts verify)",
    )
    actor_help = (
        "print a new key a surface (the web desk, a toolbox) signs its staff's actions with"
    )
    sub = keys.add_parser("actor", help=actor_help)
    sub.set_defaults(handler=cmd_keys_actor)
    sub.add_argument("--surface", required=True, help="what it is: web, toolbox…")
    sub.add_argument("--key-id", required=True, help="its id, e.g. web-2026-12")
    sub = add(
        "codec-server",
        cmd_codec_server,
        "decode payloads for the Temporal UI and CLI (for operators who hold the key)",
        (KEYS,),
    )
    sub.add_argument("--host", default="127.0.0.1")
    sub.add_argument("--port", type=int, default=8081)
    from starter import cli_payouts, cli_receipts  # they use this module's helpers

    cli_payouts.add_commands(add)
    cli_receipts.add_commands(add)
    return parser


def run(argv: list[str] | None = None) -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(f"referrals: {error}", file=sys.stderr)
        return 1
    args = build_parser(settings).parse_args(argv)
    args.settings = settings
    try:
        settings.require(*args.needs)
        if not args.reads_only:  # what it writes may be an event the program's webhooks send
            from activities.webhooks import configure as configure_webhooks

            configure_webhooks(settings.program_path, settings.webhook_retry)
        result = args.handler(args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result)
    except (Refused, SettingsError) as error:
        print(f"referrals: {error}", file=sys.stderr)
        return 1
    except Usage as error:
        print(f"referrals: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if "connect" not in str(error).lower():
            raise
        print(
            f"referrals: cannot reach Temporal at {settings.temporal_address} "
            "(is `make run` running?)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130


def main() -> None:
    """Ends without interpreter finalization: the SDK can abort there (sdk-python#300), and
    the exit status must say what the command did."""
    code = run()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
