"""PPO++: PPO with restarts from the guide's states (Chang et al., 2023, arXiv 2306.11816, Alg. 2).

A copy of ppo.py: `diff ppo.py ppo_plus_plus.py` is the algorithm. With probability beta per prompt the guide pi_g
(a frozen LLM) *rolls in*: it samples a continuation of length L, its first k ~ U{1..L-1} tokens become part of the
state, and the policy *rolls out* from there to the horizon (k + policy tokens = H). The roll-in tokens get no
policy, value or KL loss: the policy learns from its own tokens only, from states a better model reaches (the
exploration the paper's "restart distribution" buys). With probability 1 - beta, a plain PPO episode.
Read it top to bottom: Args -> helpers (batching, log-probs, the critic, GAE, the PPO loss, the rollout) -> the loop:
    1. rollout: the guide rolls in, the policy samples continuations (KV cache, no grad)
    2. scoring: reference log-probs, values, the task reward, the KL penalty, GAE
    3. update: epochs of shuffled minibatches of the clipped PPO objective
    4. logging, evaluation, checkpoint

    python ppo_plus_plus.py --task imdb                       # one GPU (or the CPU)
    torchrun --nproc_per_node 8 ppo_plus_plus.py --task tldr  # 8 GPUs, DDP: --batch-size is the global count

Token-level MDP: the state is prompt + tokens so far, the action is the next token, the horizon is
--max-new-tokens. Reward: the task score at the last generated token, plus
-kl_coef * (log pi(a_t|s_t) - log pi_ref(a_t|s_t)) at every generated token.
"""

import copy
import random
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import transformers
import tyro
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from common import diagnostics, distributed, memory, rewards, stopping, tasks, text
from common.guide import GuideArgs, MinNewTokensPerRow, check_guide_args, load_guide
from common.metrics import evaluate
from common.run import RLRunArgs, Run


