"""Receipts (docs/receipts.md): a signed, hash-chained log that proves when a prospect was
registered and why a later registration lost; nobody can alter or backdate one unseen."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import uuid
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from activities import receipts as log
from activities.db import ReceiptDisclosureRow, make_engine
from activities.erasure import erase_referral
from activities.records import save_referral
from activities.schema import upgrade
from core import receipts
from core.encryption import new_key_entry
from devstack.factories import state_at, submission, submission_data
from devstack.settings import SETTINGS
from starter.intake import DuplicateReferral, submit_referral
from starter.web import create_app
from tests.conftest import Cli, Live, eventually, in_process
from tests.desk import act_by_id
from workflows.models.program import ProgramRules
from workflows.models.referral import ReferralRecord, Stage
from workflows.models.values import Action
from workflows.transitions import expire

log.configure(SETTINGS.key_ring())


def unique() -> str:
    return uuid.uuid4().hex[:8]


def registration(domain: str = "acme.example", email: str = "claire@conseil.example") -> Any:
    return log.Registration.new(
        "Test program", {"rules": 1}, datetime(2026, 12, 14, 23, tzinfo=UTC), domain, email
    )


def fill(engine: Engine, count: int = 3, prefix: str = "R-") -> list[dict[str, Any]]:
    """`count` registrations, a refusal and a release, as the intake and the worker append."""
    made = []
    ids = [f"{prefix}{n:0{12 - len(prefix)}d}" for n in range(count)]
    for n, referral_id in enumerate(ids):
        with Session(engine) as session:
            made.append(log.register(session, referral_id, registration(f"p{n}.example")))
            session.commit()
    made.append(log.refuse_duplicate(engine, registration("p0.example"), ids[0], None))
    with Session(engine) as session:
        released = log.release(session, ids[-1])
        session.commit()
    assert released is not None
    made.append(released)
    return made


def flip(text_: str, at: int) -> str:
    return text_[:at] + chr(ord(text_[at]) ^ 1) + text_[at + 1 :]


# --- one receipt ---------------------------------------------------------------------------


def sealed(key: Ed25519PrivateKey, key_id: str = "k1") -> dict[str, Any]:
    reg = registration()
    return {
        **receipts.seal(
            {
                "v": 1,
                "program": "Test program",
                "seq": 7,
                "kind": receipts.REGISTERED,
                "referral_id": "R-0000000007",
                "at": "2026-12-07T10:00:00.000000Z",
                "rules_sha256": "ab" * 32,
                "commitments": reg.commitments,
                "decision": {"status": "received"},
                "contact_by": "2026-12-14T23:00:00.000000Z",
                "prev_entry_hash": receipts.GENESIS,
            },
            key_id,
            key,
        ),
        "disclosures": receipts.disclosed(reg.values, reg.salts),
    }


def test_a_receipt_verifies_and_every_change_shows() -> None:
    key = Ed25519PrivateKey.generate()
    copy = sealed(key)
    keys = {"k1": key.public_key()}
    verdict = receipts.verify(copy, keys)
    assert verdict.valid and verdict.seq == 7 and verdict.at == "2026-12-07T10:00:00.000000Z"
    for field, value in [
        ("at", "2026-12-01T10:00:00.000000Z"),  # backdated
        ("seq", 6),
        ("decision", {"status": "refused"}),
        ("prev_entry_hash", "1" * 64),
        ("entry_hash", "2" * 64),
        # The first character: all its bits count (the last one's may not).
        ("sig", ("B" if copy["sig"][0] == "A" else "A") + copy["sig"][1:]),
    ]:
        changed = {**copy, field: value}
        assert not receipts.verify(changed, keys).valid, field
        named = receipts.verify(changed, keys, logged=copy if field != "seq" else None)
        assert named.problem is not None and named.problem.startswith("altered"), field
        if field != "seq":
            assert field in named.fields and field in named.problem
    # The referrer's own copy: what it discloses must be what it committed to.
    edited = json.loads(json.dumps(copy))
    edited["disclosures"]["prospect_domain"]["value"] = "other.example"
    verdict = receipts.verify(edited, keys)
    assert not verdict.valid and verdict.fields == ("prospect_domain",)
    assert "prospect_domain" in (verdict.problem or "")


def test_a_receipt_signed_with_another_key_fails() -> None:
    ours, theirs = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    forged = sealed(theirs, key_id="k1")  # our key's id, another key
    verdict = receipts.verify(forged, {"k1": ours.public_key()})
    assert not verdict.valid and "signature" in (verdict.problem or "")
    unknown = receipts.verify(sealed(theirs, key_id="k9"), {"k1": ours.public_key()})
    assert unknown.code == "unknown_key" and "k9" in (unknown.problem or "")
    assert receipts.verify({"seq": 1}, {}).code == "malformed"


# --- the log -------------------------------------------------------------------------------


def test_the_chain_names_any_flipped_byte(engine: Engine) -> None:
    made = fill(engine)
    assert [r["seq"] for r in made] == [1, 2, 3, 4, 5]
    report = log.chain_check(engine)
    assert (report.problem, report.checked, report.last) == (None, 5, 5)
    assert log.chain_check(engine, 3).problem is None
    with Session(engine) as session:
        rows = {seq: session.get(log.ReceiptRow, seq).body for seq in range(1, 6)}  # type: ignore[union-attr]
    for seq, body in rows.items():
        for at in (1, len(body) // 2, len(body) - 2):
            with engine.begin() as connection:
                connection.execute(
                    text("UPDATE receipt SET body = :body WHERE seq = :seq"),
                    {"body": flip(body, at), "seq": seq},
                )
            problem = log.chain_check(engine).problem
            assert problem is not None and problem.startswith(f"receipt {seq}"), (seq, at)
            with engine.begin() as connection:
                connection.execute(
                    text("UPDATE receipt SET body = :body WHERE seq = :seq"),
                    {"body": body, "seq": seq},
                )
    assert log.chain_check(engine).problem is None
    with engine.begin() as connection:  # a receipt taken out of the log
        connection.execute(text("DELETE FROM receipt WHERE seq = 3"))
    assert log.chain_check(engine).problem == "receipt 3 is missing (the next is 4)"


def test_appends_from_many_threads_never_fork_the_chain(engine: Engine) -> None:
    start = threading.Barrier(20)

    def one(n: int) -> None:
        start.wait()
        with Session(engine) as session:
            log.register(session, f"R-T{n:09d}", registration(f"t{n}.example"))
            session.commit()

    threads = [threading.Thread(target=one, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report = log.chain_check(engine)
    assert (report.problem, report.checked) == (None, 20)
    times = [log.receipt(engine, seq)["at"] for seq in range(1, 21)]  # type: ignore[index]
    assert times == sorted(times)  # the database's clock, never earlier than the one before


def test_a_retried_append_appends_once(engine: Engine) -> None:
    reg = registration()
    for _ in range(2):
        with Session(engine) as session:
            first = log.register(session, "R-RETRIED001", reg)
            session.commit()
    assert first["seq"] == 1 and log.head(engine) == first
    assert log.chain_check(engine).checked == 1


def test_after_a_key_rotation_old_receipts_verify(engine: Engine) -> None:
    before = fill(engine, 1)
    new_key, retired = log.rotate_key(engine)
    assert retired == before[0]["key_id"] and new_key != retired
    after = fill(engine, 1, prefix="R-B")
    assert {r["key_id"] for r in after} == {new_key}
    keys = log.verifying_keys(engine)
    assert all(receipts.verify(r, keys).valid for r in before + after)
    assert log.chain_check(engine).problem is None
    [old] = [row for row in log.public_keys(engine) if row.key_id == retired]
    assert old.retired_at is not None and old.sealed_private is None  # it signs no more


def test_erasure_keeps_the_chain_and_the_referrers_copy(engine: Engine) -> None:
    fill(engine, 2)
    copy = log.referrer_copy(engine, "R-0000000000")
    assert copy is not None and copy["disclosures"]["prospect_domain"]["value"] == "p0.example"
    with Session(engine) as session:
        log.forget_disclosures(session, "R-0000000000")
        session.commit()
        assert session.get(ReceiptDisclosureRow, "R-0000000000") is None
    assert log.chain_check(engine).problem is None
    assert receipts.verify(copy, log.verifying_keys(engine)).valid
    kept = log.referrer_copy(engine, "R-0000000000")
    assert kept is not None and "disclosures" not in kept
    assert "p0.example" not in json.dumps(log.receipts_of(engine, "R-0000000000"))


# --- from the intake and the worker ------------------------------------------------------------


async def test_twenty_concurrent_submissions_one_registration(
    live: Live, rules: ProgramRules
) -> None:
    site = f"https://www.fromagerie-{unique()}.example/"
    emails = [f"referrer{n}-{unique()}@conseil{n}.example" for n in range(20)]

    async def submit(email: str) -> str | DuplicateReferral:
        try:
            return await submit_referral(
                live.client,
                live.engine,
                rules,
                submission(**{"prospect.website": site, "referrer.email": email}),
                SETTINGS,
            )
        except DuplicateReferral as refused:
            return refused

    results = await asyncio.gather(*(submit(email) for email in emails))
    [winner] = [r for r in results if isinstance(r, str)]
    refusals = [r for r in results if isinstance(r, DuplicateReferral)]
    assert len(refusals) == 19
    [registered] = log.receipts_of(live.engine, winner)
    winner_email = emails[results.index(winner)]
    copies = [r.receipt for r in refusals]
    assert all(c is not None and c["kind"] == receipts.REFUSED_DUPLICATE for c in copies)
    numbers = sorted([registered["seq"], *(c["seq"] for c in copies)])  # type: ignore[index]
    assert len(set(numbers)) == 20  # each attempt its own number, none lost
    # Between them, only other referrals' receipts (the shared worker's go on meanwhile).
    between = set(range(numbers[0], numbers[-1] + 1)) - set(numbers)
    others = [log.receipt(live.engine, seq) for seq in between]
    assert all(r is not None and r["referral_id"] not in (winner, None) for r in others)
    keys = log.verifying_keys(live.engine)
    for copy in copies:
        assert copy is not None
        decision = copy["decision"]
        assert decision["rule"] == receipts.FIRST_REGISTRATION_WINS
        assert (decision["earlier_seq"], decision["earlier_at"]) == (
            registered["seq"],
            registered["at"],
        )
        shown = json.dumps(copy)
        assert winner_email not in shown
        assert registered["commitments"]["referrer_email"] not in shown
        assert receipts.verify(copy, keys).valid
    assert log.chain_check(live.engine).problem is None
    await act_by_id(live.client, winner, Action.CANCEL, reason="test over")


def attachment(message: EmailMessage) -> dict[str, Any]:
    [part] = [p for p in message.iter_attachments() if p.get_content_type() == "application/json"]
    copy: dict[str, Any] = json.loads(part.get_content())
    return copy


async def test_a_referrals_receipts_follow_its_protection(
    live: Live, rules: ProgramRules, tmp_path: Path
) -> None:
    """registered, accepted, extended, released; the acknowledgement carries the first; after
    erasure the chain checks and the referrer's copy still verifies."""
    email = f"claire-{unique()}@conseil.example"
    data = {"prospect.website": f"https://{unique()}-vins.example", "referrer.email": email}
    rid = await submit_referral(live.client, live.engine, rules, submission(**data), SETTINGS)
    await act_by_id(live.client, rid, Action.CONTACTED)
    accepted = await act_by_id(live.client, rid, Action.ACCEPT)
    extended = await act_by_id(live.client, rid, Action.EXTEND, days=30, reason="board in June")
    await act_by_id(live.client, rid, Action.CANCEL, reason="test over")

    def kinds() -> list[str]:
        return [r["kind"] for r in log.receipts_of(live.engine, rid)]

    async def all_four() -> bool:
        return len(kinds()) == 4

    await eventually(all_four)
    registered, accept, extend, released = log.receipts_of(live.engine, rid)
    assert kinds() == ["registered", "accepted", "extended", "released"]
    assert registered["decision"]["status"] == "received"
    assert accept["decision"]["protected_until"] == log.instant(accepted.protected_until)
    assert extend["decision"]["protected_until"] == log.instant(extended.protected_until)
    assert released["decision"] == {"status": "released", "reason": "cancelled"}
    assert {r["commitments"]["prospect_domain"] for r in (accept, extend, released)} == {
        registered["commitments"]["prospect_domain"]
    }

    key = f"{rid}/referrer/submitted"

    async def acknowledged() -> bool:
        return any(m["X-Idempotency-Key"] == key for m in live.sink.messages())

    await eventually(acknowledged)
    [mail] = [m for m in live.sink.messages() if m["X-Idempotency-Key"] == key]
    copy = attachment(mail)
    assert copy == log.referrer_copy(live.engine, rid)
    assert copy["disclosures"]["referrer_email"]["value"] == email
    body = mail.get_body(("plain",))
    assert body is not None
    text_ = body.get_content()
    assert f"n° {registered['seq']}" in text_ and receipts.fingerprint(copy) in text_
    assert "/receipts/verify" in text_

    await erase_referral(
        live.client, live.engine, rid, by="dpo", reason="asked", task_queue="referrals"
    )
    assert log.chain_check(live.engine).problem is None
    assert receipts.verify(copy, log.verifying_keys(live.engine)).valid
    assert "disclosures" not in (log.referrer_copy(live.engine, rid) or {})
    stored = json.dumps(log.receipts_of(live.engine, rid))
    assert email not in stored and copy["disclosures"]["referrer_email"]["salt"] not in stored


