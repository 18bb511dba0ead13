"""Throughput of one PPO iteration, phase by phase, for each algorithm (a benchmark, not a test).

Runs the real scripts (ppo.py, and with --scripts the guided ones at the same settings) for a few
iterations in a subprocess and reads the per-phase times they log to TensorBoard
(timing/generate_s, timing/score_s, timing/update_s, timing/iteration_s):
    generate  the policy (and the guide) sample the continuations (KV cache)
    score     pi_ref log-probs, critic values, the task reward, KL, GAE
    update    the PPO epochs (forward, backward, AdamW)
and prints episodes/s and tokens/s (generated tokens) per phase, as medians over the timed
iterations (the first, warm-up iteration is left out).

    # real models (benchmarks/offline_assets.py builds them): CPU, batch 16, 48 new tokens, the hub's IMDB
    python benchmarks/throughput.py --model offline/models/smollm2-135m --reward-model offline/models/sentiment-imdb

    # every algorithm at the same settings, each one's iteration time against PPO's
    python benchmarks/throughput.py --model offline/models/smollm2-135m --reward-model offline/models/sentiment-imdb \\
        --scripts ppo.py ppo_plus_plus.py aggrevated.py d2lols.py

    # TRL's PPO trainer's settings on the tiny models benchmarks/trl_comparison.py builds: one RESULT line
    python benchmarks/throughput.py --peer-trl offline/trl-fixture
"""

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("generate", "score", "update", "iteration")

# TRL 1.12's PPOTrainer as benchmarks/trl_comparison.py runs it: 16 prompts of 8 tokens,
# always 24 new tokens at temperature 0.7 (no top-k), 4 epochs x 2 minibatches, vf_coef 0.1,
# k1 KL 0.05, gamma 1, lam 0.95, AdamW lr 3e-6 (eps 1e-8, no weight decay) decayed linearly, no
# gradient clipping, no target regularisation (our TL;DR default is tril's 0.1: a third forward pass), fp32,
# 160 episodes = 10 updates.
PEER_TRL_ARGS = [
    "--total-episodes", "160", "--batch-size", "16", "--num-minibatches", "2", "--update-epochs", "4",
    "--max-new-tokens", "24", "--temperature", "0.7", "--top-k", "0", "--top-p", "1.0", "--kl-coef", "0.05",
    "--gamma", "1.0", "--gae-lambda", "0.95", "--vf-coef", "0.1", "--clip-coef", "0.2", "--clip-coef-value", "0.2",
    "--learning-rate", "3e-6", "--anneal-lr", "True", "--adam-eps", "1e-8", "--weight-decay", "0", "--max-grad-norm", "0",
    "--target-coef", "0",
    "--rollout-batch-size", "16", "--eval-every", "0", "--max-prompt-length", "64",
]


