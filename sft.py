"""Supervised fine-tuning (SFT) on a task's references: the paper's "SL" baseline, and how a guide is made.

"Learning to Generate Better Than Your LLM" (Chang et al., 2023) starts every RL run from, and
guides it with, a model fine-tuned on the task's references:
    imdb       the second halves of the positive training reviews (--imdb-label), given the first halves
    commongen  every target sentence of a concept set, given "generate a sentence with: ..."
    tldr       the reference summary, given the post and "TL;DR:"
The prompts are exactly the RL scripts' (common/tasks.py); the loss is the mean negative
log-likelihood of the continuation tokens only (prompt and padding carry no loss). The result
loads with AutoModelForCausalLM.from_pretrained, as --model-name-or-path or --guide-model of the
RL scripts. Read it top to bottom: Args -> helpers -> the loop (batches, loss, eval, checkpoint).
"""

import random
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import transformers
import tyro
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from common import rewards, stopping, tasks
from common.metrics import evaluate
from common.run import Run, RunArgs


@dataclass
class Args(RunArgs):
    """Flags shown with (default: None) take their task's value: the table in docs/tasks.md. The run's own flags
    (seed, device and precision, checkpoints, resume, saving, tracking): RunArgs, common/run.py."""

    # task, models, data (None = the task's default, see common/tasks.py)
    task: str = "imdb"
    """the task: imdb, commongen or tldr"""
    model_name_or_path: Optional[str] = None
    """the model to fine-tune (hub id or local folder) (None: the task's default policy)"""
    reward_model: Optional[str] = None
    """eval only: imdb's sentiment classifier, tldr's reward model (None: the task's default)"""
    reward_label: int = 1
    """imdb eval: the classifier label whose probability is the score (1 = positive)"""
    imdb_label: int = 1
    """imdb: train on the reviews with this label only (1 = positive, the paper's SL model; -1 = all)"""
    perplexity_model: Optional[str] = None
    """imdb eval: the LM that scores output perplexity (default: the starting model)"""
    dataset_name: Optional[str] = None
    """the hub dataset (None: the task's default)"""
    dataset_path: Optional[str] = None
    """a local JSON Lines file (every split) or a folder of train/validation/test .jsonl files, in the hub's schema"""
    max_prompt_length: Optional[int] = None
    """prompt tokens kept, as in the RL scripts (None: the task's default)"""
    max_target_length: Optional[int] = None
    """continuation tokens trained on, EOS included when it fits (None: the task's --max-new-tokens)"""

    # optimisation
    num_epochs: float = 1.0
    """passes over the training examples (fractions allowed)"""
    max_steps: int = 0
    """stop after this many optimizer steps (0 = run --num-epochs)"""
    batch_size: int = 16
    """examples per optimizer step"""
    micro_batch_size: Optional[int] = None
    """examples per forward/backward pass; gradients accumulate over a batch (default: the batch)"""
    learning_rate: float = 5e-5
    """AdamW learning rate"""
    warmup_steps: int = 0
    """linear warm-up steps, then linear decay to 0"""
    adam_eps: float = 1e-8
    """AdamW epsilon"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient-norm clip (0 = off)"""

    # evaluation (generation with the RL scripts' settings)
    eval_every: int = 100
    """evaluate every this many steps, and before and after training (0 = never)"""
    eval_split: str = "validation"
    """the held-out split: validation (IMDB: 20% of train, seed 42) or test"""
    num_eval_prompts: int = 256
    """held-out prompts per evaluation"""
    max_new_tokens: Optional[int] = None
    """tokens generated per eval prompt (None: the task's default)"""
    top_k: Optional[int] = None
    """eval top-k sampling (0 = off) (None: the task's default)"""
    min_new_tokens: Optional[int] = None
    """no EOS before this many new tokens in evaluation, as the RL scripts (None: imdb 48, commongen 5, tldr 0)"""
    eval_greedy: Optional[bool] = None
    """deterministic decoding in evaluation: greedy, or beam search with --eval-num-beams (otherwise top-k
    sampling) (None: the task's default)"""
    eval_num_beams: Optional[int] = None
    """beams when --eval-greedy (1 = greedy) (None: commongen 5, as tril and the RL scripts; imdb and tldr 1)"""
    eval_batch_size: int = 64
    """prompts per generate/scoring call in evaluation"""
    num_sample_generations: int = 8
    """generations shown as a text table in TensorBoard at each evaluation (all go to runs/{run_name}/generations/)"""
    eval_only: bool = False
    """evaluate --model-name-or-path on the held-out prompts and stop (no training): any checkpoint's task metrics"""

    # computed at run time
    num_steps: int = 0
    """optimizer steps (computed in runtime)"""
    gradient_accumulation_steps: int = 0
    """micro-batches per batch (computed in runtime)"""


