"""Who may do what: the staff and their roles (program.yaml's `staff`) and the one table of
what each role may do. The CLI checks it when it acts as a configured identity
(REFERRALS_STAFF_IDENTITY), the staff web desk with the signed-in address.
docs/operations.md ("Staff roles") says the same for people."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum

from workflows.models.program import Role, StaffRules
from workflows.models.values import Action


class Task(StrEnum):
    """What staff do that is not a referral `Action`."""

    # `referrals erase`: a closed referral's (or a referrer's) personal data.
    ERASE = "erase"
    # The program's figures: the dashboard (`GET /staff`).
    FIGURES = "figures"
    # Payee profiles and payout runs (docs/payouts.md).
    PAYEES = "payees"
    PAYOUT_RUNS = "payout-runs"


Permission = Action | Task

SALES, FINANCE, MANAGER = Role.SALES, Role.FINANCE, Role.MANAGER

# The table. Every `Action` and `Task` is in it (tests/core/test_roles.py checks); a manager may do
# everything.
ROLES_FOR: Mapping[Permission, frozenset[Role]] = {
    Action.CONTACTED: frozenset({SALES, MANAGER}),
    Action.ACCEPT: frozenset({SALES, MANAGER}),
    Action.DECLINE: frozenset({SALES, MANAGER}),
    Action.APPROVE: frozenset({SALES, MANAGER}),
    Action.REJECT: frozenset({SALES, MANAGER}),
    Action.WON: frozenset({SALES, MANAGER}),
    Action.LOST: frozenset({SALES, MANAGER}),
    Action.EXTEND: frozenset({SALES, MANAGER}),
    Action.CANCEL: frozenset({SALES, MANAGER}),
    Action.PAYMENT: frozenset({FINANCE, MANAGER}),
    Action.PAYOUT: frozenset({FINANCE, MANAGER}),
    Action.REFUND: frozenset({FINANCE, MANAGER}),
    Task.ERASE: frozenset({MANAGER}),
    Task.FIGURES: frozenset({MANAGER}),
    Task.PAYEES: frozenset({FINANCE, MANAGER}),
    Task.PAYOUT_RUNS: frozenset({FINANCE, MANAGER}),
}


def _address(email: str) -> str:
    return email.strip().lower()


def roles_of(staff: StaffRules, email: str) -> frozenset[Role]:
    """The roles `email` holds (none: not staff). Addresses compare case-insensitively; an
    address in `staff.emails`, the older form, is a manager."""
    address = _address(email)
    held = {role for role in Role if address in {_address(e) for e in getattr(staff.roles, role)}}
    if address in {_address(e) for e in staff.emails}:
        held.add(MANAGER)
    return frozenset(held)


def staff_addresses(staff: StaffRules) -> frozenset[str]:
    """Every address with a role, in lower case: who may sign in as staff."""
    lists = [staff.emails, *(getattr(staff.roles, role) for role in Role)]
    return frozenset(_address(email) for emails in lists for email in emails)


def roles_for(permission: Permission) -> tuple[Role, ...]:
    """The roles that may do `permission`, in `Role`'s order (sales, finance, manager)."""
    return tuple(role for role in Role if role in ROLES_FOR[permission])


def may(roles: Iterable[Role], permission: Permission) -> bool:
    return not ROLES_FOR[permission].isdisjoint(roles)


def refusal(permission: Permission, gettext: Callable[[str], str] = str) -> str:
    """Why one without the role may not: "payout needs the finance or manager role", in
    English, or in the language whose `gettext` is given (the staff web desk's pages)."""
    names = [role.value for role in roles_for(permission)]
    roles = (
        names[0]
        if len(names) == 1
        else gettext("{first} or {last}").format(first=", ".join(names[:-1]), last=names[-1])
    )
    return gettext("{action} needs the {roles} role").format(action=permission.value, roles=roles)


def held(email: str, roles: Iterable[Role]) -> str:
    """Who `email` is, in English: "bob@x is sales", "bob@x is sales and finance", "bob@x has
    no staff role"."""
    names = [role.value for role in Role if role in set(roles)]
    if not names:
        return f"{email} has no staff role"
    last = names.pop()
    return f"{email} is {', '.join(names)} and {last}" if names else f"{email} is {last}"
