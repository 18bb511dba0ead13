"""The guide at GPU scale (common/guide.py and each guided script's own calls): per-row budgets in policy tokens,
the references' budget (the horizon, never a model guide's), short answers asked again through text, and samples
that are empty."""

import glob
import json
import os
import random
import threading
import time
from types import SimpleNamespace

import pytest
import torch

import aggrevated
import d2lols
import ppo_plus_plus
from common import guide as guides
from common import guide_client, stopping
from conftest import Spy, module_name, read_tensorboard, run_script_in_process, set_flags
from guide_server import GuideServer
from test_checkpoints import StopIn, logged
from test_guide_sources import http_args, served  # noqa: F401 (a fixture)
from test_guided import make_args

ROLL_IN_MODULES = [ppo_plus_plus, d2lols]  # the guide writes the first k tokens (D2LOLS: after tau)
ROLL_OUT_MODULES = [aggrevated, d2lols]  # the guide continues the policy's first k tokens (D2LOLS: before tau)


def rows(tokenizer, n, reference=" " + " ".join(["word"] * 40) + "."):
    """n examples whose prompts differ (a reference taken from the wrong row would show), each with one long
    reference."""
    texts = [f"the movie number {i} was" for i in range(n)]
    return [{"prompt": t, "prompt_ids": tokenizer(t).input_ids, "references": [f" row {i}" + reference]}
            for i, t in enumerate(texts)]


@pytest.mark.parametrize("module", ROLL_IN_MODULES, ids=module_name)
def test_reference_roll_ins_reach_the_horizon_whatever_a_model_guides_budget(assets, module):
    """DR-PO on TL;DR: H = 50 and --guide-max-new-tokens 20 (a model guide's budget, as tril) once cut every
    reference to 20 tokens, so k stayed in 1..19. The references' budget is the horizon: k reaches H - 1."""
    tokenizer = assets["tokenizer"]
    H = 12
    args = make_args(module, 1.0, max_new_tokens=H, guide_max_new_tokens=4, guide_references=True)
    guide = guides.load_guide(args, tokenizer, "cpu", torch.float32, random.Random(0))
    batch = rows(tokenizer, 200)
    roll_ins = module.guide_roll_in(guide, tokenizer, batch, args, "cpu", random.Random(1))
    lengths = [len(r) for r in roll_ins]
    assert min(lengths) >= 1 and max(lengths) == H - 1 and len(set(lengths)) == H - 1  # k ~ U{1..H-1}
    for e, roll_in in zip(batch, roll_ins):  # each row's own reference, from its start
        full = tokenizer(e["prompt"] + e["references"][0]).input_ids[len(e["prompt_ids"]) :]
        assert roll_in == full[: len(roll_in)]


@pytest.mark.parametrize("module", ROLL_IN_MODULES, ids=module_name)
def test_a_roll_in_asks_for_k_plus_one_tokens_per_row(assets, module):
    """Where the guide counts policy tokens, row i's budget is its k + 1 (k drawn first), not the batch's largest."""
    tokenizer = assets["tokenizer"]
    asked = []

    def write(examples, prefixes, budgets):
        asked.extend(budgets)
        return [([5] * budget, False) for budget in budgets]

    args = make_args(module, 1.0, max_new_tokens=12)
    roll_ins = module.guide_roll_in(SimpleNamespace(write=write, counts_policy_tokens=True), tokenizer,
                                    rows(tokenizer, 50), args, "cpu", random.Random(0))
    assert asked == [len(r) + 1 for r in roll_ins] and len(set(asked)) > 3


@pytest.mark.parametrize("module", ROLL_OUT_MODULES, ids=module_name)
def test_a_roll_out_asks_for_the_rest_of_the_horizon_per_row(assets, module):
    """The guide continues a prefix of k policy tokens for H - k of them, row by row."""
    tokenizer = assets["tokenizer"]
    from transformers import AutoModelForCausalLM
    from test_guided import policy_config

    policy = AutoModelForCausalLM.from_pretrained(assets["policy"]).eval()
    asked, H = [], 8

    def write(examples, prefixes, budgets):
        asked.extend(zip(map(len, prefixes), budgets))
        return [([5] * budget, False) for budget in budgets]

    args = make_args(module, 1.0, max_new_tokens=H)
    torch.manual_seed(0)
    module.guide_roll_out(policy, SimpleNamespace(write=write, counts_policy_tokens=True), tokenizer,
                          rows(tokenizer, 16), policy_config(tokenizer, H), args, "cpu", random.Random(0))
    assert asked and all(budget == H - k for k, budget in asked) and len({k for k, _ in asked}) > 1


@pytest.mark.parametrize("module", ROLL_IN_MODULES, ids=module_name)
@pytest.mark.parametrize("sample", [([], False), ([], True)], ids=["empty-not-ended", "empty-ended"])
def test_an_empty_sample_is_a_plain_episode(assets, module, sample):
    """A guide's sample with no tokens (a server's "" with finish_reason "length", or text that encodes to nothing)
    is no roll-in point: a plain PPO episode, not a crash (rng.randint(1, -1))."""
    tokenizer = assets["tokenizer"]
    guide = SimpleNamespace(write=lambda examples, prefixes, budgets: [sample] * len(examples),
                            counts_policy_tokens=True)
    roll_ins = module.guide_roll_in(guide, tokenizer, rows(tokenizer, 6), make_args(module, 1.0), "cpu",
                                    random.Random(0))
    assert roll_ins == [[]] * 6


