"""The three tasks: their defaults, their data (hub or local JSON Lines) and their prompts.

Everything here is about the *task*; nothing about the algorithm. A task's data becomes a list of
examples, each a dict with
    prompt      the prompt text the policy sees (after truncation)
    prompt_ids  its token ids under the policy's tokenizer
    references  reference continuations (IMDB: the review's second half; CommonGen: every sentence
                written for the concept set; TL;DR: the human summary)
"""

import json
import os
import random

from common.text import encode_in_context

TASKS = ("imdb", "commongen", "tldr")

# Per-task defaults for the flags that the scripts leave at None: tril's configs (Cornell-RL/tril,
# cfgs/alg/*.yaml, cfgs/task/*.yaml), shown in docs/tasks.md's table. Every entry is a flag of the scripts:
# `--learning-rate 3e-6` overrides the task's value. The guide (guided scripts only) is the paper's: the
# task's supervised model, sampled with nucleus sampling.
TASK_DEFAULTS = {
    "imdb": dict(
        # tril starts PPO (and every guided run) from the supervised model on positive reviews, the guide
        model_name_or_path="rajkumarrrk/gpt2-fine-tuned-on-imdb-positive-reviews",
        reward_model="lvwerra/distilbert-imdb",
        guide_model="rajkumarrrk/gpt2-fine-tuned-on-imdb-positive-reviews",
        guide_top_k=50,
        guide_min_new_tokens=48,
        dataset_name="imdb",
        max_prompt_length=64,
        max_new_tokens=48,
        min_new_tokens=48,  # tril's min_length 48, which its causal LMs count from the prompt's end
        top_k=50,
        eval_greedy=False,
        eval_num_beams=1,
        total_episodes=50 * 112,
        batch_size=112,
        num_minibatches=4,
        update_epochs=5,
        learning_rate=1e-5,
        anneal_lr=True,
        weight_decay=1e-6,
        gamma=0.99,
        vf_coef=0.5,
        kl_coef=0.001,
        target_coef=0.1,
    ),
    "commongen": dict(
        # no causal CommonGen SFT checkpoint is on the hub: make one with a supervised run on the
        # train split and pass its folder (gpt2 itself is only a placeholder that runs)
        model_name_or_path="gpt2",
        reward_model="cider-d",
        guide_model="gpt2",  # likewise: pass a CommonGen SFT model (the paper's guide)
        guide_top_k=0,
        guide_min_new_tokens=5,
        dataset_name="common_gen",
        max_prompt_length=32,
        max_new_tokens=20,
        min_new_tokens=5,
        top_k=0,
        eval_greedy=True,
        eval_num_beams=5,  # tril evaluates CommonGen with beam search
        total_episodes=500 * 128,
        batch_size=128,
        num_minibatches=4,
        update_epochs=4,
        learning_rate=5e-6,
        anneal_lr=True,
        weight_decay=1e-6,
        gamma=0.99,
        vf_coef=30.0,
        kl_coef=0.0,
        target_coef=0.1,
    ),
    "tldr": dict(
        model_name_or_path="CarperAI/openai_summarize_tldr_sft",
        reward_model="cleanrl/EleutherAI_pythia-1b-deduped__reward__tldr",
        guide_model="CarperAI/openai_summarize_tldr_sft",
        guide_top_k=0,
        guide_min_new_tokens=5,
        guide_max_new_tokens=20,  # tril's guide writes at most 20 tokens (the policy's horizon is 50)
        dataset_name="CarperAI/openai_summarize_tldr",
        max_prompt_length=500,
        max_new_tokens=50,
        min_new_tokens=0,
        top_k=50,  # tril sets none: transformers' default top-k 50
        eval_greedy=True,
        eval_num_beams=1,
        total_episodes=1000 * 128,
        batch_size=128,
        num_minibatches=1,  # tril: one optimizer step per epoch (4 accumulated micro-batches of 32)
        update_epochs=4,
        learning_rate=5e-6,
        anneal_lr=False,  # tril: a constant learning rate
        weight_decay=0.01,
        gamma=1.0,
        vf_coef=0.1,
        kl_coef=0.002,
        target_coef=0.1,
    ),
}

