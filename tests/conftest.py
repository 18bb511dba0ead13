"""Offline fixtures: a tiny tokenizer, tiny models and tiny JSONL data for every task, made in a temp dir.

Nothing is downloaded: the BPE tokenizer is trained here on synthetic text and every model is a
randomly initialised 2-layer GPT-2.
"""

import ast
import glob
import inspect
import json
import math
import os
import random
import signal
import subprocess
import sys
import types
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import aggrevated  # noqa: E402  (the scripts, imported for their helpers: the loop runs only as __main__)
import d2lols  # noqa: E402
import ppo  # noqa: E402
import ppo_plus_plus  # noqa: E402
import sft  # noqa: E402,F401  (its helpers are tested too)

# every script carries its own copy of the helpers it uses: tests run against each copy
RL_MODULES = [ppo, ppo_plus_plus, aggrevated, d2lols]
GUIDED_MODULES = [ppo_plus_plus, aggrevated, d2lols]
RL_SCRIPTS = [m.__name__ + ".py" for m in RL_MODULES]


def module_name(module):
    return module.__name__


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real processes (torchrun pairs, signals, a killed rank, the drivers end "
                                       "to end, transformers serve, a file-size limit) and long runs; the fast tier, "
                                       "python -m pytest -q -m \"not slow\" tests, leaves them out (docs/testing.md)")

WORDS = ("the movie film story actor plot scene good great bad boring funny sad love hate music ending "
         "dog cat ball park play run jump tree water eat food table sit chair book read child man woman "
         "summary post friend work time day money help think feel want know went said really very not").split()


def synthetic_sentences(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + rng.choice([".", "!", "?"])
            for _ in range(n)]


def make_tokenizer(vocab_size=400, seed=0, eos="</s>", pad="<pad>", reserved=0):
    """A byte-level BPE trained in-process; left padding, as the scripts use it. `reserved` extra special
    tokens come first, so every other id is shifted (another model family's ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = [f"<|reserved_{i}|>" for i in range(reserved)] + ([eos] if pad == eos else [eos, pad])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = synthetic_sentences(3000, seed) + ["SUBREDDIT: r/test\nTITLE: a title\nPOST: a post\nTL;DR: summary",
                                              "generate a sentence with: dog ball park."]
    bpe.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, pad_token=pad, bos_token=eos,
                                   unk_token=eos, padding_side="left", model_max_length=256)


def make_metaspace_tokenizer(vocab_size=300, seed=0):
    """A SentencePiece-style tokenizer (Metaspace "▁" word boundaries, as Llama-2, Mistral and TinyLlama's):
    a word's leading space lives in its piece, and a piece decoded alone loses it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    bpe.train_from_iterator(synthetic_sentences(2000, seed),
                            trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "</s>", "<pad>"]))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   padding_side="left")


@pytest.fixture(scope="session")
def metaspace(tmp_path_factory):
    """A SentencePiece-style tokenizer and a tiny model that uses it (saved with it in one folder)."""
    tokenizer = make_metaspace_tokenizer()
    return tokenizer, save_tiny_causal_lm(tmp_path_factory.mktemp("metaspace") / "model", tokenizer, seed=5)


