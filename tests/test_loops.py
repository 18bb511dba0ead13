"""The four training loops: what each passes its helpers, and every flag that changes a loop.

The scripts run in-process (tests/conftest.py: run_script_in_process) with some of their own helpers
wrapped by a Spy, which records what the loop hands them; nothing in the scripts is changed.
"""

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer

from common import metrics, rewards, tasks
from conftest import (RL_SCRIPTS, Spy, read_tensorboard, reward_model_of, run_script_in_process, set_flags,
                      task_args)

rl_scripts = pytest.mark.parametrize("script", RL_SCRIPTS)
SPIED = {  # the helpers that build each script's episodes, and the ones the loop feeds
    "ppo.py": ["rollout"],
    "ppo_plus_plus.py": ["guide_roll_in", "rollout"],
    "aggrevated.py": ["guide_roll_out"],
    "d2lols.py": ["guide_roll_out", "guide_roll_in", "rollout"],
}
LOOP_HELPERS = ["kl_penalized_rewards", "compute_gae", "ppo_loss"]


def run(script, args, cwd, spy_names=()):
    spies = {name: Spy() for name in spy_names}
    namespace = run_script_in_process(script, args, cwd, spies)
    return namespace, spies, read_tensorboard(cwd)


def run_with(script, args, flag, value, tmp_path):
    """run() with `flag value` added, in a folder of its own (tmp_path/value), to compare values of one flag."""
    (tmp_path / value).mkdir()
    return run(script, args + [flag, value], tmp_path / value)


def scalars(events, tag):
    return [e.value for e in events.Scalars(tag)]


def episodes_built(script, spies, iteration):
    """What the script's episode builder returned in `iteration` (0-based): the tokens and masks the loop
    must pass on. `policy` = tokens the policy sampled (policy gradient, KL), `value` = the value loss's
    tokens, `episode` = every token of the episode (the score sits on its last), `roll_in` = PPO++'s k."""
    phase = "ppo" if script == "ppo.py" else "ppo++" if script == "ppo_plus_plus.py" else "aggrevated"
    if script == "d2lols.py" and iteration > 0:  # --tau 1: AggreVaTeD, then PPO++
        phase, iteration = "ppo++", iteration - 1
    if phase == "ppo":
        _, _, responses, episode, logprobs = spies["rollout"].calls[iteration].result
        return dict(responses=responses, episode=episode, policy=episode, value=episode, logprobs=logprobs,
                    gae=episode)
    if phase == "ppo++":
        roll_ins = spies["guide_roll_in"].calls[iteration].result
        calls = [c for c in spies["rollout"].calls if c.roll_ins is roll_ins]  # D2LOLS: the one from these roll-ins
        rollout_call = calls[0] if calls else spies["rollout"].calls[iteration]  # PPO++: one a prompt's samples share
        assert rollout_call.roll_ins == roll_ins  # (one sample a prompt: the same roll-ins)
        _, _, responses, episode, logprobs, policy = rollout_call.result
        return dict(responses=responses, episode=episode, policy=policy, value=policy, logprobs=logprobs,
                    gae=policy, roll_ins=roll_ins)
    _, _, responses, policy, value, logprobs = spies["guide_roll_out"].calls[iteration].result
    return dict(responses=responses, episode=policy + value, policy=policy, value=value, logprobs=logprobs,
                gae=policy + value)


OTHER_NORM = {"ppo.py": "none", "ppo_plus_plus.py": "scale", "aggrevated.py": "scale", "d2lols.py": "none"}