@dataclass
class Args(GuideArgs, RLRunArgs):
    """Flags shown with (default: None) take their task's value: the table in docs/tasks.md. The run's own flags
    (seed, device and precision, checkpoints, resume, saving, tracking, LoRA): RLRunArgs, common/run.py."""

    # task, models, data (None = the task's default, see common/tasks.py)
    task: str = "imdb"
    """the task: imdb, commongen or tldr"""
    model_name_or_path: Optional[str] = None
    """the starting policy (hub id or local folder), also pi_ref and the critic's backbone (None: the task's default)"""
    reward_model: Optional[str] = None
    """imdb: a sentiment classifier; tldr: a one-label reward model; commongen: unused (None: the task's default)"""
    reward_label: int = 1
    """imdb: the classifier label whose probability is the reward (1 = positive)"""
    perplexity_model: Optional[str] = None
    """imdb eval: the LM that scores output perplexity (default: the frozen reference policy)"""
    # the guide's flags (--guide-model, --guide-url, --guide-references, its sampling): common/guide.py
    beta: Optional[float] = None
    """mixing: the probability, per prompt, that the guide rolls in (None: 1.0 with --guide-references, as DR-PO;
    else 0.6 for imdb, 0.8 otherwise)"""
    dataset_name: Optional[str] = None
    """the hub dataset (None: the task's default)"""
    dataset_path: Optional[str] = None
    """a local JSON Lines file (every split) or a folder of train/validation/test .jsonl files, in the hub's schema"""
    max_prompt_length: Optional[int] = None
    """prompt tokens kept (imdb: the last ones; tldr: the post is cut, 'TL;DR: ' kept) (None: the task's default)"""

    # generation
    max_new_tokens: Optional[int] = None
    """the horizon H: tokens the policy generates per episode (None: the task's default)"""
    min_new_tokens: Optional[int] = None
    """no EOS before this many new tokens, in rollouts and evaluation (tril's min_length, which it counts from the
    prompt's end for causal LMs) (None: imdb 48, commongen 5, tldr 0)"""
    temperature: float = 1.0
    """sampling temperature (log-probs use the same scaling)"""
    top_k: Optional[int] = None
    """top-k sampling during rollouts (0 = off) (None: the task's default)"""
    top_p: float = 1.0
    """nucleus sampling during rollouts (1.0 = off)"""
    missing_eos_penalty: Optional[float] = None
    """subtract this from the score of continuations that never emit EOS (None = no penalty)"""
    rollout_batch_size: int = 64
    """prompts per generate/scoring call (lower it if generation runs out of memory)"""

    # evaluation
    eval_every: int = 10
    """evaluate every this many iterations, and before and after training (0 = never)"""
    eval_split: str = "validation"
    """the held-out split: validation (IMDB: 20% of train, seed 42) or test"""
    num_eval_prompts: int = 256
    """held-out prompts per evaluation"""
    eval_greedy: Optional[bool] = None
    """deterministic decoding in evaluation: greedy, or beam search with --eval-num-beams (otherwise the rollout
    sampling settings) (None: imdb False, commongen and tldr True)"""
    eval_num_beams: Optional[int] = None
    """beams when --eval-greedy (1 = greedy) (None: commongen 5, as tril; imdb and tldr 1)"""
    num_sample_generations: int = 8
    """generations shown as a text table in TensorBoard at each evaluation (all go to runs/{run_name}/generations/)"""

    # PPO
    total_episodes: Optional[int] = None
    """total episodes (one prompt and its continuation each) (None: the task's default)"""
    batch_size: Optional[int] = None
    """episodes per iteration (rollout batch) (None: the task's default)"""
    num_minibatches: Optional[int] = None
    """minibatches per epoch: one optimizer step each (None: the task's default)"""
    micro_batch_size: Optional[int] = None
    """episodes per forward/backward pass; gradients accumulate over a minibatch (default: the minibatch)"""
    update_epochs: Optional[int] = None
    """PPO epochs over each batch (None: the task's default)"""
    learning_rate: Optional[float] = None
    """AdamW learning rate of the policy (None: the task's default)"""
    critic_learning_rate: Optional[float] = None
    """AdamW learning rate of the critic (None: --learning-rate)"""
    anneal_lr: Optional[bool] = None
    """decay the learning rate linearly to 0 (None: True; tldr False, a constant rate as tril)"""
    critic_anneal_lr: Optional[bool] = None
    """decay the critic's learning rate linearly to 0 (None: as --anneal-lr, tril's; False: a critic that keeps
    learning to the end, which a small budget needs: docs/differences-from-tril.md)"""
    critic_warmup_iterations: int = 0
    """the first this many iterations train the critic alone: the policy keeps its weights until the values it is
    judged against mean something (0 = off, tril)"""
    adam_eps: float = 1e-5
    """AdamW epsilon"""
    weight_decay: Optional[float] = None
    """AdamW weight decay (None: 1e-6; tldr 0.01, as tril)"""
    max_grad_norm: float = 1.0
    """gradient-norm clip (0 = off)"""
    gamma: Optional[float] = None
    """discount factor (None: the task's default)"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_coef: float = 0.2
    """policy ratio clip"""
    clip_coef_value: Optional[float] = 0.2
    """value clip around the rollout's values, in the reward's units (tril: 0.2; None: off, as a reward on a wider
    scale than 0-1 needs: CommonGen's CIDEr-D is 0-10)"""
    vf_coef: Optional[float] = None
    """value-loss coefficient (None: imdb 0.5, commongen 30, tldr 0.1)"""
    advantage_estimator: Literal["gae", "rloo"] = "gae"
    """gae: a critic's values and GAE (tril); rloo: no critic, an episode's reward (score minus KL penalty) minus the
    mean of its prompt's other --samples-per-prompt - 1 (Ahmadian et al. 2024), on every one of its tokens"""
    samples_per_prompt: int = 1
    """episodes per prompt in a batch, its N samples (--batch-size counts episodes; rloo needs 2 or more)"""
    advantage_norm: Optional[Literal["whiten", "scale", "none"]] = None
    """advantages per batch: whiten = (A - mean) / std (CleanRL, sfd, TRL); scale = A / std, each sign kept;
    none = raw GAE (tril) (None: whiten with gae; none with rloo, whose leave-one-out difference is the centring)"""
    norm_per_group: bool = True
    """normalise the mixed episodes' advantages and the policy's own episodes' each on its own, so that the guide's
    reward cannot shift or rescale the advantages of the policy's own episodes (False: over the whole batch)"""
    target_coef: Optional[float] = None
    """tril's target regularisation: + target_coef x the NLL of the batch's reference continuations in every
    update (0 = off) (None: 0.1)"""
    kl_coef: Optional[float] = None
    """per-token KL penalty coefficient (the initial one when --kl-target is set) (None: the task's default)"""
    kl_target: Optional[float] = None
    """adaptive KL controller: target KL per episode (None = fixed --kl-coef)"""
    kl_horizon: int = 10000
    """adaptive KL controller horizon in episodes"""

    # computed at run time
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""
    world_size: int = 1
    """processes sharing each batch: torchrun's WORLD_SIZE (computed in runtime)"""
    local_batch_size: int = 0
    """episodes per iteration in each process (computed in runtime)"""
    minibatch_size: int = 0
    """episodes per minibatch in each process (computed in runtime)"""
    gradient_accumulation_steps: int = 0
    """micro-batches per minibatch (computed in runtime)"""


# the paper's mixing probability per task (tril's configs)
BETA_DEFAULTS = {"imdb": 0.6, "commongen": 0.8, "tldr": 0.8}


def left_pad(sequences, pad_token_id, device):
    """Left-pad token lists into (ids, mask): generation then continues every row at the same column."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def position_ids(attention_mask):
    """Positions count real tokens only, so a left-padded row sees the same positions as unpadded."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def token_logprobs(logits, tokens, temperature):
    """log softmax(logits / temperature)[token], in fp32, over the full vocabulary (no top-k)."""
    logits = logits.float() / temperature
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits, temperature):
    logits = logits.float() / temperature
    return torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)


def response_logits(model, input_ids, attention_mask, num_response_tokens):
    """Logits that predict the last `num_response_tokens` tokens of each row (the LM head runs only there)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                logits_to_keep=num_response_tokens + 1, use_cache=False)
    return out.logits[:, :-1]


class Critic(nn.Module):
    """V(s_t): a scalar head on a transformer backbone initialised from the policy checkpoint."""

    def __init__(self, model_name_or_path, dtype=torch.float32, **config):
        super().__init__()
        self.backbone = AutoModel.from_pretrained(model_name_or_path, dtype=dtype, **config)
        self.value_head = nn.Linear(self.backbone.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, num_response_tokens):
        """Values of the states before each of the last `num_response_tokens` tokens, (batch, tokens) fp32."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
        with torch.autocast(hidden.device.type, enabled=False):  # the head in fp32 (autocast: a bf16 Linear)
            return self.value_head(hidden[:, -num_response_tokens - 1 : -1].float()).squeeze(-1)


class PolicyAndCritic(nn.Module):
    """The trained models as one module, so that one DDP wrapper averages both models' gradients (sfd's
    PolicyAndValueWrapper). Returns the policy's response logits and the critic's values."""

    def __init__(self, policy, critic):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, input_ids, attention_mask, num_response_tokens):
        return (response_logits(self.policy, input_ids, attention_mask, num_response_tokens),
                None if self.critic is None else self.critic(input_ids, attention_mask, num_response_tokens))


