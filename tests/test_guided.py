"""The guided algorithms: episode construction, a guide with another tokenizer, D2LOLS's switch, smoke runs."""

import random
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import aggrevated
import d2lols
import ppo
import ppo_plus_plus
from common import guide as guides
from conftest import GUIDED_MODULES, module_name, read_tensorboard, run_script_in_process, set_flags, task_args

H = 8
TEXTS = ["the movie was", "a dog runs in the park and the cat sat on the", "good", "funny sad love",
         "the story", "boring", "the actor said", "a child"]


def load_guide(path, policy_tokenizer, template=None):
    """A local guide (common/guide.py), its flags in guide.args: write() below sets them per call."""
    args = make_args(ppo_plus_plus, 1.0, guide_model=path, guide_prompt_template=template)
    guide = guides.load_guide(args, policy_tokenizer, "cpu", torch.float32, random.Random(0))
    guide.args = args
    return guide


def write(guide, batch, prefixes, max_new_tokens, args):
    """guide.write with the guide's flags of `args` (a script's Args)."""
    for name in ("guide_temperature", "guide_top_k", "guide_top_p", "guide_min_new_tokens", "rollout_batch_size"):
        setattr(guide.args, name, getattr(args, name))
    return guide.write(batch, prefixes, [max_new_tokens] * len(batch))


def make_args(module, beta, **overrides):
    # guide_top_k=1: the guide decodes greedily, so its tokens can be checked
    values = dict(max_new_tokens=H, beta=beta, rollout_batch_size=3, temperature=1.0, guide_top_k=1, guide_top_p=1.0,
                  guide_temperature=1.0, guide_prompt_template=None, guide_max_new_tokens=H, guide_min_new_tokens=0)
    values.update(overrides)
    return module.Args(**values)


def policy_config(tokenizer, max_new_tokens=H):
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            return_dict_in_generate=True, output_logits=True)


def greedy(model, ids, n, eos_token_id):
    """The guide's top-1 continuation of `ids`, up to and including EOS."""
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
    tokens = out[0, len(ids) :].tolist()
    return tokens[: tokens.index(eos_token_id) + 1] if eos_token_id in tokens else tokens


@pytest.fixture(scope="module")
def setup(assets):
    tokenizer = assets["tokenizer"]
    policy = AutoModelForCausalLM.from_pretrained(assets["policy"]).eval()
    batch = [{"prompt": t, "prompt_ids": tokenizer(t).input_ids, "references": [""]} for t in TEXTS]
    # a guide that shares the tokenizer (the token fast path), but is a model of its own
    guide = load_guide(assets["toy_guide"], tokenizer)
    return tokenizer, policy, batch, guide


def recomputed_logprobs(policy, prompt_ids, prompt_mask, responses, mask):
    with torch.no_grad():
        logits = ppo.response_logits(policy, torch.cat([prompt_ids, responses], 1),
                                     torch.cat([prompt_mask, mask.long()], 1), responses.shape[1])
        return ppo.token_logprobs(logits, responses, 1.0)


ROLL_IN_MODULES = [ppo_plus_plus, d2lols]  # PPO++'s guide_roll_in and rollout (D2LOLS: its second phase)
ROLL_OUT_MODULES = [aggrevated, d2lols]  # AggreVaTeD's guide_roll_out and ppo_loss (D2LOLS: its first phase)