def read_timings(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [events_dir] = glob.glob(os.path.join(run_dir, "runs", "*"))
    events = EventAccumulator(events_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {phase: [e.value for e in events.Scalars(f"timing/{phase}_s")] for phase in PHASES}


def run_ppo(script, script_args, threads):
    with tempfile.TemporaryDirectory(prefix="throughput-") as run_dir:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        result = subprocess.run([sys.executable, os.path.join(ROOT, script), *script_args], cwd=run_dir, env=env,
                                capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"{script} failed:\n{result.stderr[-3000:]}")
        return read_timings(run_dir)


def peer_trl_data(fixture, out_dir):
    """The peer's prompts as a TL;DR-schema JSONL (a one-label reward model scores prompt + continuation)."""
    path = os.path.join(out_dir, "prompts.jsonl")
    with open(os.path.join(fixture, "prompts.jsonl")) as src, open(path, "w") as dst:
        for line in src:
            dst.write(json.dumps({"prompt": json.loads(line)["prompt"], "label": ""}) + "\n")
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="policy checkpoint (local folder)")
    parser.add_argument("--reward-model", help="reward model (local folder)")
    parser.add_argument("--guide-model", help="the guided scripts' guide (default: the policy checkpoint)")
    parser.add_argument("--scripts", nargs="+", default=["ppo.py"],
                        help="scripts to time at the same settings: ppo.py ppo_plus_plus.py aggrevated.py d2lols.py")
    parser.add_argument("--task", default="imdb")
    parser.add_argument("--dataset-path", help="the task's local data (default: the hub's dataset)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--iterations", type=int, default=4, help="timed iterations (plus one warm-up)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per script (medians over all their iterations)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--peer-trl", metavar="FIXTURE",
                        help="TRL's PPO settings on the tiny models benchmarks/trl_comparison.py builds")
    parser.add_argument("--extra", default="", help="more flags for every script, e.g. '--bf16'")
    parser.add_argument("--out", help="also write the table to this file (Markdown), with the command and commit")
    args = parser.parse_args()
    for name in ("model", "reward_model", "guide_model", "dataset_path", "peer_trl", "out"):  # the runs have their own cwd
        if getattr(args, name) and os.path.exists(getattr(args, name)):
            setattr(args, name, os.path.abspath(getattr(args, name)))

    with tempfile.TemporaryDirectory(prefix="throughput-data-") as data_dir:
        if args.peer_trl:
            fixture = os.path.abspath(args.peer_trl)
            policy = os.path.join(fixture, "policy")
            # the peer's reward model has no tokenizer files of its own: score with the policy's tokenizer
            reward_dir = os.path.join(data_dir, "reward")
            os.makedirs(reward_dir)
            for name in os.listdir(os.path.join(fixture, "reward")):
                os.symlink(os.path.join(fixture, "reward", name), os.path.join(reward_dir, name))
            for name in ("tokenizer.json", "tokenizer_config.json"):
                if not os.path.exists(os.path.join(reward_dir, name)):
                    os.symlink(os.path.join(fixture, "tokenizer", name), os.path.join(reward_dir, name))
            script_args = ["--task", "tldr", "--model-name-or-path", policy, "--reward-model", reward_dir,
                           "--dataset-path", peer_trl_data(fixture, data_dir), *PEER_TRL_ARGS]
            batch_size, new_tokens, warmup, iterations = 16, 24, 0, 10
        else:
            if not args.model or not args.reward_model:
                parser.error("--model and --reward-model are required (or --peer-trl)")
            policy = args.model
            batch_size, new_tokens, warmup, iterations = args.batch_size, args.max_new_tokens, 1, args.iterations + 1
            script_args = ["--task", args.task, "--model-name-or-path", args.model, "--reward-model", args.reward_model,
                           *(["--dataset-path", args.dataset_path] if args.dataset_path else []),
                           "--batch-size", str(batch_size),
                           "--total-episodes", str(batch_size * iterations), "--num-minibatches", "2",
                           "--update-epochs", "4", "--max-new-tokens", str(new_tokens), "--eval-every", "0",
                           "--rollout-batch-size", str(batch_size)]
        results = {}
        for script in args.scripts:
            extra = args.extra.split()
            if script != "ppo.py":  # the guide: its own frozen copy of the policy checkpoint unless given
                extra += ["--guide-model", args.guide_model or policy]
            if script == "d2lols.py":  # half the iterations in each phase
                extra += ["--tau", str(iterations // 2)]
            runs = [run_ppo(script, script_args + extra, args.threads) for _ in range(args.repeats)]
            results[script] = {phase: [t for run in runs for t in run[phase][warmup:]] for phase in PHASES}

    if args.peer_trl and args.scripts == ["ppo.py"]:  # the peer's RESULT: every update timed, the first included
        timings = results["ppo.py"]
        seconds = sum(timings["iteration"])
        episodes = batch_size * len(timings["iteration"])
        print("BREAKDOWN", " ".join(f"{p}={sum(timings[p]):.2f}" for p in PHASES), "(seconds, all iterations)")
        print(f"RESULT episodes={episodes} seconds={seconds:.1f} eps={episodes / seconds:.2f} updates={len(timings['iteration'])}")
        return
    lines = [f"{batch_size} episodes x {new_tokens} new tokens per iteration; medians over "
             f"{len(results[args.scripts[0]]['iteration'])} timed iterations per script"
             + ("" if args.peer_trl else " (the warm-up iteration left out)"),
             f"{'script':<18} {'phase':<10} {'seconds':>8} {'episodes/s':>11} {'tokens/s':>10} {'x ppo.py':>9}"]
    for script, timings in results.items():
        for phase in PHASES:
            seconds = statistics.median(timings[phase])
            ratio = ""
            if phase == "iteration" and "ppo.py" in results:
                ratio = f"{seconds / statistics.median(results['ppo.py']['iteration']):9.2f}"
            lines.append(f"{script:<18} {phase:<10} {seconds:8.3f} {batch_size / seconds:11.2f} "
                         f"{batch_size * new_tokens / seconds:10.1f} {ratio}")
    print("\n".join(lines))
    if args.out:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
        command = " ".join(["python", os.path.relpath(sys.argv[0], ROOT) if os.path.isabs(sys.argv[0])
                            else sys.argv[0], *sys.argv[1:]])
        with open(args.out, "w") as f:
            f.write(f"# Throughput\n\nCommand: `{command}` at commit `{commit}`, "
                    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores.\n\n```\n"
                    + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
