"""`referrals payee …` and `referrals payouts …`: finance's commands (docs/payouts.md)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from core.payees import (
    MANDATE_VERSION,
    PayeeKind,
    PayeeProfile,
    VatRegime,
    mandate_accepted,
    mask_iban,
    one_line,
)
from core.roles import Task
from core.settings import Need, Settings
from starter.actions import Refused
from starter.cli import (
    acting_as,
    cli_signer,
    database,
    iso_date,
    print_json,
    program,
    temporal,
    timeout_seconds,
)
from workflows.payouts import (
    RunAction,
    RunRequest,
    RunState,
    RunStatus,
    payout_referral,
    payout_requests,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

DB = Need.DATABASE
TEMPORAL = (Need.DATABASE, Need.ENCRYPTION)

# `payee set` options: the profile field each fills.
PROFILE_OPTIONS = {
    "legal_name": "the payee's legal name, as statements print it",
    "kind": f"one of {', '.join(k.value for k in PayeeKind)}",
    "country": "ISO 3166 alpha-2 code of where the payee is established",
    "address": "street, postcode and town",
    "siret": "SIRET (French company or sole trader)",
    "vat_id": "intra-EU VAT number",
    "vat_regime": f"one of {', '.join(r.value for r in VatRegime)}",
    "vat_rate": "VAT rate under fr_vat, e.g. 0.20",
    "iban": "the account commissions are paid to",
    "bic": "its bank's BIC (found from the IBAN where known)",
    "language": "fr or en: the statements' and emails' language",
}


def _profile_lines(profile: PayeeProfile) -> list[str]:
    mandate = profile.mandate
    lines = [
        f"{profile.email}: {profile.legal_name} ({profile.kind}, {profile.country})",
        f"  address     {profile.address}",
        f"  siret       {profile.siret or '-'}",
        f"  VAT         {profile.vat_regime}"
        + (f" {profile.vat_rate}" if profile.vat_rate is not None else "")
        + (f", {profile.vat_id}" if profile.vat_id else ""),
        f"  bank        {mask_iban(profile.iban)} {profile.bic or ''}"
        + (f" (rejected: {profile.bank_rejection})" if profile.bank_rejection else ""),
        f"  language    {profile.language}",
        "  mandate     "
        + (
            f"{mandate.reference}, {mandate.channel}, by {mandate.accepted_by} on "
            f"{mandate.accepted_at.isoformat()}"
            + ("" if profile.mandate_in_force else f" (not version {MANDATE_VERSION})")
            if mandate
            else "none"
        ),
    ]
    if profile.minimum:
        minimum = ", ".join(f"{amount} {code}" for code, amount in profile.minimum.items())
        lines.append(f"  minimum     {minimum}")
    return lines


def cmd_payee_show(args: argparse.Namespace) -> int:
    from activities.payees import load_payee, payee_events

    engine = database(args.settings)
    profile = load_payee(engine, args.email)
    if profile is None:
        raise Refused(f"{args.email} has no payee profile")
    if args.json:
        print_json(
            {
                **profile.model_dump(mode="json", exclude={"iban"}),
                "iban": mask_iban(profile.iban),
                "mandate_in_force": profile.mandate_in_force,
            }
        )
        return 0
    print("\n".join(_profile_lines(profile)))
    for event in payee_events(engine, args.email):
        print(f"    {event.at.isoformat()}  {event.change} by {event.actor}: {event.detail or ''}")
    return 0


def _minimum(values: list[str]) -> dict[str, str]:
    found = {}
    for value in values:
        code, _, amount = value.partition("=")
        try:
            Decimal(amount)
        except InvalidOperation:
            raise Refused(f"--minimum takes CURRENCY=AMOUNT, not {value!r}") from None
        found[code] = amount
    return found


def cmd_payee_set(args: argparse.Namespace) -> int:
    from activities.payees import load_payee, save_payee

    settings: Settings = args.settings
    actor = acting_as(args, Task.PAYEES)
    engine = database(settings)
    current = load_payee(engine, args.email)
    data: dict[str, Any] = current.model_dump() if current else {"email": args.email}
    given = {name: getattr(args, name) for name in PROFILE_OPTIONS if getattr(args, name)}
    if not given and not args.minimum:
        raise Refused("nothing to change: give at least one --option")
    data |= given
    if args.minimum:
        data["minimum"] = {**data.get("minimum", {}), **_minimum(args.minimum)}
    if given.get("vat_regime", VatRegime.FR_VAT) != VatRegime.FR_VAT and "vat_rate" not in given:
        data.pop("vat_rate", None)  # a rate belongs to fr_vat only
    try:
        profile = PayeeProfile.model_validate(data)
    except ValidationError as error:
        raise Refused(f"payee {args.email} refused: {one_line(error)}") from None
    saved = save_payee(engine, profile, actor, datetime.now(UTC), args.note)
    print("\n".join(_profile_lines(saved.profile)))
    if saved.previous_iban:
        print(f"bank details changed from {saved.previous_iban}: held for the cooldown")
    return 0


def cmd_payee_mandate(args: argparse.Namespace) -> int:
    """Staff record a mandate the payee signed on paper; the referrer accepts theirs in the
    portal."""
    from activities.payees import accept_mandate, load_payee

    settings: Settings = args.settings
    actor = acting_as(args, Task.PAYEES)
    engine = database(settings)
    profile = load_payee(engine, args.email)
    if profile is None:
        raise Refused(f"{args.email} has no payee profile: `referrals payee set` first")
    company = program(settings).payouts.company
    if company is None:
        raise Refused("program.yaml sets no payouts.company: the mandate names who bills")
    now = datetime.now(UTC)
    signed = mandate_accepted(profile, company, actor, "paper", now, args.reason.strip())
    accepted = accept_mandate(engine, profile.email, signed, now)
    print("\n".join(_profile_lines(accepted)))
    return 0


def _run_lines(state: RunState) -> list[str]:
    from activities.payouts import item_status

    approvals = ", ".join(a.actor for a in state.approvals) or "none"
    lines = [
        f"run {state.run_id}: {state.status}, {state.currency}, cutoff {state.cutoff}, "
        f"total {state.total} {state.currency}",
        f"  approvals {len(state.approvals)} of {state.approvals_required}: {approvals}",
    ]
    for item in state.items:
        status = item_status(item)
        why = ""
        if item.excluded:
            why = f" ({item.excluded})"
        elif item.holds:
            why = f" ({', '.join(h.value for h in item.holds)})" + (
                f", included by {item.included_by}" if item.included_by else ""
            )
        recovered = f", {item.recovered} recovered" if item.recoveries else ""
        lines.append(
            f"  {item.payee_email:<40} {status:<9} {item.net:>12} {item.currency} "
            f"(gross {item.gross}{recovered}; {len(item.referrals)} referrals){why}"
        )
    return lines


async def cmd_payouts_prepare(args: argparse.Namespace) -> int:
    from starter.payouts import local_today, prepare_run

    settings: Settings = args.settings
    actor = acting_as(args, Task.PAYOUT_RUNS)
    rules = program(settings)
    cutoff = args.cutoff or local_today(rules, datetime.now(UTC))
    client = await temporal(settings)
    state = await prepare_run(
        client,
        rules,
        settings.task_queue,
        args.currency or rules.commission.currency,
        cutoff,
        actor,
        timeout_seconds(args),
    )
    _print_run(args, state)
    return 0


def _print_run(args: argparse.Namespace, state: RunState) -> None:
    if getattr(args, "json", False):
        print_json(state.model_dump(mode="json") | {"total": str(state.total)})
    else:
        print("\n".join(_run_lines(state)))


def cmd_payouts_list(args: argparse.Namespace) -> int:
    from activities.payouts import list_runs

    runs = list_runs(database(args.settings), args.status)
    if not runs:
        print("no payout runs" + (f" {args.status}" if args.status else ""))
    for run in runs:
        print(
            f"{run.run_id:<28} {run.status:<10} {run.currency} cutoff {run.cutoff}  {run.total:>12}"
        )
    return 0


def cmd_payouts_show(args: argparse.Namespace) -> int:
    from activities.payouts import load_run

    engine = database(args.settings)
    state = load_run(engine, args.run)
    if state is None:
        raise Refused(f"no payout run {args.run}")
    _print_run(args, state)
    if args.out:
        for path in write_documents(engine, state.run_id, Path(args.out)):
            print(f"wrote {path}")
    return 0


def write_documents(engine: Engine, run_id: str, folder: Path) -> list[Path]:
    """The run's bank file, statements and credit notes, as files in `folder`."""
    from activities.payouts import documents

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for row in documents(engine, run_id):
        path = folder / row.filename
        path.write_bytes(row.content)
        written.append(path)
    return written


