"""The paper's CommonGen claim in miniature, offline, on 2 CPU cores: does guidance beat PPO where the policy
must find sentences it rarely writes on its own?

    pip install -r requirements.txt
    python benchmarks/commongen_offline.py --models-dir MODELS --data-dir DATA   # the early-start tables

MODELS holds smollm2-135m/ (SmolLM2-135M-Instruct; default: the hub's), DATA holds commongen/train.jsonl and
validation.jsonl (default: the hub's common_gen). SmolLM2-135M-Instruct is the policy, pi_ref and critic
backbone; the SL model is sft.py on CommonGen train; the reward is CIDEr-D against the concept set's
references (idf from train), as tril.

Three starts. "weak": the zero-shot policy, with the SL model as the guide; rows zero-shot, SL, PPO, PPO++,
AggreVaTeD, D2LOLS and DR-PO (PPO++ with the references as the guide). "sl" (tril's setting): policy and guide
both the SL model; rows PPO, PPO++, DR-PO. "early" (where restarts can act): an early sft.py checkpoint
(--early-steps steps) that writes the sentence directly but clearly below the SL model, which is the guide.
Every method of a start gets the same episodes and optimizer steps, for each seed; --method-seeds gives a
method fewer seeds.

Dev is cut in two: the first 993 - --heldout-sets concept sets are the pilot part (--pilot evaluates there:
sizes were chosen so), the last --heldout-sets the held-out part that the table is scored on. Evaluation is
deterministic, at least 5 new tokens: greedy by default (tril: beam search with 5 beams, --eval-num-beams 5,
several times slower on a CPU).

Writes {out}.md (the tables, the SL curve, a few generations), {out}.json (every run's numbers), {out}.png
(held-out CIDEr-D against episodes; below, the policy's own episodes' training reward by quarter of the run);
every run's compact file (its scalars and last generations) goes to {records-dir}/<run>.json, its log and
TensorBoard events stay in {work-dir}/<run>/. A run whose compact file holds the same command is not run again, so
an interrupted driver continues where it stopped, and every table rebuilds from the committed files.
"""

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import List, Literal, Optional

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import metrics, tasks  # noqa: E402
import run_files  # noqa: E402  (runs side by side, and the compact file of each finished run)
from imdb_offline import mean_spread  # noqa: E402  (mean and stdev over seeds)

