"""`innkeeper serve`: load a model and serve every API family on one port."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from innkeeper.cli.app import app, console, fail
from innkeeper.config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEFAULT_SSE_PING,
    ConfigError,
    ServerConfig,
    parse_size,
)
from innkeeper.models.store import ModelNotFoundError, resolve_model


def _parse_gpu_layers(value: str) -> int | None:
    if value.lower() in ("auto", ""):
        return None
    if value.lower() in ("all", "max"):
        return 999
    try:
        n = int(value)
    except ValueError:
        fail(f"--gpu-layers must be a number, 'all' or 'auto' (got {value!r})")
    return 999 if n < 0 else n


def _read_keys(keys: list[str], key_file: Path | None) -> list[str]:
    out = [k.strip() for k in keys if k.strip()]
    if key_file is not None:
        try:
            text = key_file.read_text(encoding="utf-8")
        except OSError as exc:
            fail(f"cannot read --api-key-file {key_file}: {exc.strerror}")
        out += [
            line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
        ]
    return out


@app.command()
def serve(
    model: Annotated[
        str | None,
        typer.Argument(
            help="a GGUF file, or a store name (innkeeper models); default: the embedded SmolLM2"
        ),
    ] = None,
    host: Annotated[
        str,
        typer.Option(help="address to listen on (not loopback: needs --api-key)"),
    ] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="port for every API family")] = DEFAULT_PORT,
    ctx_size: Annotated[
        int | None,
        typer.Option(
            "--ctx-size", "-c", help="context size in tokens (default: from the model and memory)"
        ),
    ] = None,
    gpu_layers: Annotated[
        str,
        typer.Option("--gpu-layers", "-ngl", help="layers to offload: a number, 'all' or 'auto'"),
    ] = "auto",
    threads: Annotated[
        int, typer.Option("--threads", "-t", help="decode threads (0 = physical cores)")
    ] = 0,
    threads_batch: Annotated[
        int, typer.Option("--threads-batch", help="prompt threads (0 = same as --threads)")
    ] = 0,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="logical batch size")
    ] = 2048,
    ubatch_size: Annotated[
        int, typer.Option("--ubatch-size", "-ub", help="physical batch size")
    ] = 512,
    parallel: Annotated[
        int, typer.Option("--parallel", "-np", help="generation slots served at once")
    ] = 4,
    flash_attn: Annotated[
        str, typer.Option("--flash-attn", "-fa", help="on, off or auto")
    ] = "auto",
    cache_type: Annotated[
        str | None, typer.Option("--cache-type", help="KV cache type for K and V: f16, q8_0, q4_0")
    ] = None,
    cache_type_k: Annotated[str, typer.Option("--cache-type-k", "-ctk")] = "f16",
    cache_type_v: Annotated[str, typer.Option("--cache-type-v", "-ctv")] = "f16",
    mlock: Annotated[bool, typer.Option("--mlock", help="keep the model in RAM")] = False,
    no_mmap: Annotated[
        bool, typer.Option("--no-mmap", help="read the model into memory instead of mapping it")
    ] = False,
    chat_template: Annotated[
        str | None,
        typer.Option(
            "--chat-template",
            help="built-in name (alpaca, chatml, mistral, llama3, gemma, vicuna, metharme) or a Jinja file",
        ),
    ] = None,
    cache_reuse: Annotated[
        int,
        typer.Option(
            "--cache-reuse",
            help="min. chunk (tokens) moved in the KV cache after a prompt trim; 0 = off",
        ),
    ] = 32,
    cache_ram: Annotated[
        int,
        typer.Option(
            "--cache-ram",
            help="MiB of RAM for idle conversations' KV caches, restored when they return; 0 = off",
        ),
    ] = 2048,
    max_queue: Annotated[
        int, typer.Option("--max-queue", help="requests that may wait for a slot before 503")
    ] = 64,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="default length when a request gives none")
    ] = None,
    api_key: Annotated[
        list[str] | None, typer.Option("--api-key", help="require this key (Bearer); repeatable")
    ] = None,
    api_key_file: Annotated[
        Path | None, typer.Option("--api-key-file", help="file with one key per line")
    ] = None,
    insecure_no_auth: Annotated[
        bool,
        typer.Option("--insecure-no-auth", help="allow a non-loopback --host without an API key"),
    ] = False,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(
            "--cors-origin",
            help="let browser pages from this origin call the API (e.g. http://localhost:8000, "
            "or *); repeatable",
        ),
    ] = None,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-host",
            help="accept this Host name on a loopback server (e.g. host.docker.internal); "
            "repeatable",
        ),
    ] = None,
    max_body: Annotated[
        str, typer.Option("--max-body", help="largest request body (e.g. 32M, 512K)")
    ] = "32M",
    request_timeout: Annotated[
        float | None,
        typer.Option(
            "--request-timeout", help="cancel a generation after this many seconds (default: never)"
        ),
    ] = None,
    sse_ping_interval: Annotated[
        float,
        typer.Option(
            "--sse-ping-interval",
            help="seconds between keep-alive comments on a silent stream (0 = off)",
        ),
    ] = DEFAULT_SSE_PING,
    alias: Annotated[
        str | None, typer.Option("--alias", help="model name shown to clients")
    ] = None,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="allow pickle weights (can run code!)")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="show llama.cpp's log and each HTTP request")
    ] = False,
) -> None:
    """Serve a GGUF model to SillyTavern, OpenAI and KoboldAI clients."""
    from innkeeper.server import run_server

    try:
        model_path = resolve_model(model)
    except ModelNotFoundError as exc:
        fail(str(exc))
    if cache_type is not None:
        cache_type_k = cache_type_v = cache_type
    try:
        max_body_bytes = parse_size(max_body)
    except ConfigError as exc:
        fail(str(exc))
    config = ServerConfig(
        model_path=model_path,
        host=host,
        port=port,
        api_keys=_read_keys(api_key or [], api_key_file),
        ctx_size=ctx_size,
        gpu_layers=_parse_gpu_layers(gpu_layers),
        threads=threads,
        threads_batch=threads_batch,
        batch_size=batch_size,
        ubatch_size=ubatch_size,
        parallel=parallel,
        flash_attn=flash_attn.lower(),
        cache_type_k=cache_type_k.lower(),
        cache_type_v=cache_type_v.lower(),
        mlock=mlock,
        mmap=not no_mmap,
        chat_template=chat_template,
        cache_reuse=cache_reuse,
        cache_ram_mib=cache_ram,
        max_queue=max_queue,
        default_max_tokens=max_tokens,
        allow_pickle=allow_pickle,
        model_alias=alias,
        insecure_no_auth=insecure_no_auth,
        cors_origins=cors_origin or [],
        allowed_hosts=allow_host or [],
        max_body=max_body_bytes,
        request_timeout=request_timeout,
        sse_ping_interval=sse_ping_interval,
    )
    try:
        config.validate()
    except ConfigError as exc:
        fail(str(exc))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    run_server(config, verbose=verbose, console=console)