@rl_scripts
@pytest.mark.parametrize("advantage_norm", ["default", "other", "ends_early"])
def test_one_update_per_iteration_starts_at_ratio_one_with_the_algorithms_masks(assets, tmp_path, script,
                                                                                advantage_norm):
    """One epoch of one minibatch: the policy that scores the ratio is the one that sampled, so the ratio
    is 1 and approx-KL 0 on every iteration, and the loop hands KL, GAE, the advantage normalisation and the
    PPO loss the masks the algorithm says: PPO++'s roll-in is state (no loss, no KL), AggreVaTeD's value loss
    runs on the guide's tokens and its policy gradient on the policy's, D2LOLS does one then the other.
    ends_early: a policy (and guide) that says EOS with p = 0.2, so episodes end before the horizon and the
    padding after them is not a loss token."""
    args = set_flags(task_args(assets, "imdb", script), "--num-minibatches", 1, "--max-new-tokens", 8,
                     "--eval-every", 0, "--kl-coef", 0.1, "--learning-rate", 1e-3, "--gamma", 0.9, "--gae-lambda", 0.8)
    if script != "ppo.py":
        args = set_flags(args, "--beta", 1)
    if advantage_norm == "ends_early":
        args = set_flags(args, "--model-name-or-path", assets["often_eos"], "--min-new-tokens", 0, "--top-k", 0)
        if script != "ppo.py":
            args = set_flags(args, "--guide-model", assets["often_eos"], "--guide-min-new-tokens", 0,
                             "--guide-top-k", 0, "--guide-top-p", 1.0)
    norm = OTHER_NORM[script] if advantage_norm == "other" else None
    args += ["--anneal-lr", "False", "--target-coef", "0"] + (["--advantage-norm", norm] if norm else [])
    _, spies, events = run(script, args, tmp_path, SPIED[script] + LOOP_HELPERS + ["reference_nll"])
    assert not spies["reference_nll"].calls and "loss/target_avg" not in events.Tags()["scalars"]  # --target-coef 0
    assert len(spies["ppo_loss"].calls) == 2  # 2 iterations x 1 epoch x 1 minibatch
    for value in scalars(events, "val/ratio"):
        assert value == pytest.approx(1, abs=1e-5)
    assert max(scalars(events, "policy/approxkl_avg")) < 1e-9
    assert scalars(events, "policy/clipfrac_avg") == [0, 0]
    assert scalars(events, "charts/lr") == pytest.approx([1e-3, 1e-3])  # --no-anneal-lr
    if script != "ppo.py" and advantage_norm != "ends_early":
        assert min(scalars(events, "guide/mixed_fraction")) >= 0.75  # beta 1: (nearly) every episode is mixed
    ended_early = 0

    for iteration in range(2):
        built = episodes_built(script, spies, iteration)
        loss_call = spies["ppo_loss"].calls[iteration]
        num_tokens = loss_call.mask.shape[1]
        assert num_tokens == int(built["episode"].sum(1).max())  # only the columns no episode reached are dropped
        built = {name: x[:, :num_tokens] if torch.is_tensor(x) else x for name, x in built.items()}
        policy, episode = built["policy"].float(), built["episode"].float()
        assert policy.sum() > 0
        ended_early += int((episode.sum(1) < 8).sum())

        # KL on the policy's tokens, the score on the episode's last token; GAE over the episode's actions
        kl_call = spies["kl_penalized_rewards"].calls[iteration]
        assert torch.equal(kl_call.logprobs, built["logprobs"]) and kl_call.kl_coef == 0.1
        if script == "ppo.py":
            assert torch.equal(kl_call.mask, episode)
        else:
            assert torch.equal(kl_call.policy_mask, policy) and torch.equal(kl_call.mask, episode)
        gae_call = spies["compute_gae"].calls[iteration]
        assert torch.equal(gae_call.mask, built["gae"].float()) and (gae_call.gamma, gae_call.lam) == (0.9, 0.8)

        # the PPO loss sees a shuffled minibatch: match its rows to the episodes by their (unique) old log-probs
        rows = [[j for j in range(len(policy)) if torch.equal(built["logprobs"][j], old)] for old in loss_call.old_logprobs]
        assert all(len(r) == 1 for r in rows), "the old log-probs should identify each episode"
        order = [r[0] for r in rows]
        assert sorted(order) == list(range(len(policy)))
        assert torch.equal(loss_call.mask, policy[order])  # the policy gradient on the policy's tokens only
        value_mask = vars(loss_call).get("value_mask", loss_call.mask)
        # GAE's advantages (AggreVaTeD: the guide's one-step advantage where the policy writes the next token
        # too), normalised over exactly the policy's tokens: whitened by default, or as --advantage-norm says
        raw = gae_call.result[0]
        if script != "ppo.py" and "roll_ins" not in built:
            rewards, values = kl_call.result[1], gae_call.values
            goes_on = (policy * nn.functional.pad(policy[:, 1:], (0, 1))).bool()
            raw = torch.where(goes_on, rewards + 0.9 * nn.functional.pad(values[:, 1:], (0, 1)) - values, raw)
        # PPO++ (and D2LOLS after tau): the mixed episodes and the policy's own each on its own (AggreVaTeD's
        # unmixed episodes have no policy token: one group)
        how = norm or "whiten"
        mixed = torch.zeros(len(policy))
        if script in ("ppo_plus_plus.py", "d2lols.py"):
            mixed = torch.tensor([float(bool(r)) for r in built["roll_ins"]]) if "roll_ins" in built else (
                (policy.sum(1) > 0).float())
        expected = torch.zeros_like(raw)
        for rows in (mixed, 1 - mixed):  # a group of fewer than 4 episodes: the batch's mean and spread
            group = policy * rows[:, None]
            stats = group if rows.sum() >= 4 else policy
            mean = (raw * stats).sum() / stats.sum().clamp(min=1)
            var = ((raw - mean) ** 2 * stats).sum() / stats.sum().clamp(min=1)
            std = (var + 1e-8).sqrt() if var > 1e-8 else 1.0  # (no spread: not rescaled)
            expected += raw * group if how == "none" else (raw - mean * (how == "whiten")) / std * group
        torch.testing.assert_close(loss_call.advantages, expected[order])
        assert torch.equal(value_mask, built["value"].float()[order])

        # and those masks are the algorithm's
        if "roll_ins" in built:  # PPO++: k roll-in tokens (state: in the episode, no loss), then the policy's
            assert any(built["roll_ins"])
            for i, roll_in in enumerate(built["roll_ins"]):
                k, n = len(roll_in), int(episode[i].sum())
                assert built["responses"][i, :k].tolist() == roll_in
                assert episode[i, :k].all() and not policy[i, :k].any() and policy[i, k:n].all()
        elif script != "ppo.py":  # AggreVaTeD: the policy's k tokens, then the guide's; the critic on the guide's
            value = built["value"].float()
            assert (policy * value).sum() == 0 and value.sum() > 0
            for i in range(len(policy)):
                k, n = int(policy[i].sum()), int(episode[i].sum())
                assert policy[i, :k].all() and value[i, k:n].all()
    if advantage_norm == "ends_early":
        assert ended_early >= 2, "want episodes that end before the horizon"


