"""Guidance without a critic: RLOO's leave-one-out baseline (Ahmadian et al., 2024) from a prompt's N samples,
which in PPO++ share one state (the same roll-in, or none), in ppo.py's and ppo_plus_plus.py's own copies."""

import glob
import os

import pytest
import torch

import ppo
import ppo_plus_plus
from common import diagnostics
from conftest import Spy, module_name, read_tensorboard, run_script_in_process, set_flags, task_args
from test_checkpoints import logged

rloo_modules = pytest.mark.parametrize("module", [ppo, ppo_plus_plus], ids=module_name)
RLOO = ["--advantage-estimator", "rloo", "--samples-per-prompt", "2"]


@rloo_modules
def test_the_leave_one_out_advantage_by_hand(module):
    """Two prompts of three samples; an episode's reward is its per-token rewards summed (the score minus the KL
    penalty). Prompt 1: rewards 1, 2, 6: baselines (2 + 6) / 2 = 4, 3.5, 1.5: advantages -3, -1.5, 4.5; prompt 2:
    0, 0, 3: -1.5, -1.5, 3. Each on every token of its episode, none past its end."""
    rewards = torch.zeros(6, 4)
    rewards[:, -1] = torch.tensor([1.0, 2.0, 5.0, 0.0, 0.0, 3.0])
    rewards[2, 0] = 1.0  # (a KL term: rewards sum over the tokens)
    mask = torch.ones(6, 4)
    mask[1, 2:] = 0  # (an episode that ended early)
    advantages = module.rloo_advantages(rewards, mask, 3)
    expected = torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])[:, None] * mask
    torch.testing.assert_close(advantages, expected)


def test_rloo_needs_two_samples_and_whole_groups(assets, tmp_path):
    args = task_args(assets, "imdb")
    with pytest.raises(SystemExit, match="rloo needs --samples-per-prompt 2 or more"):
        run_script_in_process("ppo.py", args + ["--advantage-estimator", "rloo"], tmp_path)
    with pytest.raises(SystemExit, match="4 is not divisible by 3"):
        run_script_in_process("ppo.py", args + ["--samples-per-prompt", "3"], tmp_path)


@pytest.mark.parametrize("script", ["ppo.py", "ppo_plus_plus.py"])
def test_rloo_builds_no_critic_and_logs_nothing_that_needs_one(assets, tmp_path, script):
    """No critic is built, trained or checkpointed; every trained parameter is the policy's; the logs that need a
    critic (value loss, explained variance) are absent, not zero; --advantage-norm defaults to none."""
    args = set_flags(task_args(assets, "imdb", script), "--save-every", 2) + RLOO
    namespace = run_script_in_process(script, args, tmp_path)
    assert namespace["critic"] is None and list(namespace["trained_models"]) == ["policy"]
    policy = {id(p) for p in namespace["policy"].parameters()}
    assert all(id(p) in policy for g in namespace["optimizer"].param_groups for p in g["params"])
    assert not any("value_head" in name for name, _ in namespace["model"].named_parameters())
    [folder] = glob.glob(str(tmp_path / "checkpoints" / "*"))
    assert sorted(os.listdir(folder)) == ["optimizer.pt", "policy.safetensors", "state.json"]
    tags = read_tensorboard(tmp_path).Tags()["scalars"]
    assert "loss/value_avg" not in tags and "val/explained_variance" not in tags and "loss/policy_avg" in tags
    assert "guide/explained_variance_restart" not in tags
    assert namespace["args"].advantage_norm == "none"
    # the groups RLOO can teach nothing (all scores equal), logged with 2 samples a prompt, of each kind in PPO++
    assert "val/equal_score_groups" in tags
    assert ("guide/equal_score_groups_mixed" in tags) == (script == "ppo_plus_plus.py")


def test_the_share_of_groups_with_equal_scores_by_hand():
    """Groups are a prompt's samples, one after the other: 3 of 4 pairs, 1 of 2 fours, are all equal."""
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 2.0, 2.0])
    assert diagnostics.equal_groups(scores, 2).tolist() == [1.0, 1.0, 0.0, 1.0]
    assert diagnostics.equal_score_groups(scores, 2) == {"val/equal_score_groups": 0.75}
    assert diagnostics.equal_score_groups(scores, 4) == {"val/equal_score_groups": 0.5}


def test_a_prompts_samples_share_its_roll_in_and_go_on_apart(assets, tmp_path):
    """PPO++ with 2 samples a prompt: each prompt's two episodes start from the same state (the same roll-in, or
    none: a group is one state, so mixed and unmixed episodes never share a baseline) and the policy's
    continuations from it differ."""
    spies = {"rollout": Spy()}
    args = set_flags(task_args(assets, "imdb", "ppo_plus_plus.py"), "--beta", 0.5, "--total-episodes", 16,
                     "--batch-size", 8, "--top-k", 0, "--min-new-tokens", 6) + RLOO
    run_script_in_process("ppo_plus_plus.py", args, tmp_path, spies)
    differ, states = 0, []
    for call in spies["rollout"].calls:
        roll_ins, episodes = call.roll_ins, call.result[2]
        assert roll_ins[0::2] == roll_ins[1::2]
        states += roll_ins
        differ += sum(not torch.equal(episodes[i], episodes[i + 1]) for i in range(0, len(roll_ins), 2))
    assert differ > 0 and any(states) and not all(states)  # (mixed and unmixed groups both seen)


@pytest.mark.parametrize("script", ["ppo.py", "ppo_plus_plus.py"])
@pytest.mark.slow
def test_an_rloo_run_resumes_exactly(assets, tmp_path, script):
    """4 iterations with a checkpoint kept at 2; resumed from it, the run logs and ends as the whole run did."""
    args = set_flags(task_args(assets, "imdb", script), "--total-episodes", 16, "--save-every", 1,
                     "--keep-checkpoints", 3, "--checkpoint-dir", "ck", "--eval-every", 2, "--beta", 0.5) + RLOO
    if script == "ppo.py":
        args = [a for i, a in enumerate(args) if a != "--beta" and args[i - 1] != "--beta"]
    (tmp_path / "whole").mkdir()
    (tmp_path / "resumed").mkdir()
    whole = run_script_in_process(script, args, tmp_path / "whole")
    os.rename(tmp_path / "whole" / "ck.iteration_000002", tmp_path / "resumed" / "from")
    resumed = run_script_in_process(script, set_flags(args, "--checkpoint-dir", "ck2") + ["--resume", "from"],
                                    tmp_path / "resumed")
    for a, b in zip(whole["policy"].parameters(), resumed["policy"].parameters()):
        assert torch.equal(a, b)
    whole_logs, resumed_logs = logged(read_tensorboard(tmp_path / "whole")), logged(read_tensorboard(tmp_path / "resumed"))
    after = {tag: [(step, value) for step, value in v if step > 8] for tag, v in whole_logs.items()}  # (iteration 2: 8)
    assert {tag: v for tag, v in after.items() if v} == resumed_logs
