"""Fair credit for guided episodes: a guide's reward must not move the advantages of the policy's own episodes,
the minimum length counts the whole response (a roll-in, a prefix the guide continues), a critic that can learn
at a small budget (its clip, its learning rate, a warm-up), and AggreVaTeD's two estimators of A^g. Each test
runs against every script's own copy of what it tests."""

import random
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from safetensors.torch import load_file

import aggrevated
import d2lols
import ppo
import ppo_plus_plus
from common import diagnostics
from common import guide as guides
from conftest import (GUIDED_MODULES, RL_MODULES, RL_SCRIPTS, module_name, read_tensorboard, run_script_in_process,
                      set_flags, task_args)
from guide_server import GuideServer
from test_guided import load_guide, make_args, policy_config, recomputed_logprobs, write
from test_parts import loss

MIXING_MODULES = [ppo_plus_plus, d2lols]  # a batch of mixed and unmixed episodes (D2LOLS after tau)
ROLL_OUT_MODULES = [aggrevated, d2lols]


def commongen_like_batch(seed=0, episodes=64, H=20, beta=0.8, mixed_score=1.9, unmixed_score=0.03):
    """GAE advantages of a DR-PO batch as the committed CommonGen logs show it (values 0, no KL): the mixed
    episodes (a reference prefix of k tokens, then the policy's) score ~1.9 CIDEr-D, the policy's own ~0.03.
    Returns (advantages, policy mask, mixed)."""
    g = torch.Generator().manual_seed(seed)
    mixed = (torch.rand(episodes, generator=g) < beta).float()
    k = torch.randint(1, H, (episodes,), generator=g) * mixed.long()  # (unmixed: k = 0, the policy's own)
    policy_mask = ((torch.arange(H)[None] >= k[:, None])).float()
    scores = torch.where(mixed.bool(), mixed_score * torch.rand(episodes, generator=g) * 2,
                         unmixed_score * torch.rand(episodes, generator=g) * 2)
    rewards = torch.zeros(episodes, H)
    rewards[:, -1] = scores
    advantages, _ = ppo.compute_gae(rewards, torch.zeros(episodes, H), policy_mask, gamma=0.99, lam=0.95)
    return advantages, policy_mask, mixed


@pytest.mark.parametrize("module", MIXING_MODULES, ids=module_name)
def test_whitening_over_the_whole_batch_lowers_every_token_of_the_policys_own_episodes(module):
    """The defect this fixes, reproduced: whitened over the whole batch (one group), every token of an unmixed
    DR-PO episode gets about -1 ("lower whatever was sampled"), whatever the policy did."""
    advantages, mask, mixed = commongen_like_batch()
    unmixed = mask * (1 - mixed[:, None])
    whole_batch = module.normalize_advantages(advantages, mask, "whiten", torch.zeros_like(mixed))
    mean = (whole_batch * unmixed).sum() / unmixed.sum()
    spread = ((whole_batch - mean) ** 2 * unmixed).sum() / unmixed.sum()
    assert mean < -0.9 and spread.sqrt() < 0.05, (mean, spread)


@pytest.mark.parametrize("module", MIXING_MODULES, ids=module_name)
@pytest.mark.parametrize("how", ["whiten", "scale"])
def test_the_guides_reward_cannot_shift_or_rescale_the_policys_own_advantages(module, how):
    """Each group on its own: the policy's own episodes get exactly what plain normalisation of them alone gives,
    whatever the mixed episodes scored (their rewards x10 + 3 change nothing there), and the reverse."""
    advantages, mask, mixed = commongen_like_batch()
    grouped = module.normalize_advantages(advantages, mask, how, mixed)
    unmixed, mixed_rows = ~mixed.bool(), mixed.bool()
    torch.testing.assert_close(grouped[unmixed], ppo.normalize_advantages(advantages[unmixed], mask[unmixed], how))
    torch.testing.assert_close(grouped[mixed_rows],
                               ppo.normalize_advantages(advantages[mixed_rows], mask[mixed_rows], how))
    moved = advantages.clone()
    moved[mixed_rows] = moved[mixed_rows] * 10 + 3
    regrouped = module.normalize_advantages(moved, mask, how, mixed)
    assert torch.equal(regrouped[unmixed], grouped[unmixed])
    if how == "whiten":  # the policy's own tokens are centred on their own mean: none is lowered for the guide's
        assert abs((grouped * mask * unmixed[:, None]).sum() / (mask * unmixed[:, None]).sum()) < 1e-6