# the fields a row must have, per task (CommonGen rows carry `target` or, grouped, `references`)
REQUIRED_FIELDS = {"imdb": ("text",), "commongen": ("concepts",), "tldr": ("prompt", "label")}
# local file names tried for each split, and the hub's split names
LOCAL_SPLIT_FILES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
HUB_SPLITS = {
    "imdb": {"train": "train", "validation": "train", "test": "test"},  # validation = 20% of train
    "commongen": {"train": "train", "validation": "validation", "test": "test"},
    "tldr": {"train": "train", "validation": "valid", "test": "test"},
}
IMDB_VALIDATION_FRACTION, IMDB_SPLIT_SEED = 0.2, 42
COMMONGEN_PREFIX = "generate a sentence with: "
TLDR_MARKER = "TL;DR:"


# defaults that only make a run possible, not meaningful: an RL run that takes one says so
PLACEHOLDER_DEFAULTS = {"commongen": ("model_name_or_path", "guide_model")}


def fill_task_defaults(args, warn_placeholders=True):
    """Set every flag left at None to the task's default (an unknown task exits with one line). A placeholder
    default (CommonGen's gpt2 policy and guide, in an RL script) is named in one printed line."""
    if args.task not in TASKS:
        raise SystemExit(f"error: unknown task {args.task!r}; choose one of: {', '.join(TASKS)}")
    placeholders = []
    for name, value in TASK_DEFAULTS[args.task].items():
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, value)
            if name in PLACEHOLDER_DEFAULTS.get(args.task, ()):
                placeholders.append("--" + name.replace("_", "-"))
    if warn_placeholders and placeholders and os.environ.get("RANK", "0") == "0":
        verb = "default" if len(placeholders) > 1 else "defaults"
        print(f"note: {' and '.join(placeholders)} {verb} to {TASK_DEFAULTS[args.task]['model_name_or_path']}, a "
              f"placeholder that runs but has not learned {args.task}: make a supervised model first (python sft.py "
              f"--task {args.task} --save-model --save-path models/{args.task}-sl) and pass its folder", flush=True)
    return args


def looks_like_local_path(name):
    """Hub ids are `name` or `org/name`; anything else (./x, /x, ~/x, a/b/c) is a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def check_model_path(name, flag):
    """Fail fast, before any model loads, on a local model path that does not exist or a hub id that
    cannot be reached (offline, or no such model) and is not in the local cache."""
    if not name or os.path.exists(os.path.expanduser(name)):
        return
    if looks_like_local_path(name):
        raise SystemExit(f"error: {flag}: no such model folder: {name}")
    import huggingface_hub

    if isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str):
        return  # downloaded before: from_pretrained finds it offline too
    try:
        if huggingface_hub.constants.HF_HUB_OFFLINE:
            raise OSError("HF_HUB_OFFLINE is set and it is not in the local cache")
        huggingface_hub.model_info(name, timeout=10)
    except Exception as e:  # offline, no such repository, gated: all end the same way
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"error: {flag}: cannot load {name} from the Hugging Face hub ({reason}); "
                         "pass a local model folder (save_pretrained layout) instead")


def exact_div(a, b, what):
    """a // b, or one line naming the flags when b does not divide a."""
    if b <= 0 or a % b:
        raise SystemExit(f"error: {what}: {a} is not divisible by {b}")
    return a // b


def samples_table(generations):
    """A markdown table of (prompt, continuation, score) for TensorBoard's text tab."""
    def cell(s):
        return s.replace("|", "\\|").replace("\n", " ")

    rows = "\n".join(f"| {cell(g['prompt'])} | {cell(g['continuation'])} | {g['score']:.3f} |" for g in generations)
    return "| prompt | continuation | score |\n|-|-|-|\n" + rows


