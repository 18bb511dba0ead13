"""Rebuild the offline data the committed IMDB and CommonGen results used (docs/offline.md), byte for byte, from
its public sources at pinned commits, and check each file's sha256:

    imdb/train.jsonl, imdb/test.jsonl               a 5,000-review sample of the Stanford Large Movie Review
                                                    Dataset, data/movie_review.RData of GitHub dselivanov/text2vec
    commongen/train.jsonl, commongen/validation.jsonl  CommonGen v1.0, GitHub INK-USC/CommonGen

    python benchmarks/offline_data.py                         # downloads the sources (GitHub), writes offline/data
    python benchmarks/offline_data.py --sources DIR --out DIR  # the sources from a folder (the file names below)

IMDB needs the PyPI package `rdata` (pip install rdata) to read the R data file.
"""

import argparse
import hashlib
import json
import os
import random
import re
import urllib.request

TEXT2VEC = "https://raw.githubusercontent.com/dselivanov/text2vec/0b31bdd81f37baaf0bd2c8113cbaa578450c8730/"
COMMONGEN = "https://raw.githubusercontent.com/INK-USC/CommonGen/f8172da93e20a7fcbb71a7cdca2b81fa2e385a73/"
SOURCES = {  # local name: its address
    "movie_review.RData": TEXT2VEC + "data/movie_review.RData",
    "commongen.train.src_alpha.txt": COMMONGEN + "dataset/final_data/commongen/commongen.train.src_alpha.txt",
    "commongen.train.tgt.txt": COMMONGEN + "dataset/final_data/commongen/commongen.train.tgt.txt",
    "commongen.dev.jsonl": COMMONGEN + "dataset/final_data/commongen.dev.jsonl",
}
SHA256 = {
    "imdb/train.jsonl": "2c128a776bad28a5a16919727c9d39c795681089e4b37719f83c1ee44ac87fd5",
    "imdb/test.jsonl": "dd703d51f13ee8d20a886fb624815f1935c56e22823f6e87afa2709447999256",
    "commongen/train.jsonl": "d375b4f06bc6595ca4948ed6003659a0976319ddad5b5016f18584f344c97fea",
    "commongen/validation.jsonl": "ede96eabe0e51363b2e44dcaadd4ddf8b463f06977255f2cb0b621b8f4e229b4",
}
IMDB_TRAIN_ROWS, IMDB_SHUFFLE_SEED = 4000, 0


def imdb_rows(ids, sentiments, reviews):
    """The reviews as rows, cleaned (\\" -> ", <br /> -> a space, whitespace runs -> one space, stripped), shuffled
    with random.Random(0): (train, test), the first 4,000 and the rest."""
    rows = [{"id": str(i), "text": re.sub(r"\s+", " ", review.replace('\\"', '"').replace("<br />", " ")).strip(),
             "label": int(sentiment)} for i, sentiment, review in zip(ids, sentiments, reviews)]
    random.Random(IMDB_SHUFFLE_SEED).shuffle(rows)
    return rows[:IMDB_TRAIN_ROWS], rows[IMDB_TRAIN_ROWS:]


def commongen_train_rows(src_alpha, tgt):
    """One row per (concepts, sentence) line pair of the formatted parallel files."""
    concepts, targets = src_alpha.split("\n"), tgt.split("\n")
    return [{"concepts": c.split(), "target": t.strip()} for c, t in zip(concepts, targets) if c.strip()]


def commongen_validation_rows(dev_jsonl):
    """One row per concept set: its concepts without part-of-speech suffixes (field_N#look_V -> field, look), every
    sentence written for it."""
    rows = [json.loads(line) for line in dev_jsonl.splitlines() if line.strip()]
    return [{"concepts": [c.rsplit("_", 1)[0] for c in row["concept_set"].split("#")],
             "references": [s.strip() for s in row["scene"]]} for row in rows]


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def source(name, sources_dir):
    """A source file's bytes: from --sources, else downloaded."""
    if sources_dir:
        path = os.path.join(sources_dir, name)
        if not os.path.isfile(path):
            raise SystemExit(f"error: --sources {sources_dir}: no {name} (its address: {SOURCES[name]})")
        return open(path, "rb").read()
    print(f"downloading {SOURCES[name]}", flush=True)
    try:
        with urllib.request.urlopen(SOURCES[name], timeout=60) as response:
            return response.read()
    except OSError as e:
        raise SystemExit(f"error: cannot download {SOURCES[name]} ({e}); download it by hand and pass its folder "
                         "with --sources") from None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="offline/data", help="the folder written: imdb/ and commongen/ in it")
    parser.add_argument("--sources", help="a folder holding the source files (default: download them)")
    parser.add_argument("--only", choices=["imdb", "commongen"], help="one task's files (default: both)")
    args = parser.parse_args()
    if args.only != "commongen":
        try:
            import rdata
        except ImportError:
            raise SystemExit("error: IMDB's source is an R data file: pip install rdata (or --only commongen)") from None
        import io

        frame = rdata.read_rda(io.BytesIO(source("movie_review.RData", args.sources)))["movie_review"]
        train, test = imdb_rows(frame["id"], frame["sentiment"], frame["review"])
        write_jsonl(os.path.join(args.out, "imdb", "train.jsonl"), train)
        write_jsonl(os.path.join(args.out, "imdb", "test.jsonl"), test)
    if args.only != "imdb":
        text = {name: source(name, args.sources).decode("utf-8") for name in SOURCES if name.startswith("commongen")}
        write_jsonl(os.path.join(args.out, "commongen", "train.jsonl"),
                    commongen_train_rows(text["commongen.train.src_alpha.txt"], text["commongen.train.tgt.txt"]))
        write_jsonl(os.path.join(args.out, "commongen", "validation.jsonl"),
                    commongen_validation_rows(text["commongen.dev.jsonl"]))
    for name, expected in SHA256.items():
        path = os.path.join(args.out, name)
        if os.path.isfile(path) and (args.only is None or name.startswith(args.only)):
            digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
            verdict = "the file the committed results used" if digest == expected else "DIFFERS from the results' file"
            print(f"{path}: {verdict} (sha256 {digest[:12]})")


if __name__ == "__main__":
    main()