@pytest.mark.parametrize("module", ROLL_IN_MODULES, ids=module_name)
def test_ppo_plus_plus_rolls_in_the_guides_tokens_as_state_then_the_policy_rolls_out(setup, module):
    tokenizer, policy, batch, guide = setup
    assert guide.counts_policy_tokens
    args = make_args(module, beta=1.0)
    torch.manual_seed(0)
    roll_ins = module.guide_roll_in(guide, tokenizer, batch, args, "cpu", random.Random(0))
    k = [len(r) for r in roll_ins]
    assert all(1 <= k_i <= H - 1 for k_i in k), k
    for e, roll_in in zip(batch, roll_ins):
        guide_tokens = greedy(guide.model, e["prompt_ids"], H, tokenizer.eos_token_id)
        assert roll_in == guide_tokens[: len(roll_in)]  # the roll-in is exactly the guide's
        assert tokenizer.eos_token_id not in roll_in  # k <= L - 1
    prompt_ids, prompt_mask, responses, mask, logprobs, policy_mask = module.rollout(
        policy, tokenizer, [e["prompt_ids"] for e in batch], policy_config(tokenizer), args, "cpu", roll_ins)
    for i, k_i in enumerate(k):
        # the response opens with the roll-in: in the episode (attended) but state, with zero loss/KL mask
        assert responses[i, :k_i].tolist() == roll_ins[i]
        assert mask[i, :k_i].all() and not policy_mask[i, :k_i].any()
        # then the policy's tokens, k + policy tokens <= H, padding after
        n = int(policy_mask[i].sum())
        assert n >= 1 and policy_mask[i, k_i : k_i + n].all() and mask[i].sum() == k_i + n <= H
        assert (responses[i, k_i + n :] == tokenizer.pad_token_id).all()
    # the policy's tokens are the policy's samples: their log-probs are its own (the ratio starts at 1)
    torch.testing.assert_close(recomputed_logprobs(policy, prompt_ids, prompt_mask, responses, mask) * policy_mask,
                               logprobs * policy_mask, atol=1e-5, rtol=0)
    assert (logprobs[policy_mask == 0] == 0).all()


@pytest.mark.parametrize("module", ROLL_IN_MODULES, ids=module_name)
def test_the_policy_generates_only_the_tokens_it_keeps(setup, monkeypatch, module):
    """After a roll-in of k the policy writes H - k tokens: each generate call asks for H minus its rows'
    shortest roll-in, not H (rollout_batch_size 3: a chunk of roll-ins 2, 5, 3, then 0 (a PPO episode))."""
    tokenizer, policy, batch, _ = setup
    roll_ins = [[9] * 2, [9] * 5, [9] * 3, []]
    asked, generate = [], policy.generate
    monkeypatch.setattr(policy, "generate", lambda **kw: asked.append(kw["generation_config"].max_new_tokens)
                        or generate(**kw))
    _, _, responses, mask, _, policy_mask = module.rollout(
        policy, tokenizer, [e["prompt_ids"] for e in batch[:4]], policy_config(tokenizer), make_args(module, 1.0),
        "cpu", roll_ins)
    assert asked == [H - 2, H]
    assert policy_mask.sum(1).tolist() == [H - 2, H - 5, H - 3, H] and mask.sum(1).tolist() == [H] * 4


@pytest.mark.parametrize("module", ROLL_IN_MODULES, ids=module_name)
def test_ppo_plus_plus_with_beta_zero_takes_exactly_ppos_episodes(setup, module):
    tokenizer, policy, batch, guide = setup
    args = make_args(module, beta=0.0)
    prompts = [e["prompt_ids"] for e in batch]
    torch.manual_seed(3)
    expected = ppo.rollout(policy, tokenizer, prompts, policy_config(tokenizer), args, "cpu")
    torch.manual_seed(3)
    roll_ins = module.guide_roll_in(guide, tokenizer, batch, args, "cpu", random.Random(0))
    assert roll_ins == [[]] * len(batch)
    *got, policy_mask = module.rollout(policy, tokenizer, prompts, policy_config(tokenizer), args, "cpu", roll_ins)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    assert torch.equal(policy_mask, expected[3])  # every episode token is the policy's


