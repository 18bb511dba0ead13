"""The guide's sources (common/guide.py): a model served over HTTP (an OpenAI-compatible completions server,
here tests/guide_server.py in a thread), its faults and its key, and the dataset's references (DR-PO)."""

import glob
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import aggrevated
import d2lols
import ppo_plus_plus
from common import guide as guides
from common import guide_client, stopping
from common import tasks
from conftest import GUIDED_MODULES, Spy, module_name, read_tensorboard, run_script_in_process, set_flags, task_args
from guide_server import GuideServer
from test_checkpoints import logged
from test_guided import H, make_args, policy_config

KEY = "sk-test-4f1c9a7e-key-that-must-not-leak"


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(guide_client, "RETRY_WAIT", 0.01)


@pytest.fixture(scope="module")
def served(assets):
    """The toy guide (it continues any text with " movie") as a model a server holds, and its tokenizer."""
    return AutoModelForCausalLM.from_pretrained(assets["toy_guide"]).eval(), AutoTokenizer.from_pretrained(
        assets["toy_guide"])


def http_args(assets, script, url, *flags):
    args = set_flags(task_args(assets, "imdb", script), "--guide-url", url, "--guide-model", "toy", "--eval-every", 0,
                     "--guide-max-retries", 2, *flags)
    return set_flags(args, "--tau", 1) if script == "d2lols.py" else args


ROW_WORDS = ("dog", "park", "movie", "film", "ball", "child")  # one token each: the rows' references differ from
# their second token on


def examples(tokenizer, texts=("the movie was", "a dog runs in the park", "good", "the story", "boring", "a child")):
    """Rows whose prompts and references differ (a reference taken from another row shows from its second token);
    each row's two references have the same lengths in policy tokens as the other rows'."""
    return [{"prompt": t, "prompt_ids": tokenizer(t).input_ids,
             "references": [f" the {word} end.", f" a {word} good film and more."]}
            for t, word in zip(texts, ROW_WORDS)]


