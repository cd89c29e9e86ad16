"""What a route asks for rather than derives by hand (FastAPI dependencies): the site (its
database among its parts), the visitor's language, a posted form and whether its CSRF token
holds. Who is signed in: `signin.StaffEmail` and `signin.ReferrerEmail`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from core.links import csrf_valid
from starter.web.site import Site, pick_language


def get_site(request: Request) -> Site:
    """The app's shared parts, installed by each audience's `add_…_routes`."""
    site: Site = request.app.state.site
    return site


SiteDep = Annotated[Site, Depends(get_site)]


def language(request: Request) -> str:
    """A page's language: `?lang=`, then the browser's, then French."""
    return pick_language(request)


Language = Annotated[str, Depends(language)]


async def posted_form(request: Request) -> dict[str, str]:
    """The form's text fields (files are not taken anywhere)."""
    raw = await request.form()
    return {name: value for name, value in raw.items() if isinstance(value, str)}


PostedForm = Annotated[dict[str, str], Depends(posted_form)]


def form_language(request: Request, form: PostedForm) -> str:
    """A posted form's language: that of the page it was filled in first."""
    return pick_language(request, form)


FormLanguage = Annotated[str, Depends(form_language)]


def csrf_checked(cookie: str) -> Callable[[Request, PostedForm, Site], bool]:
    """Whether the posted form's `csrf` token matches the nonce in `cookie` (the form's page
    set it: `Site.render_with_csrf`); each route decides how to answer a mismatch."""

    def checked(request: Request, form: PostedForm, site: SiteDep) -> bool:
        return csrf_valid(form.get("csrf"), request.cookies.get(cookie), site.key)

    return checked


def install(app: FastAPI, site: Site) -> None:
    """Make `site` the one every route of the app is given (each audience's `add_…_routes`
    calls this with the same site)."""
    installed = getattr(app.state, "site", None)
    if installed is not None and installed is not site:
        raise ValueError("an app serves one site: its audiences were given different ones")
    app.state.site = site