def run_command(action: RunAction) -> Callable[[argparse.Namespace], Any]:
    async def command(args: argparse.Namespace) -> int:
        from activities.payouts import load_run
        from starter.payouts import act_on_run, new_request_id

        settings: Settings = args.settings
        actor = acting_as(args, Task.PAYOUT_RUNS)
        signer = cli_signer(settings)
        engine = database(settings)
        payouts = []
        if action is RunAction.CONFIRM:
            # Each referral's payout is signed for that referral: the proof of who confirmed
            # reaches every referral the run pays.
            state = load_run(engine, args.run)
            if state is None:
                raise Refused(f"no payout run {args.run}")
            payouts = [
                signer.sign(payout_referral(payout), payout) if signer else payout
                for payout in payout_requests(state, actor)
            ]
        request = RunRequest(
            action=action,
            actor=actor,
            request_id=new_request_id(args.request_id),
            payee_email=getattr(args, "email", None),
            reason=getattr(args, "reason", None),
            code=getattr(args, "code", None),
            execution_date=getattr(args, "execution_date", None),
            payouts=payouts,
        )
        client = await temporal(settings)
        state = await act_on_run(client, args.run, request, timeout_seconds(args), signer, engine)
        _print_run(args, state)
        if action is RunAction.EXPORT:
            folder = Path(args.out or f"payout-run-{state.run_id}")
            for path in write_documents(engine, state.run_id, folder):
                print(f"wrote {path}")
        return 0

    return command


