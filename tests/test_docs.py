"""Every documented command runs as documented, and every file, flag, function and metric the docs name exists.

The commands are collected from README.md, docs/*.md and the module docstrings of the scripts and benchmarks:
whole `python ...` / `torchrun ...` lines in code blocks (continuation lines joined) and in backticks. Each runs
in this process through its script's argument parsing and every check that comes before a model loads
(`from_pretrained` is patched to stop there; `torchrun --nproc_per_node N` sets the process count the checks
see), so a recipe whose sizes do not divide, or a flag that does not exist, fails here."""

import argparse
import ast
import glob
import os
import re
import shlex
from collections import Counter

import pytest
import torch
import transformers
import tyro

from common import checkpoint, distributed, tasks
from conftest import ROOT, run_script_in_process

DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
SCRIPTS = ["ppo.py", "ppo_plus_plus.py", "aggrevated.py", "d2lols.py", "sft.py"]
PYTHON_FILES = SCRIPTS + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "benchmarks", "*.py")))
FORKING = os.path.join("docs", "forking.md")  # recipes that change the code: their flags are their patches'
# commands that are not a script's: the test command (CI runs it, .ci/run checks it is the README's)
NOT_SCRIPTS = {("-m", "pytest")}


def logical_lines(text):
    """Lines with their backslash continuations joined."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def commands_in(line):
    """The python / torchrun commands on one shell line (after `&&` or `;`, without env assignments)."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return []
    found, current = [], []
    for word in words + [";"]:
        if word in ("&&", ";", "||", "|"):
            while current and (re.fullmatch(r"[A-Z_]+=\S*", current[0]) or current[0] == "("):
                current = current[1:]
            if current and current[0] in ("python", "python3", "torchrun"):
                found.append(current)
            current = []
        else:
            current.append(word.lstrip("(") if not current else word)
    return found


def documented_commands():
    """[(where, argv)] of every command in the docs and the scripts' docstrings."""
    commands = []
    for path in DOCS:
        text = open(path).read()
        where = os.path.relpath(path, ROOT)
        if where == FORKING:
            continue  # (its commands run on a patched copy of the repository: tests/test_forking.py)
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
            for line in logical_lines(block):
                commands += [(where, argv) for argv in commands_in(line)]
        outside = re.sub(r"```.*?```", "", text, flags=re.S)
        for inline in re.findall(r"`((?:python|torchrun) [^`]+)`", outside):
            commands += [(where, argv) for argv in commands_in(inline)]
    for path in PYTHON_FILES:
        docstring = ast.get_docstring(ast.parse(open(os.path.join(ROOT, path)).read())) or ""
        for line in logical_lines(docstring):
            if line.strip().startswith(("python ", "torchrun ")):
                commands += [(path, argv) for argv in commands_in(line.strip())]
    return commands


def split_command(argv):
    """(script, its arguments, the number of processes) of a python or torchrun command."""
    if argv[0] == "torchrun":
        processes, i = 1, 1
        while not argv[i].endswith(".py"):
            if argv[i].startswith("--nproc_per_node") or argv[i].startswith("--nproc-per-node"):
                processes *= int(argv[i].split("=")[1] if "=" in argv[i] else argv[i + 1])
            elif argv[i] == "--nnodes":
                processes *= int(argv[i + 1])
            i += 1
        return argv[i], argv[i + 1 :], processes
    return argv[1], argv[2:], 1


COMMANDS = documented_commands()


SKIPPED_FOLDERS = {"__pycache__", "runs", "models", "wandb", "offline", "checkpoints", "node_modules", "site-packages"}


def repository_files(root=ROOT):
    """The project's own files, read from the disk (a git checkout or an unpacked archive alike): not a hidden
    folder (.git, .venv), a virtual environment (a folder holding pyvenv.cfg) or what the runs write."""
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in SKIPPED_FOLDERS
                         and not os.path.isfile(os.path.join(folder, d, "pyvenv.cfg"))]
        files += [os.path.join(folder, name) for name in names]
    return files


