"""The paper's IMDB table in miniature, offline, on 2 CPU cores: SL, PPO, PPO++, AggreVaTeD, D2LOLS.

    pip install -r requirements.txt
    python benchmarks/imdb_offline.py            # ~70 minutes on 2 cores; builds the models if missing

Real assets: SmolLM2-135M-Instruct (policy, pi_ref and critic backbone) and the small IMDB sentiment
classifier (reward), both built by benchmarks/offline_assets.py into --models-dir if missing; the real
reviews of the hub's imdb dataset, or of --data-dir (imdb/train.jsonl, imdb/test.jsonl). Every method
starts from the same SmolLM2 checkpoint and sees the same number of episodes; the guide of the three
guided methods is the SL model trained here first (the paper's guide: supervised on the positive
training reviews, nucleus-sampled).

Writes benchmarks/results/imdb_offline.md (the table: held-out sentiment score, output perplexity
under the starting model, distinct-1/2; mean and spread over seeds; episodes and wall time) and
benchmarks/results/imdb_offline.png (held-out score against episodes, one line per method); every run's
compact file (its scalars and last generations, benchmarks/run_files.py) goes to --records-dir, its log and
TensorBoard events stay in --work-dir. A run whose compact file holds the same command is not run again, so an
interrupted driver continues where it stopped, and the table rebuilds from the committed files. Held-out = the
test split; the sizes below come from pilot runs of ppo.py (docs/results.md says what split they were scored on).
"""

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run_files  # noqa: E402  (runs side by side, and the compact file of each finished run)


@dataclass
class Args:
    models_dir: str = os.path.join(ROOT, "offline", "models")
    """where the real offline models are (built there by benchmarks/offline_assets.py if missing)"""
    data_dir: Optional[str] = None
    """local data: a folder whose imdb/ holds train.jsonl and test.jsonl (default: the hub's imdb dataset)"""
    records_dir: str = os.path.join(ROOT, "benchmarks", "results", "imdb_offline_runs")
    """one compact file a finished run (its command, scalars and last generations), committed: a run whose file
    holds the same command is reused, and the table rebuilds from these files"""
    work_dir: str = os.path.join(ROOT, "benchmarks", "work", "imdb_offline")
    """every run's folder (log, TensorBoard events, every evaluation's generations) and the SL model (not
    committed)"""
    out: str = os.path.join(ROOT, "benchmarks", "results", "imdb_offline")
    """a stem, the results' path without extension: {out}.md (the table), {out}.png (a trailing .md is dropped)"""
    seeds: List[int] = field(default_factory=lambda: [1, 2])
    """one run of every method per seed"""
    methods: List[str] = field(default_factory=lambda: ["ppo", "ppo_plus_plus", "aggrevated", "d2lols"])
    """the RL scripts to run (after SL)"""

    # the size every method shares: the paper's IMDB setting (64 prompt tokens, 48 new, ~1,000 optimizer
    # steps) shrunk to fit 2 CPU cores, with the optimizer steps kept rather than the episodes
    max_prompt_length: int = 8
    """prompt tokens (the last ones of the review's first half): short, so the continuation decides the score"""
    max_new_tokens: int = 24
    """the horizon H"""
    batch_size: int = 32
    """episodes per RL iteration"""
    num_iterations: int = 8
    """RL iterations: every method sees batch_size * num_iterations episodes"""
    num_minibatches: int = 4
    """PPO minibatches per epoch (one optimizer step each)"""
    update_epochs: int = 2
    """PPO epochs per batch"""
    learning_rate: float = 3e-5
    """RL learning rate of the policy"""
    critic_learning_rate: float = 1e-5
    """RL learning rate of the critic: slow, so that it stays a near-constant baseline while it cannot yet tell
    one review's value from another's (at 1e-4 it chased each batch's prompts: explained variance < 0)"""
    anneal_lr: bool = False
    """decay the RL learning rates linearly to 0 (off: the few steps here are all needed)"""
    gae_lambda: float = 1.0
    """GAE lambda: 1 = the Monte Carlo return (the scripts' default 0.95 gives the first of 24 tokens only
    (0.99 x 0.95)^23 = 0.24 of the end reward while the critic explains nothing)"""
    target_coef: float = 0.0
    """tril's target regularisation (0.1 there): off here, the IMDB references are negative reviews' second
    halves half of the time and pull against the reward, and the term costs a third of the update"""
    tau: int = 3
    """D2LOLS switch iteration (the paper: 20 of 50 iterations, 40%)"""
    sl_steps: int = 96
    """SL (sft.py) optimizer steps of --sl-batch-size positive training reviews (one run, seed 1)"""
    sl_batch_size: int = 16
    """SL examples per step"""
    sl_learning_rate: float = 1e-4
    """SL learning rate"""
    sl_model: str = ""
    """use this SL model instead of training one (e.g. {work-dir}/sl/model from an earlier run of this driver)"""
    parallel: bool = True
    """run the seeds of a method side by side, the cores shared out (on 2 cores ~20% more throughput than one
    after the other); the wall times in the table are then those of runs that shared the machine"""
    eval_every: int = 4
    """held-out evaluation every this many RL iterations (and at the start and the end)"""
    num_eval_prompts: int = 128
    """held-out (test split) prompts per evaluation (the standard error of a 64-prompt mean is ~0.05)"""


