"""Run one of the repo's scripts with the toy reward: the fraction of continuation tokens that are TOY_TOKEN.

    python tests/toy_run.py ppo.py --task imdb --model-name-or-path DIR ...   (env TOY_TOKEN=" movie")

A reward that a tiny random policy can clearly learn, so a learning test shows PPO working. The task's
reward is swapped for this one; everything else (data, prompts, the loop) is the script's own.
"""

import os
import runpy
import sys

import torch
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import rewards  # noqa: E402

script, args = sys.argv[1], sys.argv[2:]
tokenizer = AutoTokenizer.from_pretrained(args[args.index("--model-name-or-path") + 1])
target = tokenizer(os.environ.get("TOY_TOKEN", " movie"), add_special_tokens=False).input_ids[-1]


KIND = os.environ.get("TOY_REWARD", "fraction")
RUN = int(os.environ.get("TOY_RUN", "3"))


def has_run(ids, length):
    return any(ids[i : i + length] == [target] * length for i in range(len(ids) - length + 1))


def toy_reward(prompts, continuations, references):
    """The fraction of continuation tokens that are the target. Variants (TOY_REWARD):
    run    0 unless the continuation holds TOY_RUN (3) targets in a row: a random policy (1/400 per token)
           almost never writes one, a guide that writes the target does; exploration is the bottleneck
    gated  0 unless the continuation starts with the target
    zero   always 0 (the KL penalty is the only reward)"""
    ids = [tokenizer(c, add_special_tokens=False).input_ids for c in continuations]
    if KIND == "zero":
        return torch.zeros(len(ids))
    gate = {"run": lambda x: has_run(x, RUN), "gated": lambda x: x[:1] == [target]}.get(KIND, lambda x: True)
    return torch.tensor([sum(t == target for t in x) / max(1, len(x)) if gate(x) else 0.0 for x in ids])


rewards.make_reward_fn = lambda *a, **k: toy_reward
sys.argv = [script, *args]
runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