def test_the_docs_tests_read_the_projects_files_only(tmp_path):
    """A newcomer's `python -m venv .venv` (or venv/, env/) in the checkout holds .py files that are not UTF-8: the
    docs tests once parsed them and failed. Without git (an unpacked archive) the files are found all the same."""
    for venv in (".venv", "venv", "myenv"):
        (tmp_path / venv / "lib").mkdir(parents=True)
        (tmp_path / venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
        (tmp_path / venv / "lib" / "latin1.py").write_bytes(b"# caf\xe9\n")
    for written in ("runs", "checkpoints", "models", "__pycache__"):
        (tmp_path / written).mkdir()
        (tmp_path / written / "x.py").write_text("")
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "tasks.py").write_text("")
    (tmp_path / "ppo.py").write_text("")
    assert sorted(os.path.relpath(p, tmp_path) for p in repository_files(tmp_path)) == ["common/tasks.py", "ppo.py"]


def first_script(command):
    """The first `X.py` of a python / torchrun command's words (None for `python -m ...`, `python -c ...`)."""
    words = command.split()
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # (env assignments)
        words = words[1:]
    if not words or words[0].lstrip("(") not in ("python", "python3", "torchrun"):
        return None
    return next((w for w in words[1:] if w.endswith(".py")), None) if words[1:2] not in (["-m"], ["-c"]) else None


def test_the_collector_finds_every_documented_command():
    """A tripwire for the collector, per command (not their number, which a page's edit changes). Read apart from it,
    line by line: every command of a page's shell blocks, every inline `python ...`, every command line of a
    docstring must be one the tests run, from the same file for the same script, as many times as it appears."""
    found = Counter((where, split_command(argv)[0]) for where, argv in COMMANDS if tuple(argv[1:3]) not in NOT_SCRIPTS)
    expected = Counter()
    for path in DOCS + [os.path.join(ROOT, p) for p in PYTHON_FILES]:
        where = os.path.relpath(path, ROOT)
        if where == FORKING:
            continue
        text = open(path).read()
        if path.endswith(".py"):
            lines = (ast.get_docstring(ast.parse(text)) or "").splitlines()
            commands = [line.strip() for line in lines if line.strip().startswith(("python ", "torchrun "))]
        else:
            commands, fence, carried = [], None, ""
            for line in text.splitlines():
                if fence in ("", "bash", "sh") and line.rstrip().endswith("\\"):  # (continued on the next line)
                    carried += line.rstrip()[:-1] + " "
                    continue
                line, carried = carried + line, ""
                if line.strip().startswith("```"):
                    fence = None if fence is not None else line.strip()[3:]
                elif fence in ("", "bash", "sh"):
                    commands += re.split(r"&&|;|\|\|", re.sub(r"(^|\s)#.*", "", line))
                elif fence is None:
                    commands += re.findall(r"`((?:python|torchrun) [^`]+)`", line)
        expected.update((where, script) for script in map(first_script, commands) if script)
    assert not expected - found, expected - found
    scripts = {script for _, script in found}
    assert scripts >= {"ppo.py", "ppo_plus_plus.py", "aggrevated.py", "d2lols.py", "sft.py",
                       "benchmarks/toy_guided.py", "benchmarks/commongen_offline.py"}
    assert ("README.md", ["python", "-m", "pytest", "-q", "tests"]) in COMMANDS  # CI runs the README's
    assert "python -m pytest -q tests" in open(os.path.join(ROOT, ".ci", "run")).read()


class Reached(Exception):
    """The script got past its checks to the point where models load."""


def stop(*args, **kwargs):
    raise Reached


FAKE_ROWS = {"imdb": [{"text": "a fine film", "label": 1}] * 4,
             "commongen": [{"concepts": ["dog", "ball"], "target": "a dog runs for a ball"}] * 4,
             "tldr": [{"prompt": "POST: a post\nTL;DR: ", "label": "a summary"}] * 4}


