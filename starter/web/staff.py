"""The program dashboard (`/staff`): staff listed in `staff.emails` sign in by emailed link
(starter.web.signin) and see the program's figures (starter.figures) for a period and a
product, each chart beside the numbers it draws.

Charts are SVG drawn on the server by pygal and served by `/staff/charts/<name>.svg`, so the
page loads nothing but this app (the CSP allows images from it, no script): pygal's script
tags are removed. Each referral in a list links to its workflow in the Temporal UI
(`REFERRALS_TEMPORAL_UI_URL`, in the namespace the app's client uses).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Annotated, Any
from urllib.parse import urlencode

import pygal
from babel.numbers import format_decimal
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pygal.style import Style

from activities.i18n import format_percent, translations
from activities.payouts import held_now
from core.roles import Task, may, roles_of
from starter.desk import figure_filters
from starter.figures import ProgramFigures, change_stamp, program_figures
from starter.web import desk, payouts
from starter.web.deps import Language, SiteDep
from starter.web.desk import STAGE_LABELS, list_url, temporal_ui_links
from starter.web.signin import (
    PRIVATE,
    STAFF,
    StaffEmail,
    add_sign_in_routes,
    sign_in_page,
    signed_in_page,
)
from starter.web.site import Site
from workflows.models.referral import Stage

CHARTS = ("funnel", "ended", "time", "contact", "commission", "referrers")
# The longest the dashboard shows figures computed earlier (any change to the data shows at
# once; this bounds how far "now" may have moved on): see FiguresCache.
FIGURES_TTL_SECONDS = 30.0
# The site's palette (core/templates/web/static/site.css): accent blue first.
CHART_STYLE = Style(
    background="#ffffff",
    plot_background="#ffffff",
    foreground="#1f2933",
    foreground_strong="#1f2933",
    foreground_subtle="#cbd2d9",
    colors=("#1d4ed8", "#93c5fd", "#0f766e", "#b42318", "#a16207"),
    font_family="system-ui, sans-serif",
    label_font_size=13,
    major_label_font_size=13,
    value_font_size=13,
    value_label_font_size=13,
    legend_font_size=13,
    title_font_size=15,
)


class FiguresCache:
    """The figures of each choice (period, product), computed once and shared by the page
    and its chart requests, which follow it at once. An entry serves while the data has not
    changed (`figures.change_stamp`, checked on every request) and for `ttl` seconds at most,
    since "now" moves on (this month's breaches, protections ending soon). Requests that
    arrive while the figures are being computed wait for that computation. Per process; at
    most `size` choices are kept."""

    def __init__(
        self,
        compute: Callable[[Choice], ProgramFigures],
        stamp: Callable[[], tuple[Any, ...]],
        ttl: float = FIGURES_TTL_SECONDS,
        size: int = 32,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._compute = compute
        self._stamp = stamp
        self._ttl = ttl
        self._size = size
        self._monotonic = monotonic
        self._entries: dict[tuple[Any, ...], tuple[tuple[Any, ...], float, asyncio.Task[Any]]] = {}
        self.computed = 0  # how many times the figures were computed, for the curious

    async def get(self, choice: Choice) -> ProgramFigures:
        key = (choice.since, choice.product)
        stamp = await asyncio.to_thread(self._stamp)
        now = self._monotonic()
        entry = self._entries.get(key)
        if entry is not None:
            seen, at, task = entry
            failed = task.done() and (task.cancelled() or task.exception() is not None)
            other_loop = task.get_loop() is not asyncio.get_running_loop()  # a test client's
            if seen == stamp and now - at < self._ttl and not (failed or other_loop):
                figures: ProgramFigures = await asyncio.shield(task)
                return figures
        # Shielded: a visitor who leaves does not cancel what the others wait for.
        task = asyncio.ensure_future(asyncio.to_thread(self._compute, choice))
        self.computed += 1
        self._entries[key] = (stamp, now, task)
        for old in sorted(self._entries, key=lambda k: self._entries[k][1])[: -self._size]:
            del self._entries[old]
        return await asyncio.shield(task)


@dataclass(frozen=True)
class Choice:
    """The period and product asked for in the query string; `problems` names what was
    ignored because it was not valid."""

    since: date | None
    product: str | None
    problems: tuple[str, ...]

    def query(self, lang: str, **extra: str) -> str:
        values = {"lang": lang, **extra}
        if self.since:
            values["since"] = self.since.isoformat()
        if self.product:
            values["product"] = self.product
        return urlencode(values)


def choice_of(request: Request, site: Site) -> Choice:
    """From `?since=YYYY-MM-DD&product=ID`; a bad value shows everything, and says so."""
    problems = []
    since = None
    asked = request.query_params.get("since", "").strip()
    if asked:
        try:
            since = date.fromisoformat(asked)
        except ValueError:
            problems.append("since")
    product = request.query_params.get("product", "").strip() or None
    if product is not None and site.rules.product(product) is None:
        problems.append("product")
        product = None
    return Choice(since, product, tuple(problems))


def _without_scripts(root: Any) -> Any:
    """pygal writes its configuration in a script element (and its credits in comments): an
    image needs neither."""
    for parent in list(root.iter()):
        for child in list(parent):
            if not isinstance(child.tag, str) or child.tag.endswith("script"):
                parent.remove(child)
    return root


def _number(value: Decimal | int, lang: str) -> str:
    return format_decimal(value, "#,##0.##", locale=lang)


def _whole_ticks(largest: int) -> list[int]:
    """A count's axis: whole numbers only, ten ticks at most."""
    step = max(1, -(-largest // 10))
    return list(range(0, largest + step, step))


def _days(value: Decimal, lang: str) -> str:
    return format_decimal(value, "#,##0.00", locale=lang)


def chart_svg(name: str, figures: ProgramFigures, lang: str, currency: str | None = None) -> str:
    """One chart of the dashboard as an SVG document, its labels in `lang`."""
    gettext = translations(lang).gettext

    def stage(s: Stage) -> str:
        return gettext(STAGE_LABELS[s])

    def count(value: float) -> str:
        return _number(int(value), lang)

    def amount(value: float) -> str:
        """Days and money alike: up to two decimals."""
        return _number(Decimal(str(value)), lang)

    def share(value: float) -> str:
        return format_percent(Decimal(str(value)) / 100, lang)

    common: dict[str, Any] = {
        "style": CHART_STYLE,
        "js": [],
        "width": 720,
        "height": 360,
        "print_values": True,
        "print_zeroes": False,
        "show_y_guides": False,
        "margin": 12,
        "truncate_label": -1,
        "truncate_legend": -1,
    }
    chart: Any
    if name == "funnel":
        chart = pygal.HorizontalBar(show_legend=False, value_formatter=count, **common)
        chart.title = gettext("Referrals reaching each step")
        steps = list(reversed(figures.funnel))  # the first step at the top
        chart.x_labels = [stage(s.stage) for s in steps]
        chart.add(gettext("Referrals"), [s.referrals for s in steps])
        chart.y_labels = _whole_ticks(figures.referrals)
    elif name == "ended":
        chart = pygal.Bar(show_legend=False, value_formatter=count, **common)
        chart.title = gettext("Referrals ended without a commission")
        chart.x_labels = [stage(s.stage) for s in figures.ended]
        chart.add(gettext("Referrals"), [s.referrals for s in figures.ended])
        chart.y_labels = _whole_ticks(max(s.referrals for s in figures.ended))
    elif name == "time":
        chart = pygal.HorizontalBar(
            value_formatter=amount, legend_at_bottom=True, legend_at_bottom_columns=2, **common
        )
        chart.title = gettext("Days spent in each stage")
        timed = list(reversed(figures.time_in_stage))
        chart.x_labels = [stage(t.stage) for t in timed]
        chart.add(gettext("Median"), [float(t.median_days or 0) for t in timed])
        chart.add(gettext("90th percentile"), [float(t.p90_days or 0) for t in timed])
    elif name == "contact":
        contact = figures.contact
        chart = pygal.HorizontalBar(
            show_legend=False, value_formatter=share, range=(0, 100), **common
        )
        chart.title = gettext("Referrers contacted in time")
        chart.x_labels = [gettext("Before the deadline"), gettext("Before the reminder")]
        chart.add(
            gettext("Share of referrals contacted"),
            [
                float((contact.before_deadline_share or 0) * 100),
                float((contact.before_reminder_share or 0) * 100),
            ],
        )
    elif name == "commission":
        months = [m for m in figures.commission_by_month if m.currency == currency]
        chart = pygal.StackedBar(value_formatter=amount, legend_at_bottom=True, **common)
        chart.title = gettext("Commission by month won ({currency})").format(currency=currency)
        chart.x_labels = [m.month for m in months]
        chart.legend_at_bottom_columns = 3
        chart.add(gettext("Pending"), [float(m.pending) for m in months])
        chart.add(gettext("Payable"), [float(m.payable) for m in months])
        chart.add(gettext("Paid"), [float(m.paid) for m in months])
    else:
        chart = pygal.HorizontalBar(
            value_formatter=count, legend_at_bottom=True, legend_at_bottom_columns=2, **common
        )
        chart.title = gettext("Top referrers")
        top = list(reversed(figures.top_referrers))
        chart.x_labels = [r.referrer_email for r in top]
        chart.add(gettext("Referrals"), [r.referrals for r in top])
        chart.add(gettext("Deals won"), [r.won for r in top])
        chart.y_labels = _whole_ticks(max((r.referrals for r in top), default=0))
    chart.add_xml_filter(_without_scripts)
    return str(chart.render(is_unicode=True))


def add_staff_routes(
    app: FastAPI,
    site: Site,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    figures_ttl: float = FIGURES_TTL_SECONDS,
) -> None:
    """`clock` says when "now" is: this month's breaches and the protections ending soon
    depend on it. The figures are cached (FiguresCache) for `figures_ttl` seconds at most."""
    add_sign_in_routes(app, site, STAFF)

    def compute(choice: Choice) -> ProgramFigures:
        return program_figures(
            site.engine, site.rules, since=choice.since, product=choice.product, now=clock()
        )

    app.state.staff_figures = FiguresCache(compute, lambda: change_stamp(site.engine), figures_ttl)
    app.state.staff_clock = clock
    app.include_router(router)
    app.include_router(desk.router)
    app.include_router(payouts.router)


def staff_figures(request: Request) -> FiguresCache:
    cache: FiguresCache = request.app.state.staff_figures
    return cache


def choice(request: Request, site: SiteDep) -> Choice:
    return choice_of(request, site)


Figures = Annotated[FiguresCache, Depends(staff_figures)]
Chosen = Annotated[Choice, Depends(choice)]
router = APIRouter()


@router.get(STAFF.home, response_class=HTMLResponse, include_in_schema=False)
async def dashboard(
    request: Request,
    site: SiteDep,
    lang: Language,
    email: StaffEmail,
    chosen: Chosen,
    figures_cache: Figures,
) -> Response:
    """The sign-in form, or the figures for the period and product asked for (a manager's;
    other staff are sent to the referrals)."""
    if email is None:
        return sign_in_page(request, site, STAFF, lang)
    if not may(roles_of(site.rules.staff, email), Task.FIGURES):
        return RedirectResponse(f"{STAFF.home}/referrals?lang={lang}", status_code=303)
    figures = await figures_cache.get(chosen)
    now = request.app.state.staff_clock()
    held = await asyncio.to_thread(held_now, site.engine, site.rules.payouts, now)
    links = figure_filters(figures)
    gettext: Callable[[str], str] = translations(lang).gettext
    currencies = sorted({m.currency for m in figures.commission_by_month})
    response = site.render(
        request,
        "staff.html",
        lang,
        **signed_in_page(request, site, STAFF),
        email=email,
        choice=chosen,
        figures=figures,
        held=dict(sorted(held.items())),
        hold_label=payouts.hold_label(lang),
        currencies=currencies,
        stage_label=lambda s: gettext(STAGE_LABELS[Stage(s)]),
        number=lambda value: _number(value, lang),
        days=lambda value: _days(value, lang),
        temporal_ui=temporal_ui_links(site.settings),
        figure_link=lambda key: list_url(links[key], lang) if key in links else None,
        chart_url=lambda name, **extra: (
            f"{STAFF.home}/charts/{name}.svg?{chosen.query(lang, **extra)}"
        ),
    )
    response.headers.update(PRIVATE)
    return response


@router.get(f"{STAFF.home}/charts/{{name}}.svg", include_in_schema=False)
async def chart(
    request: Request,
    site: SiteDep,
    lang: Language,
    email: StaffEmail,
    chosen: Chosen,
    figures_cache: Figures,
    name: str,
) -> Response:
    if email is None or not may(roles_of(site.rules.staff, email), Task.FIGURES):
        return Response(status_code=403, headers=PRIVATE)
    if name not in CHARTS:
        return Response(status_code=404, headers=PRIVATE)
    figures = await figures_cache.get(chosen)
    currency = request.query_params.get("currency") or site.rules.commission.currency
    svg = await asyncio.to_thread(chart_svg, name, figures, lang, currency)
    return Response(svg, media_type="image/svg+xml", headers=PRIVATE)