def record_rewards(monkeypatch):
    """Wrap common.rewards.make_reward_fn: record its arguments and every score it returns."""
    calls, scores = [], []
    make_reward_fn = rewards.make_reward_fn

    def wrapped(*args, **kwargs):
        calls.append((args, kwargs))
        reward_fn = make_reward_fn(*args, **kwargs)

        def recorded(*a):
            result = reward_fn(*a)
            scores.append(result.clone())  # a copy: the loop may change its scores in place
            return result

        return recorded

    monkeypatch.setattr(rewards, "make_reward_fn", wrapped)
    return calls, scores


@rl_scripts
def test_flags_that_change_the_loop(assets, tmp_path, monkeypatch, script):
    """--kl-target (the adaptive controller), --missing-eos-penalty, --micro-batch-size, --anneal-lr with
    --critic-learning-rate,
    each checked against what it must do. Episodes end at different steps (a policy that says EOS with
    p = 0.2), so some are penalised and some are not."""
    args = set_flags(task_args(assets, "imdb", script), "--model-name-or-path", assets["often_eos"],
                     "--total-episodes", 12, "--eval-every", 0, "--learning-rate", 1e-2, "--kl-coef", 0.05,
                     "--kl-target", 0.001, "--kl-horizon", 8, "--missing-eos-penalty", 0.5, "--micro-batch-size", 1,
                     "--critic-learning-rate", 5e-2,
                     "--max-new-tokens", 3, "--top-k", 0, "--min-new-tokens", 0)
    if script != "ppo.py":  # the full distribution (top-k 50 would make EOS p = 0.6)
        args = set_flags(args, "--guide-model", assets["often_eos"], "--guide-top-k", 0, "--guide-top-p", 1.0,
                         "--guide-min-new-tokens", 0)
    _, raw_scores = record_rewards(monkeypatch)
    namespace, spies, events = run(script, args, tmp_path,
                                   SPIED[script] + ["kl_penalized_rewards", "ppo_loss", "reference_nll"])
    eos = namespace["tokenizer"].eos_token_id

    # --missing-eos-penalty: exactly the episodes without an EOS lose 0.5
    penalised = 0
    for iteration, (raw, call) in enumerate(zip(raw_scores, spies["kl_penalized_rewards"].calls, strict=True)):
        no_eos = (episodes_built(script, spies, iteration)["responses"] != eos).all(1).float()
        torch.testing.assert_close(call.scores, raw.float() - 0.5 * no_eos)
        penalised += int(no_eos.sum())
    assert 0 < penalised < 12, "want both kinds of episode"

    # --kl-target: kl_coef <- kl_coef * (1 + clip(kl / target - 1, -0.2, 0.2) * batch / horizon), after every iteration
    kl_coefs, kls = scalars(events, "objective/kl_coef"), scalars(events, "objective/kl")
    assert kl_coefs[0] == pytest.approx(0.05)
    for i in range(2):
        error = min(max(kls[i] / 0.001 - 1, -0.2), 0.2)
        assert kl_coefs[i + 1] == pytest.approx(kl_coefs[i] * (1 + error * 4 / 8), rel=1e-5)
    assert len(set(kl_coefs)) == 3

    # --micro-batch-size 1: every loss is one episode's, 2 per minibatch of 2, 2 minibatches, 3 iterations
    assert [call.mask.shape[0] for call in spies["ppo_loss"].calls] == [1] * 12
    # --anneal-lr (on by default): linear decay from the learning rate, one step per iteration, in every group:
    # the policy's (logged) and the critic's own --critic-learning-rate
    assert scalars(events, "charts/lr") == pytest.approx([1e-2, 1e-2 * 2 / 3, 1e-2 / 3])
    assert [group["lr"] for group in namespace["optimizer"].param_groups] == pytest.approx([1e-2 / 3, 5e-2 / 3])
    critic_parameters = {id(p) for p in namespace["optimizer"].param_groups[1]["params"]}
    assert all(id(p) in critic_parameters for p in namespace["critic"].parameters())
    # --target-coef (0.1 by default): every micro-batch adds the NLL of its prompts' reference continuations
    references = {tuple(e["prompt_ids"] + e["target_ids"]): len(e["target_ids"]) for e in namespace["train_examples"]}
    calls = spies["reference_nll"].calls
    assert len(calls) == 12
    for call in calls:
        [row], [attended], [target] = call.input_ids.tolist(), call.attention_mask.tolist(), call.target_mask
        assert references[tuple(t for t, a in zip(row, attended) if a)] == target.sum()
    # (each call is its micro-batch's share of its minibatch's token mean: summed per minibatch, averaged over the 2)
    target_nll = torch.stack([call.result for call in calls]).view(3, 2, 2).sum(2).mean(1)
    assert scalars(events, "loss/target_avg") == pytest.approx(target_nll.tolist())


