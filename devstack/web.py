"""What a person does in the web app's pages: read a form's CSRF token, use a sign-in link."""

from __future__ import annotations

import httpx


def csrf_of(page: str) -> str:
    """The CSRF token of the form on `page`."""
    return page.split('name="csrf" value="')[1].split('"')[0]


async def use_sign_in_link(client: httpx.AsyncClient, link: str) -> httpx.Response:
    """What a person does with an emailed sign-in link: open it (a page, which spends
    nothing), then press its button. The answer of the button: 303 and a session, or why not."""
    page = await client.get(link)
    if page.status_code != 200:
        return page
    path = link.partition("?")[0]
    lang = dict(httpx.URL(link).params).get("lang", "en")
    return await client.post(path, data={"csrf": csrf_of(page.text), "lang": lang})
