"""docs/forking.md's recipes: each one's patches applied to a copy of the repository, and its command run there for
one iteration on the tiny models (sizes, models and data the tests' own; the recipe's flags kept)."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, set_flags, task_args

PAGE = os.path.join(ROOT, "docs", "forking.md")


def recipes():
    """{title: (patches, shell lines)} of every '## ' section of the page."""
    sections = re.split(r"^## ", open(PAGE).read(), flags=re.M)[1:]
    found = {}
    for section in sections:
        title = section.splitlines()[0].strip()
        patches = re.findall(r"```diff\n(.*?)```", section, re.S)
        lines = [line.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)
                 for line in block.splitlines() if line.split("#")[0].strip()]
        found[title] = (patches, lines)
    return found


def test_the_page_has_its_three_recipes():
    assert list(recipes()) == ["A reward", "A task", "An algorithm"]
    assert all(patches and lines for patches, lines in recipes().values())


@pytest.mark.parametrize("title", ["A reward", "A task", "An algorithm"])
def test_a_recipe_applies_and_runs_an_iteration(assets, tmp_path, title):
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
    keyword_data = copy / "data" / "keyword"  # the task recipe's data: its own schema, three splits
    keyword_data.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        with open(keyword_data / f"{split}.jsonl", "w") as f:
            for i in range(8):
                f.write(json.dumps({"prompt": f"a story about a dog number {i}:", "keywords": ["dog", "ball"]}) + "\n")
    [command] = [shlex.split(line) for line in lines if line.startswith("python ")]
    script, flags = command[1], command[2:]
    pairs = [(flag, value) for flag, value in zip(flags[::2], flags[1::2])]
    args = set_flags(task_args(assets, "imdb", script if script in ("ppo.py", "ppo_plus_plus.py") else "ppo.py"),
                     "--total-episodes", 4, "--eval-every", 1, "--save-every", 0)
    for flag, value in pairs:  # the recipe's flags, its models the tiny ones
        args = set_flags(args, flag, assets["policy"] if flag in ("--model-name-or-path", "--guide-model") else value)
    result = subprocess.run([sys.executable, script, *args], cwd=copy, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "iteration 1/1 " in result.stdout and "eval @ iteration 1: score " in result.stdout, result.stdout[-2000:]
    if title == "A reward":  # the patched reward is the recipe's: 40 words lose 0.01 for each of the 10 past 30
        score = ("from common import rewards; f = rewards.make_reward_fn('imdb', {!r}, 'cpu'); "
                 "print(f(['a film'], [' word' * 40], [['x']]).item())").format(assets["classifier"])
        before, after = (float(subprocess.run([sys.executable, "-c", score], cwd=folder, capture_output=True,
                                              text=True, check=True).stdout) for folder in (ROOT, copy))
        assert after == pytest.approx(before - 0.1, abs=1e-6)