def parameter_change(model, start_path):
    start = AutoModelForCausalLM.from_pretrained(start_path)
    return sum((a - b).norm() ** 2 for a, b in zip(model.parameters(), start.parameters())).sqrt().item()


@rl_scripts
@pytest.mark.slow
def test_max_grad_norm_clips_the_update(assets, tmp_path, script):
    """A tiny --max-grad-norm leaves Adam's first step at ~lr * g / eps instead of ~lr: the policy barely moves."""
    args = set_flags(task_args(assets, "imdb", script), "--total-episodes", 4, "--num-minibatches", 1,
                     "--eval-every", 0, "--learning-rate", 1e-3)
    change = {}
    for max_grad_norm in ("1.0", "1e-9"):
        namespace, _, _ = run_with(script, args, "--max-grad-norm", max_grad_norm, tmp_path)
        change[max_grad_norm] = parameter_change(namespace["policy"], assets["policy"])
    assert change["1.0"] > 1e-3 and change["1e-9"] < 1e-3 * change["1.0"], change


@rl_scripts
@pytest.mark.slow
def test_evaluation_flags_reach_the_evaluation(assets, tmp_path, monkeypatch, script):
    """--reward-label picks the classifier's label (0: P(negative)); --perplexity-model is the LM that
    scores eval/perplexity (default: the frozen reference policy)."""
    reward_calls, _ = record_rewards(monkeypatch)
    perplexity_lms = []
    output_perplexity = metrics.output_perplexity

    def recorded_perplexity(lm, *args):
        perplexity_lms.append(lm.name_or_path)
        return output_perplexity(lm, *args)

    monkeypatch.setattr(metrics, "output_perplexity", recorded_perplexity)
    args = set_flags(task_args(assets, "imdb", script), "--total-episodes", 4, "--num-sample-generations", 2)
    _, _, events = run(script, args + ["--reward-label", "0", "--perplexity-model", assets["toy_guide"]], tmp_path)
    [(reward_args, _)] = reward_calls
    # every evaluation writes its generations as JSON Lines, one row per held-out prompt, scored as eval/score
    [run_dir] = (tmp_path / "runs").iterdir()
    files = sorted(p.name for p in (run_dir / "generations").iterdir())
    assert files == ["iteration_0000.jsonl", "iteration_0001.jsonl"]
    for name, logged in zip(files, scalars(events, "eval/score")):
        rows = [json.loads(line) for line in (run_dir / "generations" / name).read_text().splitlines()]
        assert len(rows) == 4 and all(set(row) == {"prompt", "continuation", "references", "score"} for row in rows)
        assert sum(row["score"] for row in rows) / 4 == pytest.approx(logged, abs=1e-6)
    assert reward_args[3] == 0  # make_reward_fn(task, reward_model, device, reward_label, ...)
    assert perplexity_lms == [assets["toy_guide"]] * 2  # before and after the one iteration
    (tmp_path / "default").mkdir()
    run(script, args, tmp_path / "default")
    assert reward_calls[1][0][3] == 1 and perplexity_lms[2:] == [assets["policy"]] * 2