def test_an_empty_answer_through_text_is_not_asked_again(assets):
    """A served guide that answers "" with finish_reason "length": nothing to continue, so no second request (it
    would answer "" again, for ever); and a guide that returned nothing for any row of the iteration stops the run
    with one line, where it once ran on as plain PPO."""
    tokenizer = assets["tokenizer"]
    args = make_args(ppo_plus_plus, 1.0, guide_model="toy", guide_top_k=0)
    with GuideServer(marker="") as server:
        args.guide_url = server.url
        guide = guides.load_guide(args, tokenizer, "cpu", torch.float32, random.Random(0))
        with pytest.raises(stopping.StopRun, match=f"the guide server {server.url} returned nothing for any of the 2"):
            guide.write(rows(tokenizer, 2), [[], []], [4, 4])
    assert len(server.rows()) == 2


def test_min_tokens_never_exceeds_max_tokens(assets):
    """vLLM answers 400 "min_tokens must be less than or equal to max_tokens": every request keeps min <= max, a
    short budget included."""
    tokenizer = assets["tokenizer"]
    args = make_args(ppo_plus_plus, 1.0, guide_model="toy", guide_top_k=0, guide_min_new_tokens=20)
    with GuideServer(marker=" movie movie", body=None) as server:
        args.guide_url = server.url
        guides.load_guide(args, tokenizer, "cpu", torch.float32, random.Random(0)).write(
            rows(tokenizer, 3), [[], [], []], [1, 2, 6])
    assert server.requests and all(r["min_tokens"] <= r["max_tokens"] for r in server.requests)


def test_a_json_answer_that_is_not_json_stops_with_one_line(assets):
    """A 200 with a JSON content type and a body that is not JSON (a proxy's error page): StopRun naming the URL,
    not a JSONDecodeError traceback."""
    tokenizer = assets["tokenizer"]
    args = make_args(ppo_plus_plus, 1.0, guide_model="toy", guide_top_k=0)
    with GuideServer(body=lambda request: (200, b"<html><body>502 Bad Gateway</body></html>")) as server:
        args.guide_url = server.url
        guide = guides.load_guide(args, tokenizer, "cpu", torch.float32, random.Random(0))
        with pytest.raises(stopping.StopRun, match=f"the guide server {server.url} .*"):
            guide.write(rows(tokenizer, 2), [[], []], [4, 4])


@pytest.mark.parametrize("script", ["ppo_plus_plus.py", "aggrevated.py", "d2lols.py"])
@pytest.mark.slow
def test_a_dead_guide_under_save_every_0_still_keeps_the_weights(assets, tmp_path, monkeypatch, script):
    """--save-every 0 (the default) and a guide that stays down: the weights of the last completed iteration are
    still there, so they are written (checkpoints/{run_name}) and the stop line says how to resume;
    --no-guide-failure-checkpoint writes nothing."""
    import glob
    import socket

    from conftest import run_script_in_process
    from test_guide_sources import http_args

    monkeypatch.setattr(guide_client, "RETRY_WAIT", 0.01)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    for keep in (True, False):
        cwd = tmp_path / str(keep)
        cwd.mkdir()
        args = http_args(assets, script, url, "--save-every", 0, "--beta", 1)
        with pytest.raises(SystemExit) as stop:
            run_script_in_process(script, args + ([] if keep else ["--no-guide-failure-checkpoint"]), cwd)
        message = str(stop.value.code)
        assert message.startswith(f"error: the guide server {url} failed")
        folders = glob.glob(str(cwd / "checkpoints" / "*"))
        if keep:
            assert "after iteration 0/2; checkpoint: checkpoints/" in message and "resume with: " in message
            assert len(folders) == 1
            with open(os.path.join(folders[0], "state.json")) as f:
                assert json.load(f)["iteration"] == 0
        else:
            assert "without a checkpoint" in message and not folders


# -- retries that outlive a server's restart ---------------------------------------------------------------------

def served_args(url, **flags):
    args = make_args(ppo_plus_plus, 1.0, **({"guide_model": "toy", "guide_top_k": 0, "guide_concurrency": 1} | flags))
    args.guide_url = url
    return args


@pytest.mark.slow
def test_a_server_down_for_longer_than_five_retries_is_waited_for(assets, monkeypatch):
    """A server that fails 8 times in a row (a restart) within --guide-retry-seconds: the request goes through (a
    fixed count of 5 retries once ended the run here)."""
    monkeypatch.setattr(guide_client, "RETRY_WAIT", 0.01)
    tokenizer = assets["tokenizer"]
    with GuideServer(marker=" movie", fail_first=8) as server:
        guide = guides.load_guide(served_args(server.url, guide_retry_seconds=60.0), tokenizer, "cpu", torch.float32,
                                  random.Random(0))
        assert len(guide.write(rows(tokenizer, 1), [[]], [1])) == 1
    assert len(server.requests) == 11  # 8 failures, the probe of what the server takes (its fields, a list), the row