HUB_POLICY = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class Args:
    models_dir: Optional[str] = None
    """a folder holding smollm2-135m/ (SmolLM2-135M-Instruct saved offline) (None: the hub's HuggingFaceTB/SmolLM2-135M-Instruct)"""
    data_dir: Optional[str] = None
    """a folder holding commongen/train.jsonl and commongen/validation.jsonl (None: the hub's common_gen)"""
    records_dir: str = os.path.join(ROOT, "benchmarks", "results", "commongen_offline_runs")
    """one compact file a finished run (benchmarks/run_files.py: its command, scalars and last generations),
    committed: a run whose file holds the same command is reused, and the tables rebuild from these files"""
    work_dir: str = os.path.join(ROOT, "benchmarks", "work", "commongen_offline")
    """every run's folder (log, TensorBoard events, every evaluation's generations), the SL models and the data
    parts (not committed)"""
    out: str = os.path.join(ROOT, "benchmarks", "results", "commongen_offline_early")
    """a stem, the results' path without extension: {out}.md (the tables), {out}.json, {out}.png (a trailing .md is
    dropped)"""
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3])
    """one run of every method per seed"""
    method_seeds: List[str] = field(default_factory=lambda: ["aggrevated=1,2", "d2lols=1,2"])
    """METHOD=SEED,SEED: this method runs on these seeds instead of --seeds (e.g. aggrevated=1,2)"""
    starts: List[str] = field(default_factory=lambda: ["early"])
    """weak: the zero-shot policy, the SL model as guide; sl: both the SL model (tril's setting); early: an early
    SL checkpoint (--early-steps), the SL model as guide"""
    weak_methods: List[str] = field(default_factory=lambda: ["ppo", "ppo_plus_plus", "aggrevated", "d2lols", "dr_po"])
    """the rows of the weak start"""
    sl_methods: List[str] = field(default_factory=lambda: ["ppo", "ppo_plus_plus", "dr_po"])
    """the rows of the SL start"""
    early_methods: List[str] = field(default_factory=lambda: ["ppo", "ppo_plus_plus", "dr_po", "aggrevated", "d2lols"])
    """the rows of the early start"""
    early_steps: int = 5
    """sft.py steps of the early start (--sl-batch-size, --sl-learning-rate; the schedule decays over these steps):
    picked on the pilot part (4, 5, 6, 8 steps: CIDEr-D 0.67, 0.77, 0.81, 0.96, direct 92%, 100%, 100%, 100%; the SL
    model 1.08): 5 writes the sentence directly, 0.3 below the SL model"""
    runs_label: str = ""
    """a prefix of this invocation's RL run folders (pilots of other settings keep their own runs)"""
    heldout_sets: int = 300
    """the last this many dev concept sets are held out for the table; no pilot evaluates on them"""
    pilot: bool = False
    """evaluate on the pilot part of dev (the sets before the held-out ones) instead: for choosing the sizes"""
    num_eval_prompts: int = 300
    """concept sets per evaluation (the first ones of the part evaluated)"""
    eval_num_beams: int = 1
    """beams in evaluation (tril: 5, which costs several times greedy's time on a CPU, and every RL run
    evaluates 3 times: greedy here)"""

    # the size every method shares (CommonGen: a few concepts, <= 20 new tokens): episodes spent on optimizer steps
    max_new_tokens: int = 20
    """the horizon H (tril: 20)"""
    batch_size: int = 32
    """episodes per RL iteration"""
    num_iterations: int = 20
    """RL iterations: every method sees batch_size * num_iterations episodes"""
    num_minibatches: int = 4
    """PPO minibatches per epoch (one optimizer step each)"""
    update_epochs: int = 2
    """PPO epochs per batch"""
    learning_rate: float = 2e-5
    """RL learning rate of the policy"""
    critic_learning_rate: float = 3e-4
    """RL learning rate of the critic. This and the next three: the critic pilot's setting D, every method alike
    (commongen_offline_pilots/critic.md: explained variance 0.27, at restarts 0.51, where tril's stayed at 0.06-0.07);
    the weak and SL tables ran tril's (1e-4, clip 0.2, annealed, no warm-up)"""
    clip_coef_value: Optional[float] = None
    """the value clip around the rollout's values (None: off: CIDEr-D runs 0-10, and a value that starts at 0 moves
    at most 0.2 an epoch under tril's 0.2)"""
    critic_anneal_lr: bool = False
    """decay the critic's learning rate to 0, as the policy's (tril); False: the critic keeps its rate"""
    critic_warmup_iterations: int = 2
    """RL iterations that train the critic alone before the policy moves (each D2LOLS phase's critic)"""
    gae_lambda: float = 1.0
    """GAE lambda: 1 = the Monte Carlo return (CIDEr-D comes at the end, and the critic starts knowing nothing)"""
    vf_coef: float = 1.0
    """value-loss coefficient (tril's CommonGen 30 is for its own value head scale; the critic has its own lr here)"""
    target_coef: float = 0.0
    """tril's target regularisation (0.1 there)"""
    kl_coef: float = 0.0
    """KL penalty to pi_ref (tril's CommonGen: 0)"""
    beta: float = 0.8
    """PPO++/AggreVaTeD/D2LOLS mixing: the probability that the guide rolls in (tril's CommonGen: 0.8)"""
    dr_po_beta: Optional[float] = None
    """DR-PO's mixing (None: ppo_plus_plus.py's with --guide-references, 1.0 as DR-PO's authors; the tables made
    before it existed ran DR-PO at --beta 0.8)"""
    norm_per_group: bool = True
    """PPO++, DR-PO and D2LOLS: whiten the mixed and the unmixed episodes' advantages apart (the scripts' default)"""
    advantage_estimator: Literal["gae", "rloo"] = "gae"
    """PPO's, PPO++'s and DR-PO's estimator (AggreVaTeD and D2LOLS: gae, their own): gae, a critic (tril); rloo, the
    mean reward of a prompt's other samples (no critic); with --samples-per-prompt, the scripts' flags"""
    samples_per_prompt: int = 1
    """PPO's, PPO++'s and DR-PO's samples of each prompt in a batch (--batch-size counts episodes)"""
    roll_in_advantage: Literal["one-step", "gae"] = "one-step"
    """AggreVaTeD and D2LOLS: the roll-in tokens' advantage (the scripts' default; gae: tril's)"""
    tau: Optional[int] = None
    """D2LOLS switch iteration (None: 20% of the iterations, rounded, tril's CommonGen share: 100 of 500; the weak
    table: 3 of 8; the early: 4 of 20)"""
    eval_every: int = 10
    """held-out evaluation every this many RL iterations (and at the start and the end)"""

    # the SL model (the guide of the weak start, the start of tril's)
    sl_steps: int = 100
    """sft.py optimizer steps on CommonGen train"""
    sl_batch_size: int = 16
    """SL examples per step"""
    sl_learning_rate: float = 1e-4
    """SL learning rate"""
    sl_eval_every: int = 25
    """SL evaluation every this many steps: its curve, on the pilot part of dev"""
    sl_eval_prompts: int = 100
    """pilot concept sets per SL evaluation"""
    sl_model: Optional[str] = None
    """use this SL model instead of training one (the zero-shot and SL rows are then evaluated on their own)"""
    side_by_side: int = 2
    """RL runs at a time, the cores shared out; the wall times are those of runs that shared the machine"""


LABELS = {"zero_shot": "Zero-shot", "sl": "SL (sft.py)", "early": "Early SL checkpoint (the start)", "ppo": "PPO", "ppo_plus_plus": "PPO++",
          "aggrevated": "AggreVaTeD", "d2lols": "D2LOLS", "dr_po": "DR-PO (PPO++, references as guide)"}
SCRIPTS = {"ppo": "ppo.py", "ppo_plus_plus": "ppo_plus_plus.py", "aggrevated": "aggrevated.py", "d2lols": "d2lols.py",
           "dr_po": "ppo_plus_plus.py"}
