"""An OpenAI-compatible HTTP server for a (LoRA-tuned) LLaMA, so existing `openai` clients work unchanged.

    python -m llama_e_jax.serve --adapter runs/ads/adapter --api-key $KEY      # 127.0.0.1:8000
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (streaming as
server-sent events ending with `data: [DONE]`, or not), with `max_tokens`, `temperature`, `top_p`,
`stop`, `n`, `seed`, `stream_options.include_usage`, and `usage` counts. Replies can be constrained
(generate/guided.py, on device): `guided_choice` (a list of strings: the reply is exactly one) and
`guided_regex` (vLLM's names), and in chat `response_format` `{"type": "json_schema", ...}` (objects,
arrays, enums, numbers, ...) or `{"type": "json_object"}`; a schema the compiler cannot enforce, or
whose automaton exceeds the state or memory budget, is a 400 naming the keyword or budget. Chat prompts use the model's chat template; `--template instruction` (or
`"template": "instruction"` in a request body, `extra_body` in the openai client) uses the Alpaca
template LLaMA-E was tuned with instead: the last user message is the instruction and an optional
`"input"` body field its input. Chat's default `max_tokens` is 512 (bounded by the context left).

Several adapters on one base: `--adapter NAME=DIR` (repeatable) serves the unmerged base as
`--model-name` and each adapter as NAME (listed by `/v1/models`, picked by a request's `model`, mixed
row by row in one batch). With `--admin-key` and `--adapter-root`, `GET/POST /v1/adapters` and
`DELETE /v1/adapters/{name}` list, load and remove adapters while serving (adapters.py).

The modules, in the order a request meets them:

- `app`      routes, auth, the body size cap, disconnect watching and deadlines, responses/SSE;
- `protocol` request bodies and their validation (depth, Unicode, types, ranges), the error body;
- `prompts`  templating and tokenizing (off the event loop, bounded), token budgets;
- `adapters` the served model ids, and the guards of hot loading (admin key, adapter root);
- `engine`   the batching engine: one thread owns the decoding session; `submit` from any thread;
             adapter changes run on that thread between steps;
- `cli`      the command line and `ServerThread`.

Errors use OpenAI's body (`{"error": {"message", "type", "param", "code"}}`): 400 for malformed
JSON, fields of the wrong type or range, unknown roles, unsupported options, prompts or `max_tokens`
that do not fit the context, an adapter that does not fit the base; 401 for a missing or wrong
bearer key (`--api-key`; the admin key on /v1/adapters); 403 for hot loading when it is off or a
path outside `--adapter-root`; 404 for an unknown model or path; 409 for a hot load whose name is
taken; 413 for a body over `--max-body-bytes`; 429 with `Retry-After` past
`--max-rows-per-request` (prompts × n) or `--max-queue` (rows waiting); 504 past
`--request-timeout`. A client that disconnects frees its rows at the next decode chunk. Should a
decode step itself fail, the requests in flight get a 500 and the engine starts a fresh session.
"""

from llama_e_jax.serve.app import create_app
from llama_e_jax.serve.cli import ServerThread, build_parser, main
from llama_e_jax.serve.engine import BatchingEngine, QueueFull
from llama_e_jax.serve.protocol import ApiError

__all__ = ["ApiError", "BatchingEngine", "QueueFull", "ServerThread", "build_parser", "create_app", "main"]
