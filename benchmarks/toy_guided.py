"""The paper's mechanism in miniature: when exploration is the bottleneck, a guide's states let the policy
find a reward it would almost never reach alone (CPU, minutes).

The toy (tests/toy_run.py, TOY_REWARD=run): the reward is the fraction of the 8 continuation tokens that
are " movie", and 0 unless the continuation holds 3 of them in a row. The policy is a tiny GPT-2 nudged
toward " movie" (p ~ 0.03 a token, make_assets), so a run of 3 is rare: PPO sees (almost) no reward. The guide is the same network trained to write " movie" (tests/conftest.py: save_toy_guide).
Progress is the held-out score of the policy alone (no guide), every iteration; the table gives, per
algorithm, how many seeds reach --target, when, and the last scores; then per seed.

    pip install -r requirements.txt
    python benchmarks/toy_guided.py                         # 5 methods x 20 seeds, ~26 min on 2 cores
    python benchmarks/toy_guided.py --seeds 1 2 3 4 5        # 5 seeds, ~7 min
    python benchmarks/toy_guided.py --reward fraction        # the dense toy (no exploration problem)

Writes benchmarks/results/toy_guided.md, .png and .json (the curves) (or --out).
"""

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import make_tokenizer, save_tiny_causal_lm, save_toy_guide, write_task_data  # noqa: E402

LABELS = {"ppo.py": "PPO", "ppo_plus_plus.py": "PPO++", "aggrevated.py": "AggreVaTeD", "d2lols.py": "D2LOLS",
          "dr-po": "DR-PO"}  # DR-PO: ppo_plus_plus.py --guide-references (restarts from the dataset's references)


def toy_command(method, seed, assets, args):
    """One toy run of a method (a script, or dr-po): its command line."""
    script = "ppo_plus_plus.py" if method == "dr-po" else method
    command = [sys.executable, str(ROOT / "tests" / "toy_run.py"), script, "--task", "imdb",
               "--model-name-or-path", assets["policy"], "--reward-model", assets["policy"],
               "--dataset-path", assets["data"], "--total-episodes", str(32 * args.iterations), "--batch-size", "32",
               "--num-minibatches", "4", "--update-epochs", "4", "--max-new-tokens", "8",
               "--eval-every", str(args.eval_every), "--num-eval-prompts", "32", "--learning-rate",
               str(args.learning_rate), "--kl-coef", str(args.kl_coef), "--gamma", str(args.gamma),
               "--target-coef", "0", "--top-k", "0", "--seed", str(seed)]
    if script != "ppo.py":
        command += (["--guide-references"] if method == "dr-po" else ["--guide-model", assets["guide"]]) + (
            ["--beta", str(args.beta)] if args.beta is not None else [])
    if script == "d2lols.py":
        command += ["--tau", str(args.tau if args.tau is not None else round(0.4 * args.iterations))]
    return command + shlex.split(args.flags)


