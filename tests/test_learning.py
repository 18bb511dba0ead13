"""Learning evidence: the algorithms raise a toy reward that the tiny policy can learn (CPU, fixed seed).

The toy reward (tests/toy_run.py) is the fraction of continuation tokens that are " movie". How the
guided algorithms compare with PPO on it is a benchmark, not a test: benchmarks/toy_guided.py.
"""

import re

from conftest import run_script


def run_toy(assets, cwd, script="ppo.py", iterations=30, kl_coef=0.005, extra=()):
    """Training scores and KLs per iteration and eval scores (the policy alone) of one toy run.
    A small KL penalty and gamma < 1, so that a sign or discount that is wrong in the loop has an effect."""
    args = [script, "--task", "imdb", "--model-name-or-path", assets["policy"], "--reward-model", assets["classifier"],
            "--dataset-path", assets["data"]["imdb"], "--total-episodes", str(32 * iterations), "--batch-size", "32",
            "--num-minibatches", "4", "--update-epochs", "4", "--max-new-tokens", "8", "--eval-every", "0",
            "--learning-rate", "3e-3", "--kl-coef", str(kl_coef), "--gamma", "0.95", "--target-coef", "0", "--seed", "1",
            *extra]
    result = run_script("tests/toy_run.py", args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    train = re.findall(r"^iteration \d+/\d+ episodes \d+ score ([-\d.]+) kl ([-\d.]+)", result.stdout, re.M)
    evals = [float(s) for s in re.findall(r"^eval @ iteration \d+: score ([-\d.]+)", result.stdout, re.M)]
    return [float(score) for score, _ in train], [float(kl) for _, kl in train], evals


def test_ppo_raises_the_toy_reward(assets, tmp_path):
    scores, _, _ = run_toy(assets, tmp_path)
    assert len(scores) == 30
    start, end = sum(scores[:3]) / 3, sum(scores[-5:]) / 5
    # a random tiny policy writes the chosen token ~1/400 of the time; PPO makes it most of the continuation
    assert start < 0.05 and end > 0.5, scores


def test_the_kl_penalty_holds_the_policy_near_pi_ref(assets, tmp_path):
    """The toy rewards a policy far from pi_ref (" movie" everywhere: ~6 nats per token, ~45 per episode).
    A strong penalty (0.05) must hold the policy back: measured, its KL stays about 5 nats over 15
    iterations, while with the penalty's sign flipped it runs to ~28 (it pays the policy to move away)."""
    scores, kls, _ = run_toy(assets, tmp_path, iterations=15, kl_coef=0.05)
    assert 0 < kls[-1] < 15 and max(scores) < 0.5, (kls, scores)


def test_ppo_plus_plus_with_a_good_guide_raises_the_policys_own_reward(assets, tmp_path):
    """PPO++ learns the toy task: the policy alone (held-out eval, no guide) goes from ~0 to most of
    the continuation. Training scores include the guide's roll-in tokens, so they are not the measure.

    Whether PPO++ gets there in fewer iterations than PPO (the paper's claim) is not asserted: on this
    toy the difference is within seed noise (benchmarks/toy_guided.py; numbers in the README)."""
    _, _, evals = run_toy(assets, tmp_path, "ppo_plus_plus.py", iterations=40,
                       extra=["--guide-model", assets["toy_guide"], "--eval-every", "40", "--num-eval-prompts", "32"])
    assert len(evals) == 2
    assert evals[0] < 0.05 and evals[1] > 0.5, evals
