"""The guide over HTTP on a real model: SmolLM2-135M served by transformers' own OpenAI-compatible server
(`transformers serve`, with and without --continuous-batching, at several --guide-concurrency) as the guide of a
short PPO++ run on IMDB, against the same model as a local guide; then fetch-ahead against a stand-in for a guide
on its own GPU (tests/guide_server.py answering every request after --remote-delay seconds, whatever it asks).

Every run is ppo_plus_plus.py with the same flags and seed (policy and guide SmolLM2-135M-Instruct, the IMDB
sentiment classifier as the reward, every episode mixed: --beta 1); only the guide differs. The numbers are the
runs' own TensorBoard logs (guide.stats(): the loop's wait for the guide, the policy tokens it returned, the
server's requests and latency; timing/iteration_s). The served rows run with --no-guide-fetch-ahead, so the
wait is the guide's whole time; on a CPU machine the server and the trainer share the same cores (say so beside
the numbers).

    python benchmarks/guide_http.py                                   # hub models and data
    python benchmarks/guide_http.py --models-dir DIR --data-dir DIR   # DIR/smollm2-135m, DIR/sentiment-imdb;
                                                                      # DIR/imdb/{train,test}.jsonl

Writes benchmarks/results/guide_http.md (or --out, the file written).
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import read_tensorboard, run_script_in_process  # noqa: E402
from guide_server import GuideServer  # noqa: E402


def start_server(model, log_path, continuous_batching, cb_memory_percent):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", model, "--port",
                                str(port)] + (["--continuous-batching", "--cb-max-memory-percent", str(cb_memory_percent)]
                                              if continuous_batching else []),
                               stdout=log, stderr=subprocess.STDOUT)
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


def run(flags, cwd):
    """One ppo_plus_plus.py run in `cwd`: its logged scalars per tag (one value an iteration), and its seconds."""
    cwd.mkdir(parents=True)
    start = time.perf_counter()
    run_script_in_process("ppo_plus_plus.py", flags, cwd)
    events = read_tensorboard(cwd)
    scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return scalars, time.perf_counter() - start


def table_row(label, scalars, seconds, whole_budget):
    """tokens asked (policy tokens, per-row budgets: a roll-in of k asks k + 1) against `whole_budget` (H a row, as
    before per-row budgets), the server's max_tokens asked, tokens returned, guide wait s (all; an iteration's,
    median of the 2nd on: the first probes the server), tokens/s of wait, requests, latency, iteration s (median of
    the 2nd on), run s, the last score."""
    def later(tag):
        return statistics.median(scalars[tag][1:] or scalars[tag])

    wait, tokens = sum(scalars["timing/guide_s"]), sum(scalars["guide/tokens_returned"])
    requests = sum(scalars.get("guide/requests", [0]))
    latency = statistics.mean(scalars["timing/guide_latency_s"]) if requests else float("nan")
    asked, server_asked = sum(scalars["guide/tokens_asked"]), sum(scalars.get("guide/server_tokens_asked", [0]))
    return (f"| {label} | {asked:.0f} of {whole_budget} ({asked / whole_budget:.0%}) | "
            f"{f'{server_asked:.0f}' if requests else '-'} | {tokens:.0f} | {wait:.1f} | {later('timing/guide_s'):.1f} | {tokens / wait:.1f} | "
            f"{requests:.0f} | {latency:.2f} | {later('timing/iteration_s'):.1f} | {seconds:.0f} | "
            f"{scalars['objective/scores'][-1]:.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", help="a folder with smollm2-135m/ and sentiment-imdb/ (default: the hub)")
    parser.add_argument("--data-dir", help="a folder with imdb/{train,test}.jsonl (default: the hub's imdb)")
    parser.add_argument("--iterations", type=int, default=2, help="RL iterations of each run")
    parser.add_argument("--batch-size", type=int, default=16, help="episodes per iteration")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="the horizon H")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16],
                        help="--guide-concurrency of the served runs (requests in flight)")
    parser.add_argument("--cb-memory-percent", type=float, default=0.05,
                        help="--continuous-batching's KV cache as a share of memory (its default, sized for a GPU, "
                             "took 13.7 GB of this CPU machine's RAM and was OOM-killed)")
    parser.add_argument("--remote-delay", type=float, default=10.0,
                        help="seconds the stand-in for a GPU-served guide takes to answer a request")
    parser.add_argument("--remote-iterations", type=int, default=4, help="RL iterations of the fetch-ahead runs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "guide_http.md"),
                        help="the result file written (Markdown)")
    args = parser.parse_args()
    for name in ("models_dir", "data_dir", "out"):  # the runs have their own working folders
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    model = os.path.join(args.models_dir, "smollm2-135m") if args.models_dir else "HuggingFaceTB/SmolLM2-135M-Instruct"
    reward = os.path.join(args.models_dir, "sentiment-imdb") if args.models_dir else "lvwerra/distilbert-imdb"
    flags = ["--task", "imdb", "--model-name-or-path", model, "--reward-model", reward, "--guide-model", model,
             "--batch-size", str(args.batch_size), "--num-minibatches", "2", "--update-epochs", "1",
             "--max-new-tokens", str(args.max_new_tokens), "--rollout-batch-size", str(args.batch_size),
             "--eval-every", "0", "--beta", "1", "--target-coef", "0", "--seed", str(args.seed)]
    if args.data_dir:
        flags += ["--dataset-path", os.path.join(args.data_dir, "imdb")]
    episodes = ["--total-episodes", str(args.iterations * args.batch_size)]
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"  # before the runs: the code that makes the numbers
    work = Path(tempfile.mkdtemp(prefix="guide_http_"))  # the runs' folders and the servers' logs
    header = ["| guide | tokens asked (policy; of H a row) | max_tokens asked (server) | tokens returned (policy) | "
              "guide wait s | guide wait s/it (2nd on) | tokens/s of wait | "
              "requests | latency s | iteration s (2nd on) | run s | objective/scores (last) |", "|-|-|-|-|-|-|-|-|-|-|-|-|"]
    whole_budget = args.iterations * args.batch_size * args.max_new_tokens  # --beta 1: every row rolls in
    served = [*header, table_row("local", *run(flags + episodes, work / "local"), whole_budget)]
    print(served[-1], flush=True)
    for continuous_batching in (False, True):
        name = "cb" if continuous_batching else "plain"
        server, url = start_server(model, work / f"server_{name}.log", continuous_batching, args.cb_memory_percent)
        try:
            for concurrency in args.concurrency:
                scalars, seconds = run(flags + episodes + ["--guide-url", url, "--guide-concurrency", str(concurrency),
                                                           "--no-guide-fetch-ahead"], work / f"{name}_{concurrency}")
                label = (f"served{', --continuous-batching' if continuous_batching else ''}, --guide-concurrency "
                         f"{concurrency}")
                served.append(table_row(label, scalars, seconds, whole_budget))
                print(served[-1], flush=True)
        finally:
            server.terminate()
            server.wait(timeout=60)
    remote = list(header)
    with GuideServer(marker=" and the film was a good one" * 20, delay=args.remote_delay) as server:
        for ahead in (False, True):
            scalars, seconds = run(flags + ["--total-episodes", str(args.remote_iterations * args.batch_size),
                                            "--guide-url", server.url, "--guide-model", "remote",
                                            "--guide-fetch-ahead" if ahead else "--no-guide-fetch-ahead"],
                                   work / f"remote_{ahead}")
            remote.append(table_row(f"remote, {'--guide-fetch-ahead' if ahead else '--no-guide-fetch-ahead'}",
                                    scalars, seconds, args.remote_iterations * args.batch_size * args.max_new_tokens))
            print(remote[-1], flush=True)

    command = "python benchmarks/guide_http.py " + " ".join(sys.argv[1:])
    lines = ["# The guide over HTTP: SmolLM2-135M, local and served by `transformers serve`; fetch-ahead", "",
             f"`{command.strip()}` at commit `{commit}`", "",
             f"ppo_plus_plus.py --task imdb, policy and guide SmolLM2-135M-Instruct, {args.iterations} iterations "
             f"of {args.batch_size} episodes, {args.max_new_tokens} new tokens, --beta 1 (every episode mixed), "
             f"seed {args.seed}. Served: `transformers serve` (one prompt per request), --no-guide-fetch-ahead; on "
             "this machine the server and the trainer share the same CPU cores.", "", *served, "",
             f"Fetch-ahead: the same run for {args.remote_iterations} iterations, the guide a stand-in for one on its "
             f"own GPU (every request answered after {args.remote_delay:g} s, text that does not depend on the "
             "prompt: tests/guide_server.py).", "", *remote]
    notes = ""  # what a reader wrote below the marker in an earlier result is kept
    if Path(args.out).is_file():
        notes = Path(args.out).read_text().partition(NOTES + "\n")[2]
    text = "\n".join(lines + ["", NOTES]) + "\n" + notes
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