@pytest.mark.parametrize("module", MIXING_MODULES, ids=module_name)
@pytest.mark.parametrize("how", ["whiten", "scale", "none"])
def test_one_group_is_plain_normalisation_bit_for_bit(module, how):
    """--beta 0 (every episode the policy's own) or DR-PO's beta 1 (every episode mixed): ppo.py's numbers exactly."""
    advantages, mask, _ = commongen_like_batch(seed=1)
    expected = ppo.normalize_advantages(advantages, mask, how)
    for mixed in (torch.zeros(len(mask)), torch.ones(len(mask))):
        assert torch.equal(module.normalize_advantages(advantages, mask, how, mixed), expected)


def test_dr_po_restarts_every_episode_by_default_as_its_authors(assets, tmp_path):
    """--guide-references without --beta: beta 1 (Cornell-RL/drpo); a model guide keeps tril's 0.6 on IMDB."""
    runs = {}
    for flag in ("--guide-references", "--guide-model"):
        args = set_flags(task_args(assets, "imdb", "ppo_plus_plus.py"), "--total-episodes", 4, "--batch-size", 4,
                         "--eval-every", 0) + ([flag] if flag == "--guide-references" else [])
        (tmp_path / flag[2:]).mkdir()
        runs[flag] = run_script_in_process("ppo_plus_plus.py", args, tmp_path / flag[2:])["args"].beta
    assert runs == {"--guide-references": 1.0, "--guide-model": 0.6}


@pytest.mark.slow
def test_a_run_logs_the_unmixed_advantage_it_trains_on(assets, tmp_path):
    """guide/advantage_unmixed is the mean advantage the loss gives the policy's own tokens: 0 when each group is
    whitened on its own, below 0 when the whole batch is (the guide's prefixes score higher); the restart states'
    explained variance is logged."""
    means = {}
    for grouped in (True, False):
        args = set_flags(task_args(assets, "imdb", "ppo_plus_plus.py"), "--total-episodes", 32, "--batch-size", 32,
                         "--eval-every", 0, "--beta", 0.5, "--guide-model", assets["toy_guide"])
        args += [] if grouped else ["--no-norm-per-group"]
        cwd = tmp_path / str(grouped)
        cwd.mkdir()
        run_script_in_process("ppo_plus_plus.py", args, cwd)
        events = read_tensorboard(cwd)
        means[grouped] = events.Scalars("guide/advantage_unmixed")[0].value
        assert len(events.Scalars("guide/explained_variance_restart")) == 1
    assert abs(means[True]) < 1e-5 and means[False] < -0.1, means


def test_the_mixing_logs_by_hand():
    """common/diagnostics.mixing_logs on a batch worked out by hand: two mixed episodes (k 2 and 1) around one of
    the policy's own. The critic is exact at the restart states (each mixed episode's first policy token) and
    nowhere else, so any other token taken for them gives an explained variance below 1."""
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.float)  # the policy's tokens
    mixed, k, scores = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([2, 0, 1]), torch.tensor([3.0, 0.5, 1.0])
    returns = torch.tensor([[5.0, 7.0, 2.0, 9.0], [4.0, 1.0, 6.0, 8.0], [3.0, 4.0, 1.0, 6.0]])
    values = torch.zeros(3, 4)
    values[0, 2], values[2, 1] = 1.5, 3.5  # returns 2 and 4: the residuals 0.5 and 0.5, no variance
    advantages, raw = torch.arange(12.0).reshape(3, 4), -torch.arange(12.0).reshape(3, 4)
    logs = diagnostics.mixing_logs(mixed, k, scores, values, returns, mask, unmixed=(advantages, raw, mask))
    assert logs == pytest.approx({"guide/mixed_fraction": 2 / 3, "guide/mean_k": 1.5, "guide/score_mixed": 2.0,
                                  "guide/explained_variance_restart": 1.0, "guide/score_unmixed": 0.5,
                                  "guide/k_score_correlation": 1.0,
                                  "guide/advantage_unmixed": 5.0, "guide/gae_unmixed": -5.0})  # (4 + 5 + 6) / 3
    # one kind of episode only: the other kind's scalars are not logged (nor the advantages without `unmixed`)
    assert set(diagnostics.mixing_logs(torch.ones(3), k + 1, scores, values, returns, mask)) == {
        "guide/mixed_fraction", "guide/mean_k", "guide/score_mixed", "guide/explained_variance_restart",
        "guide/k_score_correlation"}
    assert set(diagnostics.mixing_logs(torch.zeros(3), k * 0, scores, values, returns, mask)) == {
        "guide/mixed_fraction", "guide/score_unmixed"}