# --- in public ---------------------------------------------------------------------------------


async def test_the_api_refusal_and_the_public_routes(live: Live, rules: ProgramRules) -> None:
    app = create_app(rules=rules, engine=live.engine, client=live.client, key="k")
    site = f"https://{unique()}-bois.example/"
    async with in_process(app) as web:
        first = await web.post("/api/referrals", json=submission_data(**{"prospect.website": site}))
        assert first.status_code == 201, first.text
        other = submission_data(
            **{"prospect.website": site, "referrer.email": f"x-{unique()}@autre.example"}
        )
        refused = await web.post("/api/referrals", json=other)
        assert refused.status_code == 409
        copy = refused.json()["receipt"]
        assert copy["kind"] == "refused_duplicate" and copy["decision"]["earlier_seq"] >= 1

        published = (await web.get("/receipts/keys")).json()
        assert published["algorithm"] == "Ed25519"
        keys = {k["key_id"]: receipts.parse_public_key(k["public_key"]) for k in published["keys"]}
        assert receipts.verify(copy, keys).valid  # with nothing but the receipt and our keys
        head = (await web.get("/receipts/head")).json()
        assert head["seq"] >= copy["seq"] and head["receipt"]["entry_hash"] == head["entry_hash"]

        for lang, valid_text, altered_text in [
            ("en", "Valid receipt", "This receipt was altered: the time changed"),
            ("fr", "Reçu valide", "ce qui a changé : la date et l’heure"),
        ]:
            ok = await web.post(
                "/receipts/verify", data={"receipt": json.dumps(copy), "lang": lang}
            )
            assert ok.status_code == 200 and valid_text in ok.text, ok.text
            backdated = {**copy, "at": "2020-01-01T00:00:00.000000Z"}
            upload = {"file": ("receipt.json", json.dumps(backdated), "application/json")}
            bad = await web.post("/receipts/verify", data={"lang": lang}, files=upload)
            assert bad.status_code == 422 and altered_text in bad.text, bad.text
    await act_by_id(live.client, first.json()["referral_id"], Action.CANCEL, reason="test over")