@pytest.mark.slow
def test_retry_after_is_honoured(assets, monkeypatch):
    """A 503 with Retry-After: 0.6 is retried after 0.6 s, not after the client's own (here 0.01 s) wait."""
    monkeypatch.setattr(guide_client, "RETRY_WAIT", 0.01)
    tokenizer = assets["tokenizer"]
    with GuideServer(marker=" movie", fail_first=1, retry_after=0.6) as server:
        guide = guides.load_guide(served_args(server.url), tokenizer, "cpu", torch.float32, random.Random(0))
        guide.write(rows(tokenizer, 1), [[]], [1])
    assert len(server.times) == 4 and server.times[1] - server.times[0] >= 0.6  # (the probe's two; the row)


def test_the_wait_has_jitter_and_a_ceiling():
    waits = [guide_client.retry_wait(attempt) for attempt in (0, 0, 0, 0, 10)]
    assert all(0.5 * guide_client.RETRY_WAIT <= w < 1.5 * guide_client.RETRY_WAIT for w in waits[:4]) and len(set(waits[:4])) == 4
    assert waits[4] < 1.5 * guide_client.MAX_RETRY_WAIT and guide_client.retry_wait(3, asked=7.0) == 7.0


def test_retry_after_as_a_date():
    date = __import__("email.utils").utils.formatdate(__import__("time").time() + 100, usegmt=True)
    error = SimpleNamespace(response=SimpleNamespace(headers={"retry-after": date}))
    assert 90 < guide_client.retry_after(error) <= 100
    assert guide_client.retry_after(SimpleNamespace(response=SimpleNamespace(headers={"retry-after": "2.5"}))) == 2.5
    assert guide_client.retry_after(SimpleNamespace()) is None


def test_a_stop_signal_ends_the_wait_for_a_retry(assets, monkeypatch):
    """Ctrl-C while a request waits to be retried (here 20 s): the wait ends at once and the run stops (StopRun:
    the loop writes the last completed iteration's checkpoint), instead of sleeping the wait out."""
    import signal
    import socket
    import threading
    import time

    from common import stopping

    monkeypatch.setattr(guide_client, "RETRY_WAIT", 20.0)
    monkeypatch.setattr(guide_client, "JITTER", SimpleNamespace(random=lambda: 0.5))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    tokenizer = assets["tokenizer"]
    guide = guides.load_guide(served_args(url), tokenizer, "cpu", torch.float32, random.Random(0))
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        stopping.stop_on_signals()
        threading.Timer(0.5, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)).start()
        started = time.monotonic()
        with pytest.raises(stopping.StopRun, match="stopped while waiting to retry"):
            guide.write(rows(tokenizer, 1), [[]], [1])
        assert time.monotonic() - started < 5
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        stopping.RECEIVED.clear()


# -- the key ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("url,warned", [("http://gpu-node.example:8000/v1", True), ("http://10.1.2.3:8000/v1", True),
                                        ("https://api.example.com/v1", False), ("http://127.0.0.1:8000/v1", False),
                                        ("http://localhost:8000/v1", False), ("http://[::1]:8000/v1", False)])
