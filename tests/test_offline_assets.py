"""benchmarks/offline_assets.py: the sentiment classifier it builds is the same bytes from the same data and
seed (the committed IMDB results name the classifier by its build, so a rebuild must reproduce it), and its
vocabulary is the training reviews' most frequent words, ties in alphabetical order."""

import importlib.util
import json
import os
import random

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("offline_assets", os.path.join(ROOT, "benchmarks", "offline_assets.py"))
offline_assets = importlib.util.module_from_spec(spec)
spec.loader.exec_module(offline_assets)

POSITIVE, NEGATIVE = ["great", "wonderful", "superb", "loved"], ["awful", "boring", "terrible", "hated"]
FILLER = "the a film movie plot actor scene story it was and of this one".split()


def write_imdb(folder, seed=0):
    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, "imdb"))
    for split, count in (("train", 320), ("test", 64)):
        with open(os.path.join(folder, "imdb", f"{split}.jsonl"), "w") as f:
            for i in range(count):
                label = i % 2
                words = rng.choices(FILLER, k=12) + rng.choices(POSITIVE if label else NEGATIVE, k=3)
                rng.shuffle(words)
                f.write(json.dumps({"text": " ".join(words).capitalize() + ".", "label": label}) + "\n")


def build(tmp_path, name, data):
    out = tmp_path / name
    offline_assets.main(offline_assets.Args(out=str(out), data_dir=str(data), only=["sentiment-imdb"],
                                            classifier_epochs=3, classifier_vocab_size=24))
    return out / "sentiment-imdb"


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("offline_assets")
    write_imdb(tmp_path / "data")
    return tmp_path / "data", build(tmp_path, "first", tmp_path / "data"), build(tmp_path, "second", tmp_path / "data")


@pytest.mark.slow
def test_the_same_data_and_seed_build_the_same_classifier(two_builds):
    _, first, second = two_builds
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert json.loads((first / "BUILD.json").read_text())["test_accuracy"] >= 0.7


def test_the_vocabulary_is_the_most_frequent_words_ties_alphabetical(two_builds):
    data, first, _ = two_builds
    with open(first / "tokenizer.json") as f:
        vocab = json.load(f)["model"]["vocab"]
    words = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    assert words[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    counts = {}
    with open(data / "imdb" / "train.jsonl") as f:
        for line in f:
            for word in json.loads(line)["text"].lower().replace(".", " .").split():
                counts[word] = counts.get(word, 0) + 1
    expected = sorted(counts, key=lambda word: (-counts[word], word))[: 24 - 5]
    assert words[5:] == expected


def test_an_unknown_model_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown model"):
        offline_assets.main(offline_assets.Args(out=str(tmp_path), only=["gpt5"]))