@rl_scripts
@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
@pytest.mark.slow
def test_half_precision_starts_at_ratio_one_too(assets, tmp_path, script, precision):
    """Under --bf16 / --fp16 the old log-probs come from a full forward as training's (generate's cached
    half-precision pass differs from it by ~1e-3 per token), so the first ratio is 1 here too (both
    autocasts run on the CPU). --fp16 trains through its gradient scaler: the weights move."""
    args = set_flags(task_args(assets, "imdb", script), "--num-minibatches", 1, "--eval-every", 0,
                     "--learning-rate", 1e-3)
    namespace, _, events = run(script, args + [precision], tmp_path)
    for value in scalars(events, "val/ratio"):
        assert value == pytest.approx(1, abs=1e-6)
    assert max(scalars(events, "policy/approxkl_avg")) < 1e-12
    assert namespace["scaler"].is_enabled() == (precision == "--fp16")
    # --bf16 keeps the frozen models (pi_ref, the reward model, the guide) in bf16 weights: half their memory,
    # a KL near 0 at first
    frozen = [namespace["ref_policy"], reward_model_of(namespace)] + (
        [namespace["guide"].model] if script != "ppo.py" else [])
    assert all(p.dtype == (torch.bfloat16 if precision == "--bf16" else torch.float32)
               for model in frozen for p in model.parameters())
    assert abs(scalars(events, "objective/kl")[0]) < 0.05
    start = AutoModelForCausalLM.from_pretrained(assets["policy"])
    assert not torch.equal(start.transformer.h[0].mlp.c_fc.weight, namespace["policy"].transformer.h[0].mlp.c_fc.weight)


@rl_scripts
@pytest.mark.slow
def test_fp16_skips_an_overflowing_step_instead_of_stopping(assets, tmp_path, script):
    """An infinite gradient under --fp16 (a finite loss) is the scaler's business: it skips the step and
    halves the scale; the run goes on (without --fp16 it stops: the non-finite tests above)."""
    args = set_flags(task_args(assets, "imdb", script), "--num-minibatches", 1, "--eval-every", 0) + ["--fp16"]

    class InfiniteGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    class OverflowOnce(Spy):  # the run's first loss sends infinite gradients back
        def wrap(self, function):
            def wrapper(*a, **k):
                loss, stats = function(*a, **k)
                self.calls.append(None)
                return (InfiniteGradient.apply(loss) if len(self.calls) == 1 else loss), stats
            return wrapper

    namespace = run_script_in_process(script, args, tmp_path, {"ppo_loss": OverflowOnce()})
    assert namespace["scaler"].get_scale() == 2.0**15  # 2**16 halved once: the step was skipped


