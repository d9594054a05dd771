"""Running the server: the command line (`python -m llama_e_jax.serve`) and `ServerThread` (tests, notebooks).

A model that cannot be loaded (a missing file, a truncated or wrong-shape adapter) is one
`path: what is wrong` line on stderr and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
import time
from collections.abc import Sequence

import uvicorn
from fastapi import FastAPI

from llama_e_jax.generate import speculative
from llama_e_jax.generate.generator import GenerationError, Generator
from llama_e_jax.io.default_model import enable_compilation_cache
from llama_e_jax.io.load import ModelLoadError, load_model
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
    parser.add_argument("--adapter", help="LoRA adapter directory (ours or PEFT), merged into the weights")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    enable_compilation_cache()
    try:
        loaded = load_model(args.model, adapter=args.adapter, tokenizer=args.tokenizer, dtype=args.dtype)
        generator = Generator(loaded.config, loaded.params, loaded.tokenizer, adapter=loaded.adapter,
                              lora_config=loaded.lora_config, max_batch_size=args.max_batch_size,
                              max_length=args.max_context, speculation=speculative.from_arguments(args))
    except (ModelLoadError, GenerationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
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
                     max_body_bytes=args.max_body_bytes, docs=args.docs)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    return 0