GUIDED = ("ppo_plus_plus", "aggrevated", "d2lols", "dr_po")
NOTES = "<!-- notes: what the table shows, written by hand; a re-run keeps what is below this line -->"
OWN_EPISODES = {"ppo": "objective/scores", "ppo_plus_plus": "guide/score_unmixed"}
"""the tag of the training reward of the policy's own episodes (no guide's token), where a method has them: PPO's
every episode, PPO++'s unmixed ones (DR-PO's beta 1 leaves none; AggreVaTeD's unmixed are the guide's own)"""
START_TITLES = {"weak": "Weak start: zero-shot policy, SL guide (the main table)",
                "sl": "tril's setting: policy and guide both the SL model",
                "early": "Early start: an early SL checkpoint, the SL model as guide"}
METRICS = [("cider_d", "CIDEr-D ↑ (reward)"), ("rouge_L", "ROUGE-L"), ("bleu_4", "BLEU-4"),
           ("coverage", "coverage"), ("distinct_2", "distinct-2"), ("length", "words"),
           ("direct", "direct")]


# -- concept coverage: the share of a set's concepts that its sentence uses, in any inflection --------------------

def word_lemmas(word):
    """The dictionary lemmas of a word, for every part of speech (lemminflect's English lexicon, which holds the
    irregular forms: stood -> stand, mice -> mouse); a word it does not know gets its rule-based noun and verb
    lemmas (skateboarding -> skateboard)."""
    import lemminflect

    lemmas = {lemma for forms in lemminflect.getAllLemmas(word).values() for lemma in forms}
    if not lemmas:
        lemmas = {lemma for pos in ("NOUN", "VERB") for lemma in lemminflect.getAllLemmasOOV(word, pos).get(pos, ())}
    return lemmas


def concept_coverage(concepts, sentence):
    """The share of `concepts` the sentence contains: a concept counts when a word of the sentence is that word
    or has it among its lemmas (case ignored; "standing", "stood" and "stands" cover "stand", "standard" does
    not, nor does a word that merely contains it)."""
    words = set(metrics.tokenize_words(sentence))
    lemmas = set(words).union(*(word_lemmas(w) for w in words)) if words else set()
    return sum(c.lower() in lemmas for c in concepts) / len(concepts)


def prompt_concepts(prompt):
    """The concepts of a CommonGen prompt, "generate a sentence with: dog ball park." -> [dog, ball, park]."""
    if not (prompt.startswith(tasks.COMMONGEN_PREFIX) and prompt.endswith(".")):
        raise ValueError(f"not a CommonGen prompt: {prompt!r}")
    return prompt[len(tasks.COMMONGEN_PREFIX) : -1].split()


def generation_metrics(rows):
    """The table's metrics of one evaluation's generations (prompt, continuation, references per row): CIDEr-D,
    ROUGE-L and BLEU-4 against the references (the scripts' own functions), concept coverage, distinct-2, the
    mean length in words, and "direct": the share written on the prompt's line (SmolLM2-Instruct's habit is a
    new line, then talk about the sentence: "\n\nThe sentence is: ...")."""
    continuations = [r["continuation"] for r in rows]
    references = [r["references"] for r in rows]
    result = {"cider_d": statistics.mean(metrics.cider_d(continuations, references)),
              "rouge_L": metrics.rouge(continuations, references)["rouge_L"],
              "bleu_4": metrics.bleu_4(continuations, references),
              "coverage": statistics.mean(concept_coverage(prompt_concepts(r["prompt"]), r["continuation"])
                                          for r in rows),
              "distinct_2": metrics.distinct_n(continuations, 2),
              "length": statistics.mean(len(metrics.ptb_tokenize(c)) for c in continuations),
              "direct": statistics.mean(bool(c.split("\n", 1)[0].strip()) for c in continuations)}
    return result


# -- the table -------------------------------------------------------------------------------------------------

def beats(a, b):
    """A beats B when its mean CIDEr-D is higher by more than the two seed spreads (standard deviations)
    combined; returns "beats", "loses to" (the same, the other way) or "ties with"."""
    (mean_a, spread_a), (mean_b, spread_b) = mean_spread(a), mean_spread(b)
    if mean_a - mean_b > spread_a + spread_b:
        return "beats"
    if mean_b - mean_a > spread_a + spread_b:
        return "loses to"
    return "ties with"