@pytest.mark.parametrize("module", ROLL_OUT_MODULES, ids=module_name)
def test_aggrevated_policy_rolls_in_and_the_guide_rolls_out(setup, module):
    tokenizer, policy, batch, guide = setup
    args = make_args(module, beta=1.0)
    torch.manual_seed(0)
    prompt_ids, prompt_mask, responses, policy_mask, value_mask, logprobs = module.guide_roll_out(
        policy, guide, tokenizer, batch, policy_config(tokenizer), args, "cpu", random.Random(1))
    assert (policy_mask * value_mask).sum() == 0
    for i, e in enumerate(batch):
        k = int(policy_mask[i].sum())
        n = k + int(value_mask[i].sum())
        assert 1 <= k <= H - 1 and policy_mask[i, :k].all()  # the policy's prefix comes first
        assert n <= H and (responses[i, n:] == tokenizer.pad_token_id).all()
        prefix = responses[i, :k].tolist()
        if prefix[-1] == tokenizer.eos_token_id:  # the policy ended the episode itself: no roll-out
            assert n == k
            continue
        expected_suffix = greedy(guide.model, e["prompt_ids"] + prefix, H - k, tokenizer.eos_token_id)[: H - k]
        assert responses[i, k:n].tolist() == expected_suffix  # the suffix is exactly the guide's
    # the prefix log-probs are the policy's own; the guide's tokens carry none
    recomputed = recomputed_logprobs(policy, prompt_ids, prompt_mask, responses, policy_mask + value_mask)
    torch.testing.assert_close(recomputed * policy_mask, logprobs * policy_mask, atol=1e-5, rtol=0)
    assert (logprobs[value_mask.bool()] == 0).all()


@pytest.mark.parametrize("module", ROLL_OUT_MODULES, ids=module_name)
def test_aggrevated_with_beta_zero_lets_the_guide_write_everything(setup, module):
    tokenizer, policy, batch, guide = setup
    args = make_args(module, beta=0.0)
    _, _, responses, policy_mask, value_mask, _ = module.guide_roll_out(
        policy, guide, tokenizer, batch, policy_config(tokenizer), args, "cpu", random.Random(1))
    assert policy_mask.sum() == 0
    for i, e in enumerate(batch):
        n = int(value_mask[i].sum())
        assert responses[i, :n].tolist() == greedy(guide.model, e["prompt_ids"], H, tokenizer.eos_token_id)[:H]


@pytest.mark.parametrize("module", ROLL_OUT_MODULES, ids=module_name)
def test_aggrevated_pg_loss_on_the_policys_tokens_and_value_loss_on_the_guides(module):
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    value_mask = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    old = torch.zeros(1, 4)
    args = module.Args(clip_coef=0.2, clip_coef_value=100.0, vf_coef=1.0)
    new_logprobs = torch.zeros(1, 4, requires_grad=True)
    new_values = torch.zeros(1, 4, requires_grad=True)
    loss, stats = module.ppo_loss(new_logprobs, new_values, old, old, torch.ones(1, 4), torch.ones(1, 4),
                                  mask, value_mask, mask.sum(), value_mask.sum(), args)
    loss.backward()
    assert new_logprobs.grad[0, 2:].abs().sum() == 0 and new_logprobs.grad[0, :2].abs().sum() > 0
    assert new_values.grad[0, :2].abs().sum() == 0 and new_values.grad[0, 2:].abs().sum() > 0


def record_generate(guide, monkeypatch):
    """Wrap the guide's generate (for this test only): record (input ids, generated ids, config) per call."""
    calls, generate = [], guide.model.generate

    def recorded(**kwargs):
        out = generate(**kwargs)
        calls.append((kwargs["input_ids"], out[:, kwargs["input_ids"].shape[1] :], kwargs["generation_config"]))
        return out

    monkeypatch.setattr(guide.model, "generate", recorded)
    return calls


def guide_writes(guide, calls):
    """Over every recorded call: {the guide's input text: the text it wrote after it, up to its EOS, decoded in
    context}. Rows go to generate sorted by budget, and a row short of its budget asks again with its text so far."""
    writes = {}
    for input_ids, new_ids, config in calls:
        for inputs, tokens in zip(input_ids.tolist(), new_ids.tolist()):
            inputs = inputs[next(i for i, t in enumerate(inputs) if t != config.pad_token_id) :]
            if config.eos_token_id in tokens:
                tokens = tokens[: tokens.index(config.eos_token_id)]
            context = guide.tokenizer.decode(inputs, skip_special_tokens=True)
            writes[context] = guide.tokenizer.decode(inputs + tokens, skip_special_tokens=True)[len(context) :]
    return writes


