"""The guide pi_g: a black box that writes, as the reward is one that scores.

Given the examples, the prefixes the policy's episodes have so far and a budget per row (all in policy
tokens), the guide returns each continuation in policy tokens, at most its budget, and whether it ended
it (EOS). Three sources, one interface (`load_guide(...).write(examples, prefixes, budgets)`):

    a local model    --guide-model (hub id or folder): its own weights, frozen, sampled with
                     generate(); on token ids where it shares the policy's tokenizer (and has no
                     template), otherwise through text, decoded and re-encoded in context
    a served model   --guide-url http://host:port/v1 (--guide-model: the served model's name): any
                     OpenAI-compatible completions server (vLLM, SGLang, TGI, llama.cpp's server,
                     `transformers serve`, OpenAI), through text, a bounded number of requests at once
    the dataset      --guide-references: the task's reference continuations (PPO++ with them is DR-PO,
                     restarts from dataset states; roll-in only: a dataset cannot continue a prefix)

Which states the guide gives and how the algorithm uses them (the law of k, the masks) is in each
script, never here.
"""

import base64
import concurrent.futures
import email.utils
import ipaddress
import os
import random
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor

from common import distributed, tasks
from common.checkpoint import RECEIVED, StopRun
from common.text import decode_in_context, encode_in_context

RETRY_WAIT = 1.0  # seconds before a server's first retry, doubled each time up to MAX_RETRY_WAIT, with jitter
MAX_RETRY_WAIT = 30.0
JITTER = random.Random()  # (its own stream: the run's checkpointed mixing stream is never touched by a retry)
TEXT_MARGIN = 1.5  # through text: guide tokens asked per policy token still needed (a row that comes back short asks again)
CREDENTIALS = {}  # a --guide-url's user:password@, by the URL without it: never in args, logs, checkpoints or argv


@dataclass
class GuideArgs:
    """The guide's flags, shared by the guided scripts (their Args include these)."""

    guide_model: Optional[str] = None
    """the guide pi_g: a causal LM (hub id or local folder), frozen; with --guide-url, the served model's name
    (None: the task's default)"""
    guide_url: Optional[str] = None
    """an OpenAI-compatible completions server as the guide (http://host:port/v1: vLLM, SGLang, TGI, llama.cpp,
    transformers serve, OpenAI); the key, if it needs one, from the OPENAI_API_KEY environment variable"""
    guide_references: bool = False
    """the dataset's reference continuations are the guide (PPO++: DR-PO's restarts from dataset states)"""
    guide_prompt_template: Optional[str] = None
    """the guide's own prompt around the task prompt, containing {prompt} (other braces are kept as they are) (None:
    the task prompt as is)"""
    guide_chat_template: bool = False
    """an instruct guide: its prompt is rendered with its tokenizer's chat template, the task prompt (in
    --guide-prompt-template, if set) as the user's turn, the policy's prefix continuing the assistant's turn"""
    guide_tokenizer: Optional[str] = None
    """--guide-url: the served model's tokenizer (hub id or folder), for its chat template and to send token ids
    where it is the policy's (None: --guide-model's name, where it loads; otherwise through text)"""
    guide_temperature: float = 1.0
    """the guide's sampling temperature"""
    guide_top_k: Optional[int] = None
    """the guide's top-k (0 = off; a server gets it only where set: vLLM, SGLang, llama.cpp take it, OpenAI does
    not) (None: the task's default)"""
    guide_top_p: float = 0.92
    """the guide's nucleus sampling"""
    guide_max_new_tokens: Optional[int] = None
    """a model guide writes at most this many of its tokens per sample (None: H; tldr 20, as tril); the references'
    budget is H"""
    guide_min_new_tokens: Optional[int] = None
    """no EOS from the guide before the whole response has this many tokens, a prefix it continues included (tril's
    min_length; a server gets it as min_tokens where set: vLLM, SGLang) (None: imdb 48, commongen and tldr 5)"""
    guide_concurrency: int = 64
    """--guide-url: requests in flight at once, per rank (a server that takes lists of prompts, as vLLM and SGLang
    do, gets the rows that ask for the same lengths in one request)"""
    guide_seed: bool = True
    """--guide-url: send each request a seed drawn from the run's checkpointed stream, so a resumed run asks for the
    same samples (vLLM honours it, at some cost in speed: docs/guides.md); False: the server's own randomness"""
    guide_timeout: float = 120.0
    """--guide-url: seconds to wait for one answer"""
    guide_failure_checkpoint: bool = True
    """a guide that stays down ends the run with a checkpoint of its last completed iteration, under --save-every 0
    too (then in checkpoints/{run_name}); False: nothing is written there (very large models)"""
    guide_retry_seconds: float = 300.0
    """--guide-url: how long a request that failed (429, 5xx, no connection, timeout) is retried, waiting 1, 2, 4...
    s (at most 30, with jitter; a server's Retry-After where it sends one): long enough for a server to restart;
    then the run stops at its last completed iteration, as on Ctrl-C (which also ends the wait)"""
    guide_max_retries: Optional[int] = None
    """--guide-url: at most this many retries of a request, within --guide-retry-seconds (None: no count)"""
    guide_fetch_ahead: bool = True
    """--guide-url: ask for the next iteration's roll-ins while the policy updates (they do not depend on it; the
    same samples as without); False: ask when the rollout needs them"""


