"""Is one method really better than another? Per-fold, per-speaker and per-class scores of each
method from its runs' ``results.json`` records, and paired tests between methods.

Statistics only (numpy and scipy): :mod:`ser.compare` reads the records from MLflow and the true
labels from the label files, and writes what :func:`analyse` returns.

The unit of comparison is one fine-tuning run, a ``(fold, repeat)`` pair: two methods are compared
on the units both have, so the differences are paired (same test split, same repeat index). With
the few folds of a corpus (IEMOCAP: 5 sessions; the demo: a handful of speakers) every test below
has little power: a p-value above 0.05 says "not shown", never "no difference", and with n <= 4
units no two-sided test here can reach p < 0.05 at all (the smallest sign-flip p-value is 2 / 2^n).
Repeats of one fold share their test split, so they are not independent: read the tests as
describing these splits, not the population of speakers.

- Mean difference: the mean over paired units of ``UA(a) - UA(b)``, in UA percentage points.
- Bootstrap CI: a percentile 95 % interval of that mean, from resampling the paired differences
  with replacement (seeded, so the same inputs give the same interval). It describes how much the
  mean moves with the choice of units; with fewer than about 8 units it is too narrow.
- Sign-flip (paired permutation) test: under "no difference" each paired difference is as likely
  positive as negative; the two-sided p-value is the share of the 2^n sign assignments whose
  |mean| reaches the observed |mean|. Exact when 2^n <= :data:`EXACT_LIMIT`, else a seeded Monte
  Carlo estimate ``(hits + 1) / (resamples + 1)``. Valid for any n, but n = 5 all in one
  direction gives only p = 2/32 = 0.0625.
- Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, two-sided): uses the ranks of the
  differences; reported only when n >= :data:`WILCOXON_MIN_N`, below which it cannot be
  significant and its normal approximation is meaningless.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

import numpy as np
from scipy import stats

from ser.metrics import score

RESAMPLES = 10_000
SEED = 0
EXACT_LIMIT = 1 << 16  # sign-flip test: enumerate every assignment up to 16 units
WILCOXON_MIN_N = 6
LEVEL = 0.95

_DEMO_SPEAKER = re.compile(r"^(spk\d+)_")  # the demo corpus: spk01_anger_000.wav
_IEMOCAP_SPEAKER = re.compile(r"^(Ses0?\d+[FM])_")  # IEMOCAP: Ses01F_impro01_F000.wav


def speaker_of(name: str) -> str | None:
    """The speaker an utterance name states, or None when the corpus does not name it there.

    The rule, on the file name without its folders: ``spk<digits>_...`` (the demo corpus) gives
    ``spk<digits>``; ``Ses<session><F|M>_...`` (IEMOCAP) gives ``Ses<session><F|M>``, e.g.
    ``Ses01F`` (session 1, its female speaker; each session has one F and one M speaker). Any
    other name gives None, and callers group such utterances by their fold instead.
    """
    base = PurePosixPath(name).name
    for pattern in (_DEMO_SPEAKER, _IEMOCAP_SPEAKER):
        found = pattern.match(base)
        if found:
            return found.group(1)
    return None


def unit_of(record: Mapping[str, Any]) -> str:
    """A run's unit name, ``<fold>/run_<repeat>`` (as fine-tuning lays out its folders)."""
    return f"{record['fold']}/run_{record['repeat']}"


def run_ua(record: Mapping[str, Any], labels: Mapping[str, str] | None) -> float:
    """One run's test UA in percent, recomputed from its predictions and the true ``labels``
    (utterance -> class) when given, else the UA the run itself logged."""
    if labels is None:
        return float(record["scores"]["UA"])
    names = sorted(record["predictions"])
    return _ua([labels[n] for n in names], [record["predictions"][n] for n in names])


def _ua(truth: Sequence[str], preds: Sequence[str]) -> float:
    classes = sorted(set(truth) | set(preds))
    index = {c: i for i, c in enumerate(classes)}
    return score([index[t] for t in truth], [index[p] for p in preds], classes).ua