def left_pad(sequences, pad_token_id, device):
    """Left-pad token lists into (ids, mask), as the RL scripts batch prompts."""
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


def sft_examples(task, rows, tokenizer, max_prompt_length, max_target_length, imdb_label):
    """(prompt_ids, target_ids) pairs: the RL scripts' prompt, then one reference + EOS, cut to max_target_length.

    CommonGen gives one pair per reference sentence. A reference that does not begin with a space is
    joined to its prompt with one (" The dog..." after "...dog.", " I like..." after "TL;DR:")."""
    if task == "imdb" and imdb_label >= 0:
        rows = [row for row in rows if row.get("label") == imdb_label]
        if not rows:
            raise SystemExit(f"error: no training review has label {imdb_label} (--imdb-label)")
    pairs = []
    for example in tasks.make_examples(task, rows, tokenizer, max_prompt_length):
        for reference in example["references"]:
            if not reference.strip():
                continue
            pairs.append((example["prompt_ids"], tasks.continuation_ids(tokenizer, example["prompt"], reference,
                                                                        max_target_length)))
    return pairs


def sft_batch(pairs, pad_token_id, device):
    """Left-padded prompt + target rows and the loss mask: 1 on target tokens only (not prompt, not padding)."""
    input_ids, attention_mask = left_pad([p + t for p, t in pairs], pad_token_id, device)
    loss_mask = torch.zeros_like(attention_mask)
    for i, (_, target) in enumerate(pairs):
        loss_mask[i, input_ids.shape[1] - len(target) :] = 1
    return input_ids, attention_mask, loss_mask


def sft_loss(model, input_ids, attention_mask, loss_mask, num_tokens=None, longest_target=None):
    """Negative log-likelihood (fp32) of the tokens where loss_mask is 1, each predicted from the ones before,
    summed and divided by `num_tokens` (default: these tokens): with the whole batch's target tokens, the
    micro-batches' losses add up to the batch's token mean however it is split.

    Left padding puts every target at the end of its row, so the LM head runs only on the last columns: the
    longest target's (None: read from loss_mask, which waits for the device; the loop knows it)."""
    num_target_tokens = longest_target or int(loss_mask.sum(1).max())
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                   logits_to_keep=num_target_tokens + 1).logits[:, :-1].float()
    targets, mask = input_ids[:, -num_target_tokens:], loss_mask[:, -num_target_tokens:].float()
    token_nll = nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (token_nll * mask).sum() / (mask.sum().clamp(min=1) if num_tokens is None else num_tokens)


