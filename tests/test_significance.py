from __future__ import annotations

import itertools
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from scipy import stats

from ser import significance as sig
from ser.compare import PER_FOLD_PNG, SIGNIFICANCE_JSON, SIGNIFICANCE_MD, compare
from ser.config import CompareConfig
from ser.data.labels import write_label_file

# --- statistics against independent hand computations ---------------------------------------


def test_sign_flip_exact_p_values() -> None:
    # n = 5, all positive: only all-plus and all-minus reach |mean| -> 2 / 32.
    p, exact = sig.sign_flip_p([1.0, 2.0, 3.0, 4.0, 5.0])
    assert exact and p == pytest.approx(2 / 32)
    # Brute force over the 2^n assignments, written independently of the module.
    diffs = [3.0, -1.0, 2.5, 0.5, -0.25, 4.0]
    observed = abs(np.mean(diffs))
    count = sum(
        abs(np.mean([s * d for s, d in zip(signs, diffs, strict=True)])) >= observed - 1e-12
        for signs in itertools.product((1, -1), repeat=len(diffs))
    )
    p, exact = sig.sign_flip_p(diffs)
    assert exact and p == pytest.approx(count / 2 ** len(diffs))
    assert sig.sign_flip_p([0.0, 0.0, 0.0]) == (1.0, True)  # no difference at all


def test_sign_flip_monte_carlo_is_seeded() -> None:
    diffs = list(np.linspace(0.5, 2.0, 20))  # 2^20 > EXACT_LIMIT
    p, exact = sig.sign_flip_p(diffs, resamples=2000, seed=3)
    assert not exact
    assert p == sig.sign_flip_p(diffs, resamples=2000, seed=3)[0]
    assert p == pytest.approx(1 / 2001)  # all one direction: no resample reaches the observed


def test_bootstrap_ci_contains_mean_and_is_reproducible() -> None:
    diffs = [1.0, 2.5, -0.5, 3.0, 1.5, 0.0, 2.0]
    low, high = sig.bootstrap_ci(diffs, seed=7)
    assert low <= np.mean(diffs) <= high and low < high
    assert (low, high) == sig.bootstrap_ci(diffs, seed=7)
    assert min(diffs) <= low and high <= max(diffs)
    assert sig.bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)


def test_wilcoxon_equals_scipy_and_needs_six() -> None:
    diffs = [1.2, -0.4, 2.5, 3.1, 0.7, 1.9, -0.2]
    assert sig.wilcoxon_p(diffs) == pytest.approx(stats.wilcoxon(diffs).pvalue)
    assert sig.wilcoxon_p(diffs[:5]) is None
    assert sig.wilcoxon_p([0.0] * 6) == 1.0


def test_paired_uses_only_shared_units() -> None:
    a = {"f1/run_0": 60.0, "f2/run_0": 70.0, "f3/run_0": 50.0}
    b = {"f1/run_0": 55.0, "f2/run_0": 66.0, "f4/run_0": 10.0}
    result = sig.paired(a, b)
    assert result["n"] == 2 and result["units"] == ["f1/run_0", "f2/run_0"]
    assert result["mean_diff"] == pytest.approx(4.5)
    assert result["p_sign_flip"] == pytest.approx(2 / 4) and result["p_wilcoxon"] is None


# --- per-speaker, per-fold and per-class scores from predictions ---------------------------


def test_speaker_of_rule() -> None:
    assert sig.speaker_of("spk01_anger_000.wav") == "spk01"
    assert sig.speaker_of("sub/spk12_sad_003.wav") == "spk12"
    assert sig.speaker_of("Ses01F_impro01_F000.wav") == "Ses01F"
    assert sig.speaker_of("Ses05M_script02_2_M010.wav") == "Ses05M"
    assert sig.speaker_of("1001_DFA_ANG_XX.wav") is None


def _record(fold: str, repeat: int, predictions: dict[str, str], ua: float = 0.0) -> dict:
    scores = {"UA": ua, "recall": {"a": 50.0, "b": 100.0}}
    return {"fold": fold, "repeat": repeat, "seed": repeat, "label_file": "", "scores": scores,
            "predictions": predictions}  # fmt: skip


def test_per_speaker_ua_equals_hand_computation() -> None:
    labels = {"spk01_x_0.wav": "a", "spk01_x_1.wav": "a", "spk01_x_2.wav": "b",
              "spk01_x_3.wav": "b", "spk02_x_0.wav": "a", "spk02_x_1.wav": "b",
              "odd_0.wav": "a", "odd_1.wav": "b"}  # fmt: skip
    preds_0 = {"spk01_x_0.wav": "a", "spk01_x_1.wav": "b", "spk01_x_2.wav": "b",
               "spk01_x_3.wav": "b", "spk02_x_0.wav": "b", "spk02_x_1.wav": "b",
               "odd_0.wav": "a", "odd_1.wav": "a"}  # fmt: skip
    preds_1 = {**preds_0, "spk02_x_0.wav": "a"}
    records = [_record("f1", 0, preds_0), _record("f1", 1, preds_1)]
    table = sig.per_speaker(records, [labels, labels])
    # spk01, pooled over both runs: a 2/4 right, b 4/4 -> (50 + 100) / 2.
    assert table["spk01"]["UA"] == pytest.approx(75.0) and table["spk01"]["n"] == 8
    # spk02: a right once in two runs (50), b right twice (100).
    assert table["spk02"]["UA"] == pytest.approx(75.0)
    # No speaker in the name: grouped by fold; a 2/2, b 0/2 -> 50.
    assert table["f1"]["UA"] == pytest.approx(50.0)
    # Per run UA from predictions: run 0 has a 2/4 right, b 3/4 -> 62.5; run 1: a 3/4 -> 75.
    assert sig.run_ua(records[0], labels) == pytest.approx(62.5)
    assert sig.run_ua(records[1], labels) == pytest.approx(75.0)
    assert sig.run_ua(_record("f1", 0, preds_0, ua=12.5), None) == 12.5  # no labels: logged UA
    folds = sig.per_fold(records, [labels, labels])
    assert folds["f1"]["n"] == 2 and folds["f1"]["mean"] == pytest.approx((62.5 + 75.0) / 2)
    assert sig.class_recall(records) == {"a": 50.0, "b": 100.0}


