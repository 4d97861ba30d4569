"""Ollama's API on innkeeper's port (its docs/api.md), for SillyTavern's "Ollama" Text
Completion type and Ollama clients: models (ollama_models), generation (ollama_generate),
pull and delete (ollama_store). Errors are Ollama's `{"error": "..."}` (api/errors.py routes
its exact paths to that shape). Ollama's routes stay out of innkeeper's OpenAPI document:
Ollama's own docs are their contract.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from innkeeper.api import ollama_generate, ollama_models, ollama_store

# The Ollama release whose API these routes follow (clients compare it against what they need).
OLLAMA_API_VERSION = "0.6.0"

router = APIRouter(tags=["Ollama"])
router.include_router(ollama_models.router)
router.include_router(ollama_generate.router)
router.include_router(ollama_store.router)


@router.get("/api/version", include_in_schema=False)
async def version() -> dict[str, str]:
    return {"version": OLLAMA_API_VERSION}


@router.head("/", include_in_schema=False)
async def probe() -> Response:
    """Ollama clients probe `HEAD /`; `GET /` stays innkeeper's page."""
    return Response(status_code=200)