def check_guide_args(args, continues_prefixes):
    """Before any model loads: the guide's flags, with one line naming the bad one. `continues_prefixes`: the
    algorithm asks the guide to continue the policy's prefixes (AggreVaTeD), which a dataset cannot."""
    if args.max_new_tokens < 2:
        raise SystemExit("error: --max-new-tokens must be at least 2 (a roll-in of k >= 1 tokens and a roll-out)")
    if args.guide_max_new_tokens is None:
        args.guide_max_new_tokens = args.max_new_tokens
    tasks.check_ranges(args, positive=("guide_temperature", "guide_max_new_tokens", "guide_concurrency",
                                       "guide_timeout", "guide_retry_seconds"),
                       non_negative=("guide_top_k", "guide_min_new_tokens", "guide_max_retries"),
                       unit=("guide_top_p",))
    if args.guide_prompt_template is not None and "{prompt}" not in args.guide_prompt_template:
        raise SystemExit("error: --guide-prompt-template must contain {prompt}")
    if args.guide_references and (args.guide_chat_template or args.guide_prompt_template is not None):
        raise SystemExit("error: --guide-references: the dataset's references take no prompt (--guide-chat-template, "
                         "--guide-prompt-template are for a model guide)")
    if args.guide_references and args.guide_url:
        raise SystemExit("error: --guide-references and --guide-url: choose one guide")
    if args.guide_references and continues_prefixes:
        raise SystemExit("error: --guide-references: the dataset cannot continue the policy's prefixes (this "
                         "algorithm's roll-outs); use it with ppo_plus_plus.py (DR-PO), or d2lols.py --tau 0")
    if args.guide_url:
        take_credentials(args)
        if not args.guide_url.startswith(("http://", "https://")):
            raise SystemExit(f"error: --guide-url {args.guide_url}: not an http(s) address (e.g. http://host:8000/v1)")
    elif not args.guide_references:
        tasks.check_model_path(args.guide_model, "--guide-model")


def take_credentials(args):
    """A --guide-url with user:password@ in it: the credentials go to CREDENTIALS (sent with each request as HTTP
    basic auth) and out of args.guide_url and sys.argv, so the hyperparameters, checkpoints, printed lines and the
    resume command never hold them."""
    parts = urllib.parse.urlsplit(args.guide_url)
    if "@" not in parts.netloc:
        return
    url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    CREDENTIALS[url] = (urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password or ""))
    sys.argv[:] = [arg.replace(args.guide_url, url) for arg in sys.argv]
    args.guide_url = url
    print(f"guide: the user and password in --guide-url are sent to {url} with each request but kept out of the "
          "logs, checkpoints and resume command: give them again when you resume", flush=True)


