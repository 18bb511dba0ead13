"""The guide behind an OpenAI-compatible completions server (--guide-url): vLLM, SGLang, TGI,
llama.cpp's server, `transformers serve`, OpenAI. The `openai` client (imported only with --guide-url)
sends the requests, --guide-concurrency at once; what the server takes is learnt by a probe before
the first; a request that fails is retried with backoff, and one that fails for good stops the run
(StopRun) at its last completed iteration. common/guide.py loads it (load_guide) and shares with it
the routines that turn a continuation into the policy's tokens.
"""

import concurrent.futures
import copy
import email.utils
import ipaddress
import os
import random
import threading
import time
import urllib.parse
import weakref

from common.guide import CREDENTIALS, uses_template, write_policy_tokens, write_through_text
from common.stopping import ON_STOP, RECEIVED, StopRun

RETRY_WAIT = 1.0  # seconds before a server's first retry, doubled each time up to MAX_RETRY_WAIT, with jitter
MAX_RETRY_WAIT = 30.0
JITTER = random.Random()  # (its own stream: the run's checkpointed mixing stream is never touched by a retry)


def retry_after(error):
    """The seconds a server's Retry-After header asks for (a number or an HTTP date), or None."""
    value = getattr(getattr(error, "response", None), "headers", {}).get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        date = email.utils.parsedate_to_datetime(value) if email.utils.parsedate_tz(value) else None
        return None if date is None else max(date.timestamp() - time.time(), 0.0)


def retry_wait(attempt, asked=None):
    """Seconds before retry number `attempt` + 1: what the server asked for, else RETRY_WAIT doubled per attempt (at
    most MAX_RETRY_WAIT), times a jitter in [0.5, 1.5) so that many clients do not come back at once."""
    if asked is not None:
        return asked
    return min(RETRY_WAIT * 2**attempt, MAX_RETRY_WAIT) * (0.5 + JITTER.random())


def wait_unless_stopped(seconds, failed):
    """Sleep, but a Ctrl-C or SIGTERM that reached the loop, or another request's failure (the Event `failed`),
    ends the wait: True where one did."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if RECEIVED or failed.is_set():
            return True
        time.sleep(min(0.1, max(deadline - time.monotonic(), 0.0)))
    return bool(RECEIVED) or failed.is_set()


def key_stays_private(url):
    """Whether a key sent to `url` stays private: https, or plain http to this machine (a loopback address)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" or parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def served_tokenizer(args):
    """The served model's tokenizer (--guide-tokenizer, else --guide-model's name where it loads), for its chat
    template and to learn whether it is the policy's; None where it cannot be loaded (through text)."""
    from transformers import AutoTokenizer

    name = args.guide_tokenizer or args.guide_model
    try:
        return AutoTokenizer.from_pretrained(name) if name else None
    except (OSError, ValueError) as e:
        if args.guide_tokenizer or args.guide_chat_template:
            raise SystemExit(f"error: --guide-tokenizer {name}: cannot be loaded ({str(e).splitlines()[0][:200]})")
        print(f"guide: no tokenizer {name} to load (--guide-tokenizer names one): the guide's text is re-encoded",
              flush=True)
        return None


class Refused(Exception):
    """The server refused a request (400, 422): its message."""


class Aborted(Exception):
    """The server aborted a request (finish_reason "abort": vLLM under pressure): retried as a 503 is."""


