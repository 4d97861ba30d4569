"""The FastAPI factory: every route family on one port, auth, error shapes, the web page."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from innkeeper import __version__
from innkeeper.api import kobold, llamacpp, ooba, openai, status
from innkeeper.api.errors import install_handlers
from innkeeper.api.security import ApiKeyMiddleware
from innkeeper.api.service import Service
from innkeeper.config import ServerConfig

STATIC = Path(__file__).resolve().parent.parent / "web" / "static"


def create_app(service: Service, config: ServerConfig) -> FastAPI:
    app = FastAPI(
        title="innkeeper",
        version=__version__,
        description=(
            "A self-hosted LLM server. One port serves the OpenAI, KoboldAI/KoboldCpp, "
            "text-generation-webui and llama.cpp route families."
        ),
    )
    app.state.service = service
    app.state.config = config
    app.state.memory_plan = None  # filled by the server from the memory calculator
    install_handlers(app)
    for module in (openai, kobold, ooba, llamacpp, status):
        app.include_router(module.router)

    index = STATIC / "index.html"
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def root() -> object:
        if index.is_file():
            return FileResponse(index)
        return JSONResponse(
            {"name": "innkeeper", "version": __version__, "model": service.model_id}
        )

    app.add_middleware(ApiKeyMiddleware, keys=config.api_keys)
    return app
