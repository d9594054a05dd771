"""Running the server: the command line (`python -m llama_e_jax.serve`) and `ServerThread` (tests, notebooks).

A model that cannot be loaded (a missing file, a truncated or wrong-shape adapter) is one
`path: what is wrong` line on stderr and exit status 2, not a traceback.

`--adapter DIR` (once) merges one adapter into the weights, the fastest way to serve it.
`--adapter NAME=DIR` (repeatable) keeps the base unmerged and serves it under `--model-name` and each
adapter under NAME, all in one batch; so does `--admin-key` (hot loading through /v1/adapters, from
inside `--adapter-root`), even with no adapter at start.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from llama_e_jax.generate import speculative
from llama_e_jax.generate.generator import GenerationError, Generator
from llama_e_jax.io.adapters import load_any_adapter
from llama_e_jax.io.default_model import enable_compilation_cache
from llama_e_jax.io.load import LoadedModel, ModelLoadError, load_model
from llama_e_jax.model import quant
from llama_e_jax.model.lora import AdapterError
from llama_e_jax.serve.adapters import AdapterInfo, parse_adapter_args
from llama_e_jax.serve.app import create_app
from llama_e_jax.serve.engine import BatchingEngine

log = logging.getLogger("llama_e_jax.serve")

GRACEFUL_SHUTDOWN_S = 5  # on SIGTERM, requests in flight get this long; then they are cancelled


class ServerThread:
    """Serves an app on 127.0.0.1 from a background thread (tests, notebooks).

        with ServerThread(app) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key=...)
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = self.socket.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server thread did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llama_e_jax.serve",
                                     description="An OpenAI-compatible HTTP server for a (LoRA-tuned) LLaMA.")
    parser.add_argument("--model", help="GGUF file, HF checkpoint dir or preset (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                        help="LoRA adapter directory (ours or PEFT). DIR (once): merged into the weights, served as "
                             "--model-name. NAME=DIR (repeatable): served as model NAME next to the base")
    parser.add_argument("--max-adapters", type=int,
                        help="adapter slots kept ready (default: max(4, adapters given)); more grow the stack")
    parser.add_argument("--max-lora-rank", type=int,
                        help="rank the adapter stack is padded to (default: largest given, at least 8)")
    parser.add_argument("--admin-key", help="enables /v1/adapters (hot loading) behind 'Authorization: Bearer KEY'; "
                                            "keep it apart from --api-key")
    parser.add_argument("--adapter-root", help="the directory POST /v1/adapters may load from (nothing outside it)")
    parser.add_argument("--tokenizer", help="tokenizer dir or GGUF (default: from --model)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--model-name", default="llama-e", help="the id clients pass as `model`")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: local only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every /v1 request (and the docs)")
    parser.add_argument("--template", default="chat", choices=("chat", "instruction"),
                        help="prompt format of /v1/chat/completions (a request's 'template' field overrides)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together")
    parser.add_argument("--max-context", type=int, default=2048, help="cache slots per sequence (prompt + output)")
    parser.add_argument("--chunk-size", type=int, default=8, help="decode steps between scheduling decisions")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="wait for a burst to batch its prefill")
    parser.add_argument("--max-rows-per-request", type=int, default=64,
                        help="prompts × n one request may ask for (past it: 429)")
    parser.add_argument("--max-queue", type=int, default=256, help="rows that may wait for a free row (past it: 429)")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds a request may run before it is cancelled (504)")
    parser.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body (past it: 413)")
    parser.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json (behind --api-key)")
    parser.add_argument("--no-warmup", action="store_true", help="skip compiling before accepting requests")
    speculative.add_arguments(parser)
    quant.add_arguments(parser)
    return parser


def _adapter_plan(args: argparse.Namespace) -> tuple[str | None, dict[str, str]]:
    """(the adapter to merge, {name: directory} to serve unmerged); ValueError for flags that clash."""
    merged, named = parse_adapter_args(args.adapter)
    if args.admin_key is not None and args.admin_key == args.api_key:
        raise ValueError("--admin-key: must differ from --api-key (every client holds the API key)")
    if merged is not None and args.admin_key is not None:
        raise ValueError(f"--adapter {merged}: hot loading (--admin-key) keeps the base unmerged: "
                         f"name the adapter (--adapter NAME={merged})")
    return merged, named


def _read_named_adapters(named: dict[str, str], loaded: LoadedModel,
                         model_name: str) -> tuple[dict, dict[str, AdapterInfo]]:
    """{name: (tree, LoraConfig)} for `Generator(adapters=...)`, and what /v1/models says of each."""
    adapters, infos = {}, {}
    for name, directory in named.items():
        if name == model_name:
            raise ValueError(f"--adapter {name}={directory}: {name!r} is the base model's --model-name")
        adapters[name] = load_any_adapter(directory, loaded.config)  # errors name the file and tensor
        infos[name] = AdapterInfo.of(Path(directory).resolve(), adapters[name][1])
    return adapters, infos


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        merged, named = _adapter_plan(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    enable_compilation_cache()
    try:
        loaded = load_model(args.model, adapter=merged, tokenizer=args.tokenizer, dtype=args.dtype)
        multi = bool(named) or args.admin_key is not None
        adapters, infos = _read_named_adapters(named, loaded, args.model_name) if multi else (None, {})
        generator = Generator(loaded.config, loaded.params, loaded.tokenizer, adapter=loaded.adapter,
                              lora_config=loaded.lora_config, adapters=adapters, max_adapters=args.max_adapters,
                              max_adapter_rank=args.max_lora_rank, max_batch_size=args.max_batch_size,
                              max_length=args.max_context, speculation=speculative.from_arguments(args),
                              weights=quant.from_arguments(args))
    except (ModelLoadError, GenerationError, AdapterError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.admin_key is not None and args.adapter_root is None:
        log.warning("--admin-key without --adapter-root: adapters can be deleted but not loaded")
    engine = BatchingEngine(generator, max_batch_size=args.max_batch_size, chunk_size=args.chunk_size,
                            batch_wait_s=args.batch_wait_ms / 1000, max_queue=args.max_queue)
    if not args.no_warmup:
        started = time.perf_counter()
        engine.warmup()
        log.info("compiled in %.1f s", time.perf_counter() - started)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the model", args.host)
    app = create_app(engine, model_name=args.model_name, api_key=args.api_key, template=args.template,
                     max_rows_per_request=args.max_rows_per_request, request_timeout_s=args.request_timeout,
                     max_body_bytes=args.max_body_bytes, docs=args.docs, adapter_infos=infos,
                     admin_key=args.admin_key, adapter_root=args.adapter_root)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    return 0