def test_a_key_sent_in_plain_text_to_another_host_is_said_once(assets, monkeypatch, capsys, url, warned):
    """The key goes to whatever --guide-url names: over plain http to another machine, one line says so at start
    (naming the host, never the key); https and loopback are quiet."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value")
    guides.load_guide(served_args(url), assets["tokenizer"], "cpu", torch.float32, random.Random(0))
    out = capsys.readouterr().out
    assert ("sent in plain text" in out) == warned and "sk-secret-value" not in out
    if warned:
        said = [line for line in out.splitlines() if "plain text" in line]
        assert len(said) == 1 and __import__("urllib.parse").parse.urlsplit(url).hostname in said[0]


def test_no_secret_reaches_any_output_on_the_fault_path(assets, served, tmp_path, monkeypatch, capsys):
    """A key (OPENAI_API_KEY) and a user:password@ in --guide-url, and a server that answers 503 until the run
    gives up: the server gets the password as HTTP basic auth on every request, no request follows the one that gave
    up (the rows waiting in other threads give up with it), and neither secret is in what the run prints (retry lines, the stop line, the resume command), in runs/ or in the checkpoint it leaves."""
    import base64
    import glob

    from conftest import run_script_in_process
    from test_guide_sources import KEY, http_args

    password = "pw-4e9b-that-must-not-leak"
    monkeypatch.setattr(guide_client, "RETRY_WAIT", 0.01)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with GuideServer(*served, fail_first=10**6) as server:
        url = server.url.replace("http://", f"http://trainer:{password}@")
        with pytest.raises(SystemExit) as stop:
            run_script_in_process("ppo_plus_plus.py", http_args(assets, "ppo_plus_plus.py", url, "--beta", 1),
                                  tmp_path)
    basic = "Basic " + base64.b64encode(f"trainer:{password}".encode()).decode()
    assert len(server.requests) == 3 and set(server.headers) == {basic}  # the first try and --guide-max-retries 2
    message, printed = str(stop.value.code), capsys.readouterr()
    assert "retry 2 in" in printed.out and "resume with: " in message and f"--guide-url {server.url} " in message
    files = [f for f in glob.glob(str(tmp_path / "**" / "*"), recursive=True) if os.path.isfile(f)]
    assert any("/runs/" in f for f in files) and any("/checkpoints/" in f for f in files)
    for secret in (KEY, password):
        assert secret not in message + printed.out + printed.err
        for f in files:
            assert secret.encode() not in open(f, "rb").read(), f


# -- which sampling fields a server takes: one small request at start -------------------------------------------

def test_the_fields_a_server_takes_are_learnt_by_one_request_not_by_an_errors_words(assets, capsys):
    """A server that refuses top_k with a message that does not name it (pydantic's "Extra inputs are not
    permitted"): the first request (one token, every optional field) is refused, each field alone tells which, top_k
    is dropped with one line and min_tokens kept. A later refusal (the context is too long) is an error, not a
    field to drop."""
    tokenizer = assets["tokenizer"]
    error = {"object": "error", "message": "Extra inputs are not permitted", "type": "BadRequestError", "code": 400}

    def body(request):
        if "top_k" in request:
            return 400, error
        if len(request["prompt"]) > 60:
            return 400, {**error, "message": "This model's maximum context length is 16 tokens."}
        return 200, {"id": "c", "object": "text_completion", "created": 0, "model": request["model"],
                     "choices": [{"index": 0, "text": " movie", "finish_reason": "stop", "logprobs": None}]}

    args = served_args(None, guide_top_k=5, guide_min_new_tokens=2)
    with GuideServer(body=body) as server:
        args.guide_url = server.url
        guide = guides.load_guide(args, tokenizer, "cpu", torch.float32, random.Random(0))
        assert len(guide.write(rows(tokenizer, 2), [[], []], [3, 3])) == 2
        with pytest.raises(stopping.StopRun, match="refused the request .*maximum context length"):
            guide.write([{"prompt": "x" * 80, "prompt_ids": tokenizer("x" * 80).input_ids}], [[]], [3])
    printed = capsys.readouterr().out
    assert printed.count("does not take") == 1 and f"guide: {server.url} does not take top_k" in printed
    probes = [r for r in server.requests if r["max_tokens"] == 1 and r["prompt"] == "Hello"]
    assert len(probes) == 4  # all fields (top_k, repetition_penalty, min_tokens), then each alone
    later = server.rows()
    assert all("top_k" not in r and r["min_tokens"] >= 0 for r in later) and len(later) == 3


@pytest.mark.parametrize("module", ROLL_IN_MODULES, ids=module_name)
def test_rollout_chunks_group_rows_of_like_k(assets, monkeypatch, module):
    """Roll-ins of 5, 0, 5, 0, 5, 0 tokens, 3 rows a generate call: grouped by k, one call writes H - 5 tokens and
    one H (in batch order every call would hold a k = 0 row and write H); each row keeps its own episode."""
    from transformers import AutoModelForCausalLM
    from test_guided import policy_config

    tokenizer, H = assets["tokenizer"], 8
    policy = AutoModelForCausalLM.from_pretrained(assets["policy"]).eval()
    roll_ins = [[9] * 5, [], [9] * 5, [], [9] * 5, []]
    asked, generate = [], policy.generate
    monkeypatch.setattr(policy, "generate", lambda **kw: asked.append(kw["generation_config"].max_new_tokens)
                        or generate(**kw))
    prompts = [e["prompt_ids"] for e in rows(tokenizer, 6)]
    _, _, episodes, mask, _, policy_mask = module.rollout(policy, tokenizer, prompts, policy_config(tokenizer, H),
                                                          make_args(module, 1.0, max_new_tokens=H), "cpu", roll_ins)
    assert sorted(asked) == [H - 5, H]
    assert policy_mask.sum(1).tolist() == [H - 5, H, H - 5, H, H - 5, H]
    for i, roll_in in enumerate(roll_ins):  # each row's roll-in is where it belongs
        assert episodes[i, : len(roll_in)].tolist() == roll_in


# -- a server that takes lists of prompts and token ids (vLLM's shapes: tests/guide_server.py names the version) ------

def budgets_and_prefixes(tokenizer):
    """Six rows, roll-ins and roll-outs, whose budgets and minimum lengths (4 less the prefix) differ and repeat:
    three pairs ask for the same (max_tokens, min_tokens)."""
    prefixes = [[], [], [], tokenizer(" the film").input_ids, tokenizer(" the movie").input_ids, []]
    assert len(prefixes[3]) == len(prefixes[4]) == 2
    return prefixes, [4, 5, 4, 3, 3, 5]


def test_a_vllm_guide_with_the_policys_tokenizer_gets_lists_of_token_ids_and_answers_in_token_ids(assets):
    """vLLM serving a model with the policy's tokenizer (--guide-tokenizer names it): rows that ask for the same
    lengths share a request, each prompt the policy's token ids (its prompt, then its prefix), answered with token
    ids (return_token_ids), each row its own (the server answers a prompt with its tokens reversed: rows differ)."""
    tokenizer = assets["tokenizer"]
    batch, (prefixes, budgets) = rows(tokenizer, 6), budgets_and_prefixes(tokenizer)
    expected = [((e["prompt_ids"] + p)[::-1][:b], False) for e, p, b in zip(batch, prefixes, budgets)]
    assert len({tuple(t) for t, _ in expected}) == 6
    args = make_args(ppo_plus_plus, 1.0, guide_model="toy", guide_tokenizer=assets["policy"], guide_top_k=0,
                     guide_min_new_tokens=4, guide_seed=False)  # (seeded, each row is a request of its own)
    with GuideServer(tokenizer=tokenizer, vllm=True, reverse=True) as server:
        args.guide_url = server.url
        guide = guides.load_guide(args, tokenizer, "cpu", torch.float32, random.Random(0))
        assert guide.write(batch, prefixes, budgets) == expected
    assert guide.counts_policy_tokens
    asked = server.rows()
    assert len(asked) == 3 and sum(len(r["prompt"]) for r in asked) == 6  # (4, 4), (5, 4) and (3, 2)
    for r in asked:
        assert r["return_token_ids"] and all(isinstance(p, list) and all(isinstance(t, int) for t in p)
                                             for p in r["prompt"])
        assert r["min_tokens"] <= r["max_tokens"]
    assert sorted(map(tuple, (p for r in asked for p in r["prompt"]))) == sorted(
        tuple(e["prompt_ids"] + p) for e, p in zip(batch, prefixes))


def test_a_vllm_guide_with_another_tokenizer_gets_lists_of_text(assets):
    """No tokenizer to load for the served name: through text, rows that ask for the same lengths in one request,
    the same continuations a server of one prompt a request (transformers serve) gives."""
    tokenizer = assets["tokenizer"]
    batch, (prefixes, budgets) = rows(tokenizer, 6), budgets_and_prefixes(tokenizer)
    results = []
    for vllm in (False, True):
        args = make_args(ppo_plus_plus, 1.0, guide_model="toy", guide_top_k=0, guide_min_new_tokens=4, guide_seed=False)
        with GuideServer(tokenizer=tokenizer, vllm=vllm, reverse=True) as server:
            args.guide_url = server.url
            guide = guides.load_guide(args, tokenizer, "cpu", torch.float32, random.Random(0))
            results.append(guide.write(batch, prefixes, budgets))
        assert not guide.counts_policy_tokens
        shapes = {type(r["prompt"]) for r in server.rows()}
        assert shapes == ({list} if vllm else {str}) and (len(server.rows()) < 6) == vllm
    assert results[0] == results[1] and len({tuple(t) for t, _ in results[0]}) == 6


@pytest.mark.parametrize("seeded", [True, False])
def test_the_per_request_seed_is_a_flag(assets, served, seeded):
    tokenizer = assets["tokenizer"]
    args = make_args(ppo_plus_plus, 1.0, guide_model="toy", guide_top_k=0, guide_seed=seeded)
    with GuideServer(*served, vllm=True) as server:
        args.guide_url = server.url
        guides.load_guide(args, tokenizer, "cpu", torch.float32, random.Random(0)).write(
            rows(tokenizer, 3), [[]] * 3, [2, 3, 4])
    assert server.rows() and all(isinstance(r.get("seed"), int) == seeded for r in server.rows())


def test_the_guides_transport_is_counted_for_tensorboard(assets, served):
    """guide.stats(): since the last call, the policy tokens asked for (the budgets) and returned, the seconds
    waited, and a server's requests for rows, retries and latency; then back to 0."""
    tokenizer = assets["tokenizer"]
    args = make_args(ppo_plus_plus, 1.0, guide_model="toy", guide_top_k=0, guide_concurrency=1)
    with GuideServer(*served, fail_first=1) as server:
        args.guide_url = server.url
        guide = guides.load_guide(args, tokenizer, "cpu", torch.float32, random.Random(0))
        written = guide.write(rows(tokenizer, 3), [[]] * 3, [2, 3, 4])
        stats, again = guide.stats(), guide.stats()
    assert stats["guide/tokens_asked"] == 9 and stats["guide/tokens_returned"] == sum(
        len(t) - e for t, e in written) > 0
    assert stats["guide/requests"] == len(server.rows()) == 3 and stats["guide/retries"] == 1  # (the probe of lists:
    # refused, not counted; the first try failed and was retried)
    assert stats["timing/guide_latency_s"] > 0 and stats["timing/guide_s"] >= stats["timing/guide_latency_s"]
    assert all(value == 0 for value in again.values())


# -- instruct guides: a chat template, and templates with braces -------------------------------------------------

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_an_instruct_guide_reads_its_chat_template_and_braces_are_text(assets, served, tmp_path):
    """--guide-chat-template: the task prompt (in --guide-prompt-template, whose other braces are text: str.format
    once raised KeyError) is the user's turn of the guide tokenizer's own template, the policy's prefix continues the
    assistant's turn; through text (a template: never token ids), to a server as to a local model."""
    from transformers import AutoTokenizer

    tokenizer = assets["tokenizer"]
    chat = AutoTokenizer.from_pretrained(assets["toy_guide"])
    chat.chat_template = CHAT_TEMPLATE
    chat.save_pretrained(tmp_path / "chat")
    batch, prefix = rows(tokenizer, 2), tokenizer(" the film").input_ids
    args = make_args(ppo_plus_plus, 1.0, guide_model="toy", guide_tokenizer=str(tmp_path / "chat"), guide_top_k=0,
                     guide_chat_template=True, guide_prompt_template="Review {as JSON} {prompt}")
    expected = [f"</s><|user|>Review {{as JSON}} {e['prompt']}\n<|assistant|>" + text
                for e, text in zip(batch, ["", " the film"])]
    with GuideServer(*served, vllm=True) as server:
        args.guide_url = server.url
        guide = guides.load_guide(args, tokenizer, "cpu", torch.float32, random.Random(0))
        guide.write(batch, [[], prefix], [2, 2])
    assert not guide.counts_policy_tokens
    assert sorted(p for r in server.rows() for p in r["prompt"]) == sorted(expected)


def test_a_bos_the_chat_template_writes_is_left_to_a_tokenizer_that_adds_its_own():
    class Tokenizer:
        bos_token, bos_token_id = "<s>", 1

        def __init__(self, adds_bos):
            self.adds_bos = adds_bos

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return f"<s>[user] {messages[0]['content']} [assistant]"

        def __call__(self, text):
            return SimpleNamespace(input_ids=[1] * self.adds_bos)

    args = SimpleNamespace(guide_prompt_template=None, guide_chat_template=True)
    assert guides.guide_prompt(args, Tokenizer(True), "hi {x}") == "[user] hi {x} [assistant]"
    assert guides.guide_prompt(args, Tokenizer(False), "hi {x}") == "<s>[user] hi {x} [assistant]"


# -- roll-ins fetched ahead: asked for while the policy updates ----------------------------------------------------

class Slow(Spy):
    """Records when the loop calls the helper and how many requests the server had by then and on return; sleeps
    `seconds` after each call (a slow update)."""

    def __init__(self, server, seconds=0.0):
        super().__init__()
        self.server, self.seconds, self.times = server, seconds, []

    def wrap(self, function):
        recorded = super().wrap(function)

        def wrapper(*args, **kwargs):
            before = len(self.server.rows())
            result = recorded(*args, **kwargs)
            self.times.append((before, len(self.server.rows())))
            time.sleep(self.seconds)
            return result

        return wrapper


@pytest.mark.parametrize("module", ROLL_IN_MODULES, ids=module_name)
@pytest.mark.slow
def test_roll_ins_fetched_ahead_reach_the_server_before_their_rollout_and_change_nothing(assets, served, tmp_path,
                                                                                         module):
    """A server that takes D = 0.5 s an answer, an update that takes 1 s: with --guide-fetch-ahead, iteration i's
    roll-ins (i >= 2; D2LOLS: after tau = 1) were all asked for before iteration i asks the guide, none twice,
    and the loop waits < D/2 for them, against >= D without; both runs ask the same rows, budgets and seeds and
    log the same (the guide's counters included: a request counts with the iteration that takes its rows)."""
    script, delay = f"{module.__name__}.py", 0.5
    runs = {}
    for ahead in (True, False):
        with GuideServer(*served, delay=delay) as server:
            args = http_args(assets, script, server.url, "--total-episodes", 12, "--beta", 1)
            args = args + ([] if ahead else ["--no-guide-fetch-ahead"])
            asked, update = Slow(server), Slow(server, seconds=1.0)
            (tmp_path / str(ahead)).mkdir()
            run_script_in_process(script, args, tmp_path / str(ahead),
                                  spies={"guide_roll_in": asked, "normalize_advantages": update})
            runs[ahead] = (asked.times, sorted((json.dumps(r["prompt"]), r["max_tokens"], r.get("seed"))
                                               for r in server.rows()), read_tensorboard(tmp_path / str(ahead)))
    (with_ahead, requests, events), (without, requests_without, events_without) = runs[True], runs[False]
    roll_ins = 3 if module is ppo_plus_plus else 2  # (D2LOLS's iteration 1 is AggreVaTeD's: the guide rolls out)
    assert len(with_ahead) == len(without) == roll_ins and requests == requests_without
    assert [after - before > 0 for before, after in without] == [True] * roll_ins  # asked when the rollout needs them
    assert [after - before > 0 for before, after in with_ahead] == [True, False, False][3 - roll_ins :]  # before
    assert logged(events) == logged(events_without)
    waits = [e.value for e in events.Scalars("timing/guide_s")]
    waits_without = [e.value for e in events_without.Scalars("timing/guide_s")]
    assert max(waits[1:]) < delay / 2 and min(waits_without) >= delay


@pytest.mark.slow
def test_a_run_stopped_with_roll_ins_sent_ahead_resumes_exactly(assets, served, tmp_path):
    """Ctrl-C in iteration 2 (its roll-ins for iteration 3 already sent): the checkpoint is iteration 2's, and the
    resumed run logs what a run never stopped logs (its random stream is that of a run without fetch-ahead)."""
    script = "ppo_plus_plus.py"
    with GuideServer(*served) as server:
        args = http_args(assets, script, server.url, "--total-episodes", 16, "--beta", 1, "--save-every", 4)
        (tmp_path / "whole").mkdir()
        run_script_in_process(script, args, tmp_path / "whole")
        (tmp_path / "stopped").mkdir()
        with pytest.raises(SystemExit):
            run_script_in_process(script, args, tmp_path / "stopped",
                                  spies={"kl_penalized_rewards": StopIn(2, 1, "signal")})
        [folder] = glob.glob(str(tmp_path / "stopped" / "checkpoints" / "*"))
        run_script_in_process(script, set_flags(args, "--resume", folder), tmp_path / "stopped")
    assert logged(read_tensorboard(tmp_path / "stopped")) == logged(read_tensorboard(tmp_path / "whole"))


# -- the second read (issue 41): a server that changes, a stop during fetch-ahead, seeds, shared tokenizers --------

def vllm_body(server, drop_token_ids_after_probe=False, stop_id=None, abort_first=0):
    """A vLLM-shaped answer (tests/guide_server.py's), changed: token_ids gone once the probe is done (a restarted
    older server), a last token `stop_id` that the server stopped on, or finish_reason "abort" on the first rows."""
    aborted = []

    def body(request):
        status, payload = server.vllm_answer(request)
        probe = request["max_tokens"] == 1 and request.get("seed") == 0
        for choice in payload.get("choices", []):
            if drop_token_ids_after_probe and not probe:
                choice.pop("token_ids")
            if stop_id is not None and not probe:
                choice["token_ids"] = [5, 6, stop_id]
                choice["finish_reason"], choice["stop_reason"] = "stop", stop_id
            if not probe and len(aborted) < abort_first:
                aborted.append(1)
                choice["finish_reason"] = "abort"
        return status, payload

    return body


def vllm_guide(assets, server, **flags):
    args = make_args(ppo_plus_plus, 1.0, **({"guide_model": "toy", "guide_tokenizer": assets["policy"],
                                             "guide_top_k": 0} | flags))
    args.guide_url = server.url
    return guides.load_guide(args, assets["tokenizer"], "cpu", torch.float32, random.Random(0))


def test_a_server_that_stops_returning_token_ids_stops_the_run_with_one_line(assets):
    tokenizer = assets["tokenizer"]
    with GuideServer(tokenizer=tokenizer, reverse=True) as server:
        server.body = vllm_body(server, drop_token_ids_after_probe=True)
        guide = vllm_guide(assets, server)
        with pytest.raises(stopping.StopRun, match="no longer returns token_ids, as it did when the run started"):
            guide.write(rows(tokenizer, 2), [[], []], [3, 3])


def test_each_seeded_row_is_a_request_with_its_own_seed(assets):
    """vLLM seeds every prompt of a list request with the request's one seed: rows of a list shared their sampling
    noise (identical prompts, identical samples). Seeded, each row is its own request with its own seed; lists of
    rows are for --no-guide-seed."""
    tokenizer = assets["tokenizer"]
    for seeded in (True, False):
        with GuideServer(tokenizer=tokenizer, vllm=True, reverse=True) as server:
            vllm_guide(assets, server, guide_seed=seeded).write(rows(tokenizer, 4), [[]] * 4, [3] * 4)
        asked = server.rows()
        if seeded:
            assert len(asked) == 4 and len({r["seed"] for r in asked}) == 4
            assert all(len(r["prompt"]) == 1 for r in asked if isinstance(r["prompt"][0], list))  # one prompt each
        else:
            assert len(asked) == 1 and len(asked[0]["prompt"]) == 4 and "seed" not in asked[0]


def test_the_guide_encodes_with_a_tokenizer_of_its_own(assets):
    """The fetch-ahead thread encodes while the loop's thread does: transformers flips a flag of a tokenizer around
    split_special_tokens, so a shared one turned the EOS string into a real EOS now and then. The server guide
    encodes with its own copy."""
    tokenizer = assets["tokenizer"]
    with GuideServer(tokenizer=tokenizer, vllm=True, reverse=True) as server:
        guide = vllm_guide(assets, server)
    assert guide.tokenizer is not tokenizer and guide.tokenizer.get_vocab() == tokenizer.get_vocab()


def test_the_guides_sampling_fields_are_sent_even_where_off(assets):
    """vLLM applies the served model's own generation_config (a top-k, a repetition penalty) to what a request leaves
    out: top_k (-1: off) and repetition_penalty (1.0) go with every request of a server that takes them."""
    tokenizer = assets["tokenizer"]
    with GuideServer(tokenizer=tokenizer, vllm=True, reverse=True) as server:
        vllm_guide(assets, server).write(rows(tokenizer, 2), [[], []], [3, 3])
    assert server.rows() and all(r["top_k"] == -1 and r["repetition_penalty"] == 1.0 for r in server.rows())


def test_token_ids_only_where_the_server_tokenizes_as_the_policy(assets, capsys):
    """The same vocabulary is not the same tokenizer: the probe compares the server's encoding of a text (its
    prompt_token_ids) with the policy's; where they differ, the guide's text is re-encoded."""
    tokenizer = assets["tokenizer"]
    with GuideServer(tokenizer=tokenizer, vllm=True, reverse=True) as server:
        def body(request):
            status, payload = server.vllm_answer(request)
            for choice in payload["choices"]:
                if choice.get("prompt_token_ids") is not None and isinstance(request["prompt"], str):
                    choice["prompt_token_ids"] = choice["prompt_token_ids"][1:]  # (a BOS the other way)
            return status, payload

        server.body = body
        guide = vllm_guide(assets, server)
        guide.write(rows(tokenizer, 1), [[]], [3])
    assert not guide.counts_policy_tokens
    assert "encodes text otherwise than the policy's tokenizer" in capsys.readouterr().out


def test_a_stop_token_of_the_servers_own_never_stays_in_a_roll_in(assets):
    """A served model that stops on a token other than the policy's EOS (its generation_config's) returns it as the
    last token id: it is not text, so it is cut; the row ended."""
    tokenizer = assets["tokenizer"]
    for stop_id in (tokenizer.pad_token_id, 42):  # a special token, and one that is text to the policy (vLLM's
        with GuideServer(tokenizer=tokenizer, reverse=True) as server:  # stop_reason names it)
            server.body = vllm_body(server, stop_id=stop_id)
            samples = vllm_guide(assets, server).write(rows(tokenizer, 1), [[]], [5])
        assert samples == [([5, 6, tokenizer.eos_token_id], True)]


def test_an_aborted_request_is_retried(assets, monkeypatch):
    monkeypatch.setattr(guide_client, "RETRY_WAIT", 0.01)
    tokenizer = assets["tokenizer"]
    with GuideServer(tokenizer=tokenizer, reverse=True) as server:
        server.body = vllm_body(server, abort_first=1)
        samples = vllm_guide(assets, server).write(rows(tokenizer, 1), [[]], [3])
    assert len(server.rows()) == 2 and samples[0][0]


@pytest.mark.slow
def test_after_a_stop_nothing_is_sent_ahead_and_nothing_queued_is_waited_for(assets, monkeypatch):
    """Ctrl-C during an iteration: the roll-ins of the next one (which will not run) are not sent; on the way out
    the guide drops what is queued and the requests in flight give up."""
    tokenizer = assets["tokenizer"]
    with GuideServer(tokenizer=tokenizer, vllm=True, reverse=True) as server:
        guide = vllm_guide(assets, server, guide_concurrency=1)
        guide.write(rows(tokenizer, 1), [[]], [3])
        before = len(server.requests)
        monkeypatch.setattr(stopping, "RECEIVED", ["SIGINT"])
        monkeypatch.setattr(guide_client, "RECEIVED", stopping.RECEIVED)
        guide.send(rows(tokenizer, 3), [[]] * 3, [3] * 3)
        assert len(server.requests) == before and not guide.ahead
        server.delay = 2.0
        monkeypatch.setattr(guide_client, "RECEIVED", [])
        guide.send(rows(tokenizer, 4), [[]] * 4, [3] * 4)  # (sent before the stop: one in flight, three queued)
        time.sleep(0.3)
        started = time.monotonic()
        stopping.let_go()
        [future] = guide.ahead.values()
        with pytest.raises((stopping.StopRun, Exception)):
            future.result(timeout=10)
        assert time.monotonic() - started < 3  # the one in flight gives up; the queued three never go out
    assert len(server.requests) == before + 1


def test_the_retry_schedule(assets, monkeypatch):
    """Every part of it: the wait doubles from RETRY_WAIT, is capped at MAX_RETRY_WAIT, takes a jitter of 0.5-1.5x,
    gives way to the server's Retry-After, and the retries end when the next wait would pass --guide-retry-seconds
    (or at --guide-max-retries); the message says how many tries and how long."""
    clock, waits = [0.0], []

    def wait(seconds, failed):
        waits.append(round(seconds, 6))
        clock[0] += seconds
        return False

    monkeypatch.setattr(guide_client, "wait_unless_stopped", wait)
    monkeypatch.setattr(guide_client.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(guide_client, "RETRY_WAIT", 1.0)
    monkeypatch.setattr(guide_client, "MAX_RETRY_WAIT", 30.0)

    def guide_failing(retry_after=None, **flags):
        guide = guide_client.ServerGuide.__new__(guide_client.ServerGuide)
        args = served_args("http://127.0.0.1:9/v1", **({"guide_retry_seconds": 100.0} | flags))

        def create(**kwargs):
            error = guide_client.Aborted("aborted")
            if retry_after is not None:
                error.response = SimpleNamespace(headers={"retry-after": str(retry_after)})
            raise error

        import openai
        guide.args, guide.openai, guide.retried = args, openai, ()
        guide.client = SimpleNamespace(completions=SimpleNamespace(create=create))
        guide.failed, guide.failure, guide.failure_lock = threading.Event(), None, threading.Lock()
        guide.counts, guide.counts_lock = dict.fromkeys(("requests", "retries", "seconds", "tokens_asked"), 0), \
            threading.Lock()
        return guide

    for jitter, factor in ((0.5, 1.0), (0.0, 0.5), (0.999, 1.499)):
        monkeypatch.setattr(guide_client, "JITTER", SimpleNamespace(random=lambda jitter=jitter: jitter))
        waits.clear()
        clock[0] = 0.0
        with pytest.raises(stopping.StopRun, match=r"failed \d+ times in \d+ s"):
            guide_failing().request("x", 1, 0, {})
        expected, total = [], 0.0
        for attempt in range(100):  # doubling, capped, times the jitter, within the window
            step = min(2.0**attempt, 30.0) * factor
            if total + step > 100.0:
                break
            expected.append(round(step, 6))
            total += step
        assert waits == expected, (jitter, waits)
    assert [w for w in waits[:6]] == [round(x * 1.499, 6) for x in (1, 2, 4, 8, 16, 30)]
    waits.clear()
    clock[0] = 0.0
    with pytest.raises(stopping.StopRun, match="failed 21 times in 100 s"):
        guide_failing(retry_after=5).request("x", 1, 0, {})  # the server's wait, not ours
    assert waits == [5.0] * 20
    waits.clear()
    with pytest.raises(stopping.StopRun, match="failed 3 times"):
        guide_failing(guide_max_retries=2).request("x", 1, 0, {})
    assert len(waits) == 2