@pytest.fixture
def until_models_load(monkeypatch, tmp_path):
    """Run a command in-process up to the point where its models would load: the data, the hub, the process
    group and the models are stand-ins; every flag and size check runs as it would."""
    def run(script, args, processes):
        monkeypatch.setattr(distributed, "setup", lambda use_cuda, *timeout: (0, processes, torch.device("cpu")))
        monkeypatch.setattr(tasks, "load_rows", lambda task, split, *a, **k: list(FAKE_ROWS[task]))
        monkeypatch.setattr(tasks, "check_model_path", lambda name, flag: None)  # a folder made by an earlier step
        monkeypatch.setattr(checkpoint, "read_state",  # --resume: its folder is the run's own
                            lambda args, *a, **k: stop(args) if args.resume else None)
        for auto in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM, transformers.AutoModel,
                     transformers.AutoModelForSequenceClassification):
            monkeypatch.setattr(auto, "from_pretrained", stop)
        if script.startswith("benchmarks/"):  # a driver: its argument parsing, then stop
            parse_args, cli = argparse.ArgumentParser.parse_args, tyro.cli
            monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda self, *a, **k: stop(parse_args(self, *a, **k)))
            monkeypatch.setattr(tyro, "cli", lambda *a, **k: stop(cli(*a, **k)))
            monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
        with pytest.raises(Reached):
            run_script_in_process(script, args, tmp_path)

    return run


@pytest.mark.parametrize("where, argv", [c for c in COMMANDS if tuple(c[1][1:3]) not in NOT_SCRIPTS],
                         ids=lambda x: x if isinstance(x, str) else " ".join(x)[:90])
def test_every_documented_command_passes_its_checks(until_models_load, where, argv):
    script, args, processes = split_command(argv)
    path = os.path.realpath(os.path.join(ROOT, script))
    assert path.startswith(ROOT + os.sep), f"{where}: {script} is outside the repository"
    assert os.path.isfile(path), f"{where}: no script {script}"
    if "--help" in args:
        with pytest.raises(SystemExit) as stopped:
            run_script_in_process(script, args, os.getcwd())
        assert stopped.value.code == 0
        return
    until_models_load(script, args, processes)


def test_the_planted_recipe_bug_is_caught(until_models_load):
    """The 8-GPU IMDB recipe with 128 episodes a batch and the default 5,600 episodes: refused by the checks."""
    with pytest.raises(SystemExit, match="5600 is not divisible by 128"):
        until_models_load("ppo_plus_plus.py", ["--task", "imdb", "--bf16", "--batch-size", "128"], 8)


# ---- every file, flag, function and metric the docs name exists


def backticked(text):
    return re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))


def known_flags():
    flags = set()
    for path in PYTHON_FILES + ["common/guide.py", "common/run.py"]:
        source = open(os.path.join(ROOT, path)).read()
        flags |= set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", source))
        for field in re.findall(r"^    (\w+): [\w\[\], .\"'-]+(?: = .*)?$", source, re.M):
            flags |= {"--" + field.replace("_", "-"), "--no-" + field.replace("_", "-")}
    forked = re.findall(r"^\+    (\w+): ", open(os.path.join(ROOT, FORKING)).read(), re.M)  # (a recipe's new flags)
    flags |= {"--" + field.replace("_", "-") for field in forked}
    return flags | {"--nproc_per_node", "--nnodes", "--max-restarts", "--rdzv-backend", "--rdzv-endpoint",
                    "--shutdown-timeout", "--logdir", "--port", "--continuous-batching", "--signal", "--help",
                    "--index-url", "--generation-config", "--gpu-memory-utilization"}  # torchrun's, tensorboard's,
    # servers' (transformers serve's, vLLM's), SLURM's, pip's


def test_every_flag_the_docs_name_exists():
    flags = known_flags()
    unknown = {}
    for path in DOCS:
        text = open(path).read()
        for flag in set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", text)):
            if flag not in flags:
                unknown.setdefault(os.path.relpath(path, ROOT), []).append(flag)
    assert not unknown


