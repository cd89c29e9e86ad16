"""`referrals receipts show|verify|chain-check`: the receipt log from a terminal
(docs/receipts.md). `verify` and `chain-check` exit 1 with the reason on stderr."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core import receipts
from core.settings import Need
from starter.actions import Refused
from starter.cli import database, print_json

DB = Need.DATABASE


def cmd_receipts_show(args: argparse.Namespace) -> int:
    """A referral's receipts (its id), or one receipt (its number), as signed."""
    from activities import receipts as log

    engine = database(args.settings)
    if args.id.isdigit():
        found = log.receipt(engine, int(args.id))
        if found is None:
            raise Refused(f"no receipt {args.id}")
        print_json(found)
        return 0
    shown = log.receipts_of(engine, args.id)
    if not shown:
        raise Refused(f"no receipt for {args.id} (unknown, or registered before receipts)")
    if args.copy:
        print_json(log.referrer_copy(engine, args.id))
        return 0
    print_json(shown)
    return 0


def _keys_from(path: Path) -> dict[str, Any]:
    """The public keys as GET /receipts/keys publishes them, from a saved copy."""
    try:
        published = json.loads(path.read_text(encoding="utf-8"))
        return {k["key_id"]: receipts.parse_public_key(k["public_key"]) for k in published["keys"]}
    except (OSError, ValueError, KeyError, TypeError, receipts.ReceiptError) as error:
        raise Refused(f"{path}: not the keys of /receipts/keys ({error})") from error


def cmd_receipts_verify(args: argparse.Namespace) -> int:
    """Exit 0 and say what the receipt proves, or exit 1 naming what is wrong."""
    from activities import receipts as log

    try:
        document = receipts.parse(Path(args.file).read_bytes())
    except OSError as error:
        raise Refused(f"{args.file}: {error.strerror}") from error
    except receipts.ReceiptError as error:
        raise Refused(f"{args.file}: {error}") from error
    if args.keys is not None:  # offline: what the receipt and the published keys say
        verdict = receipts.verify(document, _keys_from(Path(args.keys)))
    else:
        args.settings.require(DB)
        verdict = log.verify_with_log(database(args.settings), document)
    if not verdict.valid:
        raise Refused(f"{args.file}: {verdict.problem}")
    opened = ", ".join(
        f"{name} {shown['value']}" for name, shown in (document.get("disclosures") or {}).items()
    )
    print(
        f"valid: receipt {verdict.seq} ({verdict.kind}) at {verdict.at}, signed with key "
        f"{verdict.key_id}" + (f"; discloses {opened}" if opened else "")
    )
    return 0


def cmd_receipts_chain_check(args: argparse.Namespace) -> int:
    from activities import receipts as log

    report = log.chain_check(database(args.settings), args.start)
    if report.problem is not None:
        raise Refused(f"chain broken: {report.problem} ({report.checked} receipts checked)")
    ending = f", ending at receipt {report.last}" if report.last else ""
    print(f"chain intact: {report.checked} receipts checked from {args.start}{ending}")
    return 0


def add_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Registers `receipts` on the CLI's parser (`add` as in build_parser)."""
    group = add("receipts", lambda _: 2, "the signed, chained receipts of registrations")
    commands = group.add_subparsers(
        dest="receipts_command", required=True, metavar="RECEIPTS_COMMAND"
    )
    sub = commands.add_parser("show", help="a referral's receipts, or one receipt by number")
    sub.set_defaults(handler=cmd_receipts_show, needs=(DB,), reads_only=True)
    sub.add_argument("id", help="a referral id, or a receipt number")
    sub.add_argument(
        "--copy",
        action="store_true",
        help="the referrer's copy of its registration (with the disclosures, unless erased)",
    )
    sub = commands.add_parser("verify", help="check a receipt file: exit 0 valid, 1 not")
    sub.set_defaults(handler=cmd_receipts_verify, needs=(), reads_only=True)
    sub.add_argument("file")
    sub.add_argument(
        "--keys",
        metavar="FILE",
        help="check offline against a saved copy of GET /receipts/keys, not the database",
    )
    sub = commands.add_parser(
        "chain-check", help="check every link of the log: exit 1 naming the first broken one"
    )
    sub.set_defaults(handler=cmd_receipts_chain_check, needs=(DB,), reads_only=True)
    sub.add_argument("--from", dest="start", type=int, default=1, metavar="N")