@pytest.fixture(scope="module")
def leaky_checkpoint(assets, tmp_path_factory):
    """The tiny policy's weights, with generation settings in its checkpoint that would change sampling."""
    from transformers import GenerationConfig

    path = tmp_path_factory.mktemp("leaky")
    model = AutoModelForCausalLM.from_pretrained(assets["policy"])
    model.generation_config = GenerationConfig(do_sample=True, repetition_penalty=5.0, no_repeat_ngram_size=1, top_k=2,
                                               temperature=0.3, suppress_tokens=list(range(2, 200)))
    model.save_pretrained(path)
    assets["tokenizer"].save_pretrained(path)
    return str(path)


@rl_scripts
@pytest.mark.slow
def test_the_checkpoints_generation_settings_do_not_leak_into_sampling(assets, tmp_path, leaky_checkpoint, script):
    """transformers fills every generation setting the flags leave unset from the checkpoint: a policy (and
    guide) whose checkpoint sets a repetition penalty, n-gram blocking... must sample exactly as the same
    weights without them (the rollout must be pi, the policy of the ratio and the KL); --save-model gives
    the checkpoint its own settings back."""
    curves = {}
    for name, model in (("clean", assets["policy"]), ("leaky", leaky_checkpoint)):
        (tmp_path / name).mkdir()
        args = set_flags(task_args(assets, "imdb", script), "--model-name-or-path", model, "--eval-every", 2)
        if script != "ppo.py":
            args = set_flags(args, "--guide-model", model, "--beta", 1)
        run(script, args + ["--save-model", "--save-path", "saved"], tmp_path / name)
        events = read_tensorboard(tmp_path / name)
        curves[name] = [scalars(events, tag) for tag in ("objective/scores", "objective/kl", "eval/score")]
    assert curves["leaky"] == curves["clean"]
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "leaky" / "saved")
    assert saved.generation_config.repetition_penalty == 5.0


@rl_scripts
@pytest.mark.parametrize("quantity, max_grad_norm", [("reward", 1), ("loss", 1), ("gradient", 1), ("gradient", 0)])
@pytest.mark.slow
def test_a_non_finite_reward_loss_or_gradient_stops_before_the_weights_change(assets, tmp_path, monkeypatch, script,
                                                                              quantity, max_grad_norm):
    """(--max-grad-norm 0: no clipping, the gradient's norm is still computed for this check.)"""
    args = set_flags(task_args(assets, "imdb", script), "--eval-every", 0, "--max-grad-norm", max_grad_norm)
    spies = {}
    if quantity == "reward":
        make_reward_fn = rewards.make_reward_fn
        monkeypatch.setattr(rewards, "make_reward_fn", lambda *a, **k: (
            lambda *b: make_reward_fn(*a, **k)(*b) * torch.tensor([1.0, float("nan"), 1.0, 1.0])))
    else:
        class Poison(Spy):  # a nan loss; or a finite loss whose gradient is nan (d sqrt(x) / dx at 0 is inf, times 0)
            def wrap(self, function):
                def poisoned(new_logprobs, new_values, *rest):
                    loss, stats = function(new_logprobs, new_values, *rest)
                    if quantity == "loss":
                        return loss * float("nan"), stats
                    return loss + 0 * (new_values * 0).sum().sqrt(), stats
                return poisoned
        spies = {"ppo_loss": Poison()}
    with pytest.raises(SystemExit) as stop:
        run_script_in_process(script, args, tmp_path, spies)
    assert str(stop.value.code) == (f"error: iteration 1: the {quantity} is not finite (nan or inf); stopped before "
                                    + ("any update" if quantity == "reward" else "the optimizer step"))
    start = AutoModelForCausalLM.from_pretrained(assets["policy"])
    assert all(torch.equal(a, b) for a, b in zip(stop.value.script_globals["policy"].parameters(), start.parameters()))


