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

import sys
import time
import urllib.parse
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor

from common import distributed, tasks
from common.text import decode_in_context, encode_in_context

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
    """the guide's top-k (0 = off; a server that takes it gets it either way, -1 when off: vLLM, SGLang take it,
    OpenAI does not) (None: the task's default)"""
    guide_top_p: float = 0.92
    """the guide's nucleus sampling"""
    guide_max_new_tokens: Optional[int] = None
    """a model guide writes at most this many of its tokens per sample (None: H; tldr 20, as tril); the references'
    budget is H"""
    guide_min_new_tokens: Optional[int] = None
    """no EOS from the guide before the whole response has this many tokens, a prefix it continues included (tril's
    min_length; a server gets it as min_tokens where set: vLLM, SGLang) (None: imdb 48, commongen and tldr 5)"""
    guide_concurrency: int = 64
    """--guide-url: requests in flight at once, per rank (with --no-guide-seed, a server that takes lists of prompts,
    as vLLM and SGLang do, gets the rows that ask for the same lengths in one request)"""
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
        from common.guide_client import ServerGuide  # (openai, imported only with --guide-url)

        guide = ServerGuide(args, tokenizer, rng)
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


def min_tokens(args, written, most):
    """The guide's minimum length for one request: --guide-min-new-tokens counts the whole continuation (tril's
    min_length), `written` tokens of it already there (the policy's prefix, in policy tokens, and what the guide wrote
    before), at most `most`, the request's maximum (a server refuses min_tokens > max_tokens)."""
    return min(max(args.guide_min_new_tokens - written, 0), most)


def cut_to_budget(tokens, ended, budget, eos_token_id):
    """A continuation (EOS not included) as at most `budget` policy tokens: EOS appended where the guide ended
    within the budget."""
    ended = ended and len(tokens) < budget
    return tokens[:budget] + [eos_token_id] * ended, ended


def write_policy_tokens(args, tokenizer, examples, prefixes, budgets, sample):
    """On the policy's token ids (the guide shares its tokenizer): each row asks for its budget (at most
    --guide-max-new-tokens) after its prompt and prefix, and gets it, EOS appended where the guide ended within it.
    `sample(rows, inputs, max_tokens, min_tokens)` -> per row (its tokens, EOS cut off, whether it ended)."""
    budgets = [min(budget, args.guide_max_new_tokens) for budget in budgets]
    todo = [i for i in range(len(budgets)) if budgets[i] > 0]
    samples = dict(zip(todo, sample(todo, [examples[i]["prompt_ids"] + prefixes[i] for i in todo],
                                    [budgets[i] for i in todo],
                                    [min_tokens(args, len(prefixes[i]), budgets[i]) for i in todo])))
    return [cut_to_budget(*samples.get(i, ([], False)), budget, tokenizer.eos_token_id)
            for i, budget in enumerate(budgets)]


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
        min_tokens_ = [min_tokens(args, len(prefixes[i]) + asked[i], most) for i, most in zip(todo, max_tokens)]
        answers = sample(todo, [inputs[i] + texts[i] for i in todo], max_tokens, min_tokens_)
        for i, most, (text, stopped) in zip(todo, max_tokens, answers):
            texts[i], ended[i], asked[i] = texts[i] + text, stopped, asked[i] + most
            tokens[i] = encode_in_context(tokenizer, contexts[i], texts[i])
        # short, not ended, budget left, and it wrote something (an empty answer would come back empty again)
        todo = [i for i, (text, _) in zip(todo, answers)
                if not ended[i] and text and len(tokens[i]) < budgets[i] and asked[i] < cap]
    return [cut_to_budget(t, e, b, tokenizer.eos_token_id) for t, e, b in zip(tokens, ended, budgets)]


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
            return write_policy_tokens(args, tokenizer, examples, prefixes, budgets,
                                       lambda rows, inputs, max_tokens, min_tokens: generate(inputs, max_tokens, min_tokens))

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
