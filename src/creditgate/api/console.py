"""``/console/``: the platform's credit screens, files of the ``creditgate.console``
package served as they are (no build step, nothing fetched from elsewhere).

The files are read once, when the worker starts, and only those are served: a path
names one of them or is a 404, so nothing beside them can be reached. They are open
(like ``/health``): the page asks for a token and sends it to the API itself, keeping
it in the tab's ``sessionStorage``. The headers keep the page to its own origin
(``Content-Security-Policy``) and out of frames.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import faust
from aiohttp import web
from faust.web import Request, Response, View

from creditgate.api.errors import NotFound

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # the files change with the package: a browser asks again rather than keep old ones
    "Cache-Control": "no-cache",
}


def console_files() -> dict[str, tuple[bytes, str]]:
    """File name -> (content, content type), for every file the console is made of."""
    found = {}
    for entry in resources.files("creditgate.console").iterdir():
        suffix = entry.name[entry.name.rfind(".") :]
        if entry.is_file() and suffix in _TYPES:
            found[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    return found


def register_console(app: faust.App, base: type[Any]) -> None:
    """Serve the console's files; ``base`` is the API's view class (``views.ApiView``),
    so a missing file is a problem details 404 like the API's."""
    files = console_files()

    def answer(view: View, name: str) -> Response:
        if name not in files:
            raise NotFound(f"the console has no file {name}")
        content, content_type = files[name]
        # aiohttp takes a charset in the header only, not in content_type
        return view.bytes(content, headers={"Content-Type": content_type, **HEADERS})

    class Index(base):  # type: ignore[misc]
        async def get(self, _request: Request) -> Response:
            return answer(self, "index.html")

    class File(base):  # type: ignore[misc]
        async def get(self, _request: Request, name: str) -> Response:
            return answer(self, name)

    class Bare(base):  # type: ignore[misc]
        async def get(self, _request: Request) -> Response:
            raise web.HTTPFound("/console/")

    app.page("/console/")(Index)
    app.page("/console/{name}")(File)
    app.page("/console")(Bare)