def quarters(scalars, tag):
    """The run's iterations in 4 quarters (by objective/scores, logged every iteration; fewer than 4 iterations: one
    quarter each): the mean of the tag's values logged in each, None where it logged none (guide/score_unmixed skips
    an iteration with no unmixed episode). One iteration's reward is mostly which prompts it drew."""
    steps = [step for step, _ in scalars["objective/scores"]]
    quarter = {step: i * min(4, len(steps)) // len(steps) for i, step in enumerate(steps)}
    logged = [[v for step, v in scalars.get(tag, []) if quarter[step] == q] for q in range(min(4, len(steps)))]
    return [statistics.mean(values) if values else None for values in logged]


def quarter_means(scalars, tag):
    """(first, last): the tag's mean over the run's first and last quarter of iterations."""
    by_quarter = quarters(scalars, tag)
    return by_quarter[0], by_quarter[-1]


def diagnostics(scalars):
    """What explains a run: the critic, the step size, the drift from pi_ref, and what the guide's roll-ins scored."""
    def values(tag):
        return [v for _, v in scalars.get(tag, [])]

    first, last = quarter_means(scalars, "objective/scores")
    result = {"approxkl_mean": statistics.mean(values("policy/approxkl_avg")),
              "clipfrac_mean": statistics.mean(values("policy/clipfrac_avg")),
              "kl_last": values("objective/kl")[-1], "train_score_first": first, "train_score_last": last}
    if values("val/explained_variance"):  # (rloo: no critic)
        result["ev_last"] = statistics.mean(values("val/explained_variance")[-3:])
    if values("guide/score_mixed"):
        result |= {"guide_mixed": statistics.mean(values("guide/score_mixed"))}
    if values("guide/score_unmixed"):  # the policy's own episodes (AggreVaTeD's: the guide's own)
        first, last = quarter_means(scalars, "guide/score_unmixed")
        result |= {"guide_unmixed": statistics.mean(values("guide/score_unmixed")), "unmixed_first": first,
                   "unmixed_last": last}
    if values("guide/explained_variance_restart"):  # the critic at the restart states
        result["ev_restart_last"] = statistics.mean(values("guide/explained_variance_restart")[-3:])
    if values("guide/advantage_unmixed"):  # what the loss gave the policy's own tokens
        result["advantage_unmixed_mean"] = statistics.mean(values("guide/advantage_unmixed"))
    for tag, key in (("val/equal_score_groups", "equal_groups"), ("guide/equal_score_groups_mixed", "equal_mixed"),
                     ("guide/equal_score_groups_unmixed", "equal_unmixed"), ("guide/k_score_correlation", "k_corr")):
        if values(tag):  # (groups: --samples-per-prompt > 1) the groups rloo learns nothing from; k against score
            result[key] = statistics.mean(values(tag))
    return result


def write_table(args, results, curves, sl_curve, wall, samples, command, sizes_line):
    """{out}.md: per start the mean table, the verdicts against PPO, then per seed the diagnostics."""
    heading = "pilot part" if args.pilot else "held-out part"
    beams = "greedy" if args.eval_num_beams == 1 else f"beam search, {args.eval_num_beams} beams"
    lines = ["# CommonGen in miniature, offline (CPU, 2 cores)", "", f"Command: `{command}`", "", sizes_line, ""]
    for start in args.starts:
        methods = {"weak": ["zero_shot", "sl"], "sl": ["sl"], "early": ["early", "sl"]}[start] + methods_of(args, start)
        lines += [f"## {START_TITLES[start]}", "",
                  "| method | " + " | ".join(label for _, label in METRICS) + " | episodes | wall time (s) |",
                  "|-|" + "-|" * (len(METRICS) + 2)]
        for method in methods:
            key = method if method in ("zero_shot", "sl", "early") else (start, method)
            runs = results[key]
            cells = []
            for metric, _ in METRICS:
                mean, spread = mean_spread([r[metric] for r in runs])
                cells.append(f"{mean:.3f}" + (f" ± {spread:.3f}" if len(runs) > 1 else ""))
            episodes = {"zero_shot": 0, "sl": args.sl_steps * args.sl_batch_size,
                        "early": args.early_steps * args.sl_batch_size}.get(method, args.batch_size * args.num_iterations)
            seconds = f"{statistics.mean(wall[key]):.0f}" if wall.get(key) else "–"
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + f" | {episodes} | {seconds} |")
        seeds = "; ".join(f"{LABELS[m]} {', '.join(map(str, seeds_of(args, m)))}" for m in methods_of(args, start))
        lines += ["", f"The starting models: one deterministic evaluation ({beams}); RL rows: mean ± standard "
                  f"deviation over seeds ({seeds}). Scored on the {heading} of dev ({args.num_eval_prompts} concept "
                  f"sets).", ""]
        if start == "early":  # what it was picked on
            pilot = results["early"][0]["pilot"]
            lines += [f"The early start was picked on the pilot part ({args.sl_eval_prompts} sets): after "
                      f"{args.early_steps} sft.py steps it scores CIDEr-D {pilot['cider_d']:.3f} and writes the "
                      f"sentence directly in {pilot['direct']:.0%} of them.", ""]
        ppo = [r["cider_d"] for r in results.get((start, "ppo"), [])]
        for method in methods_of(args, start):
            if method != "ppo" and ppo:
                verdict = beats([r["cider_d"] for r in results[(start, method)]], ppo)
                lines.append(f"- {LABELS[method]} {verdict} PPO on CIDEr-D (mean difference "
                             f"{mean_spread([r['cider_d'] for r in results[(start, method)]])[0] - statistics.mean(ppo):+.3f})"
                             ".")
        lines += ["", "| method | seed | start | final | explained variance (last 3) | at restarts (last 3) | "
                  "approx-KL (mean) | clip fraction (mean) | KL to pi_ref (last) | training reward, first → last "
                  "quarter | training reward of mixed / unmixed episodes (mean) | unmixed, first → last quarter | "
                  "unmixed advantage (mean) | groups of equal scores: all / mixed / unmixed (mean) | k-score correlation (mean) |",
                  "|-|-|-|-|-|-|-|-|-|-|-|-|-|-|-|"]

        def cell(r, key, digits=3):
            return f"{r[key]:.{digits}f}" if r.get(key) is not None else "–"

        for method in methods_of(args, start):
            for seed, r, curve in zip(seeds_of(args, method), results[(start, method)], curves[(start, method)]):
                guide = f"{cell(r, 'guide_mixed')} / {cell(r, 'guide_unmixed')}" if "guide_mixed" in r else "–"
                unmixed = f"{cell(r, 'unmixed_first')} → {cell(r, 'unmixed_last')}" if "unmixed_first" in r else "–"
                equal = (f"{cell(r, 'equal_groups', 2)} / {cell(r, 'equal_mixed', 2)} / {cell(r, 'equal_unmixed', 2)}"
                         if "equal_groups" in r else "–")
                lines.append(f"| {LABELS[method]} | {seed} | {curve[0][1]:.3f} | {r['cider_d']:.3f} | "
                             f"{cell(r, 'ev_last', 2)} | {cell(r, 'ev_restart_last', 2)} | {r['approxkl_mean']:.4f} | "
                             f"{r['clipfrac_mean']:.3f} | {r['kl_last']:.3f} | {cell(r, 'train_score_first')} → "
                             f"{cell(r, 'train_score_last')} | {guide} | {unmixed} | "
                             f"{cell(r, 'advantage_unmixed_mean')} | {equal} | {cell(r, 'k_corr', 2)} |")
        lines += ["", "Mixed episodes: PPO++ and DR-PO, the guide (DR-PO: the references) wrote the first k tokens; "
                  "AggreVaTeD, the policy wrote the first k and the guide the rest (unmixed: the guide alone); "
                  "D2LOLS, AggreVaTeD's until tau, then PPO++'s. Groups of equal scores (--samples-per-prompt > 1): the share "
                  "of a batch's groups (a prompt's samples, one state) whose scores are all equal, which rloo learns "
                  "nothing from; k-score correlation: of the roll-in's length with the score, over the mixed "
                  "episodes. Training reward: CIDEr-D against the set's train "
                  "references (1.5 per set on average, dev has 4), so lower than on dev; first → last quarter: its "
                  "mean over the run's first and last quarter of iterations (one iteration's mean is mostly its "
                  "prompts').", ""]
    if sl_curve:
        lines += [f"## The SL model's curve (sft.py; {args.sl_eval_prompts} sets of the pilot part)", "",
                  "| step | examples | CIDEr-D |",
                  "|-|-|-|"]
        lines += [f"| {examples // args.sl_batch_size} | {examples} | {value:.3f} |" for examples, value in sl_curve]
        lines.append("")
    lines += ["## A few generations (the last evaluation, seed " + str(args.seeds[0]) + "; as JSON strings, \\n = a new "
              "line)", ""]
    for sample in samples:
        lines.append(f"- **{' '.join(sample['concepts'])}** (a reference: \"{sample['reference']}\")")
        lines += [f"  - {name}: `{json.dumps(text, ensure_ascii=False)}`" for name, text in sample["texts"]]
    lines += ["", f"Every run's scalars and last generations: `{os.path.relpath(args.records_dir, ROOT)}/<run>.json` "
              f"(benchmarks/run_files.py).", "", NOTES]
    notes = ""  # what a reader wrote below the marker in an earlier table is kept
    if os.path.isfile(args.out + ".md"):
        with open(args.out + ".md") as f:
            notes = f.read().partition(NOTES + "\n")[2]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n" + notes)