def eval_scores(script, seed, assets, args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOY_REWARD": args.reward, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as run_dir:
        result = subprocess.run(toy_command(script, seed, assets, args), cwd=run_dir, capture_output=True, text=True,
                                env=env)
    if result.returncode != 0:
        sys.exit(f"{script} seed {seed} failed:\n{result.stderr[-3000:]}")
    return [float(x) for x in re.findall(r"^eval @ iteration \d+: score ([-\d.]+)", result.stdout, re.M)]


def iterations_to_target(scores, target, eval_every):
    """The first iteration whose eval score reaches `target` (scores[0] is before training), else None."""
    return next((i * eval_every for i, s in enumerate(scores) if s >= target), None)


def with_rewarded_run(review):
    """The review with its second half (the IMDB task's reference continuation: common/tasks.py splits at half
    its words) replaced by as many " movie": the prompt, the first half, stays the same words."""
    words = review.split()
    half = len(words) // 2
    return " ".join(words[:half] + ["movie"] * (len(words) - half))


def make_assets(root, prior_steps=10):
    """The toy's models: the policy, a tiny GPT-2 nudged toward " movie" (10 steps: p ~ 0.03 per token, as
    a supervised start gives good tokens some probability), and the guide (150 steps: nearly always). The
    data: each review's second half, its reference continuation, is replaced by the rewarded run (" movie" as
    many times as the half has words), as a dataset of good answers would hold; the prompts (the first halves)
    are the synthetic reviews' own, and only DR-PO reads the references (--target-coef 0)."""
    tokenizer = make_tokenizer()
    policy = save_toy_guide(root / "policy", tokenizer, steps=prior_steps) if prior_steps else \
        save_tiny_causal_lm(root / "policy", tokenizer)
    data = write_task_data(root)["imdb"]
    for split in ("train", "test"):
        path = Path(data) / f"{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**row, "text": with_rewarded_run(row["text"])}) + "\n" for row in rows))
    return {"policy": policy, "guide": save_toy_guide(root / "guide", tokenizer), "data": data}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scripts", nargs="+", default=list(LABELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(1, 21)))
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.5, help="the eval score that counts as learned")
    parser.add_argument("--reward", default="run", choices=["run", "fraction"], help="the toy (tests/toy_run.py)")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--kl-coef", type=float, default=0.005)
    parser.add_argument("--gamma", type=float, default=0.95)
    parser.add_argument("--beta", type=float, default=None, help="mixing (default: each script's IMDB default)")
    parser.add_argument("--tau", type=int, default=None,
                        help="D2LOLS switch (default: 40%% of the iterations, tril's IMDB share: 20 of 50)")
    parser.add_argument("--flags", default="", help="more flags for every run (e.g. \"--no-norm-per-group\")")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (each with --threads torch threads)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "toy_guided"),
                        help="a stem, the results' path without extension: {out}.md, {out}.png, {out}.json (a "
                             "trailing .md is dropped)")
    args = parser.parse_args()
    args.out = args.out.removesuffix(".md")  # (a stem)

    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"  # before the runs: the code that makes the numbers
    jobs = [(method, seed) for method in args.scripts for seed in args.seeds]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        assets = make_assets(Path(root))
        print(f"toy ({args.reward}): {args.iterations} iterations of 32 episodes x 8 tokens, lr {args.learning_rate}, "
              f"kl {args.kl_coef}, gamma {args.gamma}; {len(jobs)} runs", flush=True)

        finished = iter(range(1, len(jobs) + 1))  # next() on it is atomic: a count the workers share

        def run(job):
            scores = eval_scores(*job, assets, args)
            done = next(finished)
            left = (time.perf_counter() - start) / done * (len(jobs) - done)
            print(f"  {LABELS[job[0]]:<10} seed {job[1]}: last score {scores[-1]:.3f}, "
                  f"reached {args.target} at {iterations_to_target(scores, args.target, args.eval_every)} "
                  f"({done}/{len(jobs)}, ~{left / 60:.0f} min left)", flush=True)
            return scores

        with ThreadPoolExecutor(args.workers) as pool:
            curves = dict(zip(jobs, pool.map(run, jobs)))

    lines = [f"# Toy guided RL: reward `{args.reward}`", "",
             f"`python benchmarks/toy_guided.py {' '.join(sys.argv[1:])}`".replace(" `", "`") + f" at commit `{commit}`", "",
             f"{args.iterations} iterations of 32 episodes x 8 tokens, lr {args.learning_rate}, kl-coef {args.kl_coef}, "
             f"gamma {args.gamma}, seeds {args.seeds[0]}-{args.seeds[-1]}. Reached: the seeds on which the policy "
             f"alone (no guide) scores >= {args.target} on 32 held-out prompts at some evaluation; the median "
             "iteration at which it first does, over the seeds that reached it (- when fewer than half did); the last "
             "score over every seed.", "",
             "| algorithm | reached | median first iteration (seeds that reached) | final score (mean ± sd) |",
             "|-|-|-|-|"]
    reached = {script: [iterations_to_target(curves[(script, s)], args.target, args.eval_every) for s in args.seeds]
               for script in args.scripts}
    for script in args.scripts:
        finals = [curves[(script, s)][-1] for s in args.seeds]
        hits = [r for r in reached[script] if r is not None]
        median = statistics.median(hits) if len(hits) > len(args.seeds) / 2 else "-"
        spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
        lines.append(f"| {LABELS[script]} | {len(hits)}/{len(args.seeds)} | {median} | "
                     f"{statistics.mean(finals):.3f} ± {spread:.3f} |")
    lines += ["", "Per seed: the first iteration that reaches the target (- if never), and the last score.", "",
              "| seed | " + " | ".join(LABELS[script] for script in args.scripts) + " |",
              "|-|" + "-|" * len(args.scripts)]
    for j, seed in enumerate(args.seeds):
        cells = [f"{'-' if reached[script][j] is None else reached[script][j]} ({curves[(script, seed)][-1]:.2f})"
                 for script in args.scripts]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines += ["", f"Wall time {time.perf_counter() - start:.0f} s ({args.workers} runs at a time)."]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    Path(args.out + ".md").write_text(text)
    print(text)
    Path(args.out + ".json").write_text(json.dumps({"eval_every": args.eval_every, "target": args.target, "curves": {
        f"{script} {seed}": scores for (script, seed), scores in curves.items()}}))
    plot(curves, args)


def plot(curves, args):
    """One panel per algorithm: the held-out score of the policy alone against iterations, one line per seed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no picture (pip install -r requirements.txt)")
        return
    fig, axes = plt.subplots(1, len(args.scripts), figsize=(3 * len(args.scripts), 3), sharey=True, squeeze=False)
    axes = axes[0]  # (one panel per script, also for one script)
    for ax, script in zip(axes, args.scripts):
        for seed in args.seeds:
            scores = curves[(script, seed)]
            ax.plot([j * args.eval_every for j in range(len(scores))], scores, lw=1.2, alpha=0.8, label=f"seed {seed}")
        ax.axhline(args.target, color="black", lw=0.5, ls=":")
        ax.set_title(LABELS[script])
        ax.set_xlabel("iteration (32 episodes)")
        ax.set_ylim(-0.05, 1.05)
    axes[0].set_ylabel("held-out score, policy alone")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("toy: reward only with 3 ' movie' in a row" if args.reward == "run" else "toy: dense reward")
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)


if __name__ == "__main__":
    main()