@pytest.mark.parametrize("script", ["ppo_plus_plus.py", "aggrevated.py", "d2lols.py"])
def test_a_guided_run_over_http_end_to_end_and_the_key_goes_nowhere_else(assets, served, tmp_path, monkeypatch,
                                                                         capsys, script):
    """Each guided script trains with a served guide: the server gets the flags' sampling (temperature, top_p,
    top_k, min_tokens, a seed), the served model's name, and the key from OPENAI_API_KEY as a bearer token,
    which appears nowhere else: not in what the run prints, not in runs/ (events, the hyperparameter text), not in
    the checkpoint."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with GuideServer(*served) as server:
        args = http_args(assets, script, server.url, "--save-every", 1, "--beta", 1, "--guide-top-k", 5,
                         "--guide-min-new-tokens", 2, "--guide-temperature", 0.7)
        run_script_in_process(script, args, tmp_path)
    assert server.requests and set(server.headers) == {f"Bearer {KEY}"}
    probe, requests = server.requests[0], server.rows()  # the first: one token with every optional field, to learn
    # what the server takes
    assert (probe["prompt"], probe["max_tokens"], probe["top_k"], probe["min_tokens"]) == ("Hello", 1, 5, 1)
    for request in requests:
        assert request["model"] == "toy" and 0 < request["max_tokens"] <= 6 and isinstance(request["seed"], int)
        assert (request["temperature"], request["top_p"], request["top_k"]) == (0.7, 0.92, 5)
        # min_tokens: 2 less the policy's prefix (a roll-out after k >= 1 policy tokens: 1 or 0; tested in
        # test_fair_credit.py), 2 for a roll-in
        assert request["min_tokens"] == 2 if script == "ppo_plus_plus.py" else request["min_tokens"] in (0, 1, 2)
    most = max(request["min_tokens"] for request in requests)  # (D2LOLS: its PPO++ phase rolls in)
    assert most <= 1 if script == "aggrevated.py" else most == 2
    events = read_tensorboard(tmp_path)
    assert max(e.value for e in events.Scalars("guide/mixed_fraction")) > 0
    # the guide's transport, each iteration: requests for rows, tokens asked (the budgets) and returned, its time
    scalar = {tag: [e.value for e in events.Scalars(tag)] for tag in ("guide/requests", "guide/tokens_asked",
                                                                       "guide/tokens_returned", "timing/guide_s")}
    assert min(scalar["guide/requests"]) > 0 and min(scalar["timing/guide_s"]) > 0
    assert all(0 < returned <= asked for returned, asked in zip(scalar["guide/tokens_returned"],
                                                                scalar["guide/tokens_asked"]))
    printed = capsys.readouterr()
    assert KEY not in printed.out + printed.err
    files = [f for f in glob.glob(str(tmp_path / "**" / "*"), recursive=True) if os.path.isfile(f)]
    assert any("/runs/" in f for f in files) and any("/checkpoints/" in f for f in files)
    for f in files:
        assert KEY.encode() not in open(f, "rb").read(), f


@pytest.mark.parametrize("module", GUIDED_MODULES, ids=module_name)
@pytest.mark.slow
def test_a_served_guide_gives_the_episodes_a_local_guide_gives(assets, served, module):
    """The same greedy model, local (through text: a template) and served: the same roll-ins (PPO++) and
    roll-outs (AggreVaTeD), so the same masks."""
    tokenizer = assets["tokenizer"]
    batch = examples(tokenizer)
    policy = AutoModelForCausalLM.from_pretrained(assets["policy"]).eval()
    results = []
    with GuideServer(*served) as server:
        for source in ("local", "served"):
            flags = dict(guide_model=assets["toy_guide"], guide_prompt_template="{prompt}", guide_top_k=1)
            if source == "served":
                flags.update(guide_url=server.url, guide_model="toy", guide_top_k=0, guide_concurrency=3)
            args = make_args(module, 1.0, **flags)
            guide = guides.load_guide(args, tokenizer, "cpu", torch.float32, random.Random(0))
            assert not guide.counts_policy_tokens
            torch.manual_seed(0)
            if module is aggrevated:
                results.append(module.guide_roll_out(policy, guide, tokenizer, batch, policy_config(tokenizer), args,
                                                     "cpu", random.Random(1))[2:5])
            else:
                results.append(module.guide_roll_in(guide, tokenizer, batch, args, "cpu", random.Random(1)))
    assert len(server.rows()) == len(batch)
    if module is aggrevated:
        for local, served_ in zip(*results):
            assert torch.equal(local, served_)
        assert results[0][2].sum() > 0  # the guide's tokens: the value mask
    else:
        assert results[0] == results[1] and sum(map(len, results[0])) > 0


@pytest.mark.slow
def test_the_guides_stop_reason_ends_its_continuation_and_a_short_answer_is_asked_again(assets):
    """finish_reason "stop": the guide ended (EOS appended in policy tokens); "length": it did not, and a row
    short of its budget (in policy tokens) asks again with its text so far, until the budget is met."""
    tokenizer = assets["tokenizer"]
    args = make_args(ppo_plus_plus, 1.0, guide_model="toy", guide_top_k=0)
    for reason, ended, text, asked in (("stop", True, " movie movie", 1), ("length", False, " movie movie movie", 2)):
        with GuideServer(marker=" movie movie") as server:
            server.complete = lambda prompt, max_tokens, reason=reason: (" movie movie", reason)
            args.guide_url = server.url
            guide = guides.load_guide(args, tokenizer, "cpu", torch.float32, random.Random(0))
            [(tokens, got)] = guide.write(examples(tokenizer)[:1], [[]], [3])
        assert got == ended and (tokens[-1] == tokenizer.eos_token_id) == ended
        assert tokenizer.decode(tokens, skip_special_tokens=True) == text  # the budget: 3 policy tokens
        asked_for = server.rows()
        assert len(asked_for) == asked
        if asked == 2:  # the second request continues the first answer's text, for what is still missing
            assert asked_for[1]["prompt"] == asked_for[0]["prompt"] + " movie movie"
            assert asked_for[0]["max_tokens"] == int(guides.TEXT_MARGIN * 3) + 1
            assert asked_for[1]["max_tokens"] == int(guides.TEXT_MARGIN * 1) + 1


@pytest.mark.slow
def test_requests_go_out_several_at_once_and_failed_ones_are_retried(assets, capsys):
    tokenizer = assets["tokenizer"]
    args = make_args(ppo_plus_plus, 1.0, guide_model="toy", guide_top_k=0, guide_concurrency=4, guide_max_retries=3)
    with GuideServer(marker=" movie", delay=0.05) as server:
        args.guide_url = server.url
        guides.load_guide(args, tokenizer, "cpu", torch.float32, random.Random(0)).write(
            examples(tokenizer) * 2, [[]] * 12, [1] * 12)  # (" movie": one request a row)
    assert len(server.rows()) == 12 and 2 <= server.most_in_flight <= 4  # bounded concurrency
    with GuideServer(marker=" movie", fail_first=2) as server:
        args.guide_url, args.guide_concurrency = server.url, 1
        results = guides.load_guide(args, tokenizer, "cpu", torch.float32, random.Random(0)).write(
            examples(tokenizer)[:2], [[]] * 2, [1] * 2)
    assert len(results) == 2 and len(server.requests) == 6 and len(server.rows()) == 2  # the first (the probe of
    # the fields the server takes) failed twice, was retried, then the probe of a list, then 2 rows answered
    out = capsys.readouterr().out
    assert f"guide: {server.url}: InternalServerError" in out and "retry 1 in " in out and "retry 2 in " in out


def test_a_malformed_answer_or_a_refused_request_stops_with_one_line(assets):
    tokenizer = assets["tokenizer"]
    args = make_args(ppo_plus_plus, 1.0, guide_model="toy", guide_top_k=0)
    with GuideServer(marker=" movie", malformed=True) as server:
        args.guide_url = server.url
        with pytest.raises(stopping.StopRun, match="answered out of the completions API's shape"):
            guides.load_guide(args, tokenizer, "cpu", torch.float32, random.Random(0)).write(
                examples(tokenizer)[:1], [[]], [4])
    with GuideServer(marker=" movie") as server:
        args.guide_url = server.url + "/wrong"
        with pytest.raises(stopping.StopRun, match="refused the request .*NotFoundError"):
            guides.load_guide(args, tokenizer, "cpu", torch.float32, random.Random(0)).write(
                examples(tokenizer)[:1], [[]], [4])


@pytest.mark.slow
def test_a_server_that_goes_down_stops_the_run_at_its_last_iteration_and_the_resume_matches(assets, served, tmp_path):
    """The server answers iteration 1, then fails for good: the run stops with one line naming the URL and the
    error, writes the checkpoint of iteration 1 (--save-every 5 had not), exits non-zero; resumed with the server
    back, it logs exactly what a run whose server never failed logs (the server is deterministic)."""
    script = "ppo_plus_plus.py"
    with GuideServer(*served) as server:
        args = http_args(assets, script, server.url, "--total-episodes", 12, "--save-every", 5, "--beta", 1)
        (tmp_path / "whole").mkdir()
        run_script_in_process(script, args, tmp_path / "whole")
        per_iteration = len(server.rows()) // 3
        probes = len(server.requests) - len(server.rows())  # (the first requests learn what the server takes)
    (tmp_path / "stopped").mkdir()
    with GuideServer(*served, fail_after=probes + per_iteration) as server:
        with pytest.raises(SystemExit) as stop:
            run_script_in_process(script, set_flags(args, "--guide-url", server.url), tmp_path / "stopped")
    lines = str(stop.value.code).splitlines()
    assert lines[0].startswith(f"error: the guide server {server.url} failed 3 times in 0 s (InternalServerError")
    [folder] = glob.glob(str(tmp_path / "stopped" / "checkpoints" / "*"))
    assert lines[1] == f"stopped by that error after iteration 1/3; checkpoint: {os.path.relpath(folder, tmp_path / 'stopped')}"
    assert lines[2].startswith("resume with: python ")
    with GuideServer(*served) as server:
        run_script_in_process(script, set_flags(args, "--guide-url", server.url, "--resume", folder), tmp_path / "stopped")
    assert logged(read_tensorboard(tmp_path / "stopped")) == logged(read_tensorboard(tmp_path / "whole"))


def test_a_dead_server_in_the_first_iteration_leaves_a_checkpoint_to_start_from(assets, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    args = http_args(assets, "aggrevated.py", url, "--save-every", 1)
    with pytest.raises(SystemExit) as stop:
        run_script_in_process("aggrevated.py", args, tmp_path)
    message = str(stop.value.code)
    assert message.startswith(f"error: the guide server {url} failed 3 times in 0 s (APIConnectionError")
    assert "after iteration 0/2; checkpoint: checkpoints/" in message and glob.glob(str(tmp_path / "checkpoints" / "*"))


# the dataset as the guide (DR-PO)

def test_references_roll_in_as_prefixes_of_a_reference_by_the_law_of_k(assets):
    """Each roll-in is the first k policy tokens of one of its prompt's references (encoded in context), k <=
    L - 1 (L counts the reference's EOS), and the policy's mask leaves it out (state, no loss)."""
    tokenizer = assets["tokenizer"]
    batch = examples(tokenizer) * 50
    args = make_args(ppo_plus_plus, 1.0, guide_references=True, max_new_tokens=H)
    rng = random.Random(0)
    guide = guides.load_guide(args, tokenizer, "cpu", torch.float32, rng)
    roll_ins = ppo_plus_plus.guide_roll_in(guide, tokenizer, batch, args, "cpu", rng)
    def ids(e):  # a row's references, encoded in context after its prompt
        return [tasks.continuation_ids(tokenizer, e["prompt"], r, H) for r in e["references"]]

    lengths = [len(reference) for reference in ids(batch[0])]
    assert all([len(reference) for reference in ids(e)] == lengths for e in batch)
    assert min(lengths) < H <= max(lengths)  # one ends (EOS) within H, one is cut at H
    counts = [[0] * H for _ in lengths]  # per reference (the first or the second of its row)
    for e, roll_in in zip(batch, roll_ins):  # each roll-in a prefix of one of its own row's references
        [which] = [j for j, reference in enumerate(ids(e)) if reference[: len(roll_in)] == roll_in
                   and len(roll_in) < len(reference)]
        counts[which][len(roll_in)] += 1
    for length, count in zip(lengths, counts):  # k ~ U{1..L-1}, L = the reference's policy tokens (with EOS)
        n = min(length, H) - 1
        assert count[0] == 0 and all(c > 0 for c in count[1 : n + 1]) and sum(count[n + 1 :]) == 0, (length, count)
    policy = AutoModelForCausalLM.from_pretrained(assets["policy"]).eval()
    _, _, responses, mask, _, policy_mask = ppo_plus_plus.rollout(
        policy, tokenizer, [e["prompt_ids"] for e in batch[:6]], policy_config(tokenizer), args, "cpu", roll_ins[:6])
    for i, roll_in in enumerate(roll_ins[:6]):
        assert responses[i, : len(roll_in)].tolist() == roll_in and not policy_mask[i, : len(roll_in)].any()


@pytest.mark.parametrize("script,flags,ok", [("ppo_plus_plus.py", [], True), ("d2lols.py", ["--tau", "0"], True),
                                             ("aggrevated.py", [], False), ("d2lols.py", ["--tau", "1"], False)])
def test_references_as_the_guide_run_dr_po_and_are_refused_where_a_prefix_must_be_continued(assets, tmp_path, script,
                                                                                            flags, ok):
    args = set_flags(task_args(assets, "commongen"), "--eval-every", 0, *flags) + ["--guide-references"]
    if ok:
        run_script_in_process(script, args, tmp_path)
        assert max(e.value for e in read_tensorboard(tmp_path).Scalars("guide/mixed_fraction")) > 0
    else:
        with pytest.raises(SystemExit) as error:
            run_script_in_process(script, args, tmp_path)
        assert str(error.value.code).startswith("error: --guide-references: the dataset cannot continue the policy's")
        assert not os.path.exists(tmp_path / "runs")  # before any model loads


@pytest.fixture(scope="module")
def transformers_server(assets, tmp_path_factory):
    """transformers' own OpenAI-compatible server (`transformers serve FOLDER --port N`), nobody here wrote it, on
    the toy guide's folder, offline. It takes one prompt string per request and refuses top_k and min_tokens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w+")
    process = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", assets["toy_guide"],
                                "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"http://localhost:{port}/health", timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                log.seek(0)
                pytest.fail(f"transformers serve did not start:\n{log.read()[-3000:]}")
            time.sleep(0.5)
    yield f"http://localhost:{port}/v1"
    process.terminate()
    process.wait(timeout=30)


@pytest.mark.parametrize("script", ["ppo_plus_plus.py", "aggrevated.py"])
@pytest.mark.slow
def test_a_guided_iteration_through_transformers_serve(assets, transformers_server, tmp_path, capsys, script):
    """A real server: one iteration of PPO++ (the served guide's roll-ins are its " movie" text) and of AggreVaTeD;
    the fields it refuses (top_k) are dropped with one line, and the run goes on."""
    args = set_flags(task_args(assets, "imdb", script), "--guide-url", transformers_server, "--guide-model",
                     assets["toy_guide"], "--guide-top-k", 5, "--total-episodes", 4, "--beta", 1, "--eval-every", 0)
    spy = Spy()
    helper = "guide_roll_in" if script == "ppo_plus_plus.py" else "guide_roll_out"
    run_script_in_process(script, args, tmp_path, {helper: spy})
    assert f"guide: {transformers_server} does not take top_k" in capsys.readouterr().out
    tokenizer = assets["tokenizer"]
    if script == "ppo_plus_plus.py":
        written = [tokenizer.decode(roll_in) for roll_in in spy.calls[0].result]
    else:
        _, _, responses, policy_mask, value_mask, _ = spy.calls[0].result
        written = [tokenizer.decode(row[value.bool()]) for row, value in zip(responses, value_mask)]
    assert sum(" movie" in text for text in written) >= 2, written


def vllm_completion(request, text, finish_reason):
    """A /v1/completions answer in vLLM's shape, field by field as vLLM's protocol.py defines CompletionResponse
    and CompletionResponseChoice (built here from that schema, not recorded from a running vLLM: none runs here)."""
    return 200, {"id": "cmpl-9f2c", "object": "text_completion", "created": 1764000000, "model": request["model"],
                 "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason,
                              "stop_reason": None, "token_ids": None, "prompt_logprobs": None,
                              "prompt_token_ids": None}],
                 "service_tier": None, "system_fingerprint": None,
                 "usage": {"prompt_tokens": 5, "total_tokens": 9, "completion_tokens": 4,
                           "prompt_tokens_details": None},
                 "kv_transfer_params": None}