def load_guide(args, tokenizer, device, dtype, rng):
    """The guide of the flags: an object with write(examples, prefixes, budgets) -> per row (continuation as policy
    tokens, at most budgets[i] of them, with EOS at the end where the guide ended it within them, whether it ended),
    and counts_policy_tokens (it writes policy tokens: same tokenizer, or the dataset; otherwise through text). A
    model writes at most --guide-max-new-tokens of its tokens a row; the references are cut only by the budgets.
    `rng` is the script's mixing stream (checkpointed): it picks references and the servers' per-request seeds.
    send(examples, prefixes, budgets) starts a later write of the same rows ahead where that saves time (a server:
    in the background, while the policy updates; the caller puts `rng` back after it); elsewhere it does nothing."""
    if args.guide_references:
        guide = reference_guide(tokenizer, rng)
    elif args.guide_url:
        guide = server_guide(args, tokenizer, rng)
    else:
        guide = local_guide(args, tokenizer, device, dtype)
    if not args.guide_fetch_ahead or not hasattr(guide, "send"):  # (a local model shares the policy's device)
        guide.send = lambda examples, prefixes, budgets: None
    return with_stats(guide)


def with_stats(guide):
    """guide.stats(): what the guide did since the last call, for TensorBoard: the policy tokens asked for (the
    budgets) and returned, and a server's requests and retries, summed over the ranks (the whole batch's; every
    rank calls it); the seconds this rank's loop waited for it (timing/guide_s) and a server's mean latency
    (timing/guide_latency_s)."""
    write, transport = guide.write, getattr(guide, "transport_stats", dict)
    totals = dict.fromkeys(("timing/guide_s", "guide/tokens_asked", "guide/tokens_returned"), 0)

    def timed_write(examples, prefixes, budgets):
        started = time.monotonic()
        rows = write(examples, prefixes, budgets)
        totals["timing/guide_s"] += time.monotonic() - started
        totals["guide/tokens_asked"] += sum(budgets)
        totals["guide/tokens_returned"] += sum(len(tokens) - ended for tokens, ended in rows)
        return rows

    def stats():
        logs = dict(totals) | transport()
        totals.update(dict.fromkeys(totals, 0))
        counts = sorted(name for name in logs if name.startswith("guide/"))
        summed = distributed.sum_over_ranks(torch.tensor([logs[name] for name in counts], dtype=torch.float64))
        return logs | dict(zip(counts, summed.tolist()))

    guide.write, guide.stats = timed_write, stats
    return guide


def uses_template(args):
    """Whether the guide reads the task prompt inside a template (then never on the policy's token ids)."""
    return args.guide_prompt_template is not None or args.guide_chat_template


