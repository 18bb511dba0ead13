"""An OpenAI-compatible completions server for the tests: standard library, in a thread of the test process.

POST /v1/completions with {"model", "prompt" (one string), "max_tokens", ...} answers
{"choices": [{"text", "finish_reason", "index"}], ...}, written by a tiny local model (greedy, so a local guide
with the same model and top-k 1 writes the same text) or a fixed marker text. It records every request (its
JSON and its Authorization header), the most requests it had in flight at once, and can fail: the first
`fail_first` requests get a 503, and every one after the first `fail_after` (a server that went down);
`malformed` answers JSON of another shape; `body(request)` returns (status, JSON) to answer with (JSON given as
bytes is sent as is, with the JSON content type: a proxy's error page).

By default it answers as `transformers serve` does: one prompt string a request (another prompt: 400 "prompt must
be a string."). `reverse=True` answers each prompt with its own tokens, last first (a continuation given to the
wrong row shows). With `vllm=True` it answers as vLLM's OpenAI server does, transcribed from vLLM's source at commit
d5dba2d7b0ab9b98096560c69db7126b54b14d79 (vllm/entrypoints/openai/completion/protocol.py and serving.py,
engine/protocol.py): `prompt` is a string, a list of strings, token ids or a list of token-id lists, one choice a
prompt in prompt order (`index`); `min_tokens` is honoured and must not exceed `max_tokens` (400 with vLLM's error
body); `return_token_ids` adds `token_ids` (the sampled tokens, EOS included where it ended) and
`prompt_token_ids`; fields it does not know are ignored (vLLM logs them).
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class GuideServer:
    def __init__(self, model=None, tokenizer=None, marker=None, fail_first=0, fail_after=None, malformed=False,
                 delay=0.0, body=None, retry_after=None, vllm=False, reverse=False):
        self.model, self.tokenizer, self.marker, self.body = model, tokenizer, marker, body
        self.fail_first, self.fail_after, self.malformed, self.delay = fail_first, fail_after, malformed, delay
        self.requests, self.headers, self.in_flight, self.most_in_flight = [], [], 0, 0
        self.times, self.retry_after = [], retry_after  # when each request came; a Retry-After header on a 503
        self.vllm, self.reverse = vllm, reverse  # reverse: each prompt answered with its own tokens, last first
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.times.append(time.monotonic())
                    server.headers.append(self.headers.get("Authorization"))
                    failing = len(server.requests) <= server.fail_first or (
                        server.fail_after is not None and len(server.requests) > server.fail_after)
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                    self.counted = True
                try:
                    time.sleep(server.delay)
                    if self.path != "/v1/completions":
                        return self.reply(404, {"error": {"message": f"no route {self.path}"}})
                    if failing:
                        return self.reply(503, {"error": {"message": "busy, try again"}}, server.retry_after)
                    if server.malformed:
                        return self.reply(200, {"result": "not the completions API"})
                    if server.body is not None:  # a whole answer of another server's making: (status, JSON)
                        return self.reply(*server.body(body))
                    if server.vllm:
                        return self.reply(*server.vllm_answer(body))
                    if not isinstance(body["prompt"], str):  # transformers serve's own check
                        return self.reply(400, {"detail": "prompt must be a string."})
                    text, finish_reason = server.complete(body["prompt"], body["max_tokens"])
                    self.reply(200, {"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                                     "created": 0, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                                "finish_reason": finish_reason}]})
                finally:
                    self.done()

            def done(self):
                """The request no longer counts as in flight: before its answer goes out (once the client has it, it
                may send the next request before this thread runs on)."""
                with server.lock:
                    server.in_flight -= self.counted
                    self.counted = False

            def reply(self, status, payload, retry_after=None):
                self.done()
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()  # bytes: sent as is
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if retry_after is not None:
                    self.send_header("Retry-After", str(retry_after))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def rows(self):
        """The requests that asked for rows: not the guide's probes at start (one token, seed 0)."""
        return [r for r in self.requests if not (r["max_tokens"] == 1 and r.get("seed") == 0)]

    def vllm_answer(self, body):
        prompt, max_tokens, min_tokens = body["prompt"], body.get("max_tokens", 16), body.get("min_tokens", 0)
        if min_tokens > max_tokens:  # SamplingParams' check, answered as an ErrorResponse
            return 400, {"error": {"message": f"min_tokens must be less than or equal to max_tokens={max_tokens}, got "
                                              f"{min_tokens}.", "type": "BadRequestError", "param": None, "code": 400}}
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        choices = []
        for index, one in enumerate(prompt):
            ids = self.tokenizer(one).input_ids if isinstance(one, str) else list(one)
            tokens = self.generate(ids, max_tokens, min_tokens)
            ended = self.tokenizer.eos_token_id in tokens
            text = self.tokenizer.decode(ids + tokens, skip_special_tokens=True)[
                len(self.tokenizer.decode(ids, skip_special_tokens=True)) :]
            choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": "stop" if ended else "length",
                            "stop_reason": None, "prompt_logprobs": None,
                            "token_ids": tokens if body.get("return_token_ids") else None,
                            "prompt_token_ids": ids if body.get("return_token_ids") else None})
        return 200, {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"],
                     "choices": choices, "service_tier": None, "system_fingerprint": None,
                     "usage": {"prompt_tokens": 0, "total_tokens": 0, "completion_tokens": 0}, "kv_transfer_params": None}

    def generate(self, ids, max_tokens, min_tokens=0):
        """Greedy, up to and including EOS (`reverse`: the prompt's tokens, last first, never ending)."""
        if self.reverse:
            return ids[::-1][:max_tokens]
        with torch.no_grad():
            out = self.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      do_sample=False, max_new_tokens=max_tokens, min_new_tokens=min_tokens,
                                      eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        tokens = out[0, len(ids) :].tolist()
        eos = self.tokenizer.eos_token_id
        return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens

    def complete(self, prompt, max_tokens):
        if self.marker is not None:
            return self.marker, "length"
        if self.reverse:
            ids = self.tokenizer(prompt).input_ids
            return self.tokenizer.decode(ids + self.generate(ids, max_tokens))[len(self.tokenizer.decode(ids)) :], "length"
        ids = self.tokenizer(prompt).input_ids
        with torch.no_grad():
            out = self.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      do_sample=False, max_new_tokens=max_tokens, eos_token_id=self.tokenizer.eos_token_id,
                                      pad_token_id=self.tokenizer.pad_token_id)
        tokens = out[0, len(ids) :].tolist()
        ended = self.tokenizer.eos_token_id in tokens
        tokens = tokens[: tokens.index(self.tokenizer.eos_token_id)] if ended else tokens
        text = self.tokenizer.decode(ids + tokens, skip_special_tokens=True)[len(self.tokenizer.decode(ids, skip_special_tokens=True)) :]
        return text, "stop" if ended else "length"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