def check_save_path(path, *model_paths):
    """Before training: --save-path is new, empty, or a previous causal LM saved there (save_pretrained:
    config.json and weights, no sub-folders) that is not one of this run's own inputs; anything else fails,
    so a model is never mixed into a folder that holds something else."""
    if not path or not os.path.isdir(path) or not os.listdir(path):
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise SystemExit(f"error: --save-path {path} is a file, not a folder")
        return
    if any(p and os.path.exists(p) and os.path.samefile(p, path) for p in model_paths):
        raise SystemExit(f"error: --save-path {path} is the folder of a model this run reads; choose another folder")
    try:
        with open(os.path.join(path, "config.json")) as f:
            architectures = json.load(f).get("architectures") or []
    except (OSError, ValueError):
        architectures = []
    entries = os.listdir(path)
    previous_model = (any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
                      and any(e.endswith(".safetensors") for e in entries)
                      and not any(os.path.isdir(os.path.join(path, e)) for e in entries))
    if not previous_model:
        raise SystemExit(f"error: --save-path {path} is not empty and does not hold a previous model; choose an "
                         "empty or new folder")


def check_ranges(args, positive=(), non_negative=(), fraction=(), unit=()):
    """Fail fast, with one line naming the flag, on a numeric flag out of its range (None: unset, skipped).
    positive: > 0; non_negative: >= 0; fraction: in [0, 1]; unit: in (0, 1]."""
    rules = [(positive, lambda v: v > 0, "positive"), (non_negative, lambda v: v >= 0, "at least 0"),
             (fraction, lambda v: 0 <= v <= 1, "in [0, 1]"), (unit, lambda v: 0 < v <= 1, "in (0, 1]")]
    for names, ok, expected in rules:
        for name in names:
            value = getattr(args, name)
            if value is not None and not ok(value):
                raise SystemExit(f"error: --{name.replace('_', '-')} must be {expected}, got {value}")


def read_jsonl(path):
    if not os.path.isfile(path):
        raise SystemExit(f"error: dataset file not found: {path}")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise SystemExit(f"error: {path} line {line_number} is not valid JSON ({e.msg})")
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: cannot read dataset file {path}: {e}")
    return rows


def local_split_file(dataset_path, split):
    """A .jsonl file serves every split; a folder holds `train.jsonl`, `validation.jsonl` (or valid/val/dev)..."""
    if not os.path.exists(dataset_path):
        raise SystemExit(f"error: --dataset-path not found: {dataset_path}")
    if os.path.isfile(dataset_path):
        return dataset_path
    for name in LOCAL_SPLIT_FILES[split]:
        path = os.path.join(dataset_path, f"{name}.jsonl")
        if os.path.isfile(path):
            return path
    tried = ", ".join(f"{n}.jsonl" for n in LOCAL_SPLIT_FILES[split])
    raise SystemExit(f"error: --dataset-path {dataset_path} has no file for the {split} split (tried {tried})")


