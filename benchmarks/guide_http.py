"""The guide over HTTP on a real model: SmolLM2-135M served by transformers' own OpenAI-compatible server
(`transformers serve`) as the guide of a short PPO++ run on IMDB, against the same model as a local guide.

Both runs are ppo_plus_plus.py with the same flags and seed (policy and guide SmolLM2-135M-Instruct, the
IMDB sentiment classifier as the reward, every episode mixed: --beta 1); only the guide's source differs.
Each call of the guide is timed in-process (its `write`), and the policy tokens it returned are counted:
guide tokens per second. On a CPU machine the server and the trainer share the same cores (say so beside the
numbers).

    python benchmarks/guide_http.py                                   # hub models and data
    python benchmarks/guide_http.py --models-dir DIR --data-dir DIR   # DIR/smollm2-135m, DIR/sentiment-imdb;
                                                                      # DIR/imdb/{train,test}.jsonl

Writes benchmarks/results/guide_http.md (or --out).
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import read_tensorboard, run_script_in_process  # noqa: E402


class TimedGuide:
    """Wraps the script's load_guide: the guide it returns has its write() timed and its tokens counted."""

    def __init__(self):
        self.seconds, self.tokens, self.calls = 0.0, 0, 0

    def wrap(self, load_guide):
        def timed_load_guide(*args, **kwargs):
            guide = load_guide(*args, **kwargs)
            write = guide.write

            def timed_write(examples, prefixes, max_new_tokens):
                start = time.perf_counter()
                results = write(examples, prefixes, max_new_tokens)
                self.seconds += time.perf_counter() - start
                self.tokens += sum(len(tokens) for tokens, _ in results)
                self.calls += 1
                return results

            guide.write = timed_write
            return guide

        return timed_load_guide


def start_server(model, log_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", model, "--port",
                                str(port)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(f"http://localhost:{port}/health", timeout=2)
            return process, f"http://localhost:{port}/v1"
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                sys.exit(f"transformers serve did not start; see {log_path}")
            time.sleep(1)


NOTES = "<!-- notes: what the table shows, written by hand; a re-run keeps what is below this line -->"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", help="a folder with smollm2-135m/ and sentiment-imdb/ (default: the hub)")
    parser.add_argument("--data-dir", help="a folder with imdb/{train,test}.jsonl (default: the hub's imdb)")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--guide-concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "guide_http"))
    args = parser.parse_args()
    for name in ("models_dir", "data_dir", "out"):  # the runs have their own working folders
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    model = os.path.join(args.models_dir, "smollm2-135m") if args.models_dir else "HuggingFaceTB/SmolLM2-135M-Instruct"
    reward = os.path.join(args.models_dir, "sentiment-imdb") if args.models_dir else "lvwerra/distilbert-imdb"
    flags = ["--task", "imdb", "--model-name-or-path", model, "--reward-model", reward, "--guide-model", model,
             "--total-episodes", str(args.iterations * args.batch_size), "--batch-size", str(args.batch_size),
             "--num-minibatches", "2", "--update-epochs", "1", "--max-new-tokens", str(args.max_new_tokens),
             "--rollout-batch-size", str(args.batch_size), "--eval-every", "0", "--beta", "1", "--target-coef", "0",
             "--seed", str(args.seed)]
    if args.data_dir:
        flags += ["--dataset-path", os.path.join(args.data_dir, "imdb")]
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"  # before the runs: the code that makes the numbers
    work = Path(tempfile.mkdtemp(prefix="guide_http_"))  # the runs' folders and the server's log
    rows = {}
    server, url = start_server(model, work / "server.log")
    try:
        for source, extra in (("local", []), ("served", ["--guide-url", url, "--guide-concurrency",
                                                         str(args.guide_concurrency)])):
            cwd = work / source
            cwd.mkdir(parents=True, exist_ok=True)
            timed = TimedGuide()
            start = time.perf_counter()
            run_script_in_process("ppo_plus_plus.py", flags + extra, cwd, {"load_guide": timed})
            events = read_tensorboard(cwd)
            last = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
            rows[source] = dict(timed=timed, seconds=time.perf_counter() - start, logs=last)
            print(f"{source}: guide {timed.tokens} tokens in {timed.seconds:.1f} s over {timed.calls} calls", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)

    command = "python benchmarks/guide_http.py " + " ".join(sys.argv[1:])
    lines = ["# The guide over HTTP: SmolLM2-135M, local and served by `transformers serve`", "",
             f"`{command.strip()}` at commit `{commit}`", "",
             f"ppo_plus_plus.py --task imdb, policy and guide SmolLM2-135M-Instruct, {args.iterations} iterations "
             f"of {args.batch_size} episodes, {args.max_new_tokens} new tokens, --beta 1 (every episode mixed), "
             f"seed {args.seed}; served: --guide-concurrency {args.guide_concurrency}, one prompt per request. On "
             "this machine the server and the trainer share the same CPU cores.", "",
             "| guide | guide calls | guide tokens (policy) | guide seconds | guide tokens/s | generate s/it (last) | "
             "run seconds | guide/mixed_fraction | guide/mean_k | guide/score_mixed | objective/scores |",
             "|-|-|-|-|-|-|-|-|-|-|-|"]
    for source, row in rows.items():
        t, logs = row["timed"], row["logs"]
        lines.append(f"| {source} | {t.calls} | {t.tokens} | {t.seconds:.1f} | {t.tokens / t.seconds:.1f} | "
                     f"{logs['timing/generate_s']:.1f} | {row['seconds']:.0f} | {logs['guide/mixed_fraction']:.2f} | "
                     f"{logs.get('guide/mean_k', float('nan')):.1f} | {logs.get('guide/score_mixed', float('nan')):.3f} | "
                     f"{logs['objective/scores']:.3f} |")
    notes = ""  # what a reader wrote below the marker in an earlier result is kept
    if Path(args.out + ".md").is_file():
        notes = Path(args.out + ".md").read_text().partition(NOTES + "\n")[2]
    text = "\n".join(lines + ["", NOTES]) + "\n" + notes
    Path(args.out + ".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