def whole_text(writes, guide_input):
    """All the guide wrote for the row whose input is `guide_input`, over its requests."""
    assert guide_input in writes, f"the guide never saw {guide_input!r}"
    text = ""
    while guide_input + text in writes and (not text or writes[guide_input + text]):
        piece = writes[guide_input + text]
        text += piece
        if not piece:
            break
    return text


TEMPLATE = "Continue this review: {prompt}"


@pytest.mark.parametrize("module", GUIDED_MODULES, ids=module_name)
def test_the_guide_reads_its_template_and_the_policy_gets_the_guides_text(setup, assets, monkeypatch, module):
    """A guide with another, larger vocabulary (every id differs from the policy's): it reads its template
    around the prompt plus the decoded policy prefix, and what it writes reaches the policy as the
    policy's tokenisation of the guide's own text (never the guide's ids)."""
    tokenizer, _, batch, _ = setup
    guide = load_guide(assets["guide_bigger"], tokenizer, template=TEMPLATE)
    assert not guide.counts_policy_tokens and len(guide.tokenizer) > len(tokenizer)
    calls = record_generate(guide, monkeypatch)
    args = make_args(module, beta=1.0, guide_top_k=0, guide_prompt_template=TEMPLATE)
    prefixes = [tokenizer(" the film").input_ids if i % 2 else [] for i in range(len(batch))]
    torch.manual_seed(0)
    results = write(guide, batch, prefixes, H, args)
    writes = guide_writes(guide, calls)
    for e, prefix, (tokens, ended) in zip(batch, prefixes, results, strict=True):
        guide_text = whole_text(writes, TEMPLATE.format(prompt=e["prompt"]) + tokenizer.decode(prefix))
        expected = tokenizer(guide_text, add_special_tokens=False).input_ids
        assert tokens == (expected + [tokenizer.eos_token_id] * ended)[:H]  # at most the budget, in policy tokens
    raw = [t for _, new_ids, _ in calls for row in new_ids.tolist() for t in row]
    assert max(raw) >= len(tokenizer), "the guide should write ids the policy's vocabulary does not have"


@pytest.mark.parametrize("module", GUIDED_MODULES, ids=module_name)
@pytest.mark.parametrize("sentencepiece", ["guide", "policy"])
def test_the_space_at_the_boundary_survives_a_sentencepiece_tokenizer(assets, metaspace, monkeypatch, module,
                                                                      sentencepiece):
    """Decoding only the new pieces drops a word's leading space ("this movie was" + "great"): the prefix
    reaches the guide, and the guide's text reaches the policy, decoded and encoded in context."""
    metaspace_tokenizer, metaspace_model = metaspace
    if sentencepiece == "guide":
        tokenizer, guide = assets["tokenizer"], load_guide(metaspace_model, assets["tokenizer"])
    else:
        tokenizer, guide = metaspace_tokenizer, load_guide(assets["toy_guide"], metaspace_tokenizer)  # whole words
    assert not guide.counts_policy_tokens
    texts = ["this movie was", "the dog ran", "a sad film and", "the actor said"]
    batch = [{"prompt": t, "prompt_ids": tokenizer(t, add_special_tokens=False).input_ids} for t in texts]
    assert [tokenizer.decode(e["prompt_ids"]) for e in batch] == texts
    # the policy wrote " really" after each prompt (its own pieces, as they come in context)
    prefixes = [tokenizer(t + " really", add_special_tokens=False).input_ids[len(e["prompt_ids"]) :]
                for t, e in zip(texts, batch)]
    calls = record_generate(guide, monkeypatch)
    torch.manual_seed(0)
    results = write(guide, batch, prefixes, 6, make_args(module, 1.0, guide_top_k=0))
    guide_words, writes = [], guide_writes(guide, calls)
    for e, prefix, (tokens, ended) in zip(batch, prefixes, results, strict=True):
        guide_text = whole_text(writes, e["prompt"] + " really")  # the prefix reached the guide as text
        state = e["prompt_ids"] + prefix
        policy_text = tokenizer.decode(state + tokens[: len(tokens) - ended], skip_special_tokens=True)
        # the policy reads what the guide wrote (its first 6 policy tokens: the budget)
        assert len(tokens) == 6 or ended
        assert (e["prompt"] + " really" + guide_text).startswith(policy_text)
        assert len(policy_text) > len(e["prompt"] + " really")
        guide_words.append(guide_text)
    assert any(text.startswith(" ") for text in guide_words), "want a guide text that opens a new word"