@rl_scripts
@pytest.mark.slow
def test_generation_settings_reach_generate(assets, tmp_path, script):
    """--min-new-tokens (rollouts and evaluation), --eval-greedy with --eval-num-beams, and the guide's own
    --guide-max-new-tokens reach the calls; a policy that says EOS with p = 0.2 then never ends before 3."""
    args = set_flags(task_args(assets, "imdb", script), "--model-name-or-path", assets["often_eos"], "--top-k", 0,
                     "--total-episodes", 4, "--min-new-tokens", 3, "--eval-greedy", True, "--eval-num-beams", 2)
    builder = {"ppo.py": "rollout", "ppo_plus_plus.py": "rollout", "aggrevated.py": "guide_roll_out",
               "d2lols.py": "guide_roll_out"}[script]
    names = [builder, "evaluate"] + (["load_guide"] if script != "ppo.py" else [])
    if script != "ppo.py":
        args = set_flags(args, "--guide-model", assets["often_eos"], "--guide-max-new-tokens", 4, "--beta", 1)
    guide_calls = []

    def record_guide(guide):  # the loaded guide's write: the lengths it wrote, recorded
        write = guide.write

        def recorded(examples, prefixes, budgets):
            results = write(examples, prefixes, budgets)
            guide_calls.extend(len(tokens) for tokens, _ in results)
            return results

        guide.write = recorded
        return guide

    spies = {name: Spy() for name in names}
    if script != "ppo.py":
        spies["load_guide"].wrap = lambda function, wrap=spies["load_guide"].wrap: (
            lambda *a, **k: record_guide(wrap(function)(*a, **k)))
    run_script_in_process(script, args, tmp_path, spies)
    config = spies[builder].calls[0].generation_config
    assert (config.min_new_tokens, config.max_new_tokens, config.do_sample, config.top_k) == (3, 6, True, 0)
    for call in spies["evaluate"].calls:
        config = call.generation_config
        assert (config.min_new_tokens, config.do_sample, config.num_beams) == (3, False, 2)
    if script == "ppo.py":
        assert (spies["rollout"].calls[0].result[3].sum(1) >= 3).all()  # no episode ended before 3 tokens
    else:
        assert 0 < max(guide_calls) <= 4  # (the guide's own cap: a roll-out's budget is H - k)


@rl_scripts
@pytest.mark.slow
def test_the_target_term_pulls_the_policy_toward_the_references(assets, tmp_path, script):
    """After one update, the policy's NLL of the training prompts' reference continuations is lower with
    --target-coef than without it."""
    args = set_flags(task_args(assets, "imdb", script), "--total-episodes", 4, "--num-minibatches", 1,
                     "--eval-every", 0, "--learning-rate", 3e-3)
    nll = {}
    for coef in ("0", "1"):
        script_globals, _, _ = run_with(script, args, "--target-coef", coef, tmp_path)
        tokenizer, examples = script_globals["tokenizer"], script_globals["train_examples"]
        targets = [tasks.continuation_ids(tokenizer, e["prompt"], e["references"][0], 6) for e in examples]
        ids, mask = script_globals["left_pad"]([e["prompt_ids"] + t for e, t in zip(examples, targets)],
                                               tokenizer.pad_token_id, "cpu")
        width = max(map(len, targets))
        target_mask = torch.tensor([[0.0] * (width - len(t)) + [1.0] * len(t) for t in targets])
        with torch.no_grad():  # the script's own helper, on the trained policy
            nll[coef] = script_globals["reference_nll"](script_globals["policy"], ids, mask, target_mask,
                                                          target_mask.sum()).item()
    assert nll["1"] < nll["0"] - 0.01, nll