def test_every_file_the_docs_name_exists():
    """Link and image targets exist from the page's own folder, as a reader's browser resolves them; backticked
    paths (with a folder) from the repository's root or the page's folder; a bare file name of ours (a script, a
    test) somewhere in the repository. Not checked: what a run writes (runs/, checkpoints/, models/, offline/, a
    driver's *_runs/ folder) and bare names of files a format or a run defines."""
    ours = {os.path.basename(p) for p in repository_files()}
    missing = []
    for path in DOCS:
        text = open(path).read()
        here = os.path.dirname(path)
        links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
        names = [t for t in backticked(text) if re.fullmatch(r"[\w.-]+(/[\w.{}*-]*)*\.(py|md|json|jsonl|png|txt|yaml)|"
                                                              r"[\w.-]+/([\w.-]+/)*", t)]
        for name in links + names:
            if name.startswith(("http://", "https://")) or re.match(r"(runs|checkpoints|models|offline)/", name) \
                    or re.search(r"_runs/|[{*<]", name):
                continue  # a web page, or what a run writes
            if name in links and not os.path.exists(os.path.join(here, name)):
                missing.append((os.path.relpath(path, ROOT), name))
            elif "/" not in name.rstrip("/"):
                if name.endswith(".py") and name not in ours:
                    missing.append((os.path.relpath(path, ROOT), name))
                continue
            if not any(os.path.exists(os.path.join(base, name)) for base in (ROOT, here)):
                missing.append((os.path.relpath(path, ROOT), name))
    assert not missing


def test_every_link_to_a_section_finds_it():
    def slug(heading):
        return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")

    broken = []
    for path in DOCS:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", open(path).read()):
            target_path = os.path.join(os.path.dirname(path), target) if target else path
            headings = re.findall(r"^#+ (.+)$", open(target_path).read(), re.M)
            if anchor not in {slug(h) for h in headings}:
                broken.append((os.path.relpath(path, ROOT), f"{target}#{anchor}"))
    assert not broken


def defined_names():
    names = set()
    for path in [p for p in repository_files() if p.endswith(".py")]:
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                    names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        names.add(os.path.splitext(os.path.basename(path))[0])
    return names


# names the docs use that are not code of ours nor of the libraries below: notation, tril's and SLURM's words
OTHERS = {"pi_ref", "pi_g", "None", "__main__", "KillWait", "min_length", "quantize_model", "lora_dropout", "vf_coef",
          "state.json", "finish_reason", "max_tokens", "min_tokens", "top_p", "top_k", "OPENAI_API_KEY",
          "LOCAL_RANK", "HF_HUB_OFFLINE", "model_max_length", "logits_to_keep", "output_logits", "weights_only",
          "require_backward_grad_sync", "disable_adapter", "merge_and_unload", "save_pretrained", "from_pretrained",
          "PolicyAndValueWrapper", "PPOTrainer", "common_gen",  # (sfd's, TRL's, the hub's CommonGen)
          "repetition_penalty", "prompt_token_ids", "split_special_tokens"}  # (vLLM's fields, transformers')
LIBRARIES = ("torch", "torch.amp", "torch.distributed", "transformers", "random", "gc", "safetensors.torch")
OUR_MODULES = ("common.tasks", "common.rewards", "common.metrics", "common.guide", "common.text", "common.checkpoint",
               "common.distributed", "common.memory", "common.run", "common.stopping", "common.guide_client")


def resolves(token, names):
    """A name of ours (defined in the repository), an attribute of our modules, or of a library we use."""
    import importlib

    first, *rest = token.split(".")
    for module in OUR_MODULES + LIBRARIES:
        if module.split(".")[-1] == first or (module in LIBRARIES and not rest):
            obj = importlib.import_module(module)
            try:
                for part in rest if module.split(".")[-1] == first else [first]:
                    obj = getattr(obj, part)
                return True
            except AttributeError:
                continue
    if rest and first in names:  # an attribute of one of our variables (`rng.randint`): the variable is ours
        return True
    return not rest and first in names


