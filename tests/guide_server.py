"""An OpenAI-compatible completions server for the tests: standard library, in a thread of the test process.

POST /v1/completions with {"model", "prompt" (one string), "max_tokens", ...} answers
{"choices": [{"text", "finish_reason", "index"}], ...}, written by a tiny local model (greedy, so a local guide
with the same model and top-k 1 writes the same text) or a fixed marker text. It records every request (its
JSON and its Authorization header), the most requests it had in flight at once, and can fail: the first
`fail_first` requests get a 503, and every one after the first `fail_after` (a server that went down);
`malformed` answers JSON of another shape; `body(request)` returns (status, JSON) to answer with (JSON given as
bytes is sent as is, with the JSON content type: a proxy's error page).
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class GuideServer:
    def __init__(self, model=None, tokenizer=None, marker=None, fail_first=0, fail_after=None, malformed=False,
                 delay=0.0, body=None, retry_after=None):
        self.model, self.tokenizer, self.marker, self.body = model, tokenizer, marker, body
        self.fail_first, self.fail_after, self.malformed, self.delay = fail_first, fail_after, malformed, delay
        self.requests, self.headers, self.in_flight, self.most_in_flight = [], [], 0, 0
        self.times, self.retry_after = [], retry_after  # when each request came; a Retry-After header on a 503
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

    def complete(self, prompt, max_tokens):
        if self.marker is not None:
            return self.marker, "length"
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