class ServerGuide:
    """write(examples, prefixes, budgets) as common/guide.py's guides, through a server. What the server takes is learnt
    before the first request (probe): the optional sampling fields (top_k, repetition_penalty, min_tokens: vLLM and
    SGLang take them; transformers serve and OpenAI do not: printed once), a list of prompts in one request (vLLM,
    SGLang: unseeded, rows that ask for the same lengths share a request), and, where the served model's tokenizer
    is the policy's, token-id prompts answered with token ids (vLLM's return_token_ids: no text round trip, budgets
    in policy tokens); otherwise through text. Sampling: temperature, top_p, max_tokens, a seed per request where --guide-seed (drawn
    from `rng`: a resume is exact where the server honours it). finish_reason "stop" = the guide ended. A request
    that fails (429, 5xx, no connection, timeout) is retried for --guide-retry-seconds (retry_wait: Retry-After, else
    1, 2, 4... s with jitter), each retry printed; then, on a stop signal, or on an answer that is not the API's
    shape, StopRun (the other requests give up with it).

    Threads: the pool's requests (and send's background write) share `counts` (the requests, retries, latency and
    server tokens since the last stats) and `failure` (the first request that failed for good), each under its
    lock; the probe's findings are written once, under probe_lock, which every write takes before it reads them;
    `ahead` belongs to the loop's thread."""

    def __init__(self, args, tokenizer, rng):
        import openai

        # the policy's tokenizer, a copy of its own: the fetch-ahead thread encodes while the loop's thread encodes
        # with the original (transformers flips a flag of a shared tokenizer around split_special_tokens)
        self.args, self.tokenizer, self.rng, self.openai = args, copy.deepcopy(tokenizer), rng, openai
        credentials = CREDENTIALS.get(args.guide_url)  # (user, password) from the URL: HTTP basic auth
        if (os.environ.get("OPENAI_API_KEY") or credentials) and not key_stays_private(args.guide_url):
            what = "the password in --guide-url" if credentials else "the key in OPENAI_API_KEY"
            print(f"guide: {what} is sent in plain text to {urllib.parse.urlsplit(args.guide_url).hostname} (http, "
                  "not this machine): anyone on the way can read it; https keeps it private", flush=True)
        self.client = openai.OpenAI(base_url=args.guide_url, api_key=os.environ.get("OPENAI_API_KEY") or "none",
                                    http_client=openai.DefaultHttpxClient(auth=credentials) if credentials else None,
                                    timeout=args.guide_timeout, max_retries=0)  # (our retries: printed, then StopRun)
        self.retried = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError)
        # the optional sampling fields, as far as the server takes them (probe), sent even where they are off: vLLM
        # applies the served model's own generation_config (a top-k, a repetition penalty) to what a request leaves out
        self.extra = {"top_k": args.guide_top_k or -1, "repetition_penalty": 1.0,
                      **({"min_tokens": args.guide_min_new_tokens} if args.guide_min_new_tokens else {})}
        self.guide_tokenizer = served_tokenizer(args)
        self.same_tokenizer = (self.guide_tokenizer is not None and not uses_template(args)
                               and self.guide_tokenizer.get_vocab() == tokenizer.get_vocab())
        self.takes_lists = self.counts_policy_tokens = self.probed = False  # what the server takes: probe()
        self.stop_ids = {self.tokenizer.eos_token_id, *self.tokenizer.all_special_ids}  # (token ids: the same vocab)
        if self.guide_tokenizer is not None:  # the served model's own EOS and special tokens (its instruct turn's end)
            self.stop_ids |= {self.guide_tokenizer.eos_token_id, *self.guide_tokenizer.all_special_ids}
        self.probe_lock = threading.Lock()
        self.counts = dict.fromkeys(("requests", "retries", "seconds", "tokens_asked"), 0)  # since stats()
        self.counts_lock = threading.Lock()
        self.failed, self.failure = threading.Event(), None  # a request failed for good: every request gives up
        self.failure_lock = threading.Lock()
        self.pool = concurrent.futures.ThreadPoolExecutor(args.guide_concurrency)
        self.background, self.ahead = concurrent.futures.ThreadPoolExecutor(1), {}  # send(): the next rows
        self.source = f"the server {args.guide_url}"
        ON_STOP.append(weakref.WeakMethod(self.let_go))

    def give_up(self, message):
        """The StopRun that ends the run: the first failure's message, whichever request raises it."""
        with self.failure_lock:
            self.failure = self.failure or message
            self.failed.set()
            return StopRun(self.failure)

    def request(self, prompts, max_tokens, seed, fields, ledger=None, probing=False):
        """One request (prompts: a string, token ids, or a list of either) -> its choices in prompt order, counted in
        `ledger`: the rows' write's, which stats() counts with the write that takes them (None: a probe, whose
        retries alone count). `probing` what the server takes: a refusal or an answer of another shape is None (a
        failure is retried as always)."""
        openai, url = self.openai, self.args.guide_url
        count = len(prompts) if isinstance(prompts, list) and isinstance(prompts[0], (str, list)) else 1
        attempt, first_failure, started = 0, None, time.monotonic()
        while True:
            if self.failed.is_set():
                raise self.give_up(self.failure)
            try:
                response = self.client.completions.create(
                    model=self.args.guide_model, prompt=prompts, max_tokens=max_tokens,
                    temperature=self.args.guide_temperature, top_p=self.args.guide_top_p,
                    **({} if seed is None else {"seed": seed}), extra_body=fields or None)
                if any(getattr(c, "finish_reason", None) == "abort" for c in getattr(response, "choices", None) or []):
                    raise Aborted("the server aborted the request (finish_reason abort)")
                break
            except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
                if probing:
                    return None
                raise Refused(f"({type(e).__name__}: {str(e).splitlines()[0][:100]} {str(e.body)[:200]})")
            except (*self.retried, Aborted) as e:  # (openai.APITimeoutError is an APIConnectionError)
                error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                first_failure = time.monotonic() if first_failure is None else first_failure
                waited, wait = time.monotonic() - first_failure, retry_wait(attempt, retry_after(e))
                if attempt == self.args.guide_max_retries or waited + wait > self.args.guide_retry_seconds:
                    raise self.give_up(f"the guide server {url} failed {attempt + 1} times in {waited:.0f} s ({error})")
                attempt += 1
                with self.counts_lock:
                    (self.counts if ledger is None else ledger)["retries"] += 1
                print(f"guide: {url}: {error}; retry {attempt} in {wait:.1f} s", flush=True)
                if wait_unless_stopped(wait, self.failed):
                    raise self.give_up(f"stopped while waiting to retry the guide server {url} ({error})")
            except openai.APIError as e:  # 401, 404...: a retry would fail the same way
                if probing:
                    return None
                raise self.give_up(f"the guide server {url} refused the request ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:100]} {str(getattr(e, 'body', ''))[:200]})")
            except Exception as e:  # anything else the client raises (a proxy's page that is not JSON): one line
                if probing:
                    return None
                raise self.give_up(f"the guide server {url} answered what the client cannot read "
                                   f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")
        choices = sorted(getattr(response, "choices", None) or [], key=lambda c: getattr(c, "index", 0))
        if not (len(choices) == count and all(isinstance(getattr(c, "text", None), str)
                                              and isinstance(getattr(c, "finish_reason", None), str) for c in choices)):
            if probing:
                return None
            raise self.give_up(f"the guide server {url} answered out of the completions API's shape "
                               f"({str(response)[:200]})")
        if ledger is not None:
            with self.counts_lock:
                ledger["requests"] += 1
                ledger["seconds"] += time.monotonic() - started
                ledger["tokens_asked"] += max_tokens * count
        return choices

    def refused(self, fields):
        """Whether the server refuses a one-token request with these sampling fields (400 or 422)."""
        try:
            self.request("Hello", 1, 0, fields)
            return False
        except Refused:
            return True

    def probe(self):
        """Before the first request: one small request with every optional field (each alone where it is refused):
        a field the server refuses is dropped, with one line; later refusals are errors (never matched against an
        error's words). Then two prompts in one request (token ids asking for token ids back, where the tokenizers
        are the same), and where that is not taken and the tokenizers are the same, one; where token ids come back,
        a text whose token ids as the server returns them must be the policy tokenizer's."""
        extra, url = self.extra, self.args.guide_url
        if extra and self.refused({**extra, **({"min_tokens": 1} if "min_tokens" in extra else {})}):
            for name in list(extra):
                if self.refused({name: 1 if name == "min_tokens" else extra[name]}):
                    del extra[name]
                    print(f"guide: {url} does not take {name}: the guide samples without it", flush=True)
        hello = ([self.guide_tokenizer(word).input_ids for word in ("Hello", "Hi")] if self.same_tokenizer
                 else ["Hello", "Hi"])
        fields = {**extra, **({"min_tokens": 1} if "min_tokens" in extra else {}),
                  **({"return_token_ids": True} if self.same_tokenizer else {})}
        answer = self.request(hello, 1, 0, fields, probing=True)
        self.takes_lists = answer is not None
        if answer is None and self.same_tokenizer:
            answer = self.request(hello[0], 1, 0, fields, probing=True)
        self.counts_policy_tokens = answer is not None and self.same_tokenizer and all(
            isinstance(getattr(c, "token_ids", None), list) for c in answer)
        if self.counts_policy_tokens:  # the same vocabulary is not the same tokenizer: the server's encoding of a text
            text = "Hello, guide: 12 tokens / 3 words?"
            check = self.request(text, 1, 0, fields, probing=True)
            if getattr((check or [None])[0], "prompt_token_ids", None) != self.tokenizer(text).input_ids:
                self.counts_policy_tokens = False
                print(f"guide: {url} encodes text otherwise than the policy's tokenizer (or does not say how): the "
                      "guide's text is re-encoded", flush=True)
        self.probed = True

    def complete_all(self, prompts, max_tokens, min_tokens, seeds, ledger):
        """Every prompt's (text or token ids, whether it ended): rows that ask for the same lengths share a request
        where the server takes lists (its seed: the first row's), each its own otherwise; --guide-concurrency
        requests in flight."""
        def answer(rows):
            fields = {**self.extra, **({"min_tokens": min_tokens[rows[0]]} if "min_tokens" in self.extra else {}),
                      **({"return_token_ids": True} if self.counts_policy_tokens else {})}
            batch = [prompts[i] for i in rows] if self.takes_lists else prompts[rows[0]]
            seed = seeds[rows[0]] if self.args.guide_seed else None
            try:
                return self.request(batch, max_tokens[rows[0]], seed, fields, ledger)
            except Refused as e:
                raise self.give_up(f"the guide server {self.args.guide_url} refused the request {e}")

        groups = {}  # (seeded, each row its own request: vLLM seeds every prompt of a list with the request's seed)
        for i in range(len(prompts)):
            groups.setdefault((max_tokens[i], min_tokens[i]) if self.takes_lists and not self.args.guide_seed else i,
                              []).append(i)
        results = [None] * len(prompts)
        for rows, choices in zip(groups.values(), self.pool.map(answer, groups.values())):
            for i, choice in zip(rows, choices):
                ended = choice.finish_reason == "stop"
                if self.counts_policy_tokens:
                    if not isinstance(getattr(choice, "token_ids", None), list):  # (a restarted older server, a pool)
                        raise self.give_up(f"the guide server {self.args.guide_url} no longer returns token_ids, as it "
                                           "did when the run started: restart the run (it probes the server again)")
                    tokens = list(choice.token_ids)  # (a stop token of the server's, its EOS or another, is not text)
                    stop = tokens and (tokens[-1] in self.stop_ids or tokens[-1] == getattr(choice, "stop_reason", None))
                    tokens = tokens[:-1] if ended and stop else tokens
                    results[i] = (tokens, ended)
                else:
                    results[i] = (choice.text, ended)
        return results

    def write_rows(self, examples, prefixes, budgets, seeds):
        """write's rows, and the requests they took (a ledger for stats)."""
        ledger = dict.fromkeys(("requests", "retries", "seconds", "tokens_asked"), 0)
        with self.probe_lock:
            if not self.probed:
                self.probe()

        def sample(rows, inputs, max_tokens, min_tokens):  # a row asked again keeps its seed (its prompt is longer)
            return self.complete_all(inputs, max_tokens, min_tokens, [seeds[i] for i in rows], ledger)

        if self.counts_policy_tokens:  # the policy's tokens both ways
            return write_policy_tokens(self.args, self.tokenizer, examples, prefixes, budgets, sample), ledger
        return write_through_text(self.args, self.tokenizer, self.guide_tokenizer, examples, prefixes, budgets,
                                  sample), ledger

    def draw_seeds(self, examples, prefixes, budgets):
        """The rows' seeds, in order, before any request (the stream stays exact), and the call's key."""
        seeds = [self.rng.randrange(2**31) for _ in examples]
        return seeds, repr([(e["prompt_ids"], list(p), b, s) for e, p, b, s in zip(examples, prefixes, budgets, seeds)])

    def send(self, examples, prefixes, budgets):
        """Start writing these rows in the background: the write that asks for the same rows, budgets and seeds
        (the caller puts its random stream back, so the write draws the same seeds) takes the answer. After a stop
        (Ctrl-C, SIGTERM) nothing is sent: the run ends with this iteration."""
        if RECEIVED:
            return
        seeds, key = self.draw_seeds(examples, prefixes, budgets)
        self.ahead[key] = self.background.submit(self.write_rows, examples, prefixes, budgets, seeds)

    def write(self, examples, prefixes, budgets):
        seeds, key = self.draw_seeds(examples, prefixes, budgets)
        sent = self.ahead.pop(key, None)
        self.ahead.clear()  # (rows sent ahead that no write asked for are dropped)
        rows, ledger = sent.result() if sent else self.write_rows(examples, prefixes, budgets, seeds)
        if any(budgets) and not any(tokens for tokens, _ in rows):  # (not one token for any row: no guide at all)
            raise self.give_up(f"the guide server {self.args.guide_url} returned nothing for any of the {len(rows)} "
                               "rows it was asked for: the run would go on as plain PPO")
        with self.counts_lock:
            for name, value in ledger.items():
                self.counts[name] += value
        return rows

    def let_go(self):
        """The run stops: requests not yet sent are dropped and nothing new is sent; the requests already in flight
        are not interrupted (the HTTP client cannot cut a read short), so the exit waits for their answers, one
        request's time on a healthy server, at most --guide-timeout."""
        self.failed.set()
        for executor in (self.background, self.pool):
            executor.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    def transport_stats(self):
        """Since the last call: the requests for rows (not the probes), retries, mean latency, and the server's own
        tokens asked (max_tokens)."""
        with self.counts_lock:
            counts = self.counts
            self.counts = dict.fromkeys(counts, 0)
        return {"guide/requests": counts["requests"], "guide/retries": counts["retries"],
                "timing/guide_latency_s": counts["seconds"] / max(counts["requests"], 1),
                "guide/server_tokens_asked": counts["tokens_asked"]}
