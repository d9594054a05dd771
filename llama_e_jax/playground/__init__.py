"""The playground: one web page, served by `python -m llama_e_jax.serve` at `/`, for people who judge replies.

Merchandisers and copywriters decide whether a tuned model is good enough; they type a product and
read the ad. This package gives them a page for that without adding a runtime dependency or a build
step: `index.html`, `playground.css` and `playground.js` are plain files shipped as package data.

Design, and why:

* **Only the public API.** The page talks to the server through the same `/v1/*` endpoints as any
  OpenAI client (models, completions, chat completions, SSE streaming), so what it shows is what
  clients get, and the page works against any server with the same API. The one extra route,
  `/playground/meta.json`, is static data generated from the Python sources of truth: the task
  names, aspects, label sets and the Alpaca prompt templates (data/prompt.py). The page builds its
  prompts from those template strings, so its prompt cannot drift from `build_prompt` (a browser
  test also compares them).
* **Security.** Every playground response carries a strict Content-Security-Policy: scripts only
  from this origin (no inline script, no eval), no plugins, no framing, connections only back to the
  server. Model text is always put into the page as text (`textContent`), never parsed as HTML. The
  page itself needs no key; with `--api-key` every `/v1` call does, and the page asks for it and
  keeps it in `sessionStorage` only (gone when the tab closes).
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from llama_e_jax.data.labels import LABEL_SETS
from llama_e_jax.data.prompt import PROMPT_WITH_INPUT, PROMPT_WITHOUT_INPUT
from llama_e_jax.data.schema import ASPECTS, TASKS

CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
STATIC_FILES = {"playground.js": "text/javascript; charset=utf-8", "playground.css": "text/css; charset=utf-8"}


def page_metadata() -> dict:
    """What the page needs from the Python side: tasks, aspects, label sets and the prompt templates."""
    return {"tasks": list(TASKS), "aspects": list(ASPECTS),
            "label_sets": {task: list(labels) for task, labels in LABEL_SETS.items()},
            "prompt_with_input": PROMPT_WITH_INPUT, "prompt_without_input": PROMPT_WITHOUT_INPUT}


def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath(name).read_bytes()


def mount(app: FastAPI) -> None:
    """Adds the page at `/`, its script and style under `/playground/`, and `/playground/meta.json`.

    None of these routes is under `/v1`, so they need no API key; every API call the page makes does.
    """

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return Response(_asset("index.html"), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    @app.get("/playground/meta.json", include_in_schema=False)
    async def metadata() -> JSONResponse:
        return JSONResponse(page_metadata(), headers=SECURITY_HEADERS)

    @app.get("/playground/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in STATIC_FILES:  # a fixed list: no path from the URL ever reaches the file system
            return JSONResponse({"error": {"message": f"no playground file {name!r}", "type": "invalid_request_error",
                                           "param": None, "code": "not_found"}}, status_code=404)
        return Response(_asset(name), media_type=STATIC_FILES[name], headers=SECURITY_HEADERS)