def guide_prompt(args, guide_tokenizer, prompt):
    """The guide's input before the policy's prefix: the task prompt in --guide-prompt-template ("{prompt}" replaced,
    other braces kept), then with --guide-chat-template as the user's turn of the guide's chat template, the
    assistant's turn opened (the prefix continues it). A BOS the template writes is left to the tokenizer where it
    adds one itself (so there is one)."""
    if args.guide_prompt_template is not None:
        prompt = args.guide_prompt_template.replace("{prompt}", prompt)
    if not args.guide_chat_template:
        return prompt
    text = guide_tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    bos = guide_tokenizer.bos_token
    if bos and text.startswith(bos) and guide_tokenizer("").input_ids[:1] == [guide_tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text


def text_inputs(args, tokenizer, guide_tokenizer, examples, prefixes):
    """Through text: the policy's text so far (its prompt, then its prefix decoded in context) and the guide's
    input, guide_prompt followed by the prefix's text."""
    contexts = [e["prompt"] + decode_in_context(tokenizer, e["prompt_ids"], p) for e, p in zip(examples, prefixes)]
    inputs = [guide_prompt(args, guide_tokenizer, e["prompt"]) + context[len(e["prompt"]) :]
              for e, context in zip(examples, contexts)]
    return contexts, inputs


def served_tokenizer(args):
    """--guide-url: the served model's tokenizer (--guide-tokenizer, else --guide-model's name where it loads), for
    its chat template and to learn whether it is the policy's; None where it cannot be loaded (through text)."""
    name = args.guide_tokenizer or args.guide_model
    try:
        return AutoTokenizer.from_pretrained(name) if name else None
    except (OSError, ValueError) as e:
        if args.guide_tokenizer or args.guide_chat_template:
            raise SystemExit(f"error: --guide-tokenizer {name}: cannot be loaded ({str(e).splitlines()[0][:200]})")
        print(f"guide: no tokenizer {name} to load (--guide-tokenizer names one): the guide's text is re-encoded",
              flush=True)
        return None


def min_new_tokens(args, prefixes, max_new_tokens):
    """Per row, the guide's minimum length after the policy's prefix: --guide-min-new-tokens counts the whole
    continuation, the prefix included (tril's min_length; the prefix in policy tokens), at most max_new_tokens[i]
    (a server refuses min_tokens > max_tokens)."""
    return [min(max(args.guide_min_new_tokens - len(prefix), 0), most) for prefix, most in zip(prefixes, max_new_tokens)]


def cut_to_budget(tokens, ended, budget, eos_token_id):
    """A continuation (EOS not included) as at most `budget` policy tokens: EOS appended where the guide ended
    within the budget."""
    ended = ended and len(tokens) < budget
    return tokens[:budget] + [eos_token_id] * ended, ended


def write_through_text(args, tokenizer, guide_tokenizer, examples, prefixes, budgets, sample):
    """Through text (the guide's tokens are not the policy's): each row asks for TEXT_MARGIN guide tokens per policy
    token it needs, and asks again, continuing its text, while it is short of its budget, did not end, and has asked
    for fewer than --guide-max-new-tokens guide tokens. The minimum length counts the prefix and what the guide
    wrote before. `sample(rows, inputs, max_tokens, min_tokens)` -> per row (text, ended)."""
    contexts, inputs = text_inputs(args, tokenizer, guide_tokenizer, examples, prefixes)
    cap = args.guide_max_new_tokens
    texts, ended, asked = [""] * len(inputs), [False] * len(inputs), [0] * len(inputs)
    tokens = [[] for _ in inputs]
    todo = [i for i in range(len(inputs)) if budgets[i] > 0]
    while todo:
        max_tokens = [min(cap - asked[i], int(TEXT_MARGIN * (budgets[i] - len(tokens[i]))) + 1) for i in todo]
        min_tokens = [min(max(args.guide_min_new_tokens - len(prefixes[i]) - asked[i], 0), most)
                      for i, most in zip(todo, max_tokens)]
        answers = sample(todo, [inputs[i] + texts[i] for i in todo], max_tokens, min_tokens)
        for i, most, (text, stopped) in zip(todo, max_tokens, answers):
            texts[i], ended[i], asked[i] = texts[i] + text, stopped, asked[i] + most
            tokens[i] = encode_in_context(tokenizer, contexts[i], texts[i])
        # short, not ended, budget left, and it wrote something (an empty answer would come back empty again)
        todo = [i for i, (text, _) in zip(todo, answers)
                if not ended[i] and text and len(tokens[i]) < budgets[i] and asked[i] < cap]
    return [cut_to_budget(t, e, b, tokenizer.eos_token_id) for t, e, b in zip(tokens, ended, budgets)]


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


class MinNewTokensPerRow(LogitsProcessor):
    """generate's min_new_tokens, one per row: no EOS in row i before it has `min_new_tokens[i]` new tokens (the
    guide's roll-outs here, and the policy's roll-outs after a roll-in in ppo_plus_plus.py and d2lols.py)."""

    def __init__(self, min_new_tokens, input_length, eos_token_id):
        self.min_new_tokens, self.input_length, self.eos_token_id = min_new_tokens, input_length, eos_token_id

    def __call__(self, input_ids, scores):
        too_short = input_ids.shape[1] - self.input_length < self.min_new_tokens
        is_eos = torch.arange(scores.shape[1], device=scores.device) == self.eos_token_id
        return scores.masked_fill(too_short[:, None] & is_eos, -float("inf"))  # (a copy: output_logits stay raw)


def local_guide(args, tokenizer, device, dtype):
    """A causal LM of its own (never the policy or a view of it), frozen, in eval mode."""
    guide_tokenizer = AutoTokenizer.from_pretrained(args.guide_model, padding_side="left")
    if guide_tokenizer.pad_token is None:
        guide_tokenizer.pad_token = guide_tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.guide_model, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    eos, pad = guide_tokenizer.eos_token_id, guide_tokenizer.pad_token_id
    model.generation_config = GenerationConfig(pad_token_id=pad, eos_token_id=eos)  # the --guide-* flags decide
    same_tokenizer = not uses_template(args) and guide_tokenizer.get_vocab() == tokenizer.get_vocab()

    @torch.inference_mode()
    def generate(inputs, max_tokens, min_tokens):
        """Sample a continuation of each input (guide token ids) of up to max_tokens[i] tokens, no EOS before
        min_tokens[i]; rows of like budgets share a call (sorted by budget, --rollout-batch-size at a time), so a
        call generates only as far as its longest row needs. Per row: its tokens (EOS cut off), whether it ended."""
        results = [None] * len(inputs)
        order = sorted(range(len(inputs)), key=lambda i: max_tokens[i])
        for start in range(0, len(order), args.rollout_batch_size):
            rows = order[start : start + args.rollout_batch_size]
            width = max(len(inputs[i]) for i in rows)
            input_ids = torch.tensor([[pad] * (width - len(inputs[i])) + inputs[i] for i in rows], device=device)
            attention_mask = torch.tensor([[0] * (width - len(inputs[i])) + [1] * len(inputs[i]) for i in rows],
                                          device=device)
            config = GenerationConfig(max_new_tokens=max(max_tokens[i] for i in rows), do_sample=True,
                                      temperature=args.guide_temperature, top_k=args.guide_top_k,
                                      top_p=args.guide_top_p, eos_token_id=eos, pad_token_id=pad)
            minimum = torch.tensor([min_tokens[i] for i in rows], device=device)
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                 logits_processor=[MinNewTokensPerRow(minimum, width, eos)])
            for i, tokens in zip(rows, out[:, width:].tolist()):
                tokens = tokens[: max_tokens[i]]
                ended = eos in tokens
                results[i] = (tokens[: tokens.index(eos)] if ended else tokens, ended)
        return results

    def write(examples, prefixes, budgets):
        """A guide that shares the policy's tokenizer gets the tokens directly (the same as the text round trip,
        without it) and writes each row's budget; otherwise through text."""
        if same_tokenizer:
            budgets = [min(budget, args.guide_max_new_tokens) for budget in budgets]
            inputs = [e["prompt_ids"] + prefix for e, prefix in zip(examples, prefixes)]
            samples = generate(inputs, budgets, min_new_tokens(args, prefixes, budgets))
            return [cut_to_budget(tokens, ended, budget, tokenizer.eos_token_id)
                    for (tokens, ended), budget in zip(samples, budgets)]

        def sample(rows, texts, max_tokens, min_tokens):  # its text, decoded after its input
            inputs = [guide_tokenizer(t).input_ids for t in texts]
            return [(decode_in_context(guide_tokenizer, ids, tokens), ended)
                    for ids, (tokens, ended) in zip(inputs, generate(inputs, max_tokens, min_tokens))]

        return write_through_text(args, tokenizer, guide_tokenizer, examples, prefixes, budgets, sample)

    return SimpleNamespace(write=write, counts_policy_tokens=same_tokenizer, model=model, tokenizer=guide_tokenizer,
                           source=f"the local model {args.guide_model}")


