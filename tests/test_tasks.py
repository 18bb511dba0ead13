"""Task data: splits, prompt formatting and truncation as docs/tasks.md's table says."""

import os

import pytest

from common import tasks
from conftest import write_jsonl

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


def test_imdb_prompt_is_the_first_half_of_the_words_left_truncated(assets):
    tokenizer = assets["tokenizer"]
    words = [f"w{i}" for i in range(10)]
    [short] = tasks.make_examples("imdb", [{"text": " ".join(words)}], tokenizer, max_prompt_length=64)
    assert short["prompt"] == "w0 w1 w2 w3 w4"
    assert short["references"] == ["w5 w6 w7 w8 w9"]
    long_text = " ".join(["the movie"] * 100 + ["good"] * 200)
    [long] = tasks.make_examples("imdb", [{"text": long_text}], tokenizer, max_prompt_length=8)
    assert len(long["prompt_ids"]) == 8
    full_ids = tokenizer(" ".join(["the movie"] * 100)).input_ids
    assert long["prompt_ids"] == full_ids[-8:]  # the *last* tokens are kept


def test_imdb_train_validation_split_is_80_20_fixed_and_disjoint(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"review {i}", "label": i % 2} for i in range(50)])
    train = tasks.load_rows("imdb", "train", dataset_path=str(tmp_path))
    validation = tasks.load_rows("imdb", "validation", dataset_path=str(tmp_path))
    assert (len(train), len(validation)) == (40, 10)
    assert {r["text"] for r in train}.isdisjoint(r["text"] for r in validation)
    assert validation == tasks.load_rows("imdb", "validation", dataset_path=str(tmp_path))


def test_commongen_prompt_and_references_grouped_per_concept_set(assets):
    rows = [{"concepts": ["dog", "ball", "park"], "target": "A dog plays with a ball in the park."},
            {"concepts": ["dog", "ball", "park"], "target": "The dog fetches the ball."},
            {"concepts": ["cat", "tree"], "target": "A cat in a tree."}]
    examples = tasks.make_examples("commongen", rows, assets["tokenizer"], max_prompt_length=64)
    assert [e["prompt"] for e in examples] == ["generate a sentence with: dog ball park.",
                                               "generate a sentence with: cat tree."]
    assert examples[0]["references"] == ["A dog plays with a ball in the park.", "The dog fetches the ball."]
    grouped = [{"concepts": ["cat", "tree"], "references": ["A cat in a tree.", "Cats climb trees."]}]
    [example] = tasks.make_examples("commongen", grouped, assets["tokenizer"], max_prompt_length=64)
    assert example["references"] == ["A cat in a tree.", "Cats climb trees."]


def test_tldr_prompt_cuts_the_post_and_keeps_the_tldr_marker(assets):
    tokenizer = assets["tokenizer"]
    post = " ".join(["the movie was really very boring"] * 40)
    prompt = f"SUBREDDIT: r/test\nTITLE: a title\nPOST: {post}\nTL;DR: "
    [example] = tasks.make_examples("tldr", [{"prompt": prompt, "label": "boring"}], tokenizer, max_prompt_length=60)
    assert len(example["prompt_ids"]) <= 60
    assert example["prompt"].startswith("SUBREDDIT: r/test\nTITLE: a title\nPOST: the movie")
    assert example["prompt"].endswith("\nTL;DR: ")
    assert example["references"] == ["boring"]
    [fits] = tasks.make_examples("tldr", [{"prompt": "POST: a dog\nTL;DR: ", "label": "dog"}], tokenizer, 40)
    assert fits["prompt"] == "POST: a dog\nTL;DR: "


def test_task_defaults_fill_only_unset_flags():
    class Args:
        task, learning_rate, max_new_tokens = "tldr", 3e-6, None

    args = tasks.fill_task_defaults(Args())
    assert args.learning_rate == 3e-6 and args.max_new_tokens == 50


def test_a_placeholder_default_is_named_in_one_line(capsys):
    """CommonGen's gpt2 policy and guide run but have learned nothing of the task: an RL run that takes them by
    default says so (sft.py, which starts from gpt2 on purpose, does not); a model that is passed is not named."""
    class Args:
        task, model_name_or_path, guide_model = "commongen", None, None

    tasks.fill_task_defaults(Args())
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith("note: --model-name-or-path and --guide-model default to gpt2, a placeholder")
    assert "python sft.py --task commongen --save-model" in line
    passed = Args()
    passed.model_name_or_path = "models/commongen-sl"
    tasks.fill_task_defaults(passed)
    assert "note: --guide-model defaults to gpt2" in capsys.readouterr().out
    passed.guide_model = "models/commongen-sl"
    tasks.fill_task_defaults(passed)
    tasks.fill_task_defaults(Args(), warn_placeholders=False)
    imdb = Args()
    imdb.task = "imdb"
    tasks.fill_task_defaults(imdb)
    assert capsys.readouterr().out == ""


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data not present")
@pytest.mark.slow
def test_the_shared_real_data_loads_in_every_task(assets):
    tokenizer = assets["tokenizer"]
    for task, path, split, n in [("imdb", "imdb", "train", 3200), ("imdb", "imdb", "validation", 800),
                                 ("imdb", "imdb", "test", 1000), ("commongen", "commongen", "validation", 993),
                                 ("tldr", "tldr/valid.jsonl", "train", 100)]:
        rows = tasks.load_rows(task, split, dataset_path=os.path.join(SHARED_DATA, path))
        examples = tasks.make_examples(task, rows, tokenizer, max_prompt_length=64)
        assert len(examples) == n, (task, split)
    assert all(e["prompt"].endswith("TL;DR: ") for e in examples)


def test_write_jsonl_fails_with_one_line_where_a_file_is_in_the_way(tmp_path):
    """The generations folder of a run where a file of the user's is: one line, and the file is untouched."""
    (tmp_path / "generations").write_text("the user's")
    with pytest.raises(SystemExit) as error:
        tasks.write_jsonl(str(tmp_path / "generations" / "iteration_0001.jsonl"), [{"a": 1}])
    assert str(error.value.code).startswith(f"error: cannot write {tmp_path}/generations/iteration_0001.jsonl: ")
    assert "\n" not in str(error.value.code) and (tmp_path / "generations").read_text() == "the user's"