def mask_after_eos(responses, eos_token_id):
    """1 on generated tokens up to and including the first EOS, 0 after it."""
    is_eos = (responses == eos_token_id).long()
    return ((is_eos.cumsum(1) - is_eos) == 0).long()


def token_mean(x, mask, num_tokens):
    """A micro-batch's share of a token mean: x summed over its masked tokens, divided by the token count of the
    whole minibatch (every micro-batch, every process), so the shares add up to the minibatch's mean however it
    is split (--micro-batch-size, processes) and however many tokens each part holds."""
    return (x * mask).sum() / num_tokens


def normalize_advantages(advantages, mask, how, mixed, min_episodes=4, eps=1e-8):
    """whiten: (A - mean) / std over the masked tokens of the whole batch (every rank's); scale: A / std
    (each advantage keeps its sign); none: the raw GAE advantages (tril). Per group: the mixed episodes (`mixed` 1)
    and the policy's own (0) each over their own tokens, so that the mixed episodes' returns (mostly the guide's
    prefix) set neither the offset nor the scale of the policy's own episodes' advantages. All zeros: one group. A
    group of fewer than min_episodes (every rank's) takes the batch's mean and spread: centred on its own, a lone
    episode's first tokens would take the opposite sign of its return (its own mean is 1/n of a group's baseline)."""
    if how == "none":
        return advantages * mask
    normalized = torch.zeros_like(advantages)
    for group in (mixed[:, None], 1 - mixed[:, None]):
        stats_mask = mask * group if distributed.total(group) >= min_episodes else mask  # (too few: the batch's)
        mean = distributed.masked_mean(advantages, stats_mask)
        var = distributed.masked_mean((advantages - mean) ** 2, stats_mask)
        std = torch.where(var > eps, torch.sqrt(var + eps), 1.0)  # (all equal, no spread: not rescaled)
        normalized += (advantages - mean * (how == "whiten")) / std * mask * group
    return normalized


def kl_penalized_rewards(scores, logprobs, ref_logprobs, policy_mask, mask, kl_coef):
    """Per-token rewards: -kl_coef * (log pi - log pi_ref) on every token the policy generated (k1
    estimator), plus the task score on the episode's last token. Returns (kl, rewards), both (batch, tokens)."""
    kl = (logprobs - ref_logprobs) * policy_mask
    rewards = -kl_coef * kl
    last_token = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores), device=scores.device), last_token] += scores
    return kl, rewards


def compute_gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation over the generated tokens (mask 0 = after the episode ended).

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t);  A_t = delta_t + gamma * lam * A_{t+1};
    V is 0 past the last token, so the last token's delta is r_T - V(s_T)."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_advantage = delta + gamma * lam * last_advantage
        advantages[:, t] = last_advantage
    return advantages * mask, (advantages + values) * mask


def repeat(rows, n):
    """Each row n times, one after the other (a prompt's N samples: rloo's groups)."""
    return [row for row in rows for _ in range(n)]


def rloo_advantages(rewards, mask, samples_per_prompt):
    """RLOO: each episode's reward (its per-token rewards summed: the score minus the KL penalty) minus the mean of
    its prompt's other samples' (one prompt's N samples are N consecutive rows), on every one of its tokens."""
    episode_rewards = rewards.sum(1).view(-1, samples_per_prompt)  # (prompts, N)
    others = (episode_rewards.sum(1, keepdim=True) - episode_rewards) / (samples_per_prompt - 1)
    return (episode_rewards - others).view(-1, 1) * mask


def reference_batch(examples, pad_token_id, device):
    """tril's target regularisation: rows of prompt + reference continuation ("target_ids"), left-padded, and the
    target mask (batch, T), 1 on each row's reference tokens among the last T columns (T: the longest reference)."""
    input_ids, attention_mask = left_pad([e["prompt_ids"] + e["target_ids"] for e in examples], pad_token_id, device)
    width = max(len(e["target_ids"]) for e in examples)
    target_mask = torch.tensor([[0.0] * (width - len(e["target_ids"])) + [1.0] * len(e["target_ids"])
                                for e in examples], device=device)
    return input_ids, attention_mask, target_mask


def reference_nll(policy, input_ids, attention_mask, target_mask, num_tokens):
    """The NLL of the reference continuations under the policy, as a token mean over `num_tokens` (token_mean)."""
    num_targets = target_mask.shape[1]
    logits = response_logits(policy, input_ids, attention_mask, num_targets)
    return -token_mean(token_logprobs(logits, input_ids[:, -num_targets:], 1.0), target_mask, num_tokens)


def ppo_loss(new_logprobs, new_values, old_logprobs, old_values, advantages, returns, mask, num_tokens, args):
    """Clipped surrogate + clipped value loss, token means over the masked (policy) tokens of the minibatch
    (token_mean)."""
    log_ratio = new_logprobs - old_logprobs
    ratio = log_ratio.exp()
    pg_loss = token_mean(torch.max(-advantages * ratio,
                                   -advantages * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)), mask, num_tokens)
    if new_values is None:  # (rloo: no critic, no value loss)
        v_loss = torch.zeros_like(pg_loss)
    else:
        values_clipped = (new_values if args.clip_coef_value is None else
                          old_values + (new_values - old_values).clamp(-args.clip_coef_value, args.clip_coef_value))
        v_loss = 0.5 * token_mean(torch.max((new_values - returns) ** 2, (values_clipped - returns) ** 2), mask,
                                  num_tokens)
    with torch.no_grad():  # sums over the tokens: the logs divide by every token the update saw (every rank's)
        stats = {
            "approxkl": 0.5 * (log_ratio**2 * mask).sum(),  # k2 estimator (sfd's; CleanRL logs k3)
            "clipfrac": (((ratio - 1).abs() > args.clip_coef).float() * mask).sum(),
            "ratio": (ratio * mask).sum(),
            "policy_loss": pg_loss * num_tokens,
            "value_loss": v_loss * num_tokens,
        }
    return pg_loss + args.vf_coef * v_loss, stats