def test_vllm_shaped_answers_and_errors(assets):
    """vLLM's completion (its extra fields ignored; "stop" with stop_reason None is its EOS) and its error body
    ({"object": "error", "message", "type", "param", "code"}): read as the API says."""
    tokenizer = assets["tokenizer"]
    args = make_args(ppo_plus_plus, 1.0, guide_model="Qwen/Qwen2.5-7B-Instruct", guide_top_k=5, guide_min_new_tokens=2)
    for finish_reason, ended, text in (("stop", True, " movie movie"), ("length", False, " movie movie movie")):
        with GuideServer(body=lambda request, reason=finish_reason: vllm_completion(request, " movie movie", reason)) as server:
            args.guide_url = server.url
            [(tokens, got)] = guides.load_guide(args, tokenizer, "cpu", torch.float32, random.Random(0)).write(
                examples(tokenizer)[:1], [[]], [3])
        assert got == ended and tokenizer.decode(tokens, skip_special_tokens=True) == text  # "length": asked again
        assert (server.rows()[0]["top_k"], server.rows()[0]["min_tokens"]) == (5, 2)  # vLLM takes both (the
        # first request, one token with both, learnt that)
    error = {"object": "error", "message": "This model's maximum context length is 2048 tokens.",
             "type": "BadRequestError", "param": None, "code": 400}
    with GuideServer(body=lambda request: (400, error)) as server:
        args.guide_url = server.url
        with pytest.raises(stopping.StopRun, match="refused the request .*maximum context length is 2048"):
            guides.load_guide(args, tokenizer, "cpu", torch.float32, random.Random(0)).write(
                examples(tokenizer)[:1], [[]], [4])
