"""The paper's claim in miniature, on the toy task (a benchmark, not a test): does a guide that is good
at the task make the guided algorithms reach a target reward in fewer iterations than PPO?

Toy task (tests/toy_run.py): the reward is the fraction of continuation tokens that are " movie";
the policy is a tiny random GPT-2; the guide is the same network trained to write " movie" (tests/conftest.py).
Progress is the held-out evaluation score of the policy alone (no guide), every iteration, so the
guide's own tokens never count. Prints, per algorithm and seed, the first iteration whose eval score
reaches --target (or "-" within the budget) and the last eval score.

    python benchmarks/toy_guided.py                       # PPO, PPO++, AggreVaTeD, D2LOLS; seeds 1-3
    python benchmarks/toy_guided.py --scripts ppo.py ppo_plus_plus.py --seeds 1 2 3 4 5
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import make_tokenizer, save_tiny_causal_lm, save_toy_guide, write_task_data  # noqa: E402


def eval_scores(script, seed, assets, args):
    command = [sys.executable, str(ROOT / "tests" / "toy_run.py"), script, "--task", "imdb",
               "--model-name-or-path", assets["policy"], "--reward-model", assets["policy"],
               "--dataset-path", assets["data"], "--total-episodes", str(32 * args.iterations), "--batch-size", "32",
               "--num-minibatches", "4", "--update-epochs", "4", "--max-new-tokens", "8", "--eval-every", "1",
               "--num-eval-prompts", "32", "--learning-rate", str(args.learning_rate), "--kl-coef", "0",
               "--gamma", "1", "--seed", str(seed)]
    if script != "ppo.py":
        command += ["--guide-model", assets["guide"]]
        if args.beta is not None:
            command += ["--beta", str(args.beta)]
    if script == "d2lols.py":
        command += ["--tau", str(args.tau)]
    with tempfile.TemporaryDirectory() as run_dir:
        result = subprocess.run(command, cwd=run_dir, capture_output=True, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        sys.exit(f"{script} failed:\n{result.stderr[-3000:]}")
    return [float(x) for x in re.findall(r"^eval @ iteration \d+: score ([-\d.]+)", result.stdout, re.M)]


def iterations_to_target(scores, target):
    """The first iteration whose eval score reaches `target` (scores[0] is before training), else inf."""
    return next((i for i, s in enumerate(scores) if s >= target), float("inf"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scripts", nargs="+", default=["ppo.py", "ppo_plus_plus.py", "aggrevated.py", "d2lols.py"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--beta", type=float, default=None, help="mixing (default: each script's IMDB default)")
    parser.add_argument("--tau", type=int, default=10, help="D2LOLS switch iteration")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        tokenizer = make_tokenizer()
        assets = {"policy": save_tiny_causal_lm(root / "policy", tokenizer),
                  "guide": save_toy_guide(root / "guide", tokenizer),
                  "data": write_task_data(root)["imdb"]}
        print(f"toy task, {args.iterations} iterations of 32 episodes x 8 tokens, lr {args.learning_rate}, "
              f"target eval score {args.target}")
        print(f"{'script':<18} {'seed':>4} {'iterations to target':>21} {'last eval':>10}")
        for script in args.scripts:
            reached = []
            for seed in args.seeds:
                scores = eval_scores(script, seed, assets, args)
                reached.append(iterations_to_target(scores, args.target))
                first = "-" if reached[-1] == float("inf") else reached[-1]
                print(f"{script:<18} {seed:>4} {first:>21} {scores[-1]:>10.3f}", flush=True)
            print(f"{script:<18} {'med':>4} {statistics.median(reached):>21}")


if __name__ == "__main__":
    main()
