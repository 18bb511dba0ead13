"""Peak memory (RSS) of one RL iteration per configuration, on the CPU: what --gradient-checkpointing and --lora-r
save, measured (docs/scaling.md quotes this file). Each configuration is one fresh process (its peak from
os.wait4), SmolLM2-135M-Instruct as policy, pi_ref, critic backbone and (PPO++) guide, the IMDB classifier as the
reward, one iteration of --batch-size episodes of --max-new-tokens tokens.

    python benchmarks/memory_peak.py                                   # hub models and data
    python benchmarks/memory_peak.py --models-dir DIR --data-dir DIR   # DIR/smollm2-135m, DIR/sentiment-imdb;
                                                                       # DIR/imdb/{train,test}.jsonl
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGURATIONS = [  # (script, flags)
    ("ppo.py", []),
    ("ppo.py", ["--gradient-checkpointing"]),
    ("ppo_plus_plus.py", []),
    ("ppo_plus_plus.py", ["--gradient-checkpointing"]),
    ("ppo_plus_plus.py", ["--lora-r", "8"]),
    ("ppo_plus_plus.py", ["--lora-r", "8", "--gradient-checkpointing"]),
]


def measure(command, cwd):
    """(peak RSS in bytes, the run's output) of one process."""
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")})
        _, status, usage = os.wait4(process.pid, 0)
        out.seek(0)
        output = out.read()
    if status != 0:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{output[-3000:]}")
    return usage.ru_maxrss * 1024, output  # (Linux: kilobytes)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", help="a folder with smollm2-135m/ and sentiment-imdb/ (default: the hub)")
    parser.add_argument("--data-dir", help="a folder with imdb/{train,test}.jsonl (default: the hub's imdb)")
    parser.add_argument("--batch-size", type=int, default=16, help="episodes in the iteration")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="the horizon H")
    parser.add_argument("--update-epochs", type=int, default=4)
    parser.add_argument("--num-minibatches", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "memory_peak.md"),
                        help="the result file written (Markdown)")
    args = parser.parse_args()
    for name in ("models_dir", "data_dir", "out"):
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    model = os.path.join(args.models_dir, "smollm2-135m") if args.models_dir else "HuggingFaceTB/SmolLM2-135M-Instruct"
    reward = os.path.join(args.models_dir, "sentiment-imdb") if args.models_dir else "lvwerra/distilbert-imdb"
    common = ["--task", "imdb", "--model-name-or-path", model, "--reward-model", reward, "--batch-size",
              str(args.batch_size), "--total-episodes", str(args.batch_size), "--max-new-tokens",
              str(args.max_new_tokens), "--update-epochs", str(args.update_epochs), "--num-minibatches",
              str(args.num_minibatches), "--rollout-batch-size", str(args.batch_size), "--eval-every", "0",
              "--target-coef", "0", "--seed", "1"]
    if args.data_dir:
        common += ["--dataset-path", os.path.join(args.data_dir, "imdb")]
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    rows = ["| script | flags | trained parameters | peak RSS | update s | iteration s |", "|-|-|-|-|-|-|"]
    with tempfile.TemporaryDirectory() as work:
        for script, flags in CONFIGURATIONS:
            guide = ["--guide-model", model] if script != "ppo.py" else []
            started = time.perf_counter()
            peak, output = measure([sys.executable, os.path.join(ROOT, script), *common, *guide, *flags], work)
            trained = re.search(r"([\d,]+) trained parameters", output).group(1)
            update = re.search(r"update ([\d.]+)s\)", output).group(1)
            rows.append(f"| `{script}` | {' '.join(f'`{f}`' if f.startswith('--') else f for f in flags) or '–'} | "
                        f"{trained} | {peak / 1e9:.1f} GB | {float(update):.0f} | {time.perf_counter() - started:.0f} |")
            print(rows[-1], flush=True)
    command = "python benchmarks/memory_peak.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        "# Peak memory of one iteration on the CPU", "", f"`{command.strip()}` at commit `{commit}`", "",
        f"SmolLM2-135M-Instruct as policy, pi_ref, critic backbone and (PPO++) guide; the IMDB classifier as the "
        f"reward; one iteration of {args.batch_size} episodes of {args.max_new_tokens} new tokens, "
        f"{args.update_epochs} epochs of {args.num_minibatches} minibatches, fp32. Peak RSS of the whole process "
        "(os.wait4); the iteration's seconds include loading the models.", "", *rows, ""])
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