def unit_uas(
    records: Sequence[Mapping[str, Any]], labels: Sequence[Mapping[str, str] | None] | None = None
) -> dict[str, float]:
    """``{unit: UA}`` of one method's runs (``labels[i]``: the true labels of ``records[i]``)."""
    labels = labels if labels is not None else [None] * len(records)
    return {unit_of(r): run_ua(r, lab) for r, lab in zip(records, labels, strict=True)}


def per_fold(
    records: Sequence[Mapping[str, Any]], labels: Sequence[Mapping[str, str] | None] | None = None
) -> dict[str, dict[str, float]]:
    """``{fold: {"mean", "std", "n"}}``: UA over the fold's repeats (population std)."""
    labels = labels if labels is not None else [None] * len(records)
    grouped: dict[str, list[float]] = {}
    for record, lab in zip(records, labels, strict=True):
        grouped.setdefault(str(record["fold"]), []).append(run_ua(record, lab))
    return {f: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)}
            for f, v in grouped.items()}  # fmt: skip


def per_speaker(
    records: Sequence[Mapping[str, Any]], labels: Sequence[Mapping[str, str] | None]
) -> dict[str, dict[str, float]]:
    """``{speaker: {"UA", "n"}}``: UA of each speaker's test utterances, pooled over every run
    (so over repeats, and over folds where a speaker is tested in several). Utterances whose name
    states no speaker (:func:`speaker_of`) are grouped by their fold. Runs without labels are
    left out; ``n`` counts the pooled (utterance, run) predictions."""
    truth: dict[str, list[str]] = {}
    preds: dict[str, list[str]] = {}
    for record, lab in zip(records, labels, strict=True):
        if lab is None:
            continue
        for name, predicted in record["predictions"].items():
            group = speaker_of(name) or str(record["fold"])
            truth.setdefault(group, []).append(lab[name])
            preds.setdefault(group, []).append(predicted)
    return {g: {"UA": _ua(truth[g], preds[g]), "n": len(truth[g])} for g in sorted(truth)}


def class_recall(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Each class's test recall in percent, averaged over the runs whose test split has it (as
    ``ser.report.summarise_runs`` does)."""
    values: dict[str, list[float]] = {}
    for record in records:
        for name, recall in record["scores"]["recall"].items():
            values.setdefault(name, []).append(float(recall))
    return {name: float(np.mean(v)) for name, v in sorted(values.items())}


def sign_flip_p(
    diffs: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float, bool]:
    """Two-sided paired permutation (sign-flip) p-value of the mean of ``diffs``, and whether it
    is exact (every 2^n assignment) rather than a seeded Monte Carlo estimate."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0:
        return float("nan"), True
    observed = abs(d.mean())
    tolerance = 1e-12 * max(1.0, float(np.abs(d).max()))
    if (1 << d.size) <= EXACT_LIMIT:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        means = np.abs(signs @ d) / d.size
        return float(np.mean(means >= observed - tolerance)), True
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(resamples, d.size))
    hits = int(np.sum(np.abs(signs @ d) / d.size >= observed - tolerance))
    return (hits + 1) / (resamples + 1), False


