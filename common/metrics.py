"""Evaluation: a policy's held-out generations scored (evaluate), and the metrics: distinct-n, BLEU-4,
CIDEr-D, ROUGE, output perplexity.

BLEU-4 reproduces NLTK's `corpus_bleu` (no smoothing) and CIDEr-D reproduces pycocoevalcap's
`Cider` scorer (the COCO / CommonGen convention), both on the words of `ptb_tokenize`, which matches the
Stanford PTB tokenizer that pycocoevalcap runs (in Java) before scoring; tests/test_metrics.py pins their
numbers and benchmarks/cider_agreement.py checks the tokenizer against the Java one. Neither package is
needed at run time.
"""

import math
import re
from collections import Counter

import torch

from common.text import decode_continuations, encode_in_context


def tokenize_words(text):
    """Lower-cased words and punctuation marks: the tokens that distinct-n counts."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


# pycocoevalcap's PTBTokenizer: Stanford CoreNLP 3.4.1 `PTBTokenizer -preserveLines -lowerCase`, then the
# tokens in its PUNCTUATIONS list are dropped. Its -LRB- and kin are upper-case there but lower-cased by
# -lowerCase, so brackets survive as -lrb-; "!!" and "?!" are not in the list either.
PTB_PUNCTUATION = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}
PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
PTB_SPLIT_WORDS = {"gonna": ["gon", "na"], "gotta": ["got", "ta"], "wanna": ["wan", "na"], "cannot": ["can", "not"],
                   "lemme": ["lem", "me"], "gimme": ["gim", "me"]}
PTB_TOKEN = re.compile(r"""
    \.\.\. | --+                                         # an ellipsis (a 4th dot is a period), dashes
  | (?<![^\W_])[^\W\d_]\.(?=\.\.)                         # an initial before an ellipsis ("A..." -> a. ...)
  | (?:[^\W\d_]\.){2,}                                   # u.s. p.m. e.g.
  | (?:mr|mrs|ms|dr|jr|sr|st|prof|vs|etc)\.              # titles, vs., etc.
  | [^\W\d_]\.(?=\s|$)                                   # an initial ("e. there")
  | \d+(?:[,.:]\d+)*                                     # 1,000 3.50 12:00
  | 'n' | '(?:s|re|ve|ll|d|m)\b | n't\b                  # contractions on their own ("someone 's")
  | @?[^\W_]+(?:(?:[-/&]|'(?!n')|\.(?=[^\W_]))[^\W_]+)*  # words: well-known, and/or, o'clock, down.a
    (?:\.(?=,))?                                         # "fish.," keeps its period
  | [!?]+ | \S                                           # "!!", "?!", and any other single character
