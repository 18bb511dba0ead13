"""docs/forking.md's recipes: each one's patches applied to a copy of the repository, its command run there for
one iteration on the tiny models (sizes and models the tests' own; the recipe's other flags kept, the task recipe's
data the sample rows it ships in data/keyword/), and its effect checked: the reward's penalty, the keyword task's
reward, the algorithm's term changing the update."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import ROOT, set_flags, task_args

PAGE = os.path.join(ROOT, "docs", "forking.md")
SIZES = ("--total-episodes", 4, "--batch-size", 4, "--num-minibatches", 2, "--eval-every", 1, "--save-every", 0)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # (one thread: two runs are bit for bit alike)


def recipes():
    """{title: (patches, shell lines)} of every '## ' section of the page (continuation lines joined)."""
    sections = re.split(r"^## ", open(PAGE).read(), flags=re.M)[1:]
    found = {}
    for section in sections:
        title = section.splitlines()[0].strip()
        patches = re.findall(r"```diff\n(.*?)```", section, re.S)
        lines = [line.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)
                 for line in re.sub(r"\\\n\s*", " ", block).splitlines() if line.split("#")[0].strip()]
        found[title] = (patches, lines)
    return found


def test_the_page_has_its_three_recipes():
    assert list(recipes()) == ["A reward", "A task", "An algorithm"]
    assert all(patches and lines for patches, lines in recipes().values())


def test_the_keyword_tasks_sample_rows_are_the_recipes_schema():
    """data/keyword/ (the task recipe's --dataset-path): three splits of {"prompt", "keywords"} rows, a batch of the
    recipe's command in the training split."""
    [command] = [shlex.split(line) for line in recipes()["A task"][1] if line.startswith("python ")]
    folder = os.path.join(ROOT, command[command.index("--dataset-path") + 1])
    rows = {split: [json.loads(line) for line in open(os.path.join(folder, f"{split}.jsonl"))]
            for split in ("train", "validation", "test")}
    assert all(rows.values()) and len(rows["train"]) >= int(command[command.index("--batch-size") + 1])
    for row in sum(rows.values(), []):
        assert set(row) == {"prompt", "keywords"} and row["prompt"] and row["keywords"]


def run(script, args, folder):
    result = subprocess.run([sys.executable, script, *args], cwd=folder, capture_output=True, text=True,
                            timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def python_value(code, folder):
    """What `code` (run in `folder`, the repository or its patched copy) prints, as a Python value."""
    return json.loads(subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True,
                                     check=True, env=ENV).stdout)


@pytest.mark.parametrize("title", ["A reward", "A task", "An algorithm"])
@pytest.mark.slow
def test_a_recipe_applies_runs_an_iteration_and_does_what_it_says(assets, tmp_path, title):
    patches, lines = recipes()[title]
    copy = tmp_path / "repository"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".*", "__pycache__", "runs", "offline", "models",
                                                              "checkpoints", "results", "venv", "env"))
    for line in [line for line in lines if line.startswith("cp ")]:  # (a copy of ppo.py, before its patch)
        subprocess.run(shlex.split(line), cwd=copy, check=True)
    for patch in patches:
        applied = subprocess.run(["patch", "-p1", "--no-backup-if-mismatch"], input=patch, cwd=copy, text=True,
                                 capture_output=True)
        assert applied.returncode == 0, applied.stdout + applied.stderr
    [command] = [shlex.split(line) for line in lines if line.startswith("python ")]
    script, flags = command[1], command[2:]
    pairs = [(flag, value) for flag, value in zip(flags[::2], flags[1::2])]
    args = task_args(assets, "imdb", script if script in ("ppo.py", "ppo_plus_plus.py") else "ppo.py")
    for flag, value in pairs:  # the recipe's flags, its models the tiny ones
        args = set_flags(args, flag, assets["policy"] if flag in ("--model-name-or-path", "--guide-model") else value)
    args = set_flags(args, *SIZES)  # the tests' sizes: one iteration
    if title == "An algorithm":  # the trained policy, to set beside a run without the new term
        args = args + ["--save-model", "--save-path", "models/with-term"]
    result = run(script, args, copy)
    assert "iteration 1/1 " in result.stdout and "eval @ iteration 1: score " in result.stdout, result.stdout[-2000:]

    if title == "A reward":  # the patched reward is the recipe's: 40 words lose 0.01 for each of the 10 past 30
        score = ("import json; from common import rewards; f = rewards.make_reward_fn('imdb', {!r}, 'cpu'); "
                 "print(json.dumps(f(['a film'], [' word' * 40], [['x']]).item()))").format(assets["classifier"])
        before, after = (python_value(score, folder) for folder in (ROOT, copy))
        assert after == pytest.approx(before - 0.1, abs=1e-6)
    if title == "A task":  # the keyword reward: the share of the row's keywords the continuation names
        score = ("import json; from common import rewards; f = rewards.make_reward_fn('keyword', None, 'cpu'); "
                 "print(json.dumps(f(['a story:'] * 4, [' a Dog chased the ball', ' a dog slept', ' a cat slept', ''],"
                 " [['dog', 'ball']] * 4).tolist()))")
        assert python_value(score, copy) == pytest.approx([1.0, 0.5, 0.0, 0.0])
    if title == "An algorithm":  # the new term changes the update: the same run without it ends elsewhere
        [field] = re.findall(r"^\+    (\w+): float", "".join(patches), re.M)  # the recipe's coefficient
        run(script, set_flags(args, "--" + field.replace("_", "-"), 0, "--save-path", "models/without-term",
                              "--eval-every", 0), copy)
        with_term, without = (load_file(copy / "models" / name / "model.safetensors")
                              for name in ("with-term", "without-term"))
        assert with_term.keys() == without.keys()
        changed = [name for name in with_term if not (with_term[name] == without[name]).all()]
        assert changed, "the recipe's term left every weight of the update as it was without it"