@pytest.mark.parametrize("module", [ppo_plus_plus, d2lols], ids=module_name)
def test_the_roll_in_is_the_guides_own_text(setup, assets, monkeypatch, module):
    tokenizer, _, batch, _ = setup
    guide = load_guide(assets["guide_bigger"], tokenizer)
    calls = record_generate(guide, monkeypatch)
    args = make_args(module, beta=1.0, guide_top_k=0)
    torch.manual_seed(0)
    roll_ins = module.guide_roll_in(guide, tokenizer, batch, args, "cpu", random.Random(0))
    assert sum(map(len, roll_ins)) > 0 and all(len(r) <= H - 1 for r in roll_ins)
    writes = guide_writes(guide, calls)
    for e, roll_in in zip(batch, roll_ins, strict=True):
        guide_text = whole_text(writes, e["prompt"])
        assert roll_in == tokenizer(guide_text, add_special_tokens=False).input_ids[: len(roll_in)]
        assert guide_text.startswith(tokenizer.decode(roll_in))


@pytest.mark.parametrize("module", [aggrevated, d2lols], ids=module_name)
def test_the_guide_rolls_out_from_the_policys_prefix_as_text(setup, assets, monkeypatch, module):
    tokenizer, policy, batch, _ = setup
    guide = load_guide(assets["guide_bigger"], tokenizer)
    calls = record_generate(guide, monkeypatch)
    args = make_args(module, beta=1.0, guide_top_k=0)
    torch.manual_seed(0)
    _, _, responses, policy_mask, value_mask, _ = module.guide_roll_out(
        policy, guide, tokenizer, batch, policy_config(tokenizer), args, "cpu", random.Random(0))
    open_rows = [i for i in range(len(batch)) if value_mask[i].any() or policy_mask[i].sum() < H]
    open_rows = [i for i in open_rows if responses[i, int(policy_mask[i].sum()) - 1] != tokenizer.eos_token_id]
    writes = guide_writes(guide, calls)
    assert len(open_rows) > 0
    for i in open_rows:
        k, n = int(policy_mask[i].sum()), int((policy_mask[i] + value_mask[i]).sum())
        prefix = responses[i, :k].tolist()
        guide_text = whole_text(writes, batch[i]["prompt"] + tokenizer.decode(prefix))
        written = tokenizer(guide_text, add_special_tokens=False).input_ids
        assert responses[i, k:n].tolist() == (written + [tokenizer.eos_token_id])[: n - k]