if __name__ == "__main__":
    args = tasks.fill_task_defaults(tyro.cli(Args), warn_placeholders=False)  # (gpt2 is where SFT starts)
    transformers.logging.disable_progress_bar()
    args.max_target_length = args.max_target_length or args.max_new_tokens
    tasks.check_ranges(args, positive=("batch_size", "micro_batch_size", "learning_rate", "adam_eps", "max_prompt_length",
                                       "max_new_tokens", "max_target_length", "eval_batch_size", "num_eval_prompts",
                                       "eval_num_beams"),
                       non_negative=("num_epochs", "max_steps", "warmup_steps", "weight_decay", "max_grad_norm",
                                     "eval_every", "top_k", "num_sample_generations", "min_new_tokens"))
    args.micro_batch_size = args.micro_batch_size or args.batch_size
    args.gradient_accumulation_steps = tasks.exact_div(args.batch_size, args.micro_batch_size,
                                                 "--batch-size / --micro-batch-size")
    if args.num_epochs <= 0 and args.max_steps <= 0:
        raise SystemExit("error: --num-epochs or --max-steps must be positive")
    if args.eval_only and args.resume:
        raise SystemExit("error: --eval-only evaluates --model-name-or-path; --resume continues a training run")
    # data and model paths, checked before any model loads: bad input fails fast with one line
    needs_train_rows = not args.eval_only or args.task == "commongen"  # CommonGen's CIDEr-D idf reads them
    train_rows = tasks.load_rows(args.task, "train", args.dataset_name, args.dataset_path) if needs_train_rows else []
    evaluating = bool(args.eval_every or args.eval_only)
    eval_rows = tasks.load_rows(args.task, args.eval_split, args.dataset_name, args.dataset_path) if evaluating else []
    tasks.check_model_path(args.model_name_or_path, "--model-name-or-path")
    if args.task in rewards.MODEL_REWARDS and evaluating:
        tasks.check_model_path(args.reward_model, "--reward-model")
    tasks.check_model_path(args.perplexity_model, "--perplexity-model")
    # the run: --resume's checkpoint (checked against these flags), its name, its folders, TensorBoard
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    run = Run(args, __file__, len(train_rows), device, same=("task", "batch_size", "num_epochs", "max_steps"),
              computed=("num_steps",), unit="step", what="model")

    # seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    autocast = torch.autocast(device.type, dtype=torch.float16 if args.fp16 else torch.bfloat16,
                              enabled=args.bf16 or args.fp16)
    scaler = torch.amp.GradScaler(device.type, enabled=args.fp16)  # --fp16: small gradients survive float16

    # the model (eval mode: no dropout, as in the RL scripts), the training pairs, the eval setup
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32).to(device).eval()
    # the checkpoint's own generation settings would change what evaluation samples: set aside (restored for
    # saving), the flags decide
    checkpoint_generation_config = model.generation_config
    model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    train_pairs = [] if args.eval_only else sft_examples(args.task, train_rows, tokenizer, args.max_prompt_length,
                                                          args.max_target_length, args.imdb_label)
    if not (train_pairs or args.eval_only):
        raise SystemExit("error: the training split has no non-empty reference to train on")
    steps_per_epoch = max(1, len(train_pairs) // args.batch_size)  # the last incomplete batch is dropped
    args.num_steps = args.max_steps or max(1, round(args.num_epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True,
                                  weight_decay=args.weight_decay)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, args.warmup_steps, args.num_steps)

    if evaluating:
        eval_examples = tasks.make_examples(args.task, eval_rows, tokenizer, args.max_prompt_length)
        eval_examples = eval_examples[: args.num_eval_prompts]
        train_references = ([g["references"] for g in tasks.group_commongen(train_rows)]
                            if args.task == "commongen" else None)  # CIDEr-D's idf
        reward_fn = rewards.make_reward_fn(args.task, args.reward_model, device, args.reward_label, train_references)
        perplexity_path = args.perplexity_model or args.model_name_or_path  # the starting model, frozen
        perplexity_lm = (None, None)
        if args.task == "imdb":
            perplexity_lm = (AutoModelForCausalLM.from_pretrained(perplexity_path).to(device).eval(),
                             AutoTokenizer.from_pretrained(perplexity_path))
        sampling = dict(do_sample=True, top_k=args.top_k)
        deterministic = dict(do_sample=False, num_beams=args.eval_num_beams)  # the RL scripts' evaluation
        eval_generation_config = GenerationConfig(max_new_tokens=args.max_new_tokens,
                                                  min_new_tokens=min(args.min_new_tokens, args.max_new_tokens),
                                                  eos_token_id=tokenizer.eos_token_id,
                                                  pad_token_id=tokenizer.pad_token_id,
                                                  **(deterministic if args.eval_greedy else sampling))
    plan = (f"evaluating {args.model_name_or_path} on {len(eval_examples)} {args.eval_split} prompts" if args.eval_only
            else f"{len(train_pairs)} training examples, {args.num_steps} steps of {args.batch_size}")
    print(f"{run.name}: {plan} on {device}; TensorBoard: runs/{run.name}")

    def run_eval(step):
        # every evaluation samples with the same noise (its own seed), and leaves training's random stream as it was
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(args.seed)
            result, generations = evaluate(model, tokenizer, eval_examples, eval_generation_config, reward_fn,
                                       perplexity_lm, args.task, args.eval_batch_size, device, autocast)
        run.log_eval(step, step * args.batch_size, result, generations)  # TensorBoard, runs/{run_name}/generations/

    if args.eval_only:  # the model's task metrics, and no training
        run_eval(0)
        run.writer.close()
        raise SystemExit(0)
    # the loop's state, with --resume the checkpoint's (nanoGPT's init_from="resume", with the weights, the
    # optimizer and every random stream)
    train_seconds, order, scheduler_state = run.resume({"model": model}, optimizer, scaler, train_seconds=0.0,
                                                       order=[], scheduler=scheduler.state_dict())
    scheduler.load_state_dict(scheduler_state)
    if evaluating and not run.resumed:
        run_eval(0)
    train_start = time.perf_counter()
    for step in run.iterations(args.num_steps):  # (Ctrl-C, SIGTERM: see run.end_iteration)
        if len(order) < args.batch_size:  # a new epoch, reshuffled
            order += torch.randperm(len(train_pairs)).tolist()
        batch = [train_pairs[i] for i in order[: args.batch_size]]
        del order[: args.batch_size]

        # one optimizer step: the batch's loss (a mean over its target tokens), accumulated over micro-batches (no
        # read from the device here; on CUDA a copy to it from pageable memory waits for the work queued before it)
        step_loss, num_target_tokens = 0.0, sum(len(target) for _, target in batch)
        for start in range(0, args.batch_size, args.micro_batch_size):
            micro_batch = batch[start : start + args.micro_batch_size]
            input_ids, attention_mask, loss_mask = sft_batch(micro_batch, tokenizer.pad_token_id, device)
            with autocast:
                loss = sft_loss(model, input_ids, attention_mask, loss_mask, num_target_tokens,
                                max(len(target) for _, target in micro_batch))
            scaler.scale(loss).backward()
            step_loss += loss.detach()
        step_loss = step_loss.item()
        scaler.unscale_(optimizer)  # (--fp16) the true gradients, to clip them
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
        stopping.check_update(grad_norm, torch.tensor(step_loss), f"step {step}", args.fp16)  # a nan or inf: stop
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # logging, evaluation
        examples_seen = step * args.batch_size
        elapsed = train_seconds + time.perf_counter() - train_start
        logs = {"loss/sft": step_loss, "loss/grad_norm": grad_norm.item(), "charts/episodes": examples_seen,
                "charts/eps": examples_seen / elapsed, "charts/lr": scheduler.get_last_lr()[0]}
        for name, value in logs.items():
            run.writer.add_scalar(name, value, examples_seen)
        if step % 10 == 0 or step == 1 or step == args.num_steps:
            print(f"step {step}/{args.num_steps} examples {examples_seen} loss {step_loss:.4f} "
                  f"eps {logs['charts/eps']:.2f}", flush=True)
        if args.eval_every and (step % args.eval_every == 0 or step == args.num_steps):
            run_eval(step)
        # the step's checkpoint when due, and the clean stop after Ctrl-C or SIGTERM (common/run.py)
        run.end_iteration(step, train_seconds=train_seconds + time.perf_counter() - train_start, order=order,
                          scheduler=scheduler.state_dict())

    run.finish(model, tokenizer, checkpoint_generation_config)  # --save-model; TensorBoard closed