def add_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Registers `payee` and `payouts` on the CLI's parser (`add` as in build_parser)."""
    payee = add("payee", lambda _: 2, "payee profiles: who is paid, where, under which mandate")
    commands = payee.add_subparsers(dest="payee_command", required=True, metavar="PAYEE_COMMAND")
    sub = commands.add_parser("show", help="a payee's profile and its changes")
    sub.set_defaults(handler=cmd_payee_show, needs=(DB,), reads_only=True)
    sub.add_argument("email")
    sub.add_argument("--json", action="store_true")
    sub = commands.add_parser("set", help="create or change a payee's profile")
    sub.set_defaults(handler=cmd_payee_set, needs=(DB,))
    sub.add_argument("email")
    for name, help in PROFILE_OPTIONS.items():
        sub.add_argument(f"--{name.replace('_', '-')}", dest=name, help=help)
    sub.add_argument(
        "--minimum",
        action="append",
        metavar="CUR=AMOUNT",
        help="the payee's own minimum in a currency (repeatable)",
    )
    sub.add_argument("--note", help="why, kept in the profile's change log")
    sub = commands.add_parser(
        "mandate", help="record a self-billing mandate the payee signed on paper"
    )
    sub.set_defaults(handler=cmd_payee_mandate, needs=(DB,))
    sub.add_argument("email")
    sub.add_argument("--reason", required=True, help="where the signed copy is kept, and why")

    payouts = add("payouts", lambda _: 2, "payout runs: prepare, approve, pay")
    commands = payouts.add_subparsers(
        dest="payouts_command", required=True, metavar="PAYOUTS_COMMAND"
    )
    sub = commands.add_parser("prepare", help="start a run of what is payable, per payee")
    sub.set_defaults(handler=cmd_payouts_prepare, needs=TEMPORAL)
    sub.add_argument("--currency", help="the run's currency (default the program's)")
    sub.add_argument(
        "--cutoff", type=iso_date, metavar="DATE", help="pay what was payable by DATE less the "
        "holding period (default today)"
    )  # fmt: skip
    sub.add_argument("--json", action="store_true")
    sub = commands.add_parser("list", help="payout runs, newest first")
    sub.set_defaults(handler=cmd_payouts_list, needs=(DB,), reads_only=True)
    sub.add_argument("--status", choices=[s.value for s in RunStatus])
    sub = commands.add_parser("show", help="one run: its items, holds and approvals")
    sub.set_defaults(handler=cmd_payouts_show, needs=(DB,), reads_only=True)
    sub.add_argument("run")
    sub.add_argument("--json", action="store_true")
    sub.add_argument("--out", metavar="DIR", help="also write its files (bank file, statements)")
    for action, help, fields in (
        (
            RunAction.APPROVE,
            "approve a draft run (distinct staff, as many as the program asks)",
            (),
        ),
        (RunAction.EXCLUDE, "leave one payee's item out of a draft run", ("email", "--reason")),
        (RunAction.INCLUDE, "pay a held or excluded item in a draft run", ("email", "--reason")),
        (RunAction.EXPORT, "write an approved run's bank file and numbered statements", ()),
        (RunAction.MARK_SENT, "record that the bank file was sent to the bank", ()),
        (
            RunAction.FAIL,
            "record a payment the bank rejected: credit note, payee held until their IBAN changes",
            ("email", "--code", "--reason"),
        ),
        (RunAction.CONFIRM, "the bank paid: mark every referral of the run paid, tell payees", ()),
        (RunAction.CANCEL, "cancel a draft or approved run", ("--reason",)),
    ):
        sub = commands.add_parser(action.value, help=help, description=help)
        sub.set_defaults(handler=run_command(action), needs=TEMPORAL)
        sub.add_argument("run")
        for field in fields:
            if field.startswith("--"):
                sub.add_argument(field, required=True)
            else:
                sub.add_argument(field)
        sub.add_argument("--json", action="store_true")
        if action is RunAction.EXPORT:
            sub.add_argument(
                "--execution-date", type=iso_date, metavar="DATE",
                help="when the bank is to pay (default today)",
            )  # fmt: skip
            sub.add_argument(
                "--out", metavar="DIR", help="where to write the files (default payout-run-RUN)"
            )
