"""Learning evidence on toy rewards a tiny policy can learn (CPU, fixed seed), tests/toy_run.py:
the fraction of continuation tokens that are " movie" (PPO learns it; a KL penalty holds it back), and
the same with no reward unless 3 of them stand in a row (exploration: PPO cannot, guidance can; the
five-seed comparison is benchmarks/toy_guided.py).
"""

import os
import re

import pytest

from conftest import ROOT, run_script

pytestmark = pytest.mark.slow  # runs long enough to learn: the slow tier


def run_toy(assets, cwd, script="ppo.py", iterations=30, kl_coef=0.005, extra=(), reward="fraction",
            policy="policy"):
    """Training scores and KLs per iteration and eval scores (the policy alone) of one toy run.
    A small KL penalty and gamma < 1, so that a sign or discount that is wrong in the loop has an effect."""
    args = [script, "--task", "imdb", "--model-name-or-path", assets[policy], "--reward-model", assets["classifier"],
            "--dataset-path", assets["data"]["imdb"], "--total-episodes", str(32 * iterations), "--batch-size", "32",
            "--num-minibatches", "4", "--update-epochs", "4", "--max-new-tokens", "8", "--eval-every", "0",
            "--learning-rate", "3e-3", "--kl-coef", str(kl_coef), "--gamma", "0.95", "--target-coef", "0", "--seed", "1",
            *extra]
    result = run_script("tests/toy_run.py", args, cwd=cwd, env={"TOY_REWARD": reward})
    assert result.returncode == 0, result.stderr[-3000:]
    train = re.findall(r"^iteration \d+/\d+ episodes \d+ score ([-\d.]+) kl ([-\d.]+)", result.stdout, re.M)
    evals = [float(s) for s in re.findall(r"^eval @ iteration \d+: score ([-\d.]+)", result.stdout, re.M)]
    return [float(score) for score, _ in train], [float(kl) for _, kl in train], evals


def test_ppo_raises_the_toy_reward(assets, tmp_path):
    # 40 iterations: when the first " movie" is sampled depends on the trajectory, which the CPU's float rounding
    # changes (seed 1 passed 0.5 within 30 iterations where this test was written; on an AVX-512 EPYC it takes
    # off only at iteration 15 and ends at 0.27); at 40, seeds 1-3 all end above 0.97 there
    scores, _, _ = run_toy(assets, tmp_path, iterations=40)
    assert len(scores) == 40
    start, end = sum(scores[:3]) / 3, sum(scores[-5:]) / 5
    # a random tiny policy writes the chosen token ~1/400 of the time; PPO makes it most of the continuation
    assert start < 0.05 and end > 0.5, scores


def test_the_kl_penalty_holds_the_policy_near_pi_ref(assets, tmp_path):
    """The toy rewards a policy far from pi_ref (" movie" everywhere: ~6 nats per token, ~45 per episode).
    A strong penalty (0.05) must hold the policy back: measured, its KL stays about 5 nats over 15
    iterations, while with the penalty's sign flipped it runs to ~21 (it pays the policy to move away)."""
    scores, kls, _ = run_toy(assets, tmp_path, iterations=15, kl_coef=0.05)
    assert 0 < kls[-1] < 15 and max(scores) < 0.5, (kls, scores)


@pytest.mark.parametrize("script,learns", [("ppo.py", False), ("ppo_plus_plus.py", True), ("aggrevated.py", True)])
def test_guidance_finds_a_reward_that_ppo_cannot(assets, tmp_path, script, learns):
    """The paper's mechanism in miniature (benchmarks/toy_guided.py, docs/results.md): the reward needs 3 " movie" in a
    row, which the policy alone (p ~ 0.03 per token) almost never writes. In 30 iterations PPO sees no
    reward and stays at 0, while PPO++ (restarts from the guide's states) and AggreVaTeD (the guide's value
    after the policy's tokens) learn it (where this test was written, they first passed 0.5 at iterations 12
    and 18)."""
    extra = ["--eval-every", "30", "--num-eval-prompts", "32", "--top-k", "0"]
    if script != "ppo.py":
        extra += ["--guide-model", assets["toy_guide"]]
    _, _, evals = run_toy(assets, tmp_path, script, iterations=30, extra=extra, reward="run", policy="toy_policy")
    assert len(evals) == 2 and evals[0] == 0, evals  # the policy alone, before training and after
    assert (evals[1] > 0.5) if learns else (evals[1] < 0.05), evals


def test_the_toy_drivers_references_hold_the_rewarded_run_and_leave_the_prompts_alone(assets):
    """benchmarks/toy_guided.py gives DR-PO references that hold the rewarded run; the prompts must stay the
    reviews' first halves (appending the run to the whole review doubled every prompt: the toy of 4974c7a..)."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from toy_guided import with_rewarded_run

    from common import tasks

    for review in ("a b c d e", "a b c d", "good", "the movie was fine today"):
        (plain,), (toy,) = (tasks.make_examples("imdb", [{"text": text, "label": 1}], assets["tokenizer"], 64)
                            for text in (review, with_rewarded_run(review)))
        assert toy["prompt"] == plain["prompt"] and toy["prompt_ids"] == plain["prompt_ids"]
        assert toy["references"] == [" ".join(["movie"] * len(plain["references"][0].split()))]