def plot(args, curves, own, start_scores):
    """Per start: above, the held-out CIDEr-D over episodes; below, the policy's own episodes' training reward by
    quarter of the run (PPO's and PPO++'s; each seed faint, their mean bold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes_grid = plt.subplots(2, len(args.starts), figsize=(6.4 * len(args.starts), 8.2), squeeze=False)
    for axes, start in zip(axes_grid[1], args.starts):
        for method in [m for m in methods_of(args, start) if (start, m) in own]:
            runs = own[(start, method)]
            logged = [[q[i] for q in runs if q[i] is not None] for i in range(len(runs[0]))]
            means = [statistics.mean(values) if values else None for values in logged]
            axes.plot(range(1, len(means) + 1), means, marker="o", label=LABELS[method] + (
                " (unmixed episodes)" if method != "ppo" else ""), color=f"C{methods_of(args, start).index(method)}")
            for quarter_means_of_seed in runs:
                axes.plot(range(1, len(means) + 1), quarter_means_of_seed, color=axes.lines[-1].get_color(),
                          alpha=0.25, linewidth=1)
        axes.set_xlabel("quarter of the run's iterations")
        axes.set_ylabel("training reward of the policy's own episodes")
        axes.set_xticks(range(1, 5))
        axes.grid(alpha=0.3)
        if axes.lines:  # (DR-PO, AggreVaTeD and D2LOLS alone: no curve)
            axes.legend(fontsize=8)
    for axes, start in zip(axes_grid[0], args.starts):
        for method in methods_of(args, start):
            runs = curves[(start, method)]
            steps = sorted(set.intersection(*(set(s for s, _ in run_curve) for run_curve in runs)))
            means = [statistics.mean(dict(run_curve)[s] for run_curve in runs) for s in steps]
            axes.plot(steps, means, marker="o", label=LABELS[method])
            for run_curve in runs:  # each seed, faint
                axes.plot(*zip(*run_curve), color=axes.lines[-1].get_color(), alpha=0.25, linewidth=1)
        for name, style in (("zero_shot", ":"), ("sl", "--"), ("early", "-.")):
            if name in start_scores and (name != "zero_shot" or start == "weak") and (name != "early" or start == "early"):
                axes.axhline(start_scores[name], color="gray", linestyle=style, label=LABELS[name])
        axes.set_xlabel("episodes")
        axes.set_ylabel(f"CIDEr-D, {'pilot' if args.pilot else 'held-out'} dev ({args.num_eval_prompts} sets)")
        axes.set_title(START_TITLES[start].split(":")[0] + f" (seeds {', '.join(map(str, args.seeds))})")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle("CommonGen, SmolLM2-135M-Instruct, CPU")
    figure.tight_layout()
    figure.savefig(args.out + ".png", dpi=110)


# -- running ---------------------------------------------------------------------------------------------------

def methods_of(args, start):
    return {"weak": args.weak_methods, "sl": args.sl_methods, "early": args.early_methods}[start]


def seeds_of(args, method):
    """The seeds a method runs on: its --method-seeds entry, else --seeds."""
    for entry in args.method_seeds:
        name, _, seeds = entry.partition("=")
        if name == method:
            return [int(seed) for seed in seeds.split(",")]
    return args.seeds


def prepare_data(args):
    """{work-dir}/data: train.jsonl, validation.jsonl = the pilot part of dev, test.jsonl = the held-out part."""
    source = os.path.join(args.data_dir, "commongen") if args.data_dir else None
    train = tasks.load_rows("commongen", "train", dataset_name="common_gen", dataset_path=source)
    dev = tasks.group_commongen(tasks.load_rows("commongen", "validation", dataset_name="common_gen",
                                                dataset_path=source))
    if not 0 < args.heldout_sets < len(dev):
        raise SystemExit(f"error: --heldout-sets must be between 1 and {len(dev) - 1} (dev has {len(dev)} sets)")
    pilot, heldout = dev[: len(dev) - args.heldout_sets], dev[len(dev) - args.heldout_sets :]
    evaluated = pilot if args.pilot else heldout
    if args.num_eval_prompts > len(evaluated):
        raise SystemExit(f"error: --num-eval-prompts {args.num_eval_prompts} > the {len(evaluated)} sets of the "
                         f"{'pilot' if args.pilot else 'held-out'} part")
    folder = os.path.join(args.work_dir, "data")
    tasks.write_jsonl(os.path.join(folder, "train.jsonl"), train)
    tasks.write_jsonl(os.path.join(folder, "validation.jsonl"), pilot)
    tasks.write_jsonl(os.path.join(folder, "test.jsonl"), heldout)
    return folder, len(pilot), len(heldout)


def run_once(jobs, args):
    """benchmarks/run_files.py's run_once with this driver's folders: every job's record, the finished reused."""
    return run_files.run_once(jobs, args.work_dir, args.records_dir, args.side_by_side)