@rl_scripts
@pytest.mark.parametrize("architecture", ["gpt2", "opt"])
@pytest.mark.slow
def test_gradient_checkpointing_recomputes_and_changes_nothing_else(assets, tmp_path, script, monkeypatch,
                                                                     architecture):
    """With dropout in the checkpoint (p = 0.5): under --gradient-checkpointing the update recomputes the
    layers (transformers' checkpoint function runs) yet nothing drops out, so the first ratio is 1, and the
    run trains exactly as without it. GPT-2 drops out through nn.Dropout modules; OPT's layers call dropout
    with their own training flag, which checkpointing sets. --save-model keeps the checkpoint's dropout. The critics
    are compared too: one that kept the checkpoint's dropout would train differently under checkpointing."""
    import transformers.modeling_utils
    from transformers import OPTConfig, OPTForCausalLM

    from conftest import save_tiny_causal_lm

    tokenizer = assets["tokenizer"]
    if architecture == "gpt2":
        dropout_policy = save_tiny_causal_lm(tmp_path / "dropout_policy", tokenizer, resid_pdrop=0.5,
                                             embd_pdrop=0.5, attn_pdrop=0.5)
    else:
        torch.manual_seed(0)
        dropout_policy = str(tmp_path / "dropout_policy")
        OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, word_embed_proj_dim=32, ffn_dim=64,
                                 num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=256, dropout=0.5,
                                 attention_dropout=0.5, pad_token_id=tokenizer.pad_token_id,
                                 bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
                       ).save_pretrained(dropout_policy)
        tokenizer.save_pretrained(dropout_policy)
    args = set_flags(task_args(assets, "imdb", script), "--model-name-or-path", dropout_policy, "--num-minibatches", 1,
                     "--eval-every", 0, "--learning-rate", 1e-3, "--total-episodes", 4)
    checkpointed = []
    original = transformers.modeling_utils.checkpoint

    def counting_checkpoint(*a, **k):
        checkpointed.append(1)
        return original(*a, **k)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting_checkpoint)
    runs = {}
    for flags in ([], ["--gradient-checkpointing", "--save-model", "--save-path", str(tmp_path / "saved")]):
        (tmp_path / str(len(runs))).mkdir()
        runs[bool(flags)], _, events = run(script, args + flags, tmp_path / str(len(runs)))
        for value in scalars(events, "val/ratio"):
            assert value == pytest.approx(1, abs=1e-6)
        assert bool(checkpointed) == bool(flags)
    for name, model in runs[False]["trained_models"].items():  # the policy and every critic: none drops out
        for a, b in zip(model.parameters(), runs[True]["trained_models"][name].parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert not runs[True]["policy"].training
    assert not any(m.training for m in runs[True]["policy"].modules() if isinstance(m, GradientCheckpointingLayer))
    saved = json.load(open(tmp_path / "saved" / "config.json"))
    assert saved["dropout" if architecture == "opt" else "resid_pdrop"] == 0.5


@rl_scripts
def test_the_updates_statistics_are_means_over_every_token_it_saw(assets, tmp_path, script):
    """Minibatches of one episode, of different lengths (a policy that says EOS with p = 0.2), and, in the guided
    scripts, beta 0.5: an AggreVaTeD episode the guide wrote alone holds no policy token, and its minibatch once
    counted as a zero (val/ratio 0.50 and 0.75). val/ratio, approx-KL and the clip fraction are the means over
    every policy token the update saw, recomputed here from what the loop handed ppo_loss (a mean of the
    minibatches' means fails: they hold different numbers of tokens)."""
    args = set_flags(task_args(assets, "imdb", script), "--num-minibatches", 4, "--update-epochs", 2,
                     "--eval-every", 0, "--learning-rate", 3e-3, "--model-name-or-path", assets["often_eos"],
                     "--min-new-tokens", 0, "--top-k", 0)
    if script != "ppo.py":
        args = set_flags(args, "--beta", 0.5)
    _, spies, events = run(script, args, tmp_path, ["ppo_loss"])
    calls = spies["ppo_loss"].calls
    per_iteration = len(calls) // 2
    if script in ("aggrevated.py", "d2lols.py"):  # (D2LOLS: iteration 1 is AggreVaTeD's)
        assert any(c.mask.sum() == 0 for c in calls[:per_iteration])
    assert len({float(c.mask.sum()) for c in calls}) > 1
    for tag, per_token in (("val/ratio", lambda log_ratio: log_ratio.exp()),
                           ("policy/approxkl_avg", lambda log_ratio: 0.5 * log_ratio**2),
                           ("policy/clipfrac_avg", lambda log_ratio: ((log_ratio.exp() - 1).abs() > 0.2).float())):
        expected = []
        for iteration in range(2):
            part = calls[iteration * per_iteration : (iteration + 1) * per_iteration]
            total = sum(float((per_token(c.new_logprobs.detach() - c.old_logprobs) * c.mask).sum()) for c in part)
            expected.append(total / sum(float(c.mask.sum()) for c in part))
        assert scalars(events, tag) == pytest.approx(expected, rel=1e-5, abs=1e-9), tag
    assert max(abs(r - 1) for r in scalars(events, "val/ratio")) < 0.1
