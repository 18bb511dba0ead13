"""benchmarks/offline_data.py, which rebuilds the offline data of the committed results from its sources: its
conversions on small fixtures (the whole sources reproduce the four files' sha256, docs/offline.md)."""

import importlib.util
import json
import os
import random
import subprocess
import sys

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("offline_data", os.path.join(ROOT, "benchmarks", "offline_data.py"))
offline_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(offline_data)


def test_imdb_reviews_are_cleaned_shuffled_and_split(monkeypatch):
    monkeypatch.setattr(offline_data, "IMDB_TRAIN_ROWS", 3)
    reviews = ['A \\"great\\" film.<br /><br />Really.', "  too   long\n\tand slow ", "ok", "bad<br />", "fine"]
    train, test = offline_data.imdb_rows(["1_9", "2_2", "3_8", "4_1", "5_7"], [1, 0, 1, 0, 1], reviews)
    expected = [{"id": "1_9", "text": 'A "great" film. Really.', "label": 1},
                {"id": "2_2", "text": "too long and slow", "label": 0}, {"id": "3_8", "text": "ok", "label": 1},
                {"id": "4_1", "text": "bad", "label": 0}, {"id": "5_7", "text": "fine", "label": 1}]
    random.Random(0).shuffle(expected)  # (the file order, shuffled with seed 0: the first 3 are train)
    assert train == expected[:3] and test == expected[3:]


def test_commongen_rows_come_from_the_parallel_files_and_the_dev_sets():
    train = offline_data.commongen_train_rows("dog ball run\nsea town\n", "A dog runs for a ball. \nold town by the sea\n")
    assert train == [{"concepts": ["dog", "ball", "run"], "target": "A dog runs for a ball."},
                     {"concepts": ["sea", "town"], "target": "old town by the sea"}]
    dev = json.dumps({"concept_set": "field_N#look_V#stand_V", "scene": [" I stood in the field. ", "b"],
                      "reason": ["dropped"]}) + "\n"
    assert offline_data.commongen_validation_rows(dev) == [
        {"concepts": ["field", "look", "stand"], "references": ["I stood in the field.", "b"]}]


def test_the_files_keep_non_ascii_text_as_is(tmp_path):
    offline_data.write_jsonl(str(tmp_path / "x" / "a.jsonl"), [{"text": "café"}])
    assert (tmp_path / "x" / "a.jsonl").read_bytes() == '{"text": "café"}\n'.encode()


@pytest.mark.slow  # two real processes
def test_a_rebuild_from_a_sources_folder_writes_the_files_and_checks_them(tmp_path):
    sources = tmp_path / "sources"
    sources.mkdir()
    (sources / "commongen.train.src_alpha.txt").write_text("dog ball\n")
    (sources / "commongen.train.tgt.txt").write_text("a dog and a ball\n")
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "offline_data.py"), "--sources", str(sources),
               "--out", str(tmp_path / "data"), "--only", "commongen"]
    missing = subprocess.run(command, capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stderr.strip() == (
        f"error: --sources {sources}: no commongen.dev.jsonl (its address: {offline_data.SOURCES['commongen.dev.jsonl']})")
    (sources / "commongen.dev.jsonl").write_text(json.dumps({"concept_set": "dog_N#ball_N", "scene": ["x"]}) + "\n")
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "commongen" / "train.jsonl").read_text() == \
        '{"concepts": ["dog", "ball"], "target": "a dog and a ball"}\n'
    assert "commongen/validation.jsonl: DIFFERS from the results' file" in result.stdout  # (a fixture, not v1.0)