def checked_metrics(args, record):
    """The table's metrics of the run's last evaluation, its logged CIDEr-D checked against them."""
    rows = record["generations"]
    result = generation_metrics(rows)
    logged = record["scalars"]["eval/cider_d"][-1][1]
    if abs(logged - result["cider_d"]) > 1e-4 or len(rows) != args.num_eval_prompts:
        raise SystemExit(f"error: {record['name']}: its generations give CIDEr-D "
                         f"{result['cider_d']:.5f} on {len(rows)} sets, it logged {logged:.5f}")
    return result


def main(args):
    args.out = args.out.removesuffix(".md")  # (a stem)
    if args.tau is None:
        args.tau = round(0.2 * args.num_iterations)
    for name in ("models_dir", "data_dir", "records_dir", "work_dir", "out", "sl_model"):  # each run has its own cwd
        if getattr(args, name):
            setattr(args, name, os.path.abspath(os.path.expanduser(getattr(args, name))))
    unknown = [s for s in args.starts if s not in START_TITLES] + [
        m for s in args.starts for m in methods_of(args, s) if m not in SCRIPTS]
    if unknown or not args.seeds or not args.starts:
        raise SystemExit(f"error: unknown start(s) or method(s) {unknown}, or none given; starts: "
                         f"{' '.join(START_TITLES)}; methods: {' '.join(SCRIPTS)}")
    for entry in args.method_seeds:
        name, _, seeds = entry.partition("=")
        if name not in SCRIPTS or not all(seed.strip().isdigit() for seed in seeds.split(",")):
            raise SystemExit(f"error: --method-seeds {entry!r}: expected METHOD=SEED,SEED with METHOD one of "
                             f"{' '.join(SCRIPTS)}")
    if args.side_by_side < 1 or args.early_steps < 1:
        raise SystemExit("error: --side-by-side and --early-steps must be at least 1")
    if "ppo" not in [m for s in args.starts for m in methods_of(args, s)]:
        print("note: no PPO row: no verdicts", flush=True)
    import lemminflect  # noqa: F401  (fail now, not after two hours: pip install -r requirements.txt)
    import matplotlib  # noqa: F401

    policy = os.path.join(args.models_dir, "smollm2-135m") if args.models_dir else HUB_POLICY
    if args.models_dir and not os.path.isfile(os.path.join(policy, "config.json")):
        raise SystemExit(f"error: no saved model at {policy} (--models-dir must hold smollm2-135m/)")
    if args.sl_model and not os.path.isfile(os.path.join(args.sl_model, "config.json")):
        raise SystemExit(f"error: --sl-model {args.sl_model} is not a saved model folder")
    os.makedirs(args.work_dir, exist_ok=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    data, num_pilot, num_heldout = prepare_data(args)
    started = time.perf_counter()
    split = "validation" if args.pilot else "test"
    eval_prefix = "pilot_" if args.pilot else ""  # pilot runs keep their own folders beside the table's
    run_prefix = eval_prefix + args.runs_label
    common = ["--task", "commongen", "--dataset-path", data, "--max-new-tokens", str(args.max_new_tokens),
              "--eval-num-beams", str(args.eval_num_beams)]
    task = common + ["--eval-split", split, "--num-eval-prompts", str(args.num_eval_prompts)]
    rl = ["--total-episodes", str(args.batch_size * args.num_iterations), "--batch-size", str(args.batch_size),
          "--num-minibatches", str(args.num_minibatches), "--update-epochs", str(args.update_epochs),
          "--learning-rate", str(args.learning_rate), "--critic-learning-rate", str(args.critic_learning_rate),
          "--gae-lambda", str(args.gae_lambda), "--vf-coef", str(args.vf_coef), "--target-coef", str(args.target_coef),
          "--kl-coef", str(args.kl_coef), "--eval-every", str(args.eval_every),
          "--clip-coef-value", str(args.clip_coef_value), "--critic-anneal-lr", str(args.critic_anneal_lr),
          "--critic-warmup-iterations", str(args.critic_warmup_iterations)]

    def report(records, names):
        for name, record in zip(names, records):
            print(f"{name}: {record['seconds']:.0f} s; {(time.perf_counter() - started) / 60:.1f} min so far", flush=True)
        return records

    # SL: sft.py on CommonGen train (its curve on the pilot part: it sets --sl-steps), unless --sl-model is given;
    # the early start: the same for --early-steps steps
    results, wall, curves, own, sl_curve, made_at = {}, {}, {}, {}, [], {}
    sl_model = args.sl_model or os.path.join(args.work_dir, "sl", "model")
    early_model = os.path.join(args.work_dir, f"early{args.early_steps}", "model")
    pilot_eval = ["--eval-split", "validation", "--num-eval-prompts", str(args.sl_eval_prompts)]
    sft = common + pilot_eval + ["--model-name-or-path", policy, "--batch-size", str(args.sl_batch_size),
                                 "--learning-rate", str(args.sl_learning_rate), "--save-model"]
    jobs = [] if args.sl_model else [("sl", "sft.py", sft + ["--max-steps", str(args.sl_steps), "--eval-every",
                                                             str(args.sl_eval_every), "--save-path", sl_model])]
    if "early" in args.starts:
        jobs.append((f"early{args.early_steps}", "sft.py", sft + ["--max-steps", str(args.early_steps), "--eval-every",
                                                                  str(args.early_steps), "--save-path", early_model]))
    for (name, _, _), record in zip(jobs, report(run_once(jobs, args), [n for n, _, _ in jobs])):
        made_at[name] = record["commit"]
    if not args.sl_model:
        sl_curve = run_files.load(args.records_dir, "sl")["scalars"]["eval/cider_d"]
    # the starting models' rows: each model evaluated once, as the RL runs evaluate
    models = [("zero_shot", policy), ("sl", sl_model)] + ([("early", early_model)] if "early" in args.starts else [])
    eval_name = {name: f"{eval_prefix}{name}{args.early_steps if name == 'early' else ''}_eval" for name, _ in models}
    jobs = [(eval_name[name], "sft.py", task + ["--model-name-or-path", model, "--eval-only"]) for name, model in models]
    texts = {}  # the last generations of the rows shown side by side
    for (name, _, _), (row, _), record in zip(jobs, models, report(run_once(jobs, args), [n for n, _, _ in jobs])):
        made_at[name] = record["commit"]
        results[row] = [checked_metrics(args, record)]
        texts[row] = record["generations"]
    if "early" in args.starts:  # what the early start was picked on: the pilot part, after its steps
        early_run = run_files.load(args.records_dir, f"early{args.early_steps}")
        results["early"][0]["pilot"] = generation_metrics(early_run["generations"])
    records = {name: {"start": None, "method": name, "seed": None} | results[name][0] for name, _ in models}
    starting_model = {"weak": policy, "sl": sl_model, "early": early_model}

    # the RL runs: every (start, method, seed), --side-by-side at a time
    jobs, keys = [], []
    for start in args.starts:
        for method in methods_of(args, start):
            guide = ([] if method == "ppo" else ["--guide-references"] if method == "dr_po"
                     else ["--guide-model", sl_model])
            if method == "dr_po":
                guide += ["--beta", str(args.dr_po_beta)] if args.dr_po_beta is not None else []
            elif method != "ppo":
                guide += ["--beta", str(args.beta)]
            if method == "d2lols":
                guide += ["--tau", str(args.tau)]
            if method in ("ppo_plus_plus", "dr_po", "d2lols"):
                guide += ["--norm-per-group" if args.norm_per_group else "--no-norm-per-group"]
            if method in ("aggrevated", "d2lols"):
                guide += ["--roll-in-advantage", args.roll_in_advantage]
            else:  # (ppo.py and ppo_plus_plus.py: the estimator and the samples a prompt; rloo: no critic to warm up)
                guide += ["--advantage-estimator", args.advantage_estimator, "--samples-per-prompt",
                          str(args.samples_per_prompt)] + (["--critic-warmup-iterations", "0"]
                                                           if args.advantage_estimator == "rloo" else [])
            for seed in seeds_of(args, method):
                jobs.append((f"{run_prefix}{start}_{method}_seed{seed}", SCRIPTS[method],
                             task + rl + guide + ["--model-name-or-path", starting_model[start], "--seed", str(seed)]))
                keys.append((start, method, seed))
    for (name, _, _), (start, method, seed), record in zip(jobs, keys, report(run_once(jobs, args), [n for n, _, _ in jobs])):
        scalars = record["scalars"]
        results.setdefault((start, method), []).append(checked_metrics(args, record) | diagnostics(scalars))
        records[name] = {"start": start, "method": method, "seed": seed, "seconds": record["seconds"],
                         "commit": record["commit"], "curve": scalars["eval/cider_d"]} | results[(start, method)][-1]
        curves.setdefault((start, method), []).append(scalars["eval/cider_d"])
        if method in OWN_EPISODES:  # the policy's own episodes' training reward, by quarter of the run
            own.setdefault((start, method), []).append(quarters(scalars, OWN_EPISODES[method]))
        wall.setdefault((start, method), []).append(record["seconds"])
        made_at[name] = record["commit"]
        if seed == seeds_of(args, method)[0]:  # a few generations side by side: each method's first seed
            texts[LABELS[method] + {"weak": "", "sl": " (SL start)", "early": " (early start)"}[start]] = \
                record["generations"]
    samples = [{"concepts": prompt_concepts(row["prompt"]), "reference": row["references"][0],
                "texts": [(LABELS.get(name, name), rows[i]["continuation"]) for name, rows in texts.items()]}
               for i, row in enumerate(texts["sl"][:4])]

    minutes = (time.perf_counter() - started) / 60
    beams = "greedy" if args.eval_num_beams == 1 else f"beam search, {args.eval_num_beams} beams"
    steps = args.num_iterations * args.update_epochs * args.num_minibatches
    rloo_note = ("; rloo: no critic, so the critic's settings below are AggreVaTeD's and D2LOLS's alone, no critic "
                 "warm-up, the leave-one-out differences not whitened" if args.advantage_estimator == "rloo" else "")
    sizes = (f"Policy, pi_ref and critic backbone: SmolLM2-135M-Instruct; prompt \"{tasks.COMMONGEN_PREFIX}<concepts>.\"; "
             f"{args.max_new_tokens} new tokens at most (at least 5), sampled (top-k off); reward CIDEr-D against the "
             f"set's train references (idf from train). RL: {args.num_iterations} iterations of {args.batch_size} "
             f"episodes ({args.samples_per_prompt} a prompt, {args.batch_size // args.samples_per_prompt} prompts; PPO's, "
             f"PPO++'s and DR-PO's advantages: {args.advantage_estimator}{rloo_note}), {args.update_epochs} epochs x {args.num_minibatches} minibatches ({steps} optimizer steps), "
             f"policy lr {args.learning_rate}, critic lr {args.critic_learning_rate}, vf-coef {args.vf_coef}, GAE "
             f"lambda {args.gae_lambda}, kl-coef {args.kl_coef}, target-coef {args.target_coef}, value clip "
             f"{args.clip_coef_value}, critic lr annealed: {args.critic_anneal_lr}, critic warm-up "
             f"{args.critic_warmup_iterations} iterations; guided: beta {args.beta} (DR-PO: "
             f"{1.0 if args.dr_po_beta is None else args.dr_po_beta}), guide nucleus-sampled (top-p 0.92), D2LOLS tau "
             f"{args.tau}, gae's advantages whitened (PPO's over the batch, the guided methods' "
             f"{'per group of mixed and unmixed episodes' if args.norm_per_group else 'over the batch'}), roll-in "
             f"advantage {args.roll_in_advantage}. SL: {args.sl_steps} steps of "
             f"{args.sl_batch_size}, lr {args.sl_learning_rate}"
             + (f"; the early start: {args.early_steps} of those steps (its schedule over them)" if "early" in args.starts
                else "") + f". Dev: {num_pilot} pilot sets (the first) and "
             f"{num_heldout} held-out (the last); evaluation: {beams}, as every row. This invocation: {minutes:.0f} "
             f"min (runs finished by an earlier one are reused, with their own wall times).")
    command = " ".join(["python benchmarks/commongen_offline.py", *sys.argv[1:]])
    commits = sorted(set(made_at.values()))
    if len(commits) > 1 or commits[0].endswith("-dirty"):
        print(f"note: the runs were made at {', '.join(commits)}: not one clean commit", flush=True)
    command += f"`; every run made at commit `{', '.join(commits)}"
    write_table(args, results, curves, sl_curve, wall, samples, command, sizes)
    with open(args.out + ".json", "w") as f:  # every number of the table, per run
        json.dump({"command": command, "sizes": sizes, "sl_curve": sl_curve, "runs": records}, f, indent=1)
    plot(args, curves, own, {name: results[name][0]["cider_d"] for name, _ in models})
    print(open(args.out + ".md").read())
    print(f"wrote {args.out}.md and {args.out}.png in {minutes:.1f} minutes")
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