def test_every_function_the_docs_name_exists():
    names = defined_names()
    unknown = []
    for path in DOCS:
        for token in backticked(open(path).read()):
            token = re.sub(r"\(.*\)$", "", token)  # `f()`, `f(x)`
            if not re.fullmatch(r"[A-Za-z_][\w.]*", token) or not ("_" in token or "." in token or
                                                                  re.fullmatch(r"[A-Z]\w*[a-z]\w*", token)):
                continue  # a plain word, a value
            if token in OTHERS or re.search(r"\.(py|md|json|jsonl|png|pt|safetensors|txt|yaml)$", token):
                continue
            if not resolves(token, names):
                unknown.append((os.path.relpath(path, ROOT), token))
    assert not unknown


def logged_tags():
    """The tags the scripts log: their own, and what common/guide.py's guide.stats() (with a server's, from
    common/guide_client.py) and common/diagnostics.py's mixing_logs() return (logged by each guided script)."""
    modules = ["common/guide.py", "common/guide_client.py", "common/diagnostics.py"]
    source = "".join(open(os.path.join(ROOT, s)).read() for s in [*SCRIPTS, *modules])
    return set(re.findall(r"\"((?:objective|policy|loss|val|charts|timing|guide|eval)/\w+)\"", source))


def test_every_metric_the_docs_name_is_logged():
    tags, unknown = logged_tags(), []
    for path in DOCS:
        for token in backticked(open(path).read()):
            match = re.fullmatch(r"(objective|policy|loss|val|charts|timing|guide)/(\{[\w,]+\}|\w+)(\w*)", token)
            if not match:
                continue
            prefix, names, suffix = match.groups()
            for name in names.strip("{}").split(","):
                if f"{prefix}/{name}{suffix}" not in tags:
                    unknown.append((os.path.relpath(path, ROOT), f"{prefix}/{name}{suffix}"))
    assert not unknown


def test_no_doc_or_script_names_a_path_outside_the_repository():
    """What the docs and benchmarks run is the project's own: no ../ path, no /tmp default, no sibling folder."""
    outside = []
    for path in DOCS + [os.path.join(ROOT, p) for p in PYTHON_FILES] + glob.glob(os.path.join(ROOT, "common", "*.py")):
        for number, line in enumerate(open(path), 1):
            relative = [os.path.realpath(os.path.join(os.path.dirname(path), p))
                        for p in re.findall(r"(?<![.\w/])\.\./[\w./-]*", line)]
            if any(not p.startswith(ROOT) for p in relative) or re.search(r"/tmp/|dirname\(ROOT\)|\bshared/", line):
                outside.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()[:100]}")
    assert not outside, "\n".join(outside)


def test_the_documented_commongen_path_runs_end_to_end(assets, tmp_path, capsys):
    """docs/sft.md's two commands, a supervised model and then a guided run from it, run as written (the tiny
    model and data, and tiny sizes, appended): the guided run starts from the saved folder, with no placeholder
    note (tests/test_tasks.py: the note where the default is taken)."""
    sft_command, rl_command = [argv for where, argv in COMMANDS if where == "docs/sft.md" and "commongen" in argv]
    assert sft_command[1] == "sft.py" and rl_command[1] == "ppo_plus_plus.py"
    data = ["--dataset-path", assets["data"]["commongen"], "--max-new-tokens", "6", "--num-eval-prompts", "4"]
    run_script_in_process("sft.py", sft_command[2:] + data + ["--model-name-or-path", assets["policy"],
                                                              "--max-steps", "2", "--batch-size", "4"], tmp_path)
    assert os.path.isfile(tmp_path / "models" / "commongen-sl" / "config.json")
    capsys.readouterr()
    rl = rl_command[2:] + data + ["--total-episodes", "8", "--batch-size", "4", "--num-minibatches", "2",
                                  "--update-epochs", "1", "--eval-every", "1", "--eval-num-beams", "1"]
    namespace = run_script_in_process("ppo_plus_plus.py", rl, tmp_path)
    assert namespace["args"].model_name_or_path == "models/commongen-sl" == namespace["args"].guide_model
    out = capsys.readouterr().out
    assert "note:" not in out and "iteration 2/2" in out
    assert len(glob.glob(str(tmp_path / "runs" / "*" / "generations" / "iteration_0002.jsonl"))) == 1