# --- the compare entry point writes and logs it all -----------------------------------------

CLASSES = ("a", "b")


def _fake_method(method: str, tmp: Path, skill: float, seed: int) -> str:
    """A fine-tuning run with folds/<fold>/run_<r>/results.json artifacts (3 leave-one-speaker-out
    folds x 2 repeats) and a method run naming it, as run_method leaves them."""
    rng = np.random.default_rng(seed)
    with mlflow.start_run() as stage:
        mlflow.set_tags({"ser.method": method, "ser.stage": "finetune"})
        for k in range(1, 4):
            test = {f"spk0{k}_{c}_{i}.wav": c for c in CLASSES for i in range(4)}
            label_file = tmp / "labels" / f"fold_{k}.json"
            write_label_file(label_file, {"Train": {f"spk09_a_{k}.wav": "a"}, "Val": {},
                                          "Test": test})  # fmt: skip
            for repeat in range(2):
                preds = {n: c if rng.random() < skill else CLASSES[1 - CLASSES.index(c)]
                         for n, c in test.items()}  # fmt: skip
                record = {"fold": f"fold_{k}", "repeat": repeat, "seed": repeat,
                          "scores": {"UA": -1.0, "recall": {"a": 50.0, "b": 50.0}},
                          "label_file": str(label_file), "predictions": preds}  # fmt: skip
                folder = tmp / method / f"fold_{k}" / f"run_{repeat}"
                folder.mkdir(parents=True)
                (folder / "results.json").write_text(json.dumps(record))
                mlflow.log_artifact(str(folder / "results.json"), f"folds/fold_{k}/run_{repeat}")
    with mlflow.start_run() as run:
        mlflow.set_tags({"ser.method": method, "ser.stage": method,
                         "ser.finetune_run": stage.info.run_id})  # fmt: skip
        mlflow.log_metrics({"test_UA_mean": 100 * skill, "test_UA_std": 1.0})
    return run.info.run_id


def test_compare_writes_and_logs_significance(tracking_uri: str, tmp_path: Path) -> None:
    _fake_method("vft", tmp_path, 0.6, 1)
    _fake_method("tapt", tmp_path, 0.9, 2)
    out = tmp_path / "cmp"
    with mlflow.start_run() as entry:  # stands in for the run `mlflow run . -e compare` makes
        result = compare(CompareConfig(output_dir=str(out)))
    report = result.significance
    assert report is not None and list(report["methods"]) == ["vft", "tapt"]
    for name in (SIGNIFICANCE_JSON, SIGNIFICANCE_MD, PER_FOLD_PNG):
        assert (out / name) in result.files
    assert json.loads((out / SIGNIFICANCE_JSON).read_text())["pairs"] == json.loads(
        json.dumps(report["pairs"]))  # fmt: skip
    assert (out / PER_FOLD_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    vft = report["methods"]["vft"]
    assert vft["recomputed"] == 6 and len(vft["units"]) == 6
    assert all(ua >= 0 for ua in vft["units"].values())  # recomputed, not the logged -1
    assert set(vft["per_speaker"]) == {"spk01", "spk02", "spk03"}
    (pair,) = report["pairs"]
    assert (pair["a"], pair["b"], pair["n"]) == ("vft", "tapt", 6)
    diffs = [vft["units"][u] - report["methods"]["tapt"]["units"][u] for u in pair["units"]]
    assert pair["mean_diff"] == pytest.approx(np.mean(diffs))
    assert pair["p_wilcoxon"] == pytest.approx(stats.wilcoxon(diffs).pvalue)
    text = (out / SIGNIFICANCE_MD).read_text()
    assert "| spk01 |" in text and "| vft | tapt | 6 |" in text
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(entry.info.run_id)}
    assert {SIGNIFICANCE_JSON, SIGNIFICANCE_MD, PER_FOLD_PNG, "comparison.md"} <= logged


def test_compare_without_results_writes_only_the_table(tracking_uri: str, tmp_path: Path) -> None:
    with mlflow.start_run():
        mlflow.set_tags({"ser.method": "vft", "ser.stage": "vft"})
        mlflow.log_metrics({"test_UA_mean": 50.0})
    result = compare(CompareConfig(output_dir=str(tmp_path / "c")))
    assert result.significance is None and len(result.files) == 3
    assert not (tmp_path / "c" / SIGNIFICANCE_JSON).exists()
