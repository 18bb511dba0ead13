"""CIDEr-D as CommonGen is evaluated: our pure-Python metric against pycocoevalcap's full pipeline.

pycocoevalcap (the COCO caption toolkit that CommonGen's evaluation uses) runs Stanford's PTB tokenizer in
Java (lower-cased, its punctuation tokens removed) and then scores CIDEr-D. common/metrics.py does both in
Python (`ptb_tokenize`, `cider_d`). This checks, on the real CommonGen data (the hub's, or --data-dir's):
  1. the tokens: ptb_tokenize against the Java tokenizer, sentence by sentence (every dev reference and
     train target, and the hypotheses below);
  2. the score: cider_d against pycocoevalcap's PTBTokenizer + Cider, per example and as the corpus mean,
     on the dev set (993 concept sets) for three kinds of hypothesis: one reference held out from the
     others (human text), the concept words alone ("dog ball park"), and a noisy copy of a reference
     (upper case, stray punctuation, contractions, brackets).

    pip install -r requirements.txt -r benchmarks/requirements.txt     # pycocoevalcap; Java 8+ on the PATH
    python benchmarks/cider_agreement.py                         # ~10 s; writes benchmarks/results/cider_agreement.md
    python benchmarks/cider_agreement.py --data-dir offline/data # local files: commongen/{train,validation}.jsonl
"""

import argparse
import subprocess
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import metrics, tasks  # noqa: E402


def noisy(sentence, rng):
    """A reference made awkward for a tokenizer: case, stray punctuation, contractions, brackets, quotes."""
    words = sentence.split()
    i = rng.randrange(len(words))
    words[i] = rng.choice([f"({words[i]})", f'"{words[i]}"', f"{words[i]}!!", f"{words[i]},", words[i].upper(),
                           f"{words[i]}'s", f"don't {words[i]}", f"{words[i]} -- ", f"{words[i]}..."])
    return " ".join(words)


def commit():
    return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                          cwd=ROOT).stdout.strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="a folder whose commongen/ holds train.jsonl and validation.jsonl "
                                           "(default: the hub's dataset)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cider_agreement.md"),
                        help="the result file written (Markdown)")
    args = parser.parse_args()
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    local = os.path.join(args.data_dir, "commongen") if args.data_dir else None
    name = tasks.TASK_DEFAULTS["commongen"]["dataset_name"]
    dev = tasks.group_commongen(tasks.load_rows("commongen", "validation", name, local))
    train = [r for s in tasks.group_commongen(tasks.load_rows("commongen", "train", name, local)) for r in s["references"]]
    rng = random.Random(0)
    sets = [d for d in dev if len(d["references"]) >= 2]
    hypotheses = {
        "a held-out reference": ([d["references"][0] for d in sets], [d["references"][1:] for d in sets]),
        "the concept words": ([" ".join(d["concepts"]) for d in sets], [d["references"] for d in sets]),
        "a noisy reference": ([noisy(d["references"][0], rng) for d in sets], [d["references"][1:] for d in sets]),
    }

    # 1. tokens
    sentences = [r for d in dev for r in d["references"]] + train + [h for hyps, _ in hypotheses.values() for h in hyps]
    start = time.perf_counter()
    java = PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(sentences)})
    java_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ours = [" ".join(metrics.ptb_tokenize(s)) for s in sentences]
    python_seconds = time.perf_counter() - start
    disagree = [(s, java[i][0], ours[i]) for i, s in enumerate(sentences) if java[i][0] != ours[i]]

    # 2. scores
    rows = []
    for name, (hyps, refs) in hypotheses.items():
        gts = PTBTokenizer().tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)})
        res = PTBTokenizer().tokenize({i: [{"caption": h}] for i, h in enumerate(hyps)})
        coco_mean, coco_scores = Cider().compute_score(gts, res)
        our_scores = metrics.cider_d(hyps, refs)
        max_difference = max(abs(a - b) for a, b in zip(coco_scores, our_scores))
        rows.append((name, len(hyps), coco_mean, sum(our_scores) / len(our_scores), max_difference))

    lines = ["# CIDEr-D: common/metrics.py against pycocoevalcap (Java PTB tokenizer + Cider)", "",
             f"CommonGen dev ({len(dev)} concept sets) and train targets ({local or 'the hub'}); "
             f"`python benchmarks/cider_agreement.py{' --data-dir ' + args.data_dir if args.data_dir else ''}` at "
             f"commit `{commit()}`.", "",
             "| | count | agree |", "|-|-|-|",
             f"| tokenized sentences (dev references, train targets, the hypotheses below) | {len(sentences)} | "
             f"{len(sentences) - len(disagree)} ({1 - len(disagree) / len(sentences):.2%}) |", "",
             f"Tokenizing them: Java {java_seconds:.1f} s (with its start-up), Python {python_seconds:.1f} s.", "",
             "| hypotheses (dev sets with 2+ references) | sets | pycocoevalcap CIDEr-D | ours | largest per-example difference |",
             "|-|-|-|-|-|"]
    lines += [f"| {name} | {n} | {coco:.6f} | {ours:.6f} | {diff:.2e} |" for name, n, coco, ours, diff in rows]
    if disagree:
        lines += ["", "Sentences tokenized differently (Java, then ours):", ""]
        lines += [f"- `{s}`: `{j}` / `{o}`" for s, j, o in disagree[:20]]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