def write_jsonl(path, rows):
    """Rows (dicts) as JSON Lines, one per line, UTF-8; the folder is made if missing. A write that fails (a file
    in the way, no permission, a full disk) ends the run with one line."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    except OSError as e:
        raise SystemExit(f"error: cannot write {path}: {e.strerror or e}") from None


def load_rows(task, split, dataset_name=None, dataset_path=None):
    """Rows of one split ("train", "validation" or "test"), from local JSONL if given, else the hub.

    IMDB has no validation split on the hub: as in tril, its train split is cut 80/20 (seed 42)
    into train and validation."""
    if split not in LOCAL_SPLIT_FILES:
        raise SystemExit(f"error: unknown split {split!r}; choose one of: {', '.join(LOCAL_SPLIT_FILES)}")
    source_split = HUB_SPLITS[task][split]  # for IMDB validation, the rows come from train
    if dataset_path:
        path = local_split_file(dataset_path, "train" if task == "imdb" and split == "validation" else split)
        source = path
        rows = read_jsonl(path)
    else:
        import datasets

        source = f"{dataset_name} ({source_split})"
        import huggingface_hub

        try:
            if not huggingface_hub.constants.HF_HUB_OFFLINE:  # fail fast (datasets retries for half a minute)
                huggingface_hub.dataset_info(dataset_name, timeout=10)
            rows = list(datasets.load_dataset(dataset_name, split=source_split))
        except Exception as e:  # offline, no such dataset, no such split
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SystemExit(f"error: cannot load the hub dataset {source} ({reason}); without the hub, pass "
                             "--dataset-path (a JSON Lines file or a folder of them, in the hub's schema), or set "
                             "HF_HUB_OFFLINE=1 to use a copy in the local cache")
    if not rows:
        raise SystemExit(f"error: dataset {source} is empty")
    for i, row in enumerate(rows):
        missing = [f for f in REQUIRED_FIELDS[task] if not isinstance(row, dict) or f not in row]
        if task == "commongen" and not missing and "target" not in row and "references" not in row:
            missing = ["target or references"]
        if missing:
            raise SystemExit(f"error: dataset {source} row {i + 1} lacks the field(s): {', '.join(missing)}")
    if task == "imdb" and split in ("train", "validation"):
        order = list(range(len(rows)))
        random.Random(IMDB_SPLIT_SEED).shuffle(order)
        n_validation = int(len(rows) * IMDB_VALIDATION_FRACTION)
        keep = order[:n_validation] if split == "validation" else order[n_validation:]
        rows = [rows[i] for i in sorted(keep)]
    return rows


def group_commongen(rows):
    """One entry per concept set with all of its reference sentences (hub rows hold one target each)."""
    groups = {}
    for i, row in enumerate(rows):
        if "references" in row:  # already grouped (a local validation file may be)
            groups[i] = (row["concepts"], list(row["references"]))
        else:  # hub rows: one target each, grouped by concept set
            key = row.get("concept_set_idx", tuple(row["concepts"]))
            groups.setdefault(key, (row["concepts"], []))[1].append(row["target"])
    return [{"concepts": list(concepts), "references": refs} for concepts, refs in groups.values()]


def make_examples(task, rows, tokenizer, max_prompt_length):
    """Format and tokenise prompts exactly as docs/tasks.md's table says.

    imdb:      the first 50% of the review's words, left-truncated to max_prompt_length tokens
    commongen: "generate a sentence with: " + " ".join(concepts) + ".", right-truncated
    tldr:      the post, its end cut to fit, the prompt still ending in "TL;DR: "
    """
    if task == "commongen":
        rows = group_commongen(rows)
    examples = []
    for row in rows:
        if task == "imdb":
            words = row["text"].split()
            text, references = " ".join(words[: len(words) // 2]), [" ".join(words[len(words) // 2 :])]
            ids = tokenizer(text).input_ids[-max_prompt_length:]
        elif task == "commongen":
            text, references = COMMONGEN_PREFIX + " ".join(row["concepts"]) + ".", row["references"]
            ids = tokenizer(text).input_ids[:max_prompt_length]
        else:
            text, references = row["prompt"], [row["label"]]
            ids = tokenizer(text).input_ids
            marker = text.rfind(TLDR_MARKER)
            if len(ids) > max_prompt_length and marker >= 0:  # cut the post, keep "\nTL;DR: "
                head, tail = text[:marker].rstrip(), "\n" + text[marker:]
                tail_ids = tokenizer(tail, add_special_tokens=False).input_ids
                ids = tokenizer(head).input_ids[: max_prompt_length - len(tail_ids)] + tail_ids
            ids = ids[:max_prompt_length]
        examples.append({"prompt": tokenizer.decode(ids, skip_special_tokens=True), "prompt_ids": ids,
                         "references": references})
    return examples


def continuation_ids(tokenizer, prompt, reference, max_length):
    """A reference continuation as token ids after its prompt, encoded in context: joined with a space where
    neither side has one (" The dog..." after "...dog.", " I like..." after "TL;DR:"), EOS appended, cut to
    max_length."""
    separator = "" if prompt[-1:].isspace() or reference[:1].isspace() else " "
    return (encode_in_context(tokenizer, prompt, separator + reference) + [tokenizer.eos_token_id])[:max_length]