def reference_guide(tokenizer, rng):
    """The dataset as the guide: each prompt's reference continuation (where it has several, one drawn from `rng`),
    encoded in context after the prompt, EOS at its end, cut to the row's budget (never --guide-max-new-tokens:
    that is a model's)."""

    def write(examples, prefixes, budgets):
        if any(prefixes):
            raise ValueError("the references cannot continue a prefix: roll-in only")
        results = []
        for e, budget in zip(examples, budgets):
            reference = rng.choice(e["references"])
            tokens = tasks.continuation_ids(tokenizer, e["prompt"], reference, budget)
            ended = bool(tokens) and tokens[-1] == tokenizer.eos_token_id
            results.append((tokens, ended))
        return results

    return SimpleNamespace(write=write, counts_policy_tokens=True, source="the dataset's references")


class Refused(Exception):
    """The server refused a request (400, 422): its message."""


def key_stays_private(url):
    """Whether a key sent to `url` stays private: https, or plain http to this machine (a loopback address)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" or parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def server_guide(args, tokenizer, rng):
    """An OpenAI-compatible completions server (`openai` client, imported only with --guide-url), --guide-concurrency
    requests in flight. What the server takes is learnt before the first request (probe): the optional sampling
    fields (top_k, min_tokens: vLLM and SGLang take them; transformers serve and OpenAI do not: printed once), a list
    of prompts in one request (vLLM, SGLang: rows that ask for the same lengths share a request), and, where the
    served model's tokenizer is the policy's, token-id prompts answered with token ids (vLLM's return_token_ids: no
    text round trip, budgets in policy tokens); otherwise through text. Sampling: temperature, top_p, max_tokens, a
    seed per request where --guide-seed (drawn from `rng`: a resume is exact where the server honours it).
    finish_reason "stop" = the guide ended. A request that fails (429, 5xx, no connection, timeout) is retried for
    --guide-retry-seconds (retry_wait: Retry-After, else 1, 2, 4... s with jitter), each retry printed; then, on a
    stop signal, or on an answer that is not the API's shape, StopRun (the other requests give up with it)."""
    import openai

    credentials = CREDENTIALS.get(args.guide_url)
    if (os.environ.get("OPENAI_API_KEY") or credentials) and not key_stays_private(args.guide_url):
        what = "the password in --guide-url" if credentials else "the key in OPENAI_API_KEY"
        print(f"guide: {what} is sent in plain text to {urllib.parse.urlsplit(args.guide_url).hostname} (http, not "
              "this machine): anyone on the way can read it; https keeps it private", flush=True)
    basic_auth = credentials and {"Authorization": "Basic " + base64.b64encode(":".join(credentials).encode()).decode()}
    client = openai.OpenAI(base_url=args.guide_url, api_key=os.environ.get("OPENAI_API_KEY") or "none",
                           default_headers=basic_auth or None,
                           timeout=args.guide_timeout, max_retries=0)  # (our retries: printed, then StopRun)
    retried = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError)
    extra = {**({"top_k": args.guide_top_k} if args.guide_top_k else {}),
             **({"min_tokens": args.guide_min_new_tokens} if args.guide_min_new_tokens else {})}
    guide_tokenizer = served_tokenizer(args)
    same_tokenizer = (guide_tokenizer is not None and not uses_template(args)
                      and guide_tokenizer.get_vocab() == tokenizer.get_vocab())
    server = SimpleNamespace(lists=False, token_ids=False, probed=False)  # what the server takes: probe()
    stats = {"requests": 0, "retries": 0, "seconds": 0.0, "tokens_asked": 0}  # since the last stats() call
    failed, why, lock = threading.Event(), [], threading.Lock()  # a request failed for good: the run stops, and the
    # others give up at once

    def give_up(message):
        """The StopRun that ends the run: the first failure's message, whichever request raises it."""
        with lock:
            why.append(message)
            failed.set()
        return StopRun(why[0])

    def request(prompts, max_tokens, seed, fields, ledger=None, probing=False):
        """One request (prompts: a string, token ids, or a list of either) -> its choices in prompt order, counted in
        `ledger`: the rows' write's, which stats() counts with the write that takes them (None: a probe, whose
        retries alone count). `probing` what the server takes: a refusal or an answer of another shape is None (a
        failure is retried as always)."""
        count = len(prompts) if isinstance(prompts, list) and isinstance(prompts[0], (str, list)) else 1
        attempt, first_failure, started = 0, None, time.monotonic()
        while True:
            if failed.is_set():
                raise give_up(why[0])
            try:
                response = client.completions.create(model=args.guide_model, prompt=prompts, max_tokens=max_tokens,
                                                     temperature=args.guide_temperature, top_p=args.guide_top_p,
                                                     **({} if seed is None else {"seed": seed}),
                                                     extra_body=fields or None)
                break
            except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
                if probing:
                    return None
                raise Refused(f"({type(e).__name__}: {str(e).splitlines()[0][:100]} {str(e.body)[:200]})")
            except retried as e:  # (openai.APITimeoutError is an APIConnectionError)
                error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                first_failure = first_failure or time.monotonic()
                waited, wait = time.monotonic() - first_failure, retry_wait(attempt, retry_after(e))
                if attempt == args.guide_max_retries or waited + wait > args.guide_retry_seconds:
                    raise give_up(f"the guide server {args.guide_url} failed {attempt + 1} times in {waited:.0f} s "
                                  f"({error})")
                attempt += 1
                with lock:
                    (stats if ledger is None else ledger)["retries"] += 1
                print(f"guide: {args.guide_url}: {error}; retry {attempt} in {wait:.1f} s", flush=True)
                if wait_unless_stopped(wait, failed):
                    raise give_up(f"stopped while waiting to retry the guide server {args.guide_url} ({error})")
            except openai.APIError as e:  # 401, 404...: a retry would fail the same way
                if probing:
                    return None
                raise give_up(f"the guide server {args.guide_url} refused the request ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:100]} {str(getattr(e, 'body', ''))[:200]})")
            except Exception as e:  # anything else the client raises (a proxy's page that is not JSON): one line
                if probing:
                    return None
                raise give_up(f"the guide server {args.guide_url} answered what the client cannot read "
                              f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")
        choices = sorted(getattr(response, "choices", None) or [], key=lambda c: getattr(c, "index", 0))
        if not (len(choices) == count and all(isinstance(getattr(c, "text", None), str)
                                              and isinstance(getattr(c, "finish_reason", None), str) for c in choices)):
            if probing:
                return None
            raise give_up(f"the guide server {args.guide_url} answered out of the completions API's shape "
                          f"({str(response)[:200]})")
        if ledger is not None:
            with lock:
                ledger["requests"] += 1
                ledger["seconds"] += time.monotonic() - started
                ledger["tokens_asked"] += max_tokens * count
        return choices

    def refused(fields):
        """Whether the server refuses a one-token request with these sampling fields (400 or 422)."""
        try:
            request("Hello", 1, 0, fields)
            return False
        except Refused:
            return True

    def probe():
        """Before the first request: one small request with every optional field (each alone where it is refused):
        a field the server refuses is dropped, with one line; later refusals are errors (never matched against an
        error's words). Then two prompts in one request (token ids asking for token ids back,
        where the tokenizers are the same), and where that is not taken and the tokenizers are the same, one."""
        if extra and refused({**extra, **({"min_tokens": 1} if "min_tokens" in extra else {})}):
            for name in list(extra):
                if refused({name: 1 if name == "min_tokens" else extra[name]}):
                    del extra[name]
                    print(f"guide: {args.guide_url} does not take {name}: the guide samples without it", flush=True)
        hello = [guide_tokenizer("Hello").input_ids, guide_tokenizer("Hi").input_ids] if same_tokenizer else ["Hello", "Hi"]
        fields = {**extra, **({"min_tokens": 1} if "min_tokens" in extra else {}),
                  **({"return_token_ids": True} if same_tokenizer else {})}
        answer = request(hello, 1, 0, fields, probing=True)
        server.lists = answer is not None
        if answer is None and same_tokenizer:
            answer = request(hello[0], 1, 0, fields, probing=True)
        server.token_ids = answer is not None and same_tokenizer and all(
            isinstance(getattr(c, "token_ids", None), list) for c in answer)
        guide.counts_policy_tokens = server.token_ids
        server.probed = True

    def complete_all(prompts, max_tokens, min_tokens, seeds, ledger):
        """Every prompt's (text or token ids, whether it ended): rows that ask for the same lengths share a request
        where the server takes lists (its seed: the first row's), each its own otherwise; --guide-concurrency
        requests in flight."""
        def answer(rows):
            fields = {**extra, **({"min_tokens": min_tokens[rows[0]]} if "min_tokens" in extra else {}),
                      **({"return_token_ids": True} if server.token_ids else {})}
            batch = [prompts[i] for i in rows] if server.lists else prompts[rows[0]]
            seed = seeds[rows[0]] if args.guide_seed else None
            try:
                return request(batch, max_tokens[rows[0]], seed, fields, ledger)
            except Refused as e:
                raise give_up(f"the guide server {args.guide_url} refused the request {e}")

        groups = {}
        for i in range(len(prompts)):
            groups.setdefault((max_tokens[i], min_tokens[i]) if server.lists else i, []).append(i)
        results = [None] * len(prompts)
        for rows, choices in zip(groups.values(), pool.map(answer, groups.values())):
            for i, choice in zip(rows, choices):
                ended = choice.finish_reason == "stop"
                if server.token_ids:
                    tokens = list(choice.token_ids)
                    tokens = tokens[:-1] if ended and tokens and tokens[-1] == tokenizer.eos_token_id else tokens
                    results[i] = (tokens, ended)
                else:
                    results[i] = (choice.text, ended)
        return results

    pool = concurrent.futures.ThreadPoolExecutor(args.guide_concurrency)
    ahead, background, probe_lock = {}, concurrent.futures.ThreadPoolExecutor(1), threading.Lock()  # (send)

    def write_rows(examples, prefixes, budgets, seeds):
        """write's rows, and the requests they took (a ledger for stats)."""
        ledger = {"requests": 0, "retries": 0, "seconds": 0.0, "tokens_asked": 0}
        with probe_lock:
            if not server.probed:
                probe()
        if server.token_ids:  # the policy's tokens both ways: each row asks for its budget
            budgets = [min(budget, args.guide_max_new_tokens) for budget in budgets]
            inputs = [e["prompt_ids"] + prefix for e, prefix in zip(examples, prefixes)]
            todo = [i for i in range(len(inputs)) if budgets[i] > 0]
            samples = dict(zip(todo, complete_all([inputs[i] for i in todo], [budgets[i] for i in todo],
                                                  min_new_tokens(args, [prefixes[i] for i in todo],
                                                                 [budgets[i] for i in todo]),
                                                  [seeds[i] for i in todo], ledger)))
            return [cut_to_budget(*samples.get(i, ([], False)), budget, tokenizer.eos_token_id)
                    for i, budget in enumerate(budgets)], ledger

        def sample(rows, texts, max_tokens, min_tokens):  # a row asked again keeps its seed (its prompt is longer)
            return complete_all(texts, max_tokens, min_tokens, [seeds[i] for i in rows], ledger)

        return write_through_text(args, tokenizer, guide_tokenizer, examples, prefixes, budgets, sample), ledger

    def draw_seeds(examples, prefixes, budgets):
        """The rows' seeds, in order, before any request (the stream stays exact), and the call's key."""
        seeds = [rng.randrange(2**31) for _ in examples]
        return seeds, repr([(e["prompt_ids"], list(p), b, s) for e, p, b, s in zip(examples, prefixes, budgets, seeds)])

    def send(examples, prefixes, budgets):
        """Start writing these rows in the background: the write that asks for the same rows, budgets and seeds
        (the caller puts its random stream back, so the write draws the same seeds) takes the answer."""
        seeds, key = draw_seeds(examples, prefixes, budgets)
        ahead[key] = background.submit(write_rows, examples, prefixes, budgets, seeds)

    def write(examples, prefixes, budgets):
        seeds, key = draw_seeds(examples, prefixes, budgets)
        sent = ahead.pop(key, None)
        ahead.clear()  # (rows sent ahead that no write asked for are dropped)
        rows, ledger = sent.result() if sent else write_rows(examples, prefixes, budgets, seeds)
        with lock:
            for name, value in ledger.items():
                stats[name] += value
        return rows

    def transport_stats():
        """Since the last call: the requests for rows (not the probes), retries, mean latency, and the server's own
        tokens asked (max_tokens)."""
        with lock:
            out = {"guide/requests": stats["requests"], "guide/retries": stats["retries"],
                   "timing/guide_latency_s": stats["seconds"] / max(stats["requests"], 1),
                   "guide/server_tokens_asked": stats["tokens_asked"]}
            stats.update(requests=0, retries=0, seconds=0.0, tokens_asked=0)
        return out

    guide = SimpleNamespace(write=write, send=send, counts_policy_tokens=False, source=f"the server {args.guide_url}",
                            transport_stats=transport_stats, server=server)
    return guide