async def test_the_cli_shows_verifies_and_checks(cli: Cli, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'receipts.db'}"
    engine = make_engine(url)
    upgrade(engine)
    made = fill(engine)
    env = {"REFERRALS_DATABASE_URL": url}
    shown = await cli("receipts", "show", "R-0000000002", env_changes=env)
    assert shown.code == 0 and [r["kind"] for r in json.loads(shown.out)] == [
        "registered",
        "released",
    ]
    copy = await cli("receipts", "show", "R-0000000000", "--copy", env_changes=env)
    path = tmp_path / "receipt.json"
    path.write_text(copy.out)
    valid = await cli("receipts", "verify", str(path), env_changes=env)
    assert valid.code == 0 and valid.out.startswith("valid: receipt 1 (registered)"), valid
    assert "discloses prospect_domain p0.example" in valid.out
    edited = json.loads(copy.out)
    edited["disclosures"]["prospect_domain"]["value"] = "p9.example"
    path.write_text(json.dumps(edited))
    altered = await cli("receipts", "verify", str(path), env_changes=env)
    assert altered.code == 1 and "prospect_domain" in altered.err and "commitment" in altered.err
    keys_file = tmp_path / "keys.json"
    published = [{"key_id": r.key_id, "public_key": r.public_key} for r in log.public_keys(engine)]
    keys_file.write_text(json.dumps({"keys": published}))
    path.write_text(json.dumps({**made[2], "at": "2020-01-01T00:00:00.000000Z"}))
    offline = await cli("receipts", "verify", str(path), "--keys", str(keys_file))
    assert offline.code == 1 and "altered" in offline.err

    intact = await cli("receipts", "chain-check", env_changes=env)
    assert (intact.code, intact.out.strip()) == (
        0,
        "chain intact: 5 receipts checked from 1, ending at receipt 5",
    )
    rotated = await cli("keys", "rotate", "--receipts", env_changes=env)
    assert rotated.code == 0 and "receipts are signed with key rk-" in rotated.out
    with Session(engine) as session:
        log.register(session, "R-AFTERROTATE", registration("later.example"))
        session.commit()
    new_key = log.head(engine)["key_id"]  # type: ignore[index]
    assert new_key in rotated.out and new_key != made[0]["key_id"]
    path.write_text(json.dumps(made[0]))
    assert (await cli("receipts", "verify", str(path), env_changes=env)).code == 0
    with engine.begin() as connection:
        body = connection.execute(text("SELECT body FROM receipt WHERE seq = 4")).scalar_one()
        connection.execute(
            text("UPDATE receipt SET body = :b WHERE seq = 4"), {"b": flip(body, 40)}
        )
    broken = await cli("receipts", "chain-check", "--from", "2", env_changes=env)
    assert broken.code == 1 and "chain broken: receipt 4" in broken.err, broken
    engine.dispose()