@pytest.mark.parametrize("module", GUIDED_MODULES, ids=module_name)
@pytest.mark.slow
def test_the_guides_sampling_flags_reach_its_generate(setup, assets, monkeypatch, module):
    """--guide-temperature, --guide-top-k and --guide-top-p are the guide's own: they reach its generate
    and change what it writes (a tiny top-p or temperature leaves only its top token: greedy)."""
    tokenizer, _, batch, _ = setup
    guide = load_guide(assets["policy"], tokenizer)  # a flat distribution: free sampling is far from greedy
    greedy_text = [greedy(guide.model, e["prompt_ids"], H, tokenizer.eos_token_id) for e in batch]
    calls = record_generate(guide, monkeypatch)

    def continuations(**flags):
        torch.manual_seed(0)
        args = make_args(module, beta=1.0, **flags)
        return [tokens for tokens, _ in write(guide, batch, [[]] * len(batch), H, args)]

    continuations(guide_temperature=0.7, guide_top_k=5, guide_top_p=0.5)
    config = calls[-1][2]
    assert (config.do_sample, config.temperature, config.top_k, config.top_p) == (True, 0.7, 5, 0.5)
    free = continuations(guide_temperature=1.0, guide_top_k=0, guide_top_p=1.0)
    assert free != greedy_text
    assert continuations(guide_temperature=1.0, guide_top_k=0, guide_top_p=1e-9) == greedy_text
    assert continuations(guide_temperature=1e-4, guide_top_k=0, guide_top_p=1.0) == greedy_text


def critics_after(assets, tmp_path, tau):
    args = task_args(assets, "imdb", "d2lols.py") + ["--eval-every", "0"]
    args[args.index("--tau") + 1] = str(tau)
    tmp_path.mkdir()
    run = run_script_in_process("d2lols.py", args, cwd=tmp_path)
    changed = {}
    for name in ("critic", "guide_critic"):
        initial = ppo.Critic(assets["policy"])
        changed[name] = any(not torch.equal(a, b) for a, b in zip(run[name].parameters(), initial.parameters()))
    return changed


@pytest.mark.slow
def test_d2lols_trains_the_guide_critic_before_tau_and_the_policy_critic_after(assets, tmp_path):
    # 2 iterations: tau = 2 -> both AggreVaTeD; tau = 0 -> both PPO++
    assert critics_after(assets, tmp_path / "a", tau=2) == {"critic": False, "guide_critic": True}
    assert critics_after(assets, tmp_path / "b", tau=0) == {"critic": True, "guide_critic": False}


GUIDE_TAGS = ["guide/mixed_fraction", "guide/mean_k", "guide/score_mixed"]