@torch.inference_mode()
def rollout(policy, tokenizer, prompts, generation_config, args, device, roll_ins):
    """The policy continues each prompt + roll-in to the horizon H (KV cache, --rollout-batch-size prompts a call).
    Returns the left-padded prompts and their mask and the episodes laid out as PPO's, prompt | k roll-in tokens +
    the policy's H - k: the response mask (1 up to and including the first EOS), the log-probs from generate's own
    logits (no second forward pass), and the policy mask (1 on the policy's tokens; the roll-in is state)."""
    prompt_ids, prompt_mask = left_pad([p + r for p, r in zip(prompts, roll_ins)], tokenizer.pad_token_id, device)
    responses, logprobs = [None] * len(prompts), [None] * len(prompts)
    by_k = sorted(range(len(prompts)), key=lambda i: -len(roll_ins[i]))  # a call's rows have like k
    for start in range(0, len(prompts), args.rollout_batch_size):
        chunk = by_k[start : start + args.rollout_batch_size]
        config = copy.copy(generation_config)  # generate only what is kept: H - k tokens after a roll-in of k
        config.max_new_tokens = generation_config.max_new_tokens - min(len(roll_ins[i]) for i in chunk)
        # the minimum length counts the whole response, the roll-in included (tril): a roll-in near the end of a
        # sentence is not padded with the policy's filler
        config.min_new_tokens = None
        min_new_tokens = torch.tensor([(generation_config.min_new_tokens or 0) - len(roll_ins[i]) for i in chunk],
                                      device=device)
        out = policy.generate(input_ids=prompt_ids[chunk], attention_mask=prompt_mask[chunk], generation_config=config,
                              logits_processor=[MinNewTokensPerRow(min_new_tokens, prompt_ids.shape[1],
                                                                   tokenizer.eos_token_id)])
        response = out.sequences[:, prompt_ids.shape[1] :]
        logprob = token_logprobs(torch.stack(out.logits, dim=1), response, args.temperature)
        pad = args.max_new_tokens - response.shape[1]  # generate stops early once every row has ended
        for row, i in enumerate(chunk):
            responses[i] = nn.functional.pad(response[row], (0, pad), value=tokenizer.pad_token_id)
            logprobs[i] = nn.functional.pad(logprob[row], (0, pad))
    responses, logprobs = torch.stack(responses), torch.stack(logprobs)
    response_mask = mask_after_eos(responses, tokenizer.eos_token_id)  # what follows EOS is not in the episode
    # lay the episodes out as prompt | roll-in + policy tokens, as PPO's (on the host, from one copy: no row waits)
    lengths, responses, logprobs = response_mask.sum(1).tolist(), responses.cpu(), logprobs.cpu()
    episodes, episode_logprobs = torch.full_like(responses, tokenizer.pad_token_id), torch.zeros_like(logprobs)
    episode_mask, policy_mask = torch.zeros_like(responses), torch.zeros_like(responses)
    for i, roll_in in enumerate(roll_ins):
        k, n = len(roll_in), min(lengths[i], args.max_new_tokens - len(roll_in))
        episodes[i, :k] = torch.tensor(roll_in, dtype=torch.long)
        episodes[i, k : k + n], episode_logprobs[i, k : k + n] = responses[i, :n], logprobs[i, :n]
        episode_mask[i, : k + n], policy_mask[i, k : k + n] = 1, 1
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id, device)
    return prompt_ids, prompt_mask, *(x.to(device) for x in (episodes, episode_mask, episode_logprobs, policy_mask))


def guide_roll_in(guide, tokenizer, batch, args, device, rng):
    """PPO++'s restarts: with probability beta the guide rolls in the first k ~ U{1..n} tokens of its sample of L,
    n = L - 1 (policy tokens, its EOS counted, at most H - 1; tril: never the whole sample). k is drawn first, so the
    guide writes only k + 1 tokens; where its sample is shorter (n < k), k is drawn again within it:
    P(k = j) = 1/(H-1) + (H-1-n)/(H-1) * 1/n = 1/n, exactly U{1..n}. Returns the roll-in tokens per row (none: a
    plain PPO episode, also where n = 0)."""
    mixed, k_draw = draw_roll_ins(batch, args, rng)
    roll_ins = [[] for _ in batch]
    if mixed:  # the guide writes k + 1 tokens: a sample longer than k (or the whole of a shorter one)
        samples = guide.write([batch[i] for i in mixed], [[] for _ in mixed], [k_draw[i] + 1 for i in mixed])
        for i, (tokens, ended) in zip(mixed, samples):
            n = min(len(tokens) - 1, args.max_new_tokens - 1)  # the roll-in points: k <= L - 1
            k = k_draw[i] if k_draw[i] <= n else rng.randint(1, n) if n > 0 else 0  # shorter: drawn again within
            roll_ins[i] = tokens[:k]
    return roll_ins


def draw_roll_ins(batch, args, rng):
    """Which rows the guide rolls in (probability beta), and each one's k ~ U{1..H-1}."""
    mixed = [i for i in range(len(batch)) if rng.random() < args.beta]
    return mixed, {i: rng.randint(1, args.max_new_tokens - 1) for i in mixed}


def send_roll_ins_ahead(guide, batch, args, rng):
    """The next batch's roll-ins do not depend on this iteration's update: a server guide starts writing them now.
    The draws are put back, so the next rollout draws the same rows, k and seeds, and takes the answer."""
    state = rng.getstate()
    mixed, k_draw = draw_roll_ins(batch, args, rng)
    guide.send([batch[i] for i in mixed], [[] for _ in mixed], [k_draw[i] + 1 for i in mixed])
    rng.setstate(state)


