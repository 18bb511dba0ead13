"""Learning evidence: PPO raises a toy reward that the tiny policy can learn (CPU, fixed seed)."""

import re

from conftest import run_script


def toy_scores(assets, cwd, script="ppo.py", iterations=30, extra=()):
    args = [script, "--task", "imdb", "--model-name-or-path", assets["policy"], "--reward-model", assets["classifier"],
            "--dataset-path", assets["data"]["imdb"], "--total-episodes", str(32 * iterations), "--batch-size", "32",
            "--num-minibatches", "4", "--update-epochs", "4", "--max-new-tokens", "8", "--eval-every", "0",
            "--learning-rate", "3e-3", "--kl-coef", "0", "--gamma", "1", "--seed", "1", *extra]
    result = run_script("tests/toy_run.py", args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return [float(s) for s in re.findall(r"^iteration \d+/\d+ episodes \d+ score ([-\d.]+)", result.stdout, re.M)]


def test_ppo_raises_the_toy_reward(assets, tmp_path):
    scores = toy_scores(assets, tmp_path)
    assert len(scores) == 30
    start, end = sum(scores[:3]) / 3, sum(scores[-5:]) / 5
    # a random tiny policy writes the chosen token ~1/400 of the time; PPO makes it most of the continuation
    assert start < 0.05 and end > 0.5, scores