@pytest.mark.parametrize("script", ["ppo_plus_plus.py", "aggrevated.py", "d2lols.py"])
@pytest.mark.parametrize("task", ["imdb", "commongen", "tldr"])
def test_two_iterations_per_task(assets, tmp_path, capsys, script, task):
    args = task_args(assets, task, script) + ["--beta", "0.5", "--eval-every", "2"]
    if task == "imdb":  # a guide with another tokenizer and vocabulary, and a prompt template of its own
        args[args.index("--guide-model") + 1] = assets["guide_other"]
        args += ["--guide-prompt-template", "Continue this review: {prompt}", "--save-model", "--save-path", "saved"]
    if task == "tldr":
        args += ["--bf16"]
    run = run_script_in_process(script, args, cwd=tmp_path)
    out = capsys.readouterr().out
    assert "iteration 2/2" in out and "eval @ iteration 2" in out
    events = read_tensorboard(tmp_path)
    tags = events.Tags()["scalars"]
    for tag in ["objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "eval/score"] + GUIDE_TAGS:
        assert tag in tags, tag
    if script == "d2lols.py":  # --tau 1: AggreVaTeD, then PPO++
        assert [e.value for e in events.Scalars("guide/phase")] == [0.0, 1.0]
    if "--save-model" in args:  # the trained policy, loadable as a model (e.g. the next run's --guide-model)
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
        assert AutoTokenizer.from_pretrained(tmp_path / "saved").get_vocab() == assets["tokenizer"].get_vocab()
        start = AutoModelForCausalLM.from_pretrained(assets["policy"])
        assert all(torch.equal(a, b) for a, b in zip(saved.parameters(), run["policy"].parameters()))
        assert any(not torch.equal(a, b) for a, b in zip(saved.parameters(), start.parameters()))


@pytest.mark.parametrize("script,args,message", [
    ("ppo_plus_plus.py", ["--beta", "1.5"], "--beta must be in [0, 1], got 1.5"),
    ("aggrevated.py", ["--guide-top-p", "0"], "--guide-top-p must be in (0, 1], got 0.0"),
    ("d2lols.py", ["--tau", "-1"], "--tau must be at least 0, got -1"),
    ("aggrevated.py", ["--guide-prompt-template", "Continue:"], "--guide-prompt-template must contain {prompt}"),
    ("d2lols.py", ["--guide-model", "./no_guide"], "--guide-model: no such model folder"),
    ("ppo_plus_plus.py", ["--max-new-tokens", "1"], "--max-new-tokens must be at least 2"),
])
def test_guided_bad_input_fails_fast(assets, tmp_path, script, args, message):
    base = task_args(assets, "imdb", script)
    for flag, value in zip(args[::2], args[1::2]):
        if flag in base:
            base[base.index(flag) + 1] = value
        else:
            base += [flag, value]
    with pytest.raises(SystemExit) as exit_info:
        run_script_in_process(script, base, cwd=tmp_path)
    assert str(exit_info.value.code).startswith("error: ") and message in str(exit_info.value.code)


@pytest.mark.parametrize("module,episodes", [(ppo_plus_plus, "roll_in"), (aggrevated, "roll_out"), (d2lols, "roll_in"),
                                             (d2lols, "roll_out")], ids=lambda x: getattr(x, "__name__", x))
def test_the_switch_time_k_is_uniform_on_1_to_L_minus_1(module, episodes, monkeypatch):
    """k is drawn before the sample is written and drawn again where the sample is shorter: check the law."""
    eos, draws = 2, 6000
    batch = [{"prompt": "p", "prompt_ids": [5, 6], "references": [""]}] * draws
    tokenizer = SimpleNamespace(eos_token_id=eos, pad_token_id=0)
    args = make_args(module, beta=1.0)
    # L = 3 (ended: n = 2 roll-in points), a sample that ran to H (n = H - 1, as k < H), and a roll-in sample
    # that stopped without EOS after 3 tokens (the guide's budget; through text, policy tokens): n = L - 1 = 2,
    # never the whole sample (tril's k <= L - 1)
    cases = [([7, 8, eos], True, 2), ([7] * H, False, H - 1)] + [([7, 8, 9], False, 2)] * (episodes == "roll_in")
    for sample, ended, n in cases:
        length = len(sample)
        if episodes == "roll_in":  # PPO++: the guide writes the roll-in
            guide = SimpleNamespace(counts_policy_tokens=True, write=lambda examples, *a: [(sample, ended)] * len(examples))
            roll_ins = module.guide_roll_in(guide, tokenizer, batch, args, "cpu",
                                            random.Random(0))
            k = torch.tensor([len(r) for r in roll_ins])
        else:  # AggreVaTeD: the policy writes the roll-in; the guide's roll-out is not needed here
            def fake_rollout(policy, tok, prompts, config, args, device, *roll_ins):
                responses = torch.tensor([sample + [0] * (H - length)] * len(prompts))
                mask = ppo.mask_after_eos(responses, eos) * (torch.arange(H) < length)
                return (None, None, responses, mask, torch.zeros(len(prompts), H)) + (mask,) * len(roll_ins)

            monkeypatch.setattr(module, "rollout", fake_rollout)
            guide = SimpleNamespace(write=lambda examples, *a: [([], True)] * len(examples))
            monkeypatch.setattr(module, "left_pad", lambda *a: (None, None))
            _, _, _, policy_mask, _, _ = module.guide_roll_out(None, guide, tokenizer, batch, GenerationConfig(), args,
                                                               "cpu", random.Random(0))
            k = policy_mask.sum(1)
        frequencies = torch.bincount(k, minlength=H) / draws
        expected = torch.zeros(H)
        expected[1 : n + 1] = 1 / n  # U{1..n}
        torch.testing.assert_close(frequencies, expected, atol=0.025, rtol=0)


@pytest.mark.parametrize("script", ["ppo.py", "ppo_plus_plus.py", "aggrevated.py", "d2lols.py"])
@pytest.mark.slow
def test_num_eos_tokens_counts_episodes_that_ended_not_padding(assets, tmp_path, script):
    # episodes (and guide roll-ins) end early and at different steps; the padding after an EOS is EOS too
    often_eos = assets["often_eos"]
    args = task_args(assets, "imdb", script)
    args[args.index("--model-name-or-path") + 1] = often_eos
    args[args.index("--max-new-tokens") + 1] = "16"  # long padding tails after the early EOSes
    args += ["--min-new-tokens", "0", "--guide-min-new-tokens", "0"] if script != "ppo.py" else ["--min-new-tokens", "0"]
    if "--guide-model" in args:
        args[args.index("--guide-model") + 1] = often_eos
    run_script_in_process(script, args + ["--eval-every", "0"], cwd=tmp_path)
    counts = [e.value for e in read_tensorboard(tmp_path).Scalars("val/num_eos_tokens")]
    assert len(counts) == 2 and all(0 <= c <= 4 for c in counts) and sum(counts) > 0, counts  # batches of 4


@pytest.mark.parametrize("module", GUIDED_MODULES, ids=module_name)
@pytest.mark.slow
def test_the_guides_length_flags(setup, assets, monkeypatch, module):
    """--guide-min-new-tokens: no EOS from the guide before it (a guide that says EOS with p = 0.2);
    --guide-max-new-tokens: its roll-in (PPO++) or roll-out (AggreVaTeD) is at most that long."""
    often_eos = load_guide(assets["often_eos"], AutoTokenizer.from_pretrained(assets["often_eos"]))
    examples = [{"prompt": "p", "prompt_ids": often_eos.tokenizer(t).input_ids} for t in TEXTS * 4]
    lengths = {}
    for minimum in (0, 3):
        torch.manual_seed(0)
        args = make_args(module, 1.0, guide_top_k=0, guide_min_new_tokens=minimum)
        results = write(often_eos, examples, [[]] * len(examples), 6, args)
        lengths[minimum] = [len(tokens) - ended for tokens, ended in results]
    assert min(lengths[0]) < 3 <= min(lengths[3])

    tokenizer, policy, batch, guide = setup  # the toy guide, which does not end
    args = make_args(module, 1.0, guide_max_new_tokens=3)
    monkeypatch.setattr(guide.args, "guide_max_new_tokens", 3)  # (the guide's own flags: those it was loaded with)
    torch.manual_seed(0)
    if module in ROLL_IN_MODULES:
        roll_ins = module.guide_roll_in(guide, tokenizer, batch, args, "cpu", random.Random(0))
        assert max(map(len, roll_ins)) <= 3 and min(map(len, roll_ins)) >= 1
    if module in ROLL_OUT_MODULES:
        _, _, _, policy_mask, value_mask, _ = module.guide_roll_out(
            policy, guide, tokenizer, batch, policy_config(tokenizer), args, "cpu", random.Random(0))
        assert value_mask.sum(1).max() <= 3 and value_mask.sum() > 0


@pytest.mark.parametrize("tau,twin", [(2, "aggrevated.py"), (0, "ppo_plus_plus.py")])
def test_d2lols_is_aggrevated_then_ppo_plus_plus(assets, tmp_path, tau, twin):
    """Each D2LOLS phase is its algorithm, to the last sampled token: with the switch after both iterations
    it trains exactly as aggrevated.py, with the switch before them exactly as ppo_plus_plus.py."""
    curves = {}
    for script in ("d2lols.py", twin):
        (tmp_path / script).mkdir()
        args = set_flags(task_args(assets, "imdb", script), "--beta", 0.7, "--eval-every", 0)
        if script == "d2lols.py":
            args = set_flags(args, "--tau", tau)
        run_script_in_process(script, args, tmp_path / script)
        events = read_tensorboard(tmp_path / script)
        curves[script] = [[e.value for e in events.Scalars(tag)] for tag in ("objective/scores", "objective/kl",
                                                                             "loss/policy_avg", "loss/value_avg")]
    assert curves["d2lols.py"] == curves[twin]