def tiny_gpt2_config(tokenizer, **overrides):
    from transformers import GPT2Config

    config = dict(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config.update(overrides)
    return GPT2Config(**config)


def save_tiny_causal_lm(path, tokenizer, seed=0, **overrides):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(tiny_gpt2_config(tokenizer, **overrides)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def save_tiny_classifier(path, tokenizer, num_labels, seed=0):
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(seed)
    GPT2ForSequenceClassification(tiny_gpt2_config(tokenizer, num_labels=num_labels)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def write_task_data(root):
    """Small JSONL folders in each task's schema (the layout of ../shared/data)."""
    rng = random.Random(0)
    sentences = synthetic_sentences(200, seed=1)
    paths = {}
    imdb = root / "imdb"
    imdb.mkdir()
    reviews = [{"text": " ".join(sentences[i : i + 3]), "label": i % 2} for i in range(60)]
    write_jsonl(imdb / "train.jsonl", reviews[:40])
    write_jsonl(imdb / "test.jsonl", reviews[40:])
    paths["imdb"] = str(imdb)
    commongen = root / "commongen"
    commongen.mkdir()
    concept_sets = [sorted(rng.sample(WORDS, 3)) for _ in range(20)]
    train = [{"concepts": c, "target": f"the {c[0]} and the {c[1]} {c[2]} {w}."}
             for c in concept_sets[:14] for w in ("today", "again")]
    write_jsonl(commongen / "train.jsonl", train)
    write_jsonl(commongen / "validation.jsonl",
                [{"concepts": c, "references": [f"a {c[0]} {c[1]} {c[2]}.", f"the {c[2]} with a {c[0]}."]}
                 for c in concept_sets[14:]])
    paths["commongen"] = str(commongen)
    tldr = root / "tldr"
    tldr.mkdir()
    posts = [{"prompt": f"SUBREDDIT: r/test\nTITLE: {sentences[i]}\nPOST: {' '.join(sentences[i + 1 : i + 4])}\nTL;DR: ",
              "label": sentences[i + 4]} for i in range(30)]
    write_jsonl(tldr / "train.jsonl", posts[:20])
    write_jsonl(tldr / "valid.jsonl", posts[20:])
    paths["tldr"] = str(tldr)
    return paths


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    tokenizer = make_tokenizer()
    data = write_task_data(root)
    return {
        "tokenizer": tokenizer,
        "policy": save_tiny_causal_lm(root / "policy", tokenizer),
        "classifier": save_tiny_classifier(root / "classifier", tokenizer, num_labels=2, seed=1),
        "reward_model": save_tiny_classifier(root / "reward_model", tokenizer, num_labels=1, seed=2),
        # a guide with another tokenizer and vocabulary (EOS = pad, as in GPT-2)
        "guide_other": save_tiny_causal_lm(root / "guide_other", make_tokenizer(300, seed=1, eos="<|end|>", pad="<|end|>"),
                                           seed=3),
        # a guide with a larger vocabulary whose ids all differ from the policy's for the same text
        "guide_bigger": save_tiny_causal_lm(root / "guide_bigger", make_tokenizer(600, seed=2, reserved=7), seed=4),
        "toy_guide": save_toy_guide(root / "toy_guide", tokenizer),
        # the exploration toy's policy: nudged toward " movie" (p ~ 0.03 per token, as an SL start gives a good
        # token some probability), so a run of three is rare for it alone (benchmarks/toy_guided.py)
        "toy_policy": save_toy_guide(root / "toy_policy", tokenizer, steps=10),
        "often_eos": save_often_eos_model(root / "often_eos"),
        "data": data,
        "root": root,
    }


def save_often_eos_model(path):
    """A tiny GPT-2 that says EOS with p = 0.2 at every step, with pad = EOS (as GPT-2 and SmolLM2 are used)."""
    from transformers import GPT2LMHeadModel

    tokenizer = make_tokenizer(300, seed=1, eos="<|end|>", pad="<|end|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config(tokenizer))
    with torch.no_grad():  # tied head: logits = ln_f(h) @ wte.T; ln_f's output := the EOS embedding e
        eos = model.transformer.wte.weight[tokenizer.eos_token_id]
        eos.mul_(math.log(75) ** 0.5 / eos.norm())  # EOS logit |e|^2 = ln 75, the others ~0: p = 75 / (75 + 299)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(eos)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def read_tensorboard(run_dir):
    """The TensorBoard events of the one run under run_dir/runs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [events_dir] = glob.glob(os.path.join(run_dir, "runs", "*"))
    accumulator = EventAccumulator(events_dir, size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def run_script(script, args, cwd, timeout=300, env=None):
    """Run one of the repo's scripts as a user would (CleanRL's tests do the same)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


class Spy:
    """Wraps one of a script's helpers: records every call's arguments (by name) and result, then returns it."""

    def __init__(self):
        self.calls = []

    def wrap(self, function):
        signature = inspect.signature(function)

        def wrapper(*args, **kwargs):
            result = function(*args, **kwargs)
            self.calls.append(SimpleNamespace(result=result, **signature.bind(*args, **kwargs).arguments))
            return result

        return wrapper


def run_script_in_process(script, args, cwd, spies=None):
    """Run a script's `__main__` block in this process, as `python script args` would, and return its globals.

    Faster than a subprocess (no start-up cost). `spies` maps names of the script's own helpers to
    Spy objects: the helper is wrapped after the script defines it and before the loop runs, so the
    test sees what the loop passes it and what it returns."""
    path = os.path.join(ROOT, script)
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    *definitions, main = tree.body
    assert isinstance(main, ast.If) and "__main__" in ast.unparse(main.test), f"{script} must end in its main block"
    module = types.ModuleType(f"_run_{script[:-3]}")
    module.__file__ = path
    old_argv, old_cwd = sys.argv, os.getcwd()
    old_handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    sys.argv, sys.modules[module.__name__] = [script, *args], module  # dataclasses and tyro look the module up
    os.chdir(cwd)
    try:
        exec(compile(ast.Module(definitions, type_ignores=[]), path, "exec"), module.__dict__)
        for name, spy in (spies or {}).items():
            setattr(module, name, spy.wrap(getattr(module, name)))
        exec(compile(ast.Module(main.body, type_ignores=[]), path, "exec"), module.__dict__)
        return module.__dict__
    except BaseException as e:  # SystemExit included: the test may look at the state the script stopped in
        e.script_globals = module.__dict__
        writer = getattr(module.__dict__.get("run"), "writer", None)
        if hasattr(writer, "close"):  # its events, on disk in the run's folder (a relative path)
            writer.close()
        raise
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
        for signum, handler in old_handlers.items():  # the script's Ctrl-C handler ends with it
            signal.signal(signum, handler)
        del sys.modules[module.__name__]


def task_args(assets, task, script="ppo.py"):
    """The smallest run of `task` on the tiny assets (the guided scripts get the tiny policy as their guide)."""
    args = ["--task", task, "--model-name-or-path", assets["policy"], "--dataset-path", assets["data"][task],
            "--total-episodes", "8", "--batch-size", "4", "--num-minibatches", "2", "--update-epochs", "1",
            "--max-new-tokens", "6", "--eval-every", "1", "--num-eval-prompts", "4", "--rollout-batch-size", "3"]
    if task == "imdb":
        args += ["--reward-model", assets["classifier"]]
    if task == "tldr":
        args += ["--reward-model", assets["reward_model"], "--max-prompt-length", "48"]
    if script != "ppo.py":
        args += ["--guide-model", assets["policy"]]
    if script == "d2lols.py":
        args += ["--tau", "1"]  # one iteration of each phase
    return args


def sft_args(assets, task, steps=2):
    """The smallest sft.py run of `task` on the tiny assets."""
    args = ["--task", task, "--model-name-or-path", assets["policy"], "--dataset-path", assets["data"][task],
            "--max-steps", str(steps), "--batch-size", "4", "--micro-batch-size", "2", "--max-new-tokens", "6",
            "--eval-every", "1", "--num-eval-prompts", "4", "--eval-batch-size", "3"]
    if task == "imdb":
        args += ["--reward-model", assets["classifier"]]
    if task == "tldr":
        args += ["--reward-model", assets["reward_model"], "--max-prompt-length", "48"]
    return args


def reward_model_of(namespace):
    """The classifier inside a finished run's reward_fn (common/rewards.py keeps it in the closure)."""
    [model] = [cell.cell_contents for cell in namespace["reward_fn"].__closure__
               if isinstance(cell.cell_contents, torch.nn.Module)]
    return model


def set_flags(args, *flags):
    """args with `--flag value` pairs set: replaced where present, appended otherwise."""
    args = list(args)
    for flag, value in zip(flags[::2], flags[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = str(value)
        else:
            args += [flag, str(value)]
    return args


def save_toy_guide(path, tokenizer, word=" movie", steps=150, seed=0):
    """A guide that is good at the toy task: the tiny GPT-2, trained here to continue any text with `word`."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(tiny_gpt2_config(tokenizer))
    target = tokenizer(word, add_special_tokens=False).input_ids[-1]
    prompts = [tokenizer(s).input_ids[:8] for s in synthetic_sentences(64, seed=seed + 7)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = [prompts[(step * 8 + j) % len(prompts)] for j in range(8)]
        ids = torch.tensor([[tokenizer.pad_token_id] * (8 - len(p)) + p + [target] * 16 for p in batch])
        attention_mask = (ids != tokenizer.pad_token_id).long()
        labels = ids.masked_fill(torch.arange(ids.shape[1]) < 8, -100)  # learn the continuation only
        model(input_ids=ids, attention_mask=attention_mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
