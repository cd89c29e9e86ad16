"""Receipts, in public: our signing keys, the log's head, and a page that checks a receipt,
uploaded or pasted, in the visitor's language (docs/receipts.md). Nothing here needs an
account: a referrer, their lawyer or a competitor checks a receipt the same way."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile

from activities import receipts as log
from activities.i18n import N_, translations
from core import receipts
from starter.web.deps import Language, SiteDep, install, pick_language
from starter.web.security import ApiRefusal
from starter.web.site import Site

# A receipt is about 1.5 KiB; anything much larger is not one.
MAX_RECEIPT_BYTES = 64 * 1024

KIND_LABELS = {
    receipts.REGISTERED: N_("Registration received"),
    receipts.REFUSED_DUPLICATE: N_("Registration refused: the company was already registered"),
    receipts.ACCEPTED: N_("Referral accepted: protection started"),
    receipts.EXTENDED: N_("Protection extended"),
    receipts.EXPIRED: N_("Protection ended"),
    receipts.RELEASED: N_("Company released: it can be registered again"),
}
FIELD_LABELS = {
    "at": N_("the time"),
    "seq": N_("the receipt number"),
    "kind": N_("what the receipt records"),
    "referral_id": N_("the referral"),
    "commitments": N_("the commitments"),
    "decision": N_("the decision"),
    "contact_by": N_("the contact date"),
    "program": N_("the program"),
    "rules_sha256": N_("the rules' fingerprint"),
    "prev_entry_hash": N_("the link to the receipt before"),
    "entry_hash": N_("the receipt's hash"),
    "key_id": N_("the key"),
    "sig": N_("the signature"),
    "v": N_("the version"),
    "prospect_domain": N_("the company's domain"),
    "referrer_email": N_("the referrer's address"),
}

# What a valid receipt's disclosures open, as the page lists them.
DISCLOSURE_LABELS = {
    "prospect_domain": N_("Company's domain"),
    "referrer_email": N_("Referrer's address"),
}

router = APIRouter()


def add_receipt_routes(app: FastAPI, site: Site) -> None:
    install(app, site)
    app.include_router(router)


@router.get("/receipts/keys", summary="Every public key receipts were ever signed with")
async def receipt_keys(site: SiteDep) -> dict[str, Any]:
    """Ed25519 public keys (base64url of the 32 raw bytes), by `key_id`; a retired key stays
    listed, so what it signed still verifies."""
    rows = await asyncio.to_thread(log.public_keys, site.engine)
    return {
        "algorithm": "Ed25519",
        "keys": [
            {
                "key_id": row.key_id,
                "public_key": row.public_key,
                "created_at": log.instant(row.created_at),
                "retired_at": log.instant(row.retired_at),
            }
            for row in rows
        ],
    }


@router.get(
    "/receipts/head",
    summary="The last receipt of the log",
    responses={404: {"model": ApiRefusal, "description": "no receipt yet"}},
)
async def receipt_head(site: SiteDep) -> Response:
    """Its number, hash and signature pin every receipt before it: keep a copy now and then,
    and any later change to the log shows."""
    last = await asyncio.to_thread(log.head, site.engine)
    if last is None:
        return JSONResponse({"detail": "no receipt yet"}, status_code=404)
    response = JSONResponse(
        {
            "seq": last["seq"],
            "at": last["at"],
            "entry_hash": last["entry_hash"],
            "key_id": last["key_id"],
            "sig": last["sig"],
            "receipt": last,
        }
    )
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get("/receipts/verify", response_class=HTMLResponse, include_in_schema=False)
async def verify_page(request: Request, site: SiteDep, lang: Language) -> HTMLResponse:
    return site.render(request, "receipt_verify.html", lang, pasted="", result=None)


@router.post("/receipts/verify", response_class=HTMLResponse, include_in_schema=False)
async def verify_post(request: Request, site: SiteDep) -> HTMLResponse:
    form = await request.form()
    lang = pick_language(request, {k: v for k, v in form.items() if isinstance(v, str)})
    retry = site.over_limit(request)
    if retry is not None:
        response = site.render(
            request, "receipt_verify.html", lang, 429, pasted="", result=None, limited=True
        )
        response.headers.update(retry)
        return response
    upload, pasted = form.get("file"), form.get("receipt")
    text = pasted if isinstance(pasted, str) else ""
    if isinstance(upload, UploadFile) and upload.filename:
        text = (await upload.read(MAX_RECEIPT_BYTES + 1)).decode("utf-8", "replace")
    result = await asyncio.to_thread(check, site, text, lang)
    status = 200 if result["valid"] else 422
    keep = text if len(text) <= MAX_RECEIPT_BYTES else ""
    return site.render(request, "receipt_verify.html", lang, status, pasted=keep, result=result)


def check(site: Site, text: str, lang: str) -> dict[str, Any]:
    """What the page says of `text`: valid, with what the receipt proves, or why not."""
    _ = translations(lang).gettext
    if not text.strip():
        return {"valid": False, "problem": _("Paste a receipt or choose its file.")}
    if len(text) > MAX_RECEIPT_BYTES:
        return {"valid": False, "problem": _("This file is far too large to be a receipt.")}
    try:
        document = receipts.parse(text)
    except receipts.ReceiptError:
        return {"valid": False, "problem": _("This is not a receipt: it is not JSON.")}
    verdict = log.verify_with_log(site.engine, document)
    shown: dict[str, Any] = {
        "valid": verdict.valid,
        "seq": verdict.seq,
        "kind": _(KIND_LABELS[verdict.kind]) if verdict.kind in KIND_LABELS else None,
        "at": verdict.at,
        "local_at": _local(verdict.at, site.rules.calendar.timezone),
        "key_id": verdict.key_id,
        "fingerprint": receipts.fingerprint(document),
        "detail": verdict.problem,
        "problem": _problem(verdict, lang),
    }
    if verdict.valid:
        shown["facts"] = _facts(document, lang)
    return shown


def _problem(verdict: receipts.Verdict, lang: str) -> str | None:
    _ = translations(lang).gettext
    if verdict.code == "valid":
        return None
    if verdict.code == "malformed":
        return _("This is not a receipt we can check: a part of it is missing or malformed.")
    if verdict.code == "unknown_key":
        return _("This receipt names a key we never signed with: it is not one of ours.")
    if verdict.code == "not_in_log":
        return _(
            "This receipt is signed, but it is not the receipt of that number in our log. "
            "Please keep it and contact us."
        )
    if verdict.fields:
        changed = ", ".join(_(FIELD_LABELS.get(f, f)) for f in verdict.fields)
        return _("This receipt was altered: %(changed)s changed since we signed it.") % {
            "changed": changed
        }
    return _("This receipt was altered since we signed it: its signature does not match it.")


def _local(at: Any, zone: str) -> str | None:
    if not isinstance(at, str):
        return None
    try:
        moment = datetime.fromisoformat(at.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.astimezone(ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M:%S %Z")


def _facts(document: dict[str, Any], lang: str) -> list[tuple[str, str]]:
    """What a valid receipt states, line by line, in the visitor's language."""
    _ = translations(lang).gettext
    facts = []
    if document.get("referral_id"):
        facts.append((_("Referral reference"), str(document["referral_id"])))
    decision = document.get("decision") or {}
    if document.get("contact_by"):
        facts.append((_("We contact the referrer by"), receipts.readable(document["contact_by"])))
    if decision.get("earlier_seq") is not None:
        facts.append(
            (
                _("Registered first by another referrer"),
                _("receipt no. %(seq)s, at %(at)s")
                % {
                    "seq": decision["earlier_seq"],
                    "at": receipts.readable(decision["earlier_at"]),
                },
            )
        )
    if decision.get("rule") == receipts.FIRST_REGISTRATION_WINS:
        facts.append((_("Rule"), _("the first registration of a company wins")))
    if decision.get("protected_until"):
        facts.append((_("Protected until"), receipts.readable(decision["protected_until"])))
    if decision.get("reason"):
        facts.append((_("Reason"), str(decision["reason"])))
    for name, shown in (document.get("disclosures") or {}).items():
        label = _(DISCLOSURE_LABELS.get(name, name))
        facts.append((label, _("%(value)s (matches its commitment)") % {"value": shown["value"]}))
    return facts