""", re.X)


def ptb_tokenize(text):
    """The words pycocoevalcap scores: Stanford's PTB tokens, lower-cased, without its punctuation list
    ("The dog's ball, isn't it?" -> the dog 's ball is n't it). Agrees with the Java tokenizer on every
    CommonGen sentence (benchmarks/cider_agreement.py)."""
    tokens = []
    for token in PTB_TOKEN.findall(text.lower().replace("\u2019", "'").replace("\u2018", "'")):
        if token in PTB_SPLIT_WORDS:
            tokens += PTB_SPLIT_WORDS[token]
        elif "'" in token and token[0].isalnum():  # doesn't -> does n't, man's -> man 's
            contraction = re.fullmatch(r"(.+?)(n't|'s|'re|'ve|'ll|'d|'m)", token)
            tokens += list(contraction.groups()) if contraction else [token]
        else:
            tokens.append(PTB_BRACKETS.get(token, token))
    return [t for t in tokens if t not in PTB_PUNCTUATION]


def ngrams(tokens, n):
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def distinct_n(texts, n):
    """Distinct n-grams over all texts divided by all n-grams (corpus level)."""
    counts = Counter()
    for text in texts:
        counts.update(ngrams(tokenize_words(text), n))
    return len(counts) / max(1, sum(counts.values()))


def bleu_4(predictions, references):
    """Corpus BLEU-4 as NLTK's corpus_bleu computes it (uniform weights, no smoothing).

    Clipped n-gram matches and n-gram counts are summed over the corpus (a hypothesis with no
    n-grams of some order still counts 1 in that denominator, as in NLTK); the brevity penalty uses,
    per hypothesis, the reference length closest to it (the shorter one on a tie)."""
    matches, totals = [0] * 4, [0] * 4
    hyp_length = ref_length = 0
    for prediction, refs in zip(predictions, references, strict=True):
        hyp, refs = ptb_tokenize(prediction), [ptb_tokenize(r) for r in refs]
        for n in range(1, 5):
            hyp_counts = ngrams(hyp, n)
            max_ref_counts = Counter()
            for ref in refs:
                max_ref_counts |= ngrams(ref, n)
            matches[n - 1] += sum(min(c, max_ref_counts[g]) for g, c in hyp_counts.items())
            totals[n - 1] += max(1, sum(hyp_counts.values()))
        hyp_length += len(hyp)
        ref_length += min((len(r) for r in refs), key=lambda length: (abs(length - len(hyp)), length))
    if min(matches) == 0:  # NLTK: exactly 0 without unigram matches, ~1e-77 for other orders
        return 0.0
    brevity_penalty = 1.0 if hyp_length > ref_length else math.exp(1 - ref_length / hyp_length)
    return brevity_penalty * math.exp(sum(math.log(m / t) for m, t in zip(matches, totals)) / 4)


def cider_document_frequency(references):
    """For each n-gram (n <= 4): in how many examples' reference sets it occurs."""
    df = Counter()
    for refs in references:
        df.update(set().union(*(ngrams(ptb_tokenize(r), n) for r in refs for n in range(1, 5))))
    return df, len(references)


def cider_d(predictions, references, document_frequency=None, sigma=6.0):
    """CIDEr-D per prediction (pycocoevalcap's CiderScorer: tf-idf n-gram vectors, n = 1..4,
    hypothesis counts clipped by the reference's, a Gaussian penalty on the bigram-count
    difference, averaged over references, times 10).

    The idf comes from the evaluated references themselves (the COCO convention) unless
    `document_frequency` = cider_document_frequency(some corpus) is given, as the reward does."""
    df, num_docs = document_frequency or cider_document_frequency(references)
    log_num_docs = math.log(float(num_docs))

    def tfidf(text):
        counts = Counter()
        for n in range(1, 5):
            counts.update(ngrams(ptb_tokenize(text), n))
        vec = [{} for _ in range(4)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_num_docs - math.log(max(1.0, df[gram])))
        norms = [math.sqrt(sum(v * v for v in vec[n].values())) for n in range(4)]
        num_bigrams = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return vec, norms, num_bigrams

    scores = []
    for prediction, refs in zip(predictions, references, strict=True):
        hyp_vec, hyp_norms, hyp_len = tfidf(prediction)
        total = 0.0
        for ref in refs:
            ref_vec, ref_norms, ref_len = tfidf(ref)
            for n in range(4):
                sim = sum(min(v, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0) for g, v in hyp_vec[n].items())
                if hyp_norms[n] != 0 and ref_norms[n] != 0:
                    sim /= hyp_norms[n] * ref_norms[n]
                total += sim * math.exp(-((hyp_len - ref_len) ** 2) / (2 * sigma**2)) / 4
        scores.append(10.0 * total / len(refs))
    return scores


