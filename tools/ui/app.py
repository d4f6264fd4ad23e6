"""The web UI's HTTP side: a Starlette app serving one page, its bundled assets and a JSON API.

Live updates are server-sent events: the stream of a run sends each new line of its events.jsonl
as one message, plus a status message per second. Every asset is served from tools/ui/static, and
the Content-Security-Policy header lets the page load and connect to this server only.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import mimetypes
import shutil
import threading
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from library.errors import UserError
from tools.ui import forms
from tools.ui.datasets import Datasets
from tools.ui.events import summarise
from tools.ui.runs import ACTIVE, Workspace

STATIC = Path(__file__).resolve().parent / "static"
TOKEN_COOKIE = "apt_webui_token"
LOCAL_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]", "testserver"]
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
       "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
TICK_SECONDS = 1.0


def _error(exc: Exception, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=status)


async def _body(request: Request) -> dict:
    try:
        data = await request.json()
    except ValueError:
        raise UserError("the request body is not JSON") from None
    if not isinstance(data, dict):
        raise UserError("the request body must be a JSON object")
    return data


def create_app(workspace: Path, *, token: str | None = None, launcher: str | list[str] = "accelerate",
               allowed_hosts: list[str] | None = None, scheduler: bool = True) -> Starlette:
    """The UI over `workspace` (runs, scratch files). With `token`, every request must carry it
    (`?token=` once, then a cookie; or `Authorization: Bearer`). `scheduler` starts the queue."""
    ws = Workspace(Path(workspace), launcher=launcher)
    datasets = Datasets(ws.root)
    scratch = ws.root / "scratch"

    def api(fn):
        async def endpoint(request: Request):
            try:
                return await fn(request)
            except UserError as exc:
                return _error(exc, 409 if "is writing there" in str(exc) else 400)
            except KeyError as exc:
                return _error(f"not found: {exc.args[0] if exc.args else ''}", 404)
        return endpoint

    # --- pages -------------------------------------------------------------------------------------
    async def index(request: Request):
        return FileResponse(STATIC / "index.html", media_type="text/html")

    # --- New run -----------------------------------------------------------------------------------
    async def options(request: Request):
        return JSONResponse({"tables": forms.form_schema(), "dataset_field": forms.DATASET_FIELD})

    async def presets(request: Request):
        return JSONResponse({"presets": forms.list_presets()})

    async def preset(request: Request):
        return JSONResponse(forms.load_preset(request.path_params["name"]))

    def _validate(folder: Path, data: dict, fresh: bool = False) -> dict:
        values = data.get("values") or {}
        if not isinstance(values, dict):
            raise UserError("values must be an object of option -> value")
        return forms.validate(folder, values, data.get("dataset_toml"), cwd=folder, fresh=fresh)

    async def validate(request: Request):
        data = await _body(request)
        result = await asyncio.to_thread(_validate, scratch / "validate", data, True)
        return JSONResponse(result)

    async def create_run(request: Request):
        data = await _body(request)
        name = str(data.get("name") or "run")
        run_id, folder = ws.new_run_folder(name)
        result = await asyncio.to_thread(_validate, folder, data)
        if not result["ok"]:
            shutil.rmtree(folder)
            return JSONResponse(result, status_code=422)
        output_dir = (data.get("values") or {}).get("output_dir") or "output"
        try:
            rec = ws.create(run_id, name, str(output_dir), queue=bool(data.get("queue")))
        except UserError as exc:
            shutil.rmtree(folder)
            return JSONResponse({"ok": False, "errors": [{"field": "output_dir", "message": str(exc)}],
                                 "error": str(exc)}, status_code=409)
        return JSONResponse({"ok": True, "run": ws.describe(rec["id"])}, status_code=201)

    # --- Runs --------------------------------------------------------------------------------------
    async def list_runs(request: Request):
        ws.tick()
        return JSONResponse({"runs": [ws.describe(i) for i in reversed(ws.run_ids())]})

    async def get_run(request: Request):
        return JSONResponse(ws.describe(request.path_params["run"], full=True))

    async def run_events(request: Request):
        rec = ws.record(request.path_params["run"])
        after = int(request.query_params.get("after", 0))
        events, offset = ws.events(rec, after)
        return JSONResponse({"events": events, "next": offset, "status": ws.status(rec)})

    async def stream(request: Request):
        run_id = request.path_params["run"]
        rec = ws.record(run_id)
        start = int(request.query_params.get("after", 0))

        async def gen():
            offset = start
            last_status = None
            quiet = 0
            while True:
                events, offset = ws.events(rec, offset)
                for ev in events:
                    yield f"event: trainer\ndata: {json.dumps(ev)}\n\n"
                status = ws.status(ws.record(run_id))
                if status != last_status or quiet >= 10:
                    yield f"event: status\ndata: {json.dumps({'status': status, 'next': offset})}\n\n"
                    last_status, quiet = status, 0
                quiet += 1
                if status not in ACTIVE and status != "queued" and not events:
                    yield f"event: done\ndata: {json.dumps({'status': status})}\n\n"
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.5)

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def command(request: Request):
        data = await _body(request)
        run_id = request.path_params["run"]
        command_id = ws.send(run_id, str(data.get("command")))
        return JSONResponse({"id": command_id, "command": data.get("command")}, status_code=202)

    async def command_state(request: Request):
        if request.path_params["id"] == "SIGTERM":  # a run stopped while loading: done once it is gone
            state = ws.status(ws.record(request.path_params["run"]))
            return JSONResponse({"acknowledged": state not in ACTIVE, "event": {"step": 0}})
        ack = ws.command_ack(request.path_params["run"], request.path_params["id"])
        return JSONResponse({"acknowledged": ack is not None, "event": ack})

    async def resume(request: Request):
        rec = ws.resume(request.path_params["run"])
        return JSONResponse({"run": ws.describe(rec["id"])})

    async def cancel(request: Request):
        rec = ws.cancel(request.path_params["run"])
        return JSONResponse({"run": ws.describe(rec["id"])})

    async def run_file(request: Request):
        path = ws.output_file(request.path_params["run"], request.query_params.get("path", ""))
        return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")

    # --- Results -----------------------------------------------------------------------------------
    def _loras(run_id: str) -> list[dict]:
        from library.lora.inspect import inspect_file
        from library.lora.kohya_file import read_lora

        out = []
        for path in ws.lora_files(run_id):
            try:
                tensors, metadata = read_lora(path, allow_non_finite=True)
                rep = inspect_file(tensors, metadata, str(path), check_diffusers=False)
            except (UserError, OSError, ValueError) as exc:
                out.append({"file": str(path), "name": path.name, "error": str(exc)})
                continue
            out.append({"file": str(path), "name": path.name, "size_bytes": path.stat().st_size,
                        "summary": {k: rep.get(k) for k in ("architecture", "base_model_version", "layout",
                                                            "network_type", "fits", "modules", "tensors", "ranks",
                                                            "alphas", "dtypes", "compatibility")},
                        "metadata": rep.get("metadata", {})})
        return out

    async def results(request: Request):
        run_id = request.path_params["run"]
        loras = await asyncio.to_thread(_loras, run_id)
        return JSONResponse({"run": ws.describe(run_id), "loras": loras})

    async def compare(request: Request):
        a, b = request.query_params.get("a", ""), request.query_params.get("b", "")
        sides = []
        for run_id in (a, b):
            rec = ws.record(run_id)
            summary = summarise(ws.events(rec)[0])
            latest = summary["samples"][-1] if summary["samples"] else {"step": None, "images": []}
            sides.append({"run": ws.describe(run_id), "samples": latest,
                          "config": ws.describe(run_id, full=True)["config_toml"]})
        pairs: dict[tuple, dict] = {}
        for i, side in enumerate(sides):
            for img in side["samples"]["images"]:
                if img.get("base"):
                    continue  # the base model's image is the same in both runs
                key = (img.get("prompt"), img.get("seed"))
                pairs.setdefault(key, {"prompt": key[0], "seed": key[1], "images": [None, None]})["images"][i] = img
        return JSONResponse({"sides": sides, "pairs": list(pairs.values())})

    # --- Dataset -----------------------------------------------------------------------------------
    async def dataset_scan(request: Request):
        data = await _body(request)
        report = await asyncio.to_thread(datasets.scan, data.get("dataset_toml"), data.get("folder"),
                                         data.get("resolution"), data.get("model"))
        return JSONResponse(report)

    async def dataset_image(request: Request):
        return FileResponse(datasets.image(request.query_params.get("path", "")))

    async def dataset_caption(request: Request):
        data = await _body(request)
        return JSONResponse(datasets.save_caption(str(data.get("caption_file", "")), str(data.get("text", ""))))

    async def tool_start(request: Request):
        data = await _body(request)
        return JSONResponse(datasets.start_tool(str(data.get("tool")), str(data.get("folder", "")),
                                                str(data.get("args", ""))), status_code=202)

    async def tool_status(request: Request):
        return JSONResponse(datasets.tool_status(request.path_params["job"]))

    routes = [
        Route("/", index),
        Route("/api/options", api(options)),
        Route("/api/presets", api(presets)),
        Route("/api/presets/{name}", api(preset)),
        Route("/api/validate", api(validate), methods=["POST"]),
        Route("/api/runs", api(list_runs)),
        Route("/api/runs", api(create_run), methods=["POST"]),
        Route("/api/runs/{run}", api(get_run)),
        Route("/api/runs/{run}/events", api(run_events)),
        Route("/api/runs/{run}/stream", api(stream)),
        Route("/api/runs/{run}/command", api(command), methods=["POST"]),
        Route("/api/runs/{run}/command/{id}", api(command_state)),
        Route("/api/runs/{run}/resume", api(resume), methods=["POST"]),
        Route("/api/runs/{run}/cancel", api(cancel), methods=["POST"]),
        Route("/api/runs/{run}/file", api(run_file)),
        Route("/api/runs/{run}/results", api(results)),
        Route("/api/compare", api(compare)),
        Route("/api/dataset/scan", api(dataset_scan), methods=["POST"]),
        Route("/api/dataset/image", api(dataset_image)),
        Route("/api/dataset/caption", api(dataset_caption), methods=["POST"]),
        Route("/api/tools", api(tool_start), methods=["POST"]),
        Route("/api/tools/{job}", api(tool_status)),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or LOCAL_HOSTS)]
    stop = threading.Event()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        thread = None
        if scheduler:
            def loop():
                while not stop.wait(TICK_SECONDS):
                    try:
                        ws.tick()
                    except Exception:  # a bad run record must not stop the queue for the others
                        pass
            thread = threading.Thread(target=loop, name="run-queue", daemon=True)
            thread.start()
        yield
        stop.set()

    app = Starlette(routes=routes, middleware=[Middleware(Guard, token=token), *middleware], lifespan=lifespan)
    app.state.workspace = ws
    app.state.datasets = datasets
    return app


class Guard:
    """ASGI middleware: the access token (when set) and the headers that keep the page local."""

    def __init__(self, app, token: str | None):
        self.app = app
        self.token = token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        from_query = False
        if self.token is not None:
            query = request.query_params.get("token")
            given = query or request.cookies.get(TOKEN_COOKIE) or \
                request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
                response = Response("access token required: open the address printed by tools/webui.py "
                                    "(it ends in ?token=...)", status_code=401, media_type="text/plain")
                return await response(scope, receive, send)
            from_query = bool(query)
        refusal = _cross_site(request)
        if refusal:
            return await Response(refusal, status_code=403, media_type="text/plain")(scope, receive, send)
        token = self.token

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"no-referrer")]
                if from_query:
                    cookie = f"{TOKEN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
                    headers.append((b"set-cookie", cookie.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _cross_site(request: Request) -> str | None:
    """Why a state-changing request is refused: another web page open in the same browser must not
    start runs or tools here. A JSON body cannot be sent cross-site without a CORS preflight, which
    this server never grants, and a browser's Origin header must name this server."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return None
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        return "requests that change something must send a JSON body (Content-Type: application/json)"
    origin = request.headers.get("origin")
    if origin and origin != "null":
        from urllib.parse import urlparse

        if urlparse(origin).netloc != request.headers.get("host", ""):
            return f"cross-site request from {origin} refused"
    elif origin == "null":
        return "cross-site request from an opaque origin refused"
    return None
