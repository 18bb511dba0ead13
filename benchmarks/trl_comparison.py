"""Against TRL's PPO trainer: the same PPO work on the same tiny models, in episodes per second (CPU).

    python benchmarks/trl_comparison.py              # a venv for TRL, the tiny models, 3 rounds (~15 min on 2 cores)

TRL 1.12.0 is the last release with a PPO trainer (`trl.experimental.ppo.PPOTrainer`; 1.13.0 removed it). It
runs in a virtual environment of its own (--venv, made on first use: this machine's torch, then
benchmarks/requirements-trl.txt), on tiny models built here (--fixture: a byte-level BPE tokenizer trained on
synthetic review sentences, a 4-layer GPT-2 policy and a GPT-2 reward model with one label, 512 prompts of 8
tokens). Both sides do the same work: 160 episodes in updates of 16 prompts, always 24 new tokens at
temperature 0.7 (no top-k), 4 epochs x 2 minibatches, k1 KL 0.05, gamma 1, lambda 0.95, clip 0.2 (value 0.2),
vf-coef 0.1, AdamW lr 3e-6 decayed linearly, no gradient clipping, fp32; ours as `benchmarks/throughput.py
--peer-trl FIXTURE`. The rounds alternate TRL and ppo.py, each run started when the rest of the machine uses
under 0.1 core; episodes/s counts every update, the first included. Writes benchmarks/results/trl_comparison.md.
"""

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPISODES, BATCH, NEW_TOKENS, PROMPT_TOKENS = 160, 16, 24, 8


def make_fixture(folder, seed=0):
    """The tiny models and prompts both sides run (deterministic for a seed)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

    rng = random.Random(seed)
    subjects = ["this film", "the movie", "the plot", "the acting", "the ending", "the score", "the cast",
                "the story", "the dialogue", "the director", "the sequel", "every scene", "the villain"]
    verbs = ["was", "felt", "seemed", "turned out", "became", "looked", "sounded"]
    adverbs = ["really", "quite", "very", "oddly", "truly", "hardly", "deeply", "almost", "rather"]
    adjectives = ["wonderful", "boring", "moving", "dull", "clever", "messy", "funny", "flat", "gripping", "silly",
                  "charming", "tedious", "stunning", "bland", "haunting", "lazy", "elegant", "stale"]
    endings = ["i would watch it again", "skip this one", "a must see", "i fell asleep", "five stars",
               "two stars", "bring the kids", "wait for streaming", "a real classic", "what a waste"]
    sentences = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(adverbs)} {rng.choice(adjectives)} and "
                 f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(adjectives)}, {rng.choice(endings)}."
                 for _ in range(20000)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(sentences, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>", "<pad>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>", pad_token="<pad>", padding_side="left")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=128, n_layer=4, n_head=4,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    policy = GPT2LMHeadModel(config)
    torch.manual_seed(seed + 1)
    reward = GPT2ForSequenceClassification(GPT2Config(**config.to_dict(), num_labels=1))
    for name, model in (("policy", policy), ("reward", reward)):
        model.save_pretrained(os.path.join(folder, name))
        tokenizer.save_pretrained(os.path.join(folder, name))
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    prompts = {}
    for sentence in sentences:  # 8 tokens that decode to a text which encodes back to the same 8
        ids = tokenizer(sentence)["input_ids"][:PROMPT_TOKENS]
        text = tokenizer.decode(ids)
        if len(ids) == PROMPT_TOKENS and tokenizer(text)["input_ids"] == ids:
            prompts.setdefault(text, ids)
        if len(prompts) == 512:
            break
    with open(os.path.join(folder, "prompts.jsonl"), "w") as f:
        for text, ids in prompts.items():
            f.write(json.dumps({"prompt": text, "input_ids": ids}) + "\n")


def run_trl(fixture, seed=0):
    """TRL's PPOTrainer on the fixture (run inside the TRL venv); prints the RESULT line."""
    os.environ.update(HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1", WANDB_DISABLED="true",
                      CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    import tempfile

    import datasets
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(fixture, "tokenizer"))
    policy, ref_policy = (AutoModelForCausalLM.from_pretrained(os.path.join(fixture, "policy")) for _ in range(2))
    reward, value = (AutoModelForSequenceClassification.from_pretrained(os.path.join(fixture, "reward"), num_labels=1)
                     for _ in range(2))  # TRL's value model starts from the reward model (ours: from the policy)
    with open(os.path.join(fixture, "prompts.jsonl")) as f:
        prompts = datasets.Dataset.from_list([{"input_ids": json.loads(line)["input_ids"]} for line in f])
    config = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-ppo-"), seed=seed, use_cpu=True, report_to="none",
        save_strategy="no", disable_tqdm=True, num_sample_generations=0, logging_steps=1,
        per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, num_mini_batches=2, num_ppo_epochs=4,
        local_rollout_forward_batch_size=BATCH, total_episodes=EPISODES, response_length=NEW_TOKENS,
        stop_token=None, missing_eos_penalty=None, temperature=0.7, kl_coef=0.05, kl_estimator="k1", gamma=1.0,
        lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, whiten_rewards=False, learning_rate=3e-6,
        lr_scheduler_type="linear", weight_decay=0.0, optim="adamw_torch")
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                         reward_model=reward, value_model=value, train_dataset=prompts)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    torch.manual_seed(seed)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    episodes = trainer.state.episode
    print(f"RESULT episodes={episodes} seconds={seconds:.1f} eps={episodes / seconds:.2f} "
          f"updates={trainer.state.global_step}", flush=True)