def test_the_groups_mixing_logs_by_hand():
    """Three groups of two samples (each group one state): a mixed group whose scores are equal, an unmixed one
    whose are not, a mixed one whose are not; over the mixed episodes k 2, 2, 4, 4 against scores 1, 1, 2, 3:
    covariance 0.75, variances 1 and 0.6875."""
    mixed, k = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 1.0]), torch.tensor([2, 2, 0, 0, 4, 4])
    scores, mask = torch.tensor([1.0, 1.0, 0.5, 0.25, 2.0, 3.0]), torch.ones(6, 3)
    logs = diagnostics.mixing_logs(mixed, k, scores, None, None, mask, samples_per_prompt=2)
    assert logs["guide/equal_score_groups_mixed"] == pytest.approx(0.5)
    assert logs["guide/equal_score_groups_unmixed"] == pytest.approx(0.0)
    assert logs["guide/k_score_correlation"] == pytest.approx(0.75 / 0.6875 ** 0.5)
    # one sample a prompt: no groups to count; a restart depth that does not vary: no correlation (not a 0)
    logs = diagnostics.mixing_logs(mixed, k * 0 + 3, scores, None, None, mask)
    assert "guide/equal_score_groups_mixed" not in logs and "guide/k_score_correlation" not in logs


# -- the minimum length counts the whole response ------------------------------------------------------------------