LABELS = {"zero_shot": "Zero-shot (start)", "sl": "SL (sft.py)", "ppo": "PPO", "ppo_plus_plus": "PPO++",
          "aggrevated": "AggreVaTeD", "d2lols": "D2LOLS"}
METRICS = [("score", "sentiment score ↑"), ("perplexity", "perplexity ↓"), ("distinct_1", "distinct-1"),
           ("distinct_2", "distinct-2")]


def diagnostics(scalars):
    """What says whether PPO's update was sound: the critic, the step size, the drift from pi_ref."""
    def values(tag):
        return [v for _, v in scalars[tag]]

    ev = values("val/explained_variance")
    return {"ev_last": statistics.mean(ev[-3:]), "approxkl_first": values("policy/approxkl_avg")[0],
            "clipfrac_mean": statistics.mean(values("policy/clipfrac_avg")), "kl_last": values("objective/kl")[-1]}


def mean_spread(values):
    mean = statistics.mean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def provenance(args, policy, classifier):
    """The models' checksums (from their BUILD.json, when offline_assets.py built them)."""
    models = []
    for name, folder in (("policy", policy), ("classifier", classifier)):
        build = os.path.join(folder, "BUILD.json")
        if os.path.isfile(build):
            with open(build) as f:
                info = json.load(f)
            accuracy = f", test accuracy {info['test_accuracy']}" if "test_accuracy" in info else ""
            models.append(f"{name} model.safetensors sha256 {info['files']['model.safetensors'][:12]}{accuracy}")
    return "; ".join(models)


def write_table(args, results, seconds, episodes, sizes_line, guide_line, commit, models):
    lines = [
        "# IMDB in miniature, offline (CPU, 2 cores)", "",
        f"Command: `{' '.join(['python benchmarks/imdb_offline.py', *sys.argv[1:]])}`; every run made at commit "
        f"`{commit}`. "
        f"{sizes_line}" + (f" Models (benchmarks/offline_assets.py): {models}." if models else ""), "",
        guide_line, "",
        "| method | " + " | ".join(label for _, label in METRICS) + " | episodes | wall time (s) |",
        "|-|" + "-|" * (len(METRICS) + 2),
    ]
    for method in results:
        cells = []
        for key, _ in METRICS:
            mean, spread = mean_spread([r[key] for r in results[method]])
            cells.append(f"{mean:.3f} ± {spread:.3f}")
        wall = f"{statistics.mean(seconds[method]):.0f}" if seconds.get(method) else "–"
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + f" | {episodes[method]} | {wall} |")
    over = (f"Mean ± standard deviation over {len(args.seeds)} seeds" if len(args.seeds) > 1
            else f"One seed ({args.seeds[0]}), so ± 0 is no spread, not no noise")
    lines += ["", f"{over}; each evaluated on the first "
              f"{args.num_eval_prompts} test-split prompts (sampled continuations, top-k 50). Per seed:", ""]
    lines += ["| method | seed | start | final | change | perplexity | explained variance (last 3 iterations) | "
              "approx-KL (first iteration) | clip fraction (mean) | KL to pi_ref (last iteration) |",
              "|-|-|-|-|-|-|-|-|-|-|"]
    for method in [m for m in results if m != "zero_shot"]:
        for seed, r, start in zip(args.seeds, results[method], results["zero_shot"]):
            cells = [LABELS[method], str(seed), f"{start['score']:.3f}", f"{r['score']:.3f}",
                     f"{r['score'] - start['score']:+.3f}", f"{r['perplexity']:.2f}"]
            cells += ([f"{r['ev_last']:.2f}", f"{r['approxkl_first']:.3f}", f"{r['clipfrac_mean']:.3f}",
                       f"{r['kl_last']:.2f}"] if "ev_last" in r else ["–"] * 4)
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Every run's scalars and last generations (prompt, continuation, references, score): "
              f"`{os.path.relpath(args.records_dir, ROOT)}/<run>.json` (benchmarks/run_files.py)."]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(args, curves, sl_scores):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for method, runs in curves.items():
        steps = sorted(set.intersection(*(set(s for s, _ in run_curve) for run_curve in runs)))
        means = [statistics.mean(dict(run_curve)[s] for run_curve in runs) for s in steps]
        axes.plot(steps, means, marker="o", label=LABELS[method])
        for run_curve in runs:  # each seed, faint
            axes.plot(*zip(*run_curve), color=axes.lines[-1].get_color(), alpha=0.25, linewidth=1)
    axes.axhline(statistics.mean(sl_scores), color="gray", linestyle="--", label="SL (the guide)")
    axes.set_xlabel("episodes")
    axes.set_ylabel(f"held-out sentiment score ({args.num_eval_prompts} test prompts)")
    seeds = f"mean of seeds {', '.join(map(str, args.seeds))}" if len(args.seeds) > 1 else f"seed {args.seeds[0]}"
    axes.set_title(f"IMDB, SmolLM2-135M-Instruct, CPU; {seeds}")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.out + ".png", dpi=120)