if __name__ == "__main__":
    args = tasks.fill_task_defaults(tyro.cli(Args))
    if args.beta is None:  # DR-PO's authors restart every episode from a reference prefix (beta 1)
        args.beta = 1.0 if args.guide_references else BETA_DEFAULTS[args.task]
    transformers.logging.disable_progress_bar()
    args.critic_learning_rate = args.learning_rate if args.critic_learning_rate is None else args.critic_learning_rate
    args.critic_anneal_lr = args.anneal_lr if args.critic_anneal_lr is None else args.critic_anneal_lr
    # numeric flags and derived sizes, checked before anything loads
    tasks.check_ranges(args, positive=("total_episodes", "batch_size", "num_minibatches", "micro_batch_size",
                                       "update_epochs", "learning_rate", "critic_learning_rate", "max_new_tokens",
                                       "max_prompt_length", "rollout_batch_size", "temperature", "adam_eps",
                                       "clip_coef", "clip_coef_value", "kl_target", "kl_horizon", "num_eval_prompts",
                                       "eval_num_beams", "samples_per_prompt"),
                       non_negative=("top_k", "weight_decay", "max_grad_norm", "vf_coef", "kl_coef", "eval_every",
                                     "num_sample_generations", "min_new_tokens", "target_coef",
                                     "critic_warmup_iterations"),
                       fraction=("gae_lambda", "beta"),
                       unit=("gamma", "top_p"))
    args.num_iterations = tasks.exact_div(args.total_episodes, args.batch_size, "--total-episodes / --batch-size")
    rank, args.world_size, device = distributed.setup(args.cuda, args.process_group_timeout)  # torchrun: one per GPU
    master = rank == 0  # logs, evaluates and saves
    args.local_batch_size = tasks.exact_div(args.batch_size, args.world_size, "--batch-size / processes")
    args.minibatch_size = tasks.exact_div(args.batch_size, args.num_minibatches * args.world_size,  # per process
                                    f"--batch-size / --num-minibatches{' / processes' * (args.world_size > 1)}")
    args.micro_batch_size = args.micro_batch_size or args.minibatch_size
    args.gradient_accumulation_steps = tasks.exact_div(args.minibatch_size, args.micro_batch_size,
                                                 "minibatch size / --micro-batch-size")
    prompts_per_rank = tasks.exact_div(args.local_batch_size, args.samples_per_prompt,  # each rank: whole groups
                                       f"--batch-size{' / processes' * (args.world_size > 1)} / --samples-per-prompt")
    if args.advantage_estimator == "rloo" and args.samples_per_prompt < 2:
        raise SystemExit("error: --advantage-estimator rloo needs --samples-per-prompt 2 or more (its baseline)")
    args.advantage_norm = args.advantage_norm or ("none" if args.advantage_estimator == "rloo" else "whiten")
    # data and model paths, checked before any model loads: bad input fails fast with one line
    train_rows = tasks.load_rows(args.task, "train", args.dataset_name, args.dataset_path)
    eval_rows = tasks.load_rows(args.task, args.eval_split, args.dataset_name, args.dataset_path)
    tasks.check_model_path(args.model_name_or_path, "--model-name-or-path")
    if args.task in rewards.MODEL_REWARDS:  # (the others are computed: CommonGen's CIDEr-D)
        tasks.check_model_path(args.reward_model, "--reward-model")
    tasks.check_model_path(args.perplexity_model, "--perplexity-model")
    check_guide_args(args, continues_prefixes=False)
    # the run: --resume's checkpoint (checked against these flags), its name, its folders, TensorBoard
    run = Run(args, __file__, len(train_rows), device,
              same=("task", "total_episodes", "batch_size", "world_size", "samples_per_prompt", "advantage_estimator"))

    # seeding: each rank samples with its own noise (CleanRL's multi-GPU PPO: crucial); DDP starts them equal
    random.seed(args.seed + rank)
    rng = random.Random(args.seed + rank)  # mixing and k: its own stream, so beta = 0 samples exactly PPO's episodes
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    autocast = torch.autocast(device.type, dtype=torch.float16 if args.fp16 else torch.bfloat16,
                              enabled=args.bf16 or args.fp16)
    scaler = torch.amp.GradScaler(device.type, enabled=args.fp16)  # --fp16: small gradients survive float16

    # models: the policy, its frozen copy pi_ref, the critic; the task reward
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # every model stays in eval mode, and the trained ones have no dropout at all (even under checkpointing),
    # so the training pass reproduces the rollout's log-probs
    dropout = memory.dropout_probabilities(args.model_name_or_path)  # (restored for saving)
    no_dropout = dict.fromkeys(dropout, 0.0)
    frozen_dtype = torch.bfloat16 if args.bf16 else torch.float32  # --bf16: frozen weights in bf16
    policy_dtype = frozen_dtype if args.lora_r else torch.float32  # (LoRA: the policy's and critic's are frozen)
    policy = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=policy_dtype, **no_dropout)
    policy = policy.to(device).eval()
    if not args.lora_r:  # pi_ref: a frozen copy of the starting policy
        ref_policy = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=frozen_dtype).to(device).eval()
        ref_policy.requires_grad_(False)
    critic = (Critic(args.model_name_or_path, policy_dtype, **no_dropout).to(device).eval()
              if args.advantage_estimator == "gae" else None)  # (rloo: no critic)
    # the checkpoint's own generation settings (a repetition penalty, n-gram blocking...) would change what is
    # sampled but not the log-probs of the ratio and the KL: set aside (restored for saving), the flags decide
    checkpoint_generation_config = policy.generation_config
    policy.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if args.lora_r:  # LoRA: adapters train on frozen weights; pi_ref is the policy with its adapters off (one copy)
        policy = memory.add_lora(policy, args, "CAUSAL_LM")
        if critic is not None:  # its own adapters; the value head trains
            critic.backbone = memory.add_lora(critic.backbone, args, "FEATURE_EXTRACTION")
        ref_policy = memory.AdaptersOff(policy)
    guide = load_guide(args, tokenizer, device, frozen_dtype, rng)  # a local model, a server, or the dataset
    train_examples = tasks.make_examples(args.task, train_rows, tokenizer, args.max_prompt_length)
    if args.target_coef:  # tril's target regularisation: one reference continuation per prompt (CommonGen: a sentence)
        reference_rng = random.Random(args.seed)
        for e in train_examples:
            e["target_ids"] = tasks.continuation_ids(tokenizer, e["prompt"], reference_rng.choice(e["references"]),
                                                     args.max_new_tokens)
    eval_examples = tasks.make_examples(args.task, eval_rows, tokenizer, args.max_prompt_length)[: args.num_eval_prompts]
    reward_fn = rewards.make_reward_fn(args.task, args.reward_model, device, args.reward_label,
                                       train_references=[e["references"] for e in train_examples], dtype=frozen_dtype)
    perplexity_lm = (ref_policy, tokenizer)
    if args.task == "imdb" and args.perplexity_model:
        perplexity_lm = (AutoModelForCausalLM.from_pretrained(args.perplexity_model, dtype=frozen_dtype).to(device)
                         .eval(), AutoTokenizer.from_pretrained(args.perplexity_model))
    policy_parameters, critic_parameters = ([p for p in m.parameters() if p.requires_grad]  # (LoRA: adapters, head)
                                            for m in (policy, critic or nn.Module()))
    trained_parameters = policy_parameters + critic_parameters
    optimizer = torch.optim.AdamW([{"params": policy_parameters, "lr": args.learning_rate},  # fused: one kernel
                                   {"params": critic_parameters, "lr": args.critic_learning_rate}],
                                  eps=args.adam_eps, weight_decay=args.weight_decay, fused=True)
    model = PolicyAndCritic(policy, critic)  # the update's forward passes; several processes: DDP averages gradients
    if args.world_size > 1:
        model = DDP(model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)
    # rollouts sample with the flags' settings; output_logits are the raw logits: the log-probs are pi's
    lengths = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=min(args.min_new_tokens, args.max_new_tokens),
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    generation_config = GenerationConfig(**lengths, **sampling, return_dict_in_generate=True, output_logits=True)
    deterministic = dict(do_sample=False, num_beams=args.eval_num_beams)
    eval_generation_config = GenerationConfig(**lengths, **(deterministic if args.eval_greedy else sampling))
    if master:
        print(f"{run.name}: {len(train_examples)} training prompts, {args.num_iterations} iterations of "
              f"{args.batch_size} episodes on {args.world_size} x {device}, "
              f"{sum(p.numel() for p in trained_parameters):,} trained parameters; TensorBoard: runs/{run.name}")

    def run_eval(iteration):
        # every evaluation samples with the same noise (its own seed), and leaves training's random stream as it was
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(args.seed)
            result, generations = evaluate(policy, tokenizer, eval_examples, eval_generation_config, reward_fn,
                                       perplexity_lm, args.task, args.rollout_batch_size, device, autocast)
        run.log_eval(iteration, global_episodes, result, generations)  # TensorBoard, runs/{run_name}/generations/

    trained_models = {"policy": policy} | ({} if critic is None else {"critic": critic})
    if args.gradient_checkpointing:  # the update recomputes activations instead of keeping them
        memory.enable_gradient_checkpointing(trained_models.values())

    # the loop's state, with --resume the checkpoint's (nanoGPT's init_from="resume", with the weights, the
    # optimizer and every random stream)
    global_episodes, train_seconds, kl_coef, prompt_order = run.resume(
        trained_models, optimizer, scaler, mixing_rng=rng,  # (mixing and k: the guided scripts' own stream)
        global_episodes=0, train_seconds=0.0, kl_coef=args.kl_coef,
        prompt_order=distributed.broadcast(torch.randperm(len(train_examples)).tolist()))  # rank 0's, on every rank
    if master and args.eval_every and not run.resumed:
        run_eval(0)
    for iteration in run.iterations(args.num_iterations):  # (Ctrl-C, SIGTERM: see run.end_iteration)
        iteration_start = time.perf_counter()
        for group, base_lr, anneal in zip(optimizer.param_groups, (args.learning_rate, args.critic_learning_rate),
                                          (args.anneal_lr, args.critic_anneal_lr)):  # (policy, critic)
            group["lr"] = (1.0 - (iteration - 1.0) / args.num_iterations) * base_lr if anneal else base_lr
        critic_only = iteration <= args.critic_warmup_iterations  # the critic's warm-up: the policy waits
        if len(prompt_order) < prompts_per_rank * args.world_size:  # a new pass over the prompts, reshuffled
            prompt_order += distributed.broadcast(torch.randperm(len(train_examples)).tolist())
        local_prompts = prompt_order[rank * prompts_per_rank : (rank + 1) * prompts_per_rank]
        prompts = [train_examples[i] for i in local_prompts]  # this rank's share of the batch
        batch = repeat(prompts, args.samples_per_prompt)  # each prompt's N episodes, one after the other
        del prompt_order[: prompts_per_rank * args.world_size]

        # 1. rollout: with probability beta the guide rolls in k tokens (one state a prompt), the policy rolls out
        with run.stop_on_failure(), autocast:  # a guide that stays down: every rank stops, at the last iteration
            roll_ins = repeat(guide_roll_in(guide, tokenizer, prompts, args, device, rng), args.samples_per_prompt)
            prompt_ids, prompt_mask, responses, response_masks, logprobs, policy_masks = rollout(
                policy, tokenizer, [e["prompt_ids"] for e in batch], generation_config, args, device, roll_ins)
        next_prompts = prompt_order[rank * prompts_per_rank : (rank + 1) * prompts_per_rank]
        if iteration < args.num_iterations and len(prompt_order) >= prompts_per_rank * args.world_size:  # (reshuffle)
            send_roll_ins_ahead(guide, [train_examples[i] for i in next_prompts], args, rng)  # during the update
        k = torch.tensor([len(r) for r in roll_ins], device=device)
        mixed = (k > 0).float()  # the episodes the guide took part in
        generate_seconds = time.perf_counter() - iteration_start
        num_tokens = int(response_masks.sum(1).max())  # drop the columns that no episode reached
        responses, response_masks, logprobs, policy_masks = (
            x[:, :num_tokens] for x in (responses, response_masks, logprobs, policy_masks))
        query_responses = torch.cat([prompt_ids, responses], 1)
        attention_masks = torch.cat([prompt_mask, response_masks], 1)
        continuations = text.decode_continuations(tokenizer, [e["prompt_ids"] for e in batch], responses)  # in context

        # 2. scoring: pi_ref's log-probs, the critic's values, the task reward on the text
        ref_logprobs, values, full_pass_logprobs = [], [], []
        with torch.inference_mode(), autocast:
            for start in range(0, len(batch), args.rollout_batch_size):
                chunk = slice(start, start + args.rollout_batch_size)
                ref_logits = response_logits(ref_policy, query_responses[chunk], attention_masks[chunk], num_tokens)
                ref_logprobs.append(token_logprobs(ref_logits, responses[chunk], args.temperature))
                if critic is not None:
                    values.append(critic(query_responses[chunk], attention_masks[chunk], num_tokens))
            if args.bf16 or args.fp16:  # generate's cached pass rounds unlike training's: take the latter's, in the
                for start in range(0, len(batch), args.micro_batch_size):  # update's shapes (a GPU rounds by shape)
                    chunk = slice(start, start + args.micro_batch_size)
                    logits = response_logits(policy, query_responses[chunk], attention_masks[chunk], num_tokens)
                    full_pass_logprobs.append(token_logprobs(logits, responses[chunk], args.temperature))
            ref_logprobs, values = torch.cat(ref_logprobs), torch.cat(values) if values else None
            scores = reward_fn([e["prompt"] for e in batch], continuations, [e["references"] for e in batch]).float()
            if args.missing_eos_penalty is not None:  # an episode that never ends loses this much
                scores -= args.missing_eos_penalty * (responses != tokenizer.eos_token_id).all(1).float()
        stopping.check_reward(scores, f"iteration {iteration}")  # a nan or inf on any rank: stop before any update
        # the roll-in is state: KL, GAE and every loss run over the policy's tokens only (mask), not the episode's
        mask, episode_mask = policy_masks.float(), response_masks.float()
        logprobs = torch.cat(full_pass_logprobs) * mask if args.bf16 or args.fp16 else logprobs
        kl, rewards_per_token = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, episode_mask, kl_coef)
        if critic is None:  # RLOO: the baseline is the prompt's other samples (a Monte Carlo value, no critic)
            advantages, returns = rloo_advantages(rewards_per_token, mask, args.samples_per_prompt), None
        else:
            advantages, returns = compute_gae(rewards_per_token, values, mask, args.gamma, args.gae_lambda)
        raw_advantages = advantages
        advantages = normalize_advantages(advantages, mask, args.advantage_norm,
                                          mixed if args.norm_per_group else torch.zeros_like(mixed))
        if args.target_coef:  # tril's target regularisation: the batch's prompts | their reference continuations
            reference_ids, reference_mask, target_mask = reference_batch(batch, tokenizer.pad_token_id, device)
        rollout_seconds = time.perf_counter() - iteration_start

        # 3. update: epochs of shuffled minibatches, gradients accumulated over micro-batches
        update_start = time.perf_counter()
        memory.set_gradient_checkpointing(trained_models.values(), args.gradient_checkpointing)  # (for the update)
        stats = {name: torch.zeros((args.update_epochs, args.num_minibatches), device=device)
                 for name in ("approxkl", "clipfrac", "ratio", "policy_loss", "value_loss", "entropy", "loss",
                              "target_nll")}
        for epoch in range(args.update_epochs):
            order = torch.randperm(args.local_batch_size, device=device)
            for minibatch in range(args.num_minibatches):
                minibatch_idx = order[minibatch * args.minibatch_size : (minibatch + 1) * args.minibatch_size]
                # each loss term is a mean over its own tokens in the whole minibatch, every rank's (DDP averages)
                loss_tokens = distributed.tokens_per_rank(mask[minibatch_idx])
                target_tokens = distributed.tokens_per_rank(target_mask[minibatch_idx]) if args.target_coef else 0
                for micro in range(args.gradient_accumulation_steps):
                    idx = minibatch_idx[micro * args.micro_batch_size : (micro + 1) * args.micro_batch_size]
                    if args.world_size > 1:  # DDP: average the gradients across ranks after the last micro-batch only
                        model.require_backward_grad_sync = micro == args.gradient_accumulation_steps - 1
                    with autocast:
                        logits, new_values = model(query_responses[idx], attention_masks[idx], num_tokens)
                    new_logprobs = token_logprobs(logits, responses[idx], args.temperature)
                    old_values, old_returns = (None, None) if critic is None else (values[idx], returns[idx])
                    loss, micro_stats = ppo_loss(new_logprobs, new_values, logprobs[idx], old_values,
                                                 advantages[idx], old_returns, mask[idx], loss_tokens, args)
                    if args.target_coef:  # tril's target regularisation, on these episodes' prompts
                        with autocast:
                            target_nll = reference_nll(policy, reference_ids[idx], reference_mask[idx],
                                                       target_mask[idx], target_tokens)
                        loss = loss + args.target_coef * target_nll
                        micro_stats["target_nll"] = target_nll.detach()
                    scaler.scale(loss).backward()  # (the micro-batches' shares add up to the minibatch's loss)
                    with torch.no_grad():
                        micro_stats["loss"] = loss.detach()
                        micro_stats["entropy"] = (entropy_from_logits(logits, args.temperature) * mask[idx]).sum()
                    for name, value in micro_stats.items():
                        stats[name][epoch, minibatch] += value
                if critic_only:  # the policy keeps its weights (AdamW skips a parameter without a gradient)
                    for p in policy_parameters:
                        p.grad = None
                scaler.unscale_(optimizer)  # (--fp16) the true gradients, to clip them
                grad_norm = (nn.utils.clip_grad_norm_(trained_parameters, args.max_grad_norm) if args.max_grad_norm else
                             nn.utils.get_total_norm([p.grad for p in trained_parameters if p.grad is not None]))
                stopping.check_update(grad_norm, stats["loss"][epoch, minibatch], f"iteration {iteration}", args.fp16)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
        memory.set_gradient_checkpointing(trained_models.values(), False)
        update_seconds = time.perf_counter() - update_start

        # 4. logging (and the adaptive KL controller): statistics of the whole batch, every rank's
        global_episodes += args.batch_size
        train_seconds += time.perf_counter() - iteration_start
        mean_kl = distributed.mean(kl.sum(1)).item()
        mean_score = distributed.mean(scores).item()
        mask_seen = args.update_epochs * mask  # every token once an epoch: what the update's sums divide by
        logs = {
            "objective/scores": mean_score,
            "objective/kl": mean_kl,
            "objective/entropy": distributed.mean(-(logprobs * mask).sum(1)).item(),
            "objective/rlhf_reward": mean_score - kl_coef * mean_kl,
            "objective/kl_coef": kl_coef,
            "policy/approxkl_avg": distributed.ratio_of_sums(stats["approxkl"], mask_seen).item(),
            "policy/clipfrac_avg": distributed.ratio_of_sums(stats["clipfrac"], mask_seen).item(),
            "policy/entropy_avg": distributed.ratio_of_sums(stats["entropy"], mask_seen).item(),
            "loss/policy_avg": distributed.ratio_of_sums(stats["policy_loss"], mask_seen).item(),
            **({"loss/target_avg": distributed.mean(stats["target_nll"]).item()} if args.target_coef else {}),
            "val/ratio": distributed.ratio_of_sums(stats["ratio"], mask_seen).item(),
            **({} if critic is None else {  # (rloo: no critic: no value loss, nothing to explain)
                "loss/value_avg": distributed.ratio_of_sums(stats["value_loss"], mask_seen).item(),
                "val/explained_variance": distributed.explained_variance(values, returns, mask).item()}),
            **(diagnostics.equal_score_groups(scores, args.samples_per_prompt) if args.samples_per_prompt > 1 else {}),
            "val/num_eos_tokens": round(distributed.mean((responses == tokenizer.eos_token_id).any(1)).item()
                                        * args.batch_size),  # episodes that ended
            "charts/episodes": global_episodes,
            "charts/eps": global_episodes / train_seconds,
            "charts/lr": optimizer.param_groups[0]["lr"],
            **guide.stats(),  # the guide's tokens asked and returned, its time; a server's requests, retries, latency
            # the mixed episodes beside the policy's own: the critic at the restart states (each mixed episode's first
            # policy token, where the roll-in ends), the advantages the policy's own tokens get
            **diagnostics.mixing_logs(mixed, k, scores, values, returns, mask,
                                      unmixed=(advantages, raw_advantages, mask),
                                      samples_per_prompt=args.samples_per_prompt),
            "timing/generate_s": generate_seconds,
            "timing/score_s": rollout_seconds - generate_seconds,
            "timing/update_s": update_seconds,
            "timing/iteration_s": time.perf_counter() - iteration_start,
        }
        if master:
            for name, value in logs.items():
                run.writer.add_scalar(name, value, global_episodes)
            print(f"iteration {iteration}/{args.num_iterations} episodes {global_episodes} score {mean_score:.4f} "
                  f"kl {mean_kl:.4f} mixed {logs['guide/mixed_fraction']:.2f} eps {logs['charts/eps']:.2f} "
                  f"(generate {generate_seconds:.2f}s, "
                  f"score {rollout_seconds - generate_seconds:.2f}s, update {update_seconds:.2f}s)", flush=True)
        if args.kl_target is not None:  # Ziegler et al.'s proportional controller
            error = float(np.clip(mean_kl / args.kl_target - 1, -0.2, 0.2))
            kl_coef *= 1 + error * args.batch_size / args.kl_horizon
        if master and args.eval_every and (iteration % args.eval_every == 0 or iteration == args.num_iterations):
            run_eval(iteration)
        # the iteration's checkpoint when due, and the clean stop after Ctrl-C or SIGTERM (common/run.py)
        run.end_iteration(iteration, global_episodes=global_episodes, train_seconds=train_seconds, kl_coef=kl_coef,
                          prompt_order=prompt_order)

    run.finish(policy, tokenizer, checkpoint_generation_config, dropout)  # --save-model (LoRA: merged); TensorBoard