@pytest.mark.parametrize("module", MIXING_MODULES, ids=module_name)
def test_the_policys_minimum_length_counts_the_roll_in(assets, module):
    """A policy that says EOS with p = 0.2 continues roll-ins of 0, 2, 4 and 6 tokens, minimum 5, H 8: no episode
    ends before 5 tokens in all (roll-in + policy), and after a roll-in of 6 the policy may end at once (counted
    from its own first token, it would write 5 tokens of filler first). The log-probs are still pi's own, over the
    whole vocabulary (the minimum only forbids EOS in sampling)."""
    tokenizer = AutoTokenizer.from_pretrained(assets["often_eos"])
    policy = AutoModelForCausalLM.from_pretrained(assets["often_eos"]).eval()
    config = policy_config(tokenizer)
    config.min_new_tokens = 5
    args = make_args(module, 1.0, rollout_batch_size=64)
    roll_ins = [[7] * k for k in (0, 2, 4, 6)] * 16
    torch.manual_seed(0)
    prompt_ids, prompt_mask, episodes, episode_mask, logprobs, policy_mask = module.rollout(
        policy, tokenizer, [tokenizer("a b").input_ids] * len(roll_ins), config, args, "cpu", roll_ins)
    ended = (episodes == tokenizer.eos_token_id) & episode_mask.bool()
    before_eos = episode_mask.sum(1) - ended.sum(1)  # the response's tokens before its EOS
    assert before_eos.min() >= 5
    policy_tokens_before_eos = policy_mask.sum(1) - ended.sum(1)
    late = torch.tensor([len(r) == 6 for r in roll_ins])
    assert ended[late].any(1).any() and policy_tokens_before_eos[late & ended.any(1)].max() < 5
    recomputed = recomputed_logprobs(policy, prompt_ids, prompt_mask, episodes, episode_mask)
    torch.testing.assert_close(logprobs * policy_mask, recomputed * policy_mask, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("module", ROLL_OUT_MODULES, ids=module_name)
def test_the_guides_minimum_length_counts_the_policys_prefix(assets, module):
    """The local guide (EOS with p = 0.2) continues prefixes of 0 and 3 policy tokens, --guide-min-new-tokens 5:
    prefix + continuation is never shorter than 5, and after 3 tokens the guide may end after 2."""
    often_eos = load_guide(assets["often_eos"], AutoTokenizer.from_pretrained(assets["often_eos"]))
    examples = [{"prompt": "p", "prompt_ids": often_eos.tokenizer("a b").input_ids}] * 64
    prefixes = [[7] * (3 * (i % 2)) for i in range(64)]
    torch.manual_seed(0)
    results = write(often_eos, examples, prefixes, 8, make_args(module, 1.0, guide_top_k=0, guide_min_new_tokens=5))
    written = [len(prefix) + len(tokens) - ended for prefix, (tokens, ended) in zip(prefixes, results)]
    assert min(written) >= 5
    assert min(len(tokens) - ended for prefix, (tokens, ended) in zip(prefixes, results) if prefix) < 5


@pytest.mark.slow
def test_a_served_guide_is_asked_for_the_minimum_after_the_prefix(assets):
    """min_tokens per request: --guide-min-new-tokens less the prefix's policy tokens (never below 0)."""
    tokenizer = assets["tokenizer"]
    args = make_args(aggrevated, 1.0, guide_model="toy", guide_top_k=0, guide_min_new_tokens=5)
    examples = [{"prompt": "a b", "prompt_ids": tokenizer("a b").input_ids}] * 3
    prefixes = [[], tokenizer(" movie movie").input_ids, tokenizer(" the movie was a good one").input_ids]
    with GuideServer(marker=" movie") as server:
        args.guide_url = server.url
        guides.load_guide(args, tokenizer, "cpu", torch.float32, random.Random(0)).write(examples, prefixes, [8] * 3)
    asked = server.rows()  # (not the first requests: they learn what the server takes)
    assert sorted(r["min_tokens"] for r in asked) == sorted(max(5 - len(p), 0) for p in prefixes)


# -- a critic that can learn at a small budget ----------------------------------------------------------------------

@pytest.mark.parametrize("module", RL_MODULES, ids=module_name)
def test_the_value_clip_off_is_the_plain_squared_error(module):
    """--clip-coef-value None: the value loss is 0.5 (V - R)^2 however far V moved from the rollout's value
    (with tril's 0.2 a move of 1.5 toward the return is cut to 0.2)."""
    new_values, old_values, returns = torch.tensor([[1.5, -2.0]]), torch.zeros(1, 2), torch.tensor([[2.0, -3.0]])
    mask, zeros = torch.ones(1, 2), torch.zeros(1, 2)
    args = SimpleNamespace(clip_coef=0.2, vf_coef=1.0, clip_coef_value=None)
    total, _ = loss(module, zeros, new_values, zeros, old_values, zeros, returns, mask, args)  # (advantages 0: the
    torch.testing.assert_close(total, torch.tensor(0.5 * (0.5**2 + 1.0**2) / 2))  # value loss alone, vf_coef 1)
    args.clip_coef_value = 0.2  # max((V - R)^2, (clipped V - R)^2): (0.2 - 2)^2 and (-0.2 + 3)^2
    total, _ = loss(module, zeros, new_values, zeros, old_values, zeros, returns, mask, args)
    torch.testing.assert_close(total, torch.tensor(0.5 * (1.8**2 + 2.8**2) / 2))


def warmup_run(assets, tmp_path, script, *flags):
    args = set_flags(task_args(assets, "imdb", script), "--total-episodes", 8, "--batch-size", 4, "--eval-every", 0,
                     "--learning-rate", 1e-2, *flags)
    tmp_path.mkdir(exist_ok=True)
    if script != "ppo.py":
        args = set_flags(args, "--guide-model", assets["toy_guide"], "--beta", 0.5)
    return run_script_in_process(script, args, tmp_path)


@pytest.mark.parametrize("script", RL_SCRIPTS)
@pytest.mark.slow
def test_the_critics_warm_up_leaves_the_policy_as_it_was(assets, tmp_path, script):
    """--critic-warmup-iterations 1 of 2: the policy moves in iteration 2 only, the critic in both (D2LOLS with
    tau 1: each phase's critic warms up in its own first iteration, so the policy never moves)."""
    start = load_file(f"{assets['policy']}/model.safetensors")
    extra = ("--tau", 1) if script == "d2lols.py" else ()
    one = warmup_run(assets, tmp_path / "one", script, "--critic-warmup-iterations", 1, "--total-episodes", 4, *extra)
    two = warmup_run(assets, tmp_path / "two", script, "--critic-warmup-iterations", 1, *extra)
    changed = lambda namespace: any(not torch.equal(p.detach(), start[name]) for name, p in  # noqa: E731
                                    namespace["policy"].named_parameters() if name in start)
    assert not changed(one) and changed(two) != (script == "d2lols.py")
    head = one["critic"].value_head.weight if script != "d2lols.py" else one["guide_critic"].value_head.weight
    assert head.abs().sum() > 0  # (the head starts at 0)


@pytest.mark.parametrize("script", RL_SCRIPTS)
@pytest.mark.slow
def test_the_critic_can_keep_its_learning_rate(assets, tmp_path, script):
    """--critic-anneal-lr false with --anneal-lr: the policy's rate decays, the critic's stays."""
    namespace = warmup_run(assets, tmp_path, script, "--critic-learning-rate", 3e-3, "--critic-anneal-lr", False)
    policy_group, critic_group = namespace["optimizer"].param_groups
    assert policy_group["lr"] == pytest.approx(1e-2 / 2) and critic_group["lr"] == 3e-3


# -- AggreVaTeD's estimator of A^g on the roll-in ------------------------------------------------------------------

@pytest.mark.parametrize("module", ROLL_OUT_MODULES, ids=module_name)
def test_roll_in_advantages_by_hand(module):
    """Two policy tokens then two of the guide's, score 1 at the end, no KL; V = 0.2, 0.4, 0.5, 0.8; gamma 0.9,
    lambda 0.5. GAE: deltas 0.16, 0.05, 0.22, 0.2 -> A3 = 0.2, A2 = 0.22 + 0.45 * 0.2 = 0.31,
    A1 = 0.05 + 0.45 * 0.31 = 0.1895, A0 = 0.16 + 0.45 * 0.1895 = 0.245275.
    one-step: token 0 is followed by the policy's token 1, so r0 + 0.9 V1 - V0 = 0.16; token 1 (the roll-in's
    last) keeps GAE's 0.1895. gae (tril): the trace as it is."""
    rewards, values = torch.tensor([[0.0, 0.0, 0.0, 1.0]]), torch.tensor([[0.2, 0.4, 0.5, 0.8]])
    mask, policy_mask = torch.ones(1, 4), torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    gae, _ = module.compute_gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(gae, torch.tensor([[0.245275, 0.1895, 0.31, 0.2]]))
    one_step = module.roll_in_advantages(gae, rewards, values, policy_mask, 0.9, "one-step")
    torch.testing.assert_close(one_step[0, :2], torch.tensor([0.16, 0.1895]))
    assert torch.equal(module.roll_in_advantages(gae, rewards, values, policy_mask, 0.9, "gae"), gae)


def lone_unmixed_episode(score):
    """A batch of 8 10-token episodes, values 0, gamma 0.99, lambda 0.95: 7 mixed ones that score 0 and one of the
    policy's own that scores `score` (the issue's example). Returns (advantages, mask, mixed)."""
    rewards, mask = torch.zeros(8, 10), torch.ones(8, 10)
    rewards[7, -1] = score
    advantages, _ = ppo.compute_gae(rewards, torch.zeros(8, 10), mask, gamma=0.99, lam=0.95)
    return advantages, mask, torch.tensor([1.0] * 7 + [0.0])


@pytest.mark.parametrize("module", MIXING_MODULES, ids=module_name)
@pytest.mark.parametrize("how", ["whiten", "scale"])
def test_a_group_of_one_episode_keeps_the_sign_of_its_return(module, how):
    """Whitened on its own, a lone unmixed episode is centred on its own mean: at +2 its first tokens got -1.44 and
    its last +1.70 (credit inverted along the episode), at -2 the reverse. A group of fewer than 4 episodes (every
    rank's) takes the batch's mean and spread: every token of a +2 episode is positive, of a -2 one negative; the
    mixed group (7 episodes) keeps its own."""
    for score, sign in ((2.0, 1), (-2.0, -1)):
        advantages, mask, mixed = lone_unmixed_episode(score)
        own = module.normalize_advantages(advantages, mask, how, mixed, min_episodes=1)  # (the old rule)
        if how == "whiten":
            assert own[7, 0] == pytest.approx(-1.44 * sign, abs=0.01) and own[7, -1] == pytest.approx(1.70 * sign,
                                                                                                     abs=0.01)
        fixed = module.normalize_advantages(advantages, mask, how, mixed)
        assert (torch.sign(fixed[7]) == sign).all(), fixed[7]
        batch = ppo.normalize_advantages(advantages, mask, how)
        torch.testing.assert_close(fixed[7], batch[7])  # the batch's statistics
        torch.testing.assert_close(fixed[:7], torch.zeros(7, 10))  # (the mixed: all 0, their own, not rescaled)


@pytest.mark.parametrize("module", RL_MODULES, ids=module_name)
def test_scale_leaves_a_group_without_spread_as_it_is(module):
    """scale divides by the spread; where every advantage of a group is the same, it used to divide by sqrt(eps)
    (0.5 became 5000): a group without spread is not rescaled."""
    advantages, mask = torch.full((8, 10), 0.5), torch.ones(8, 10)
    if module in MIXING_MODULES:
        advantages[:4] = torch.randn(4, 10)  # a mixed group with a spread; the policy's own (4) without
        scaled = module.normalize_advantages(advantages, mask, "scale", torch.tensor([1.0] * 4 + [0.0] * 4))
        torch.testing.assert_close(scaled[4:], torch.full((4, 10), 0.5))
        assert scaled[:4].std() == pytest.approx(1.0, rel=0.1)
    else:
        torch.testing.assert_close(module.normalize_advantages(advantages, mask, "scale"), advantages)