def busy_seconds():
    """CPU seconds the whole machine has spent busy (from /proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def wait_until_quiet(max_wait=600):
    """Wait until the rest of the machine uses under 0.1 core for 3 seconds."""
    deadline = time.time() + max_wait
    while True:
        before = busy_seconds()
        time.sleep(3)
        if (busy_seconds() - before) / 3 < 0.1 or time.time() > deadline:
            return


def measure(command):
    """(episodes/s, CPU seconds others used during the run) of one run of `command` on a quiet machine."""
    wait_until_quiet()
    before, children = busy_seconds(), os.times()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    after, children_after = busy_seconds(), os.times()
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{result.stderr[-3000:]}")
    [eps] = re.findall(r"^RESULT .*eps=([\d.]+)", result.stdout, re.M)
    own = (children_after.children_user + children_after.children_system
           - children.children_user - children.children_system)
    return float(eps), max(0.0, after - before - own)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", default=os.path.join(ROOT, "offline", "trl-venv"), help="TRL's virtual environment")
    parser.add_argument("--fixture", default=os.path.join(ROOT, "offline", "trl-fixture"), help="the tiny models")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "trl_comparison.md"),
                        help="the result file written (Markdown)")
    parser.add_argument("--trl-run", metavar="FIXTURE", help=argparse.SUPPRESS)  # (inside the venv)
    args = parser.parse_args()
    if args.trl_run:
        return run_trl(args.trl_run)

    python = os.path.join(args.venv, "bin", "python")
    if not os.path.isfile(python):
        import torch

        print(f"making TRL's venv at {args.venv} (torch {torch.__version__}, then requirements-trl.txt)", flush=True)
        subprocess.check_call([sys.executable, "-m", "venv", args.venv])
        subprocess.check_call([python, "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}"])
        subprocess.check_call([python, "-m", "pip", "install", "-q", "-r",
                               os.path.join(ROOT, "benchmarks", "requirements-trl.txt")])
    if not os.path.isfile(os.path.join(args.fixture, "prompts.jsonl")):
        print(f"building the tiny models in {args.fixture}", flush=True)
        make_fixture(args.fixture)
    sides = {"TRL 1.12 PPOTrainer": [python, os.path.abspath(__file__), "--trl-run", args.fixture],
             "ppo.py": [sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), "--peer-trl", args.fixture]}
    runs = {side: [] for side in sides}
    for round_ in range(1, args.rounds + 1):
        for side, command in sides.items():
            eps, others = measure(command)
            runs[side].append((eps, others))
            print(f"round {round_}: {side}: {eps:.2f} episodes/s (other processes: {others:.1f} CPU-s)", flush=True)
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    trl, ours = (statistics.median(e for e, _ in runs[side]) for side in sides)
    lines = ["# Against TRL's PPO trainer (CPU)", "",
             f"Command: `python benchmarks/trl_comparison.py --rounds {args.rounds}` at commit `{commit}`, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores.", "",
             "| | episodes/s: median | runs (other processes' CPU-s during the run) |", "|-|-|-|"]
    for side in sides:
        median = statistics.median(e for e, _ in runs[side])
        lines.append(f"| {side} | {median:.2f} | " + ", ".join(f"{e:.2f} ({o:.1f})" for e, o in runs[side]) + " |")
    lines += ["", f"ppo.py / TRL: **{ours / trl:.2f}x**.", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
