"""Task rewards R(prompt, continuation), computed on text so any policy tokenizer works.

`make_reward_fn` returns `reward_fn(prompts, continuations, references) -> float tensor (batch,)`:
    imdb       P(label = --reward-label) of a sequence classifier on prompt + continuation
    commongen  CIDEr-D of the continuation against the concept set's references (idf from the
               training references, so a sentence's reward does not depend on its batch)
    tldr       the single logit of a one-label sequence-classification reward model on prompt + summary
"""

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from common import metrics

MODEL_REWARDS = ("imdb", "tldr")  # the tasks whose reward is a model (--reward-model); the others' are computed


def load_classifier(path, device, num_labels=None, dtype=torch.float32):
    """A frozen sequence classifier and its tokenizer; fails with one line if the label count is wrong."""
    # keep the continuation's end; right padding, so absolute-position models (GPT-2, BERT) see the
    # positions of the text alone, and a text's reward does not depend on the batch it is scored in
    tokenizer = AutoTokenizer.from_pretrained(path, truncation_side="left", padding_side="right")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if num_labels is not None and model.config.num_labels != num_labels:
        raise SystemExit(f"error: reward model {path} has {model.config.num_labels} labels, the task needs {num_labels}")
    return model, tokenizer


@torch.no_grad()
def classifier_logits(model, tokenizer, texts, device, batch_size):
    logits = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                          max_length=min(tokenizer.model_max_length, 1024), return_tensors="pt").to(device)
        logits.append(model(**batch).logits.float())
    return torch.cat(logits)


def make_reward_fn(task, reward_model, device, reward_label=1, train_references=None, batch_size=32,
                   dtype=torch.float32):
    if task == "commongen":
        document_frequency = metrics.cider_document_frequency(train_references)

        def reward_fn(prompts, continuations, references):
            return torch.tensor(metrics.cider_d(continuations, references, document_frequency), device=device)

        return reward_fn

    model, tokenizer = load_classifier(reward_model, device, num_labels=1 if task == "tldr" else None, dtype=dtype)
    if task == "imdb" and not 0 <= reward_label < model.config.num_labels:
        raise SystemExit(f"error: --reward-label {reward_label} is not a label of {reward_model} "
                         f"({model.config.num_labels} labels)")

    def reward_fn(prompts, continuations, references):
        logits = classifier_logits(model, tokenizer, [p + c for p, c in zip(prompts, continuations)], device, batch_size)
        return logits.softmax(-1)[:, reward_label] if task == "imdb" else logits[:, 0]

    return reward_fn