TABLE_START, TABLE_END = "<!-- the defaults table (tests/test_docs.py checks it against the code) -->", \
    "<!-- end of the defaults table -->"


def defaults_table():
    """The flags a task sets (common/tasks.py's TASK_DEFAULTS, and the guided scripts' mixing and switch), one row
    each, as docs/tasks.md shows them."""
    import aggrevated
    import d2lols
    import ppo_plus_plus

    rows = {f"`--{name.replace('_', '-')}`": [tasks.TASK_DEFAULTS[task].get(name, "–") for task in tasks.TASKS]
            for name in dict.fromkeys(n for task in tasks.TASKS for n in tasks.TASK_DEFAULTS[task])}
    rows["`--beta` (`ppo_plus_plus.py`; 1.0 with `--guide-references`)"] = [ppo_plus_plus.BETA_DEFAULTS[t]
                                                                            for t in tasks.TASKS]
    rows["`--beta` (`aggrevated.py`)"] = [aggrevated.BETA_DEFAULTS[t] for t in tasks.TASKS]
    rows["`--beta` (`d2lols.py`)"] = [d2lols.BETA_DEFAULTS[t] for t in tasks.TASKS]
    rows["`--tau` (`d2lols.py`)"] = [d2lols.TAU_DEFAULTS[t] for t in tasks.TASKS]
    lines = ["| flag | " + " | ".join(tasks.TASKS) + " |", "|-|" + "-|" * len(tasks.TASKS)]
    lines += [f"| {flag} | " + " | ".join(str(v) for v in values) + " |"
              for flag, values in rows.items()]
    return "\n".join(lines)


def test_the_defaults_table_is_the_codes():
    """docs/tasks.md's table of the task defaults is what the code sets (paste the expected table on a change)."""
    text = open(os.path.join(ROOT, "docs", "tasks.md")).read()
    shown = text.partition(TABLE_START)[2].partition(TABLE_END)[0].strip()
    assert shown == defaults_table(), "\n" + defaults_table()


def test_the_licence_and_the_citation_file_agree():
    import yaml

    citation = yaml.safe_load(open(os.path.join(ROOT, "CITATION.cff")))
    assert citation["cff-version"] == "1.2.0" and citation["title"] and citation["authors"]
    assert open(os.path.join(ROOT, "LICENSE")).readline().strip() == f"{citation['license']} License"
    assert {r["journal"] for r in citation["references"]} == {"arXiv preprint arXiv:2306.11816",
                                                              "arXiv preprint arXiv:2404.08495"}


@pytest.mark.parametrize("driver", ["commongen_offline", "imdb_offline", "toy_guided", "guide_http", "cider_agreement",
                                    "trl_comparison", "throughput", "memory_peak"])
def test_every_drivers_out_says_whether_it_is_the_file_or_a_stem(driver):
    """`guide_http.py --out results.md` once wrote results.md.md: a driver's --out is the file it writes, or a stem
    (its help, the argparse help or the tyro field's docstring, says which; a stem drops a trailing .md)."""
    source = open(os.path.join(ROOT, "benchmarks", f"{driver}.py")).read()
    argparse_help = re.search(r'add_argument\("--out",.*?help=((?:"[^"]*"\s*)+)\)', source, re.S)
    field_help = re.search(r'^    out: str = [^\n]*\n    """(.*?)"""', source, re.S | re.M)
    [found] = [m for m in (argparse_help, field_help) if m]
    help_text = " ".join(re.sub(r'"\s*"', "", found.group(1)).split())
    assert any(words in help_text for words in ("the result file written", "to this file", "a stem, the results' "
                                                "path without extension")), help_text
    if "a stem" in help_text:
        assert 'args.out = args.out.removesuffix(".md")' in source
    else:
        assert 'args.out + ".' not in source  # (the file itself)