if __name__ == "__main__":
    args = tyro.cli(Args)
    args.out = args.out.removesuffix(".md")  # (a stem)
    for name in ("models_dir", "data_dir", "records_dir", "work_dir", "out", "sl_model"):  # each run has its own cwd
        if getattr(args, name):
            setattr(args, name, os.path.abspath(os.path.expanduser(getattr(args, name))))
    policy = os.path.join(args.models_dir, "smollm2-135m")
    classifier = os.path.join(args.models_dir, "sentiment-imdb")
    imdb = os.path.join(args.data_dir, "imdb") if args.data_dir else None  # (None: the hub's)
    if imdb and not os.path.isfile(os.path.join(imdb, "test.jsonl")):
        raise SystemExit(f"error: no IMDB data at {imdb} (expected train.jsonl and test.jsonl)")
    unknown = [m for m in args.methods if m not in LABELS or m in ("zero_shot", "sl")]
    if unknown or not args.seeds:
        raise SystemExit(f"error: unknown method(s) {unknown} or no seeds; methods: ppo ppo_plus_plus aggrevated d2lols")
    import matplotlib  # noqa: F401  (fail now, not after 45 minutes: pip install -r requirements.txt)

    if args.sl_model and not os.path.isfile(os.path.join(args.sl_model, "config.json")):
        raise SystemExit(f"error: --sl-model {args.sl_model} is not a saved model folder")
    if not (os.path.isdir(policy) and os.path.isdir(classifier)):
        print(f"building the offline models in {args.models_dir} (a few minutes)", flush=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "offline_assets.py"), "--out", args.models_dir]
                       + (["--data-dir", args.data_dir] if args.data_dir else []), check=True)
    os.makedirs(args.work_dir, exist_ok=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    os.makedirs(args.records_dir, exist_ok=True)
    models = provenance(args, policy, classifier)

    task = ["--task", "imdb", *(["--dataset-path", imdb] if imdb else []), "--reward-model", classifier,
            "--max-prompt-length", str(args.max_prompt_length), "--max-new-tokens", str(args.max_new_tokens),
            "--eval-split", "test", "--num-eval-prompts", str(args.num_eval_prompts)]
    episodes = args.batch_size * args.num_iterations
    rl = ["--model-name-or-path", policy, "--total-episodes", str(episodes), "--batch-size", str(args.batch_size),
          "--num-minibatches", str(args.num_minibatches), "--update-epochs", str(args.update_epochs),
          "--learning-rate", str(args.learning_rate), "--critic-learning-rate", str(args.critic_learning_rate),
          "--anneal-lr", str(args.anneal_lr), "--gae-lambda", str(args.gae_lambda),
          "--target-coef", str(args.target_coef), "--eval-every", str(args.eval_every)]
    results, seconds, curves = {"zero_shot": [], "sl": []}, {"sl": []}, {}
    episode_counts = {"zero_shot": 0, "sl": args.sl_steps * args.sl_batch_size}
    side_by_side = len(args.seeds) if args.parallel else 1
    started, made_at = time.perf_counter(), set()  # (the commits the runs were made at: reused ones keep theirs)

    def progress(name, wall):
        print(f"{name} done in {wall:.0f}s; {(time.perf_counter() - started) / 60:.1f} min so far", flush=True)

    def run_once(jobs):  # the runs not made before (benchmarks/run_files.py), side by side; every job's record
        records = run_files.run_once(jobs, args.work_dir, args.records_dir, side_by_side, progress)
        made_at.update(record["commit"] for record in records)
        return records

    # SL: supervised on the positive training reviews, once (seed 1); the guide of every guided run
    sl_model = args.sl_model or os.path.join(args.work_dir, "sl", "model")
    if not args.sl_model:
        [record] = run_once([("sl", "sft.py", task + ["--model-name-or-path", policy, "--max-steps", str(args.sl_steps),
                                                     "--batch-size", str(args.sl_batch_size), "--learning-rate",
                                                     str(args.sl_learning_rate), "--eval-every", "0", "--save-model",
                                                     "--save-path", sl_model])])
        seconds["sl"].append(record["seconds"])
    # the starting model and the SL model, evaluated by the same code, with each seed's sampling
    for method, model in (("zero_shot", policy), ("sl", sl_model)):
        jobs = [(f"{method}_seed{seed}", "sft.py", task + ["--model-name-or-path", model, "--perplexity-model", policy,
                                                           "--seed", str(seed), "--eval-only"]) for seed in args.seeds]
        for record in run_once(jobs):
            results[method].append({key: record["scalars"][f"eval/{key}"][0][1] for key, _ in METRICS})
    # every RL method from the same start, the seeds of a method side by side
    for method in args.methods:
        guide = [] if method == "ppo" else ["--guide-model", sl_model]
        if method == "d2lols":
            guide += ["--tau", str(args.tau)]
        jobs = [(f"{method}_seed{seed}", f"{method}.py", task + rl + guide + ["--seed", str(seed)])
                for seed in args.seeds]
        for record in run_once(jobs):
            scalars = record["scalars"]
            results.setdefault(method, []).append({key: scalars[f"eval/{key}"][-1][1] for key, _ in METRICS}
                                                  | diagnostics(scalars))
            curves.setdefault(method, []).append(scalars["eval/score"])
            seconds.setdefault(method, []).append(record["seconds"])
        episode_counts[method] = episodes

    sizes = (f"Policy, pi_ref and critic backbone: SmolLM2-135M-Instruct; reward: P(positive) of the small IMDB "
             f"classifier; prompts: the last {args.max_prompt_length} tokens of a review's first half; "
             f"{args.max_new_tokens} new tokens (top-k 50); RL: {args.num_iterations} iterations of "
             f"{args.batch_size} episodes, {args.update_epochs} epoch(s) x {args.num_minibatches} minibatches "
             f"({args.num_iterations * args.update_epochs * args.num_minibatches} optimizer steps), policy lr "
             f"{args.learning_rate}, critic lr {args.critic_learning_rate}, anneal {args.anneal_lr}, target-coef "
             f"{args.target_coef}, kl-coef 0.001, whitened GAE (lambda {args.gae_lambda}); D2LOLS tau {args.tau}; "
             f"SL: {args.sl_steps} steps of "
             f"{args.sl_batch_size} positive reviews, lr {args.sl_learning_rate}"
             + (f" (trained by an earlier run: {os.path.relpath(args.sl_model, ROOT)})." if args.sl_model else "."))
    guide = ("Guide (PPO++, AggreVaTeD, D2LOLS): the SL model, nucleus-sampled (top-p 0.92, "
             "top-k 50), as in the paper. Zero-shot = the starting model, evaluated by the same code.")
    write_table(args, results, seconds, episode_counts, sizes, guide, ", ".join(sorted(made_at)), models)
    plot(args, curves, [r["score"] for r in results["sl"]])
    print(open(args.out + ".md").read())
    print(f"wrote {args.out}.md and {args.out}.png in {(time.perf_counter() - started) / 60:.1f} minutes")