def rouge(predictions, references):
    """Mean ROUGE-1/2/L F1 (rouge-score, Porter stemmer); with several references, the best one counts."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = Counter()
    for prediction, refs in zip(predictions, references, strict=True):
        for name, score in scorer.score_multi(refs, prediction).items():
            totals[name] += score.fmeasure
    n = max(1, len(predictions))
    return {"rouge_1": totals["rouge1"] / n, "rouge_2": totals["rouge2"] / n, "rouge_L": totals["rougeL"] / n}


@torch.no_grad()
def output_perplexity(model, tokenizer, prompts, continuations, device, batch_size=16):
    """exp(mean negative log-likelihood per continuation token) under `model`, given the prompt."""
    nll, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        rows = []
        for prompt, continuation in zip(prompts[start : start + batch_size], continuations[start : start + batch_size]):
            prompt_ids = tokenizer(prompt).input_ids
            continuation_ids = encode_in_context(tokenizer, prompt, continuation)  # as it reads after the prompt
            if continuation_ids:
                rows.append((prompt_ids, continuation_ids))
        if not rows:
            continue
        width = max(len(p) + len(c) for p, c in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        labels = torch.full_like(input_ids, -100)
        attention_mask = torch.zeros_like(input_ids)
        for i, (p, c) in enumerate(rows):  # right padding: positions start at 0 for every row
            input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
            attention_mask[i, : len(p) + len(c)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits.float()
        labels = labels.to(device)[:, 1:]
        token_nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none")
        nll += token_nll[labels != -100].sum().item()
        count += (labels != -100).sum().item()
    return math.exp(nll / max(1, count))


def task_metrics(task, prompts, continuations, references):
    """The text metrics of docs/tasks.md's table (the model-based ones, reward and perplexity, are added by the caller)."""
    if task == "imdb":
        return {"distinct_1": distinct_n(continuations, 1), "distinct_2": distinct_n(continuations, 2)}
    result = rouge(continuations, references)
    if task == "commongen":
        result["bleu_4"] = bleu_4(continuations, references)
        result["cider_d"] = sum(cider_d(continuations, references)) / max(1, len(continuations))
    return result


@torch.inference_mode()
def evaluate(policy, tokenizer, examples, generation_config, reward_fn, perplexity_lm, task, batch_size, device,
             autocast):
    """Generate for held-out prompts (`batch_size` a call, left-padded): the task's metrics (the reward's mean as
    "score", task_metrics, IMDB's perplexity under perplexity_lm = (model, tokenizer)) and every generation with its
    score. A continuation ends at its first EOS and is read in context (common/text.py), as the RL scripts read it."""
    prompts, continuations, references, scores = [], [], [], []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        width = max(len(e["prompt_ids"]) for e in batch)
        prompt_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(e["prompt_ids"])) + e["prompt_ids"]
                                   for e in batch], device=device)
        prompt_mask = torch.tensor([[0] * (width - len(e["prompt_ids"])) + [1] * len(e["prompt_ids"]) for e in batch],
                                   device=device)
        with autocast:
            out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=generation_config)
        responses = out[:, width:]
        is_eos = (responses == tokenizer.eos_token_id).long()
        responses = responses.masked_fill(is_eos.cumsum(1) - is_eos > 0, tokenizer.pad_token_id)  # after the first EOS
        texts = decode_continuations(tokenizer, [e["prompt_ids"] for e in batch], responses)  # in context
        batch_prompts, batch_refs = [e["prompt"] for e in batch], [e["references"] for e in batch]
        scores.append(reward_fn(batch_prompts, texts, batch_refs).float().cpu())
        prompts += batch_prompts
        continuations += texts
        references += batch_refs
    result = {"score": torch.cat(scores).mean().item()}
    result.update(task_metrics(task, prompts, continuations, references))
    if task == "imdb":
        lm, lm_tokenizer = perplexity_lm
        result["perplexity"] = output_perplexity(lm, lm_tokenizer, prompts, continuations, device)
    generations = [dict(prompt=p, continuation=c, references=r, score=s)
                   for p, c, r, s in zip(prompts, continuations, references, torch.cat(scores).tolist())]
    return result, generations
