"""Estimated GPU memory of a guided run (PPO++: policy, pi_ref, critic, reward model, guide) at each
task's default models, with and without --bf16 and --lora-r, from parameter counts (a benchmark, not a test).

The models are built on PyTorch's meta device from their published configs (no download, no memory),
so the counts are exact. Per process (DDP replicates every model on every GPU):
    trained weights, fp32:  16 bytes a parameter (weight 4 + gradient 4 + AdamW's two moments 8)
    frozen weights:          4 bytes (fp32), 2 under --bf16
    --lora-r R:              the policy's and critic's own weights frozen (2 or 4 bytes), adapters
                             R x (fan_in + fan_out) per linear layer trained (16 bytes), and pi_ref is
                             the policy with its adapters off: no copy of its own
    KV cache:                2 x layers x hidden x tokens x rollout batch (generation, bf16 2 bytes)
    activations:             Korthikanti et al. (2022): s b h (34 + 5 a s / h) bytes a layer in 16-bit
                             (--gradient-checkpointing: 2 s b h a layer, plus one layer in full);
                             policy and critic each, per micro-batch of b episodes of s tokens
D2LOLS adds a second critic (16 bytes a parameter; with LoRA its own frozen backbone and adapters);
PPO and AggreVaTeD have the same models as PPO++ but PPO has no guide.

    python benchmarks/memory_estimate.py             # docs/scaling.md's table (the tasks' default micro-batches)
    python benchmarks/memory_estimate.py --micro-batch-size 8 --rollout-batch-size 32   # the GPU recipes
    python benchmarks/memory_estimate.py --model /path/to/a/checkpoint --micro-batch-size 4
"""

import argparse

import torch
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          DistilBertConfig, GPT2Config, GPTJConfig, GPTNeoXConfig)
from transformers.pytorch_utils import Conv1D

# the task defaults' models (common/tasks.py), as their config.json files on the hub describe them
GPT2 = GPT2Config()  # gpt2 and rajkumarrrk/gpt2-fine-tuned-on-imdb-positive-reviews: 124M
GPTJ = GPTJConfig(vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64,
                  tie_word_embeddings=False)  # CarperAI/openai_summarize_tldr_sft (GPT-J-6B)
PYTHIA_1B = GPTNeoXConfig(vocab_size=50304, hidden_size=2048, num_hidden_layers=16, num_attention_heads=8,
                          intermediate_size=8192, rotary_pct=0.25, tie_word_embeddings=False,
                          num_labels=1)  # cleanrl/EleutherAI_pythia-1b-deduped__reward__tldr
DISTILBERT = DistilBertConfig(num_labels=2)  # lvwerra/distilbert-imdb
TASKS = {  # policy (= guide = critic backbone), reward model, tokens per episode, micro-batch (the minibatch)
    "imdb": dict(policy=GPT2, reward=DISTILBERT, tokens=64 + 48, micro_batch=112 // 4),
    "commongen": dict(policy=GPT2, reward=None, tokens=32 + 20, micro_batch=128 // 4),
    "tldr": dict(policy=GPTJ, reward=PYTHIA_1B, tokens=500 + 50, micro_batch=128),
    # TL;DR with a 1B policy and guide (a Pythia-1B SFT model, e.g. cleanrl's): what fits a 24 GB GPU
    "tldr, 1B policy": dict(policy=PYTHIA_1B, reward=PYTHIA_1B, tokens=500 + 50, micro_batch=128),
}
GB = 1e9


def count(config, kind):
    """(parameters, LoRA parameters at rank 1 on every linear layer but the LM head) of a model on the meta device."""
    cls = {"causal": AutoModelForCausalLM, "backbone": AutoModel, "classifier": AutoModelForSequenceClassification}[kind]
    with torch.device("meta"):
        model = cls.from_config(config)
    output = model.get_output_embeddings() if kind == "causal" else None
    lora = 0
    for module in model.modules():
        if module is not output and isinstance(module, (torch.nn.Linear, Conv1D)):
            fan_in, fan_out = (module.in_features, module.out_features) if isinstance(module, torch.nn.Linear) \
                else module.weight.shape
            lora += fan_in + fan_out
    return sum(p.numel() for p in model.parameters()), lora


def estimate(config, reward, tokens, micro_batch, bf16, lora_r, rollout_batch, guide=True, checkpointing=False):
    frozen_bytes = 2 if bf16 else 4
    policy, policy_lora = count(config, "causal")
    backbone, backbone_lora = count(config, "backbone")
    critic = backbone + config.hidden_size + 1
    if lora_r:  # frozen policy (also pi_ref) and critic backbone; adapters and the value head train
        trained = 16 * (lora_r * (policy_lora + backbone_lora) + config.hidden_size + 1)
        frozen = frozen_bytes * (policy + backbone)
    else:
        trained = 16 * (policy + critic)
        frozen = frozen_bytes * policy  # pi_ref
    frozen += frozen_bytes * ((count(reward, "classifier")[0] if reward else 0) + (policy if guide else 0))
    layers, hidden, heads = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
    kv_cache = 2 * layers * hidden * tokens * rollout_batch * 2
    per_layer = tokens * micro_batch * hidden * (34 + 5 * heads * tokens / hidden)
    activations = 2 * (2 * tokens * micro_batch * hidden * layers + per_layer if checkpointing else per_layer * layers)
    return dict(trained=trained / GB, frozen=frozen / GB, states=(trained + frozen) / GB, kv_cache=kv_cache / GB,
                activations=activations / GB)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local checkpoint folder: estimate for its config instead of the tasks'")
    parser.add_argument("--reward-model", help="(with --model) a local reward model folder")
    parser.add_argument("--tokens", type=int, default=512, help="(with --model) prompt + new tokens")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="episodes per forward/backward pass")
    parser.add_argument("--rollout-batch-size", type=int, default=64)
    parser.add_argument("--lora-r", type=int, default=8, help="the rank of the LoRA rows")
    args = parser.parse_args()

    tasks = TASKS
    if args.model:
        reward = AutoConfig.from_pretrained(args.reward_model) if args.reward_model else None
        tasks = {args.model: dict(policy=AutoConfig.from_pretrained(args.model), reward=reward, tokens=args.tokens,
                                  micro_batch=args.micro_batch_size or 8)}
    print("| task | flags | trained (GB) | frozen (GB) | model states (GB) | KV cache, rollout batch "
          f"{args.rollout_batch_size} (GB) | activations, micro-batch (GB) | with --gradient-checkpointing (GB) |")
    print("|---|---|---|---|---|---|---|---|")
    for task, spec in tasks.items():
        micro_batch = args.micro_batch_size or spec["micro_batch"]
        for flags, bf16, lora_r in [("fp32", False, 0), ("--bf16", True, 0), (f"--lora-r {args.lora_r}", False, args.lora_r),
                                    (f"--lora-r {args.lora_r} --bf16", True, args.lora_r)]:
            common = (spec["policy"], spec["reward"], spec["tokens"], micro_batch, bf16, lora_r, args.rollout_batch_size)
            e = estimate(*common)
            with_checkpointing = estimate(*common, checkpointing=True)["activations"]
            print(f"| {task} | {flags} | {e['trained']:.2f} | {e['frozen']:.1f} | **{e['states']:.1f}** | "
                  f"{e['kv_cache']:.1f} | {e['activations']:.1f} ({micro_batch}) | {with_checkpointing:.1f} |")


if __name__ == "__main__":
    main()