def bootstrap_ci(
    diffs: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diffs`` (seeded: reproducible)."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def wilcoxon_p(diffs: Sequence[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value (scipy), or None below :data:`WILCOXON_MIN_N`
    differences. All differences zero: no evidence of a difference, p = 1."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.size < WILCOXON_MIN_N:
        return None
    if not np.any(d):
        return 1.0
    return float(stats.wilcoxon(d).pvalue)


def paired(
    a: Mapping[str, float], b: Mapping[str, float], resamples: int = RESAMPLES, seed: int = SEED
) -> dict[str, Any]:
    """Method a against method b over the units both have (``{unit: UA}`` each)."""
    units = [u for u in a if u in b]
    diffs = [a[u] - b[u] for u in units]
    p_flip, exact = sign_flip_p(diffs, resamples, seed)
    low, high = bootstrap_ci(diffs, resamples, seed)
    return {
        "n": len(units),
        "units": units,
        "mean_diff": float(np.mean(diffs)) if diffs else float("nan"),
        "ci95": [low, high],
        "p_sign_flip": p_flip,
        "sign_flip_exact": exact,
        "p_wilcoxon": wilcoxon_p(diffs),
    }


def analyse(
    methods: Mapping[str, Sequence[Mapping[str, Any]]],
    labels: Mapping[str, Sequence[Mapping[str, str] | None]],
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> dict[str, Any]:
    """Everything for ``{method: its runs' results.json records}`` and ``{method: the true test
    labels of each record, or None}``: per-unit, per-fold, per-speaker UA, per-class recall of
    each method, and :func:`paired` for every pair of methods (a - b, in the given order)."""
    units = {m: unit_uas(runs, labels[m]) for m, runs in methods.items()}
    names = list(methods)
    return {
        "settings": {"resamples": resamples, "seed": seed, "level": LEVEL,
                     "wilcoxon_min_n": WILCOXON_MIN_N, "exact_limit": EXACT_LIMIT},
        "methods": {
            m: {
                "units": units[m],
                "per_fold": per_fold(runs, labels[m]),
                "per_speaker": per_speaker(runs, labels[m]),
                "recall": class_recall(runs),
                "recomputed": sum(lab is not None for lab in labels[m]),
            }
            for m, runs in methods.items()
        },
        "pairs": [
            {"a": a, "b": b, **paired(units[a], units[b], resamples, seed)}
            for a, b in itertools.combinations(names, 2)
        ],
    }


def _cell(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def to_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: per-fold, per-speaker and per-class tables and the paired tests."""
    methods = report["methods"]
    names = list(methods)
    out = ["# Per-fold UA [%] (mean ± std over repeats)", ""]
    folds = list(dict.fromkeys(f for m in names for f in methods[m]["per_fold"]))
    out += _table(["fold", *names], [
        [f, *(f"{methods[m]['per_fold'][f]['mean']:.1f} ± {methods[m]['per_fold'][f]['std']:.1f}"
              if f in methods[m]["per_fold"] else "–" for m in names)]
        for f in folds
    ])  # fmt: skip
    out += ["", "# Per-speaker UA [%] (pooled over runs; unnamed speakers: by fold)", ""]
    groups = sorted({g for m in names for g in methods[m]["per_speaker"]})
    out += _table(["speaker", *names], [
        [g, *(_cell(methods[m]["per_speaker"].get(g, {}).get("UA")) for m in names)]
        for g in groups
    ])  # fmt: skip
    out += ["", "# Per-class recall [%] (mean over runs)", ""]
    classes = sorted({c for m in names for c in methods[m]["recall"]})
    out += _table(["class", *names],
                  [[c, *(_cell(methods[m]["recall"].get(c)) for m in names)] for c in classes])
    settings = report["settings"]
    out += ["", "# Paired comparisons of UA over shared (fold, repeat) units", "",
            f"a - b in UA points; bootstrap {settings['level']:.0%} CI of the mean "
            f"({settings['resamples']} resamples, seed {settings['seed']}); sign-flip p-value "
            f"(exact when marked); Wilcoxon signed-rank p-value only when n >= "
            f"{settings['wilcoxon_min_n']}. Few folds mean low power: p > 0.05 is not evidence "
            "of no difference.", ""]  # fmt: skip
    out += _table(["a", "b", "n", "mean a - b", "95 % CI", "p sign-flip", "p Wilcoxon"], [
        [p["a"], p["b"], str(p["n"]), _cell(p["mean_diff"], 2),
         f"[{_cell(p['ci95'][0], 2)}, {_cell(p['ci95'][1], 2)}]",
         _cell(p["p_sign_flip"], 4) + (" (exact)" if p["sign_flip_exact"] else ""),
         _cell(p["p_wilcoxon"], 4)]
        for p in report["pairs"]
    ])  # fmt: skip
    return "\n".join(out) + "\n"