def test_an_expiry_is_receipted_once_however_often_it_is_written(
    engine: Engine, rules: ProgramRules
) -> None:
    state = state_at(Stage.APPROVED, rules)
    state.protected_until = datetime(2027, 6, 1, tzinfo=UTC)
    with Session(engine) as session:
        log.register(session, state.referral_id, registration())
        session.commit()
    expired = expire(state, datetime(2027, 6, 1, tzinfo=UTC))
    record = ReferralRecord(
        state=expired.model_copy(update={"history": []}), events=expired.history
    )
    for _ in range(2):  # a write retried after a crash
        save_referral(engine, record)
    kinds = [r["kind"] for r in log.receipts_of(engine, state.referral_id)]
    assert kinds == ["registered", "expired"]
    [_, receipt] = log.receipts_of(engine, state.referral_id)
    assert receipt["decision"] == {
        "status": "expired",
        "protected_until": "2027-06-01T00:00:00.000000Z",
    }
    assert log.chain_check(engine).problem is None


async def test_a_web_app_that_cannot_sign_is_not_ready(
    engine: Engine, live: Live, rules: ProgramRules, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deployed with a payload key ring that lacks the one sealing the receipt key: every
    registration would fail, so it takes no traffic."""
    fill(engine, 1)
    monkeypatch.setattr(log, "_unsealed", {})  # a process that has not signed yet
    foreign = dataclasses.replace(SETTINGS, encryption_keys=new_key_entry())
    try:
        app = create_app(foreign, rules=rules, engine=engine, client=live.client, key="k")
        async with in_process(app) as web:
            ready = await web.get("/readyz")
    finally:
        log.configure(SETTINGS.key_ring())
    assert ready.status_code == 503
    assert ready.json()["receipts"].startswith("cannot sign: receipt key rk-")
    assert log.signing_problem(engine) is None  # with the deployment's own ring
