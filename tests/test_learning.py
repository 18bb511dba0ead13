"""Learning evidence: the algorithms raise a toy reward that the tiny policy can learn (CPU, fixed seed).

The toy reward (tests/toy_run.py) is the fraction of continuation tokens that are " movie". How the
guided algorithms compare with PPO on it is a benchmark, not a test: benchmarks/toy_guided.py.
"""

import os
import re
import statistics
import sys
from types import SimpleNamespace

from conftest import ROOT, run_script

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import toy_guided  # noqa: E402


def run_toy(assets, cwd, script="ppo.py", iterations=30, extra=()):
    """Training scores per iteration and eval scores (the policy alone) of one toy run."""
    args = [script, "--task", "imdb", "--model-name-or-path", assets["policy"], "--reward-model", assets["classifier"],
            "--dataset-path", assets["data"]["imdb"], "--total-episodes", str(32 * iterations), "--batch-size", "32",
            "--num-minibatches", "4", "--update-epochs", "4", "--max-new-tokens", "8", "--eval-every", "0",
            "--learning-rate", "3e-3", "--kl-coef", "0", "--gamma", "1", "--seed", "1", *extra]
    result = run_script("tests/toy_run.py", args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    train = [float(s) for s in re.findall(r"^iteration \d+/\d+ episodes \d+ score ([-\d.]+)", result.stdout, re.M)]
    evals = [float(s) for s in re.findall(r"^eval @ iteration \d+: score ([-\d.]+)", result.stdout, re.M)]
    return train, evals


def test_ppo_raises_the_toy_reward(assets, tmp_path):
    scores, _ = run_toy(assets, tmp_path)
    assert len(scores) == 30
    start, end = sum(scores[:3]) / 3, sum(scores[-5:]) / 5
    # a random tiny policy writes the chosen token ~1/400 of the time; PPO makes it most of the continuation
    assert start < 0.05 and end > 0.5, scores


def test_ppo_plus_plus_with_a_good_guide_reaches_the_target_in_fewer_iterations_than_ppo(assets):
    """The paper's claim in miniature, over three fixed seeds: the first iteration at which the policy
    alone (held-out eval, no guide) scores 0.5 on the toy task, PPO++ (guide rolls in, beta 0.6)
    against PPO. Measured when written (benchmarks/toy_guided.py, same settings): PPO 17 / 18 / 21,
    PPO++ 19 / 12 / 15, so PPO++ is faster on two seeds of three and in the median and the mean,
    not on every seed. AggreVaTeD does not reach 0.5 in this budget (see the README)."""
    settings = SimpleNamespace(iterations=30, learning_rate=3e-3, beta=None, tau=10)
    toy_assets = {"policy": assets["policy"], "guide": assets["toy_guide"], "data": assets["data"]["imdb"]}
    reached = {}
    for script in ("ppo.py", "ppo_plus_plus.py"):
        reached[script] = [toy_guided.iterations_to_target(toy_guided.eval_scores(script, seed, toy_assets, settings), 0.5)
                           for seed in (1, 2, 3)]
    ppo, ppo_plus_plus = reached["ppo.py"], reached["ppo_plus_plus.py"]
    assert max(ppo_plus_plus) < float("inf"), reached  # PPO++ gets there on every seed
    assert statistics.median(ppo_plus_plus) < statistics.median(ppo), reached
    assert sum(ppo_plus_plus) < sum(ppo), reached
