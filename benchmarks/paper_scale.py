"""Paper-scale cost of the three methods (V-FT, TAPT, P-TAPT) at ``recipe=paper``: time, memory
and disk per stage, measured on an IEMOCAP-sized synthetic corpus and projected to the recipe.

Every stage of every method runs through ``ser.pipelines.execute_stage`` on ONE fold, each in
its own process (so peak memory does not mix), against a local SQLite MLflow store in a
temporary folder, with the paper's values (``ser.recipes``) except what a measurement must
change, which the report lists: a few optimizer steps (``training_step``; fine-tuning
``max_epochs=1`` over a Train subset of steps x batch files), checkpoints close enough to be
seen, batch sizes times ``--batch-scale``, and Train subsets for phase 1, clustering (and so
phase 2) and fine-tuning. TAPT reads the whole fold. The stages:

    pretrain_w2v1   wav2vec 1.0 ``--w2v1`` (default ``large``, wav2vec_large.pt's structure)
    cluster         k = ``--num-clusters`` (64, 512, 4096) on the phase-1 model's features
    pretrain_w2v2   wav2vec 2.0 ``--wav2vec2`` (default ``base``: random init, wav2vec2-base size)
    tapt_pretrain   the same backbone
    finetune        from TAPT's backbone as a ``runs:/`` URI (TAPT's and P-TAPT's fine-tuning)

Measured per stage: seconds per optimizer step after the first (as measured; scaled back to
the paper's batch linearly; and "by audio": cost per processed sample times the samples of a
paper-size batch, from ser's own batch sampler on the fold's lengths), peak RSS of the stage's
process, disk under the stage's output folder at the end and at its peak (sampled every 0.5 s
from this process, with what the stage adds to ser's input cache ``<output_root>/.inputs`` and
its own $TMPDIR, where Lightning writes each checkpoint first), the bytes of its MLflow run's
artifact folder and of the logged pyfunc model (MLflow 3 stores it under
``<experiment>/models/``), and what it spends hashing, downloading and logging. Then the whole
recipe is projected: 3 methods, 5 folds, 5 fine-tuning repeats, 20,000 TAPT and phase-2 steps,
10,000 phase-1 steps, 15 fine-tuning epochs at batch 64: compute per method on this machine,
disk of outputs + input copies + MLflow artifacts, and the peak, against the goal (< 25 GB
kept, never > 40 GB at the peak). First, FACTS.md's reference workload is timed once
(``--no-calibrate`` skips it), to say how loaded the shared cores were.

    python benchmarks/paper_scale.py     # about 16 min on 2 shared cores; writes the corpus
                                         # first if missing (7 h of audio, 0.8 GB, about 20 s)
    python benchmarks/paper_scale.py --utterances 200 --wav2vec2 tiny --w2v1 tiny   # 3 min
    python benchmarks/paper_scale.py --stages tapt_pretrain finetune --steps 6 --keep
    python benchmarks/paper_scale.py --report-from /tmp/ser-paper-scale-XXXX  # a kept run
    python benchmarks/paper_scale.py --device cuda --precision 16-mixed --steps 20

On a GPU (``--device cuda``; batch scale 1 by default there) the table adds peak GPU memory
(``torch.cuda.max_memory_allocated``) and flags any non-finite training loss; utterances per
second are reported either way. The corpus is cached in ``--corpus`` (default
``data/paper_scale/n<utterances>-seed<seed>``, written by ``benchmarks/iemocap_like.py``); the
report goes to ``--out`` (default ``benchmarks/results/paper_scale.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import iemocap_like  # noqa: E402  (the sibling module, importable when run as a script)

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("pretrain_w2v1", "cluster", "pretrain_w2v2", "tapt_pretrain", "finetune")
NEEDS = {"cluster": "pretrain_w2v1", "pretrain_w2v2": "cluster"}
STEP_STAGES = ("pretrain_w2v1", "pretrain_w2v2", "tapt_pretrain", "finetune")
METHODS = {
    "V-FT": ("finetune",),
    "TAPT": ("tapt_pretrain", "finetune"),
    "P-TAPT": ("pretrain_w2v1", "cluster", "pretrain_w2v2", "finetune"),
}
EXPERIMENT = "paper_scale"
INPUT_CACHE = ".inputs"  # ser.pipelines.INPUT_CACHE: downloaded input URIs, under output_root
SAMPLE_RATE = iemocap_like.SAMPLE_RATE
GB = 1e9
GOAL_TOTAL_GB = 25.0
GOAL_PEAK_GB = 40.0
FEATURE_BYTES = 512 * 4  # one phase-1 frame feature on disk (float32 x 512)


# =========================================================================== the child process
# Everything below up to "the parent" runs inside one stage's own process.


def _probe_class() -> type:
    """A Lightning callback that times every step, validation, test and checkpoint (built
    lazily: the parent never imports Lightning)."""
    import torch
    from pytorch_lightning.callbacks import Callback

    cuda = torch.cuda.is_available()

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * page

    def shape(batch: Mapping[str, Any]) -> dict[str, int]:
        items, padded = batch["input_values"].shape
        lengths = batch["lengths"]
        return {"items": int(items), "padded": int(items * padded),
                "real": int(lengths.sum()), "cropped": int(items * int(lengths.min()))}

    class StepProbe(Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.events: list[tuple[float, str]] = []
            self.steps: list[dict[str, Any]] = []
            self.evals: list[dict[str, Any]] = []  # validations and tests
            self.checkpoint_files: dict[str, int] = {}
            self.non_finite = 0
            self._eval: dict[str, Any] | None = None

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                                 batch_idx: int) -> None:
            self.steps.append({"start": now(), **shape(batch)})
            self.events.append((self.steps[-1]["start"], "step"))

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            step = self.steps[-1]
            step["end"] = now()
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            if loss is not None and not bool(torch.isfinite(loss.detach()).all()):
                self.non_finite += 1
            step["finite"] = loss is None or bool(torch.isfinite(loss.detach()).all())
            step["rss"] = rss()
            step["max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

        def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Any) -> None:
            self.events.append((time.perf_counter(), "checkpoint"))

        def _eval_start(self, kind: str) -> None:
            self._eval = {"kind": kind, "start": now(), "items": 0, "real": 0}
            self.events.append((self._eval["start"], kind))

        def _eval_batch(self, batch: Any) -> None:
            if self._eval is not None:
                self._eval["items"] += int(batch["input_values"].shape[0])
                self._eval["real"] += int(batch["lengths"].sum())

        def _eval_end(self) -> None:
            if self._eval is not None:
                self._eval["end"] = now()
                self.evals.append(self._eval)
                self._eval = None

        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            self._eval_start("validation")

        def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                                      batch_idx: int, dataloader_idx: int = 0) -> None:
            self._eval_batch(batch)

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            self._eval_end()

        def on_test_start(self, trainer: Any, pl_module: Any) -> None:
            self._eval_start("test")
            self._list_checkpoints(trainer)  # fine-tuning tests its last.ckpt, still there

        def on_test_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
            self._eval_batch(batch)

        def on_test_end(self, trainer: Any, pl_module: Any) -> None:
            self._eval_end()

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self.events.append((now(), "epoch_end"))

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.events.append((now(), "train_end"))
            self._list_checkpoints(trainer)

        def _list_checkpoints(self, trainer: Any) -> None:
            callback = trainer.checkpoint_callback
            folder = Path(callback.dirpath) if callback and callback.dirpath else None
            if folder and folder.is_dir():
                for path in folder.glob("*.ckpt"):
                    size = path.stat().st_size
                    self.checkpoint_files[path.name] = max(size, self.checkpoint_files.get(
                        path.name, 0))

        def summary(self) -> dict[str, Any]:
            return {"events": self.events, "steps": self.steps, "evals": self.evals,
                    "checkpoint_files": self.checkpoint_files, "non_finite": self.non_finite}

    return StepProbe


def _timed(module: Any, name: str, timers: dict[str, float], key: str) -> bool:
    """Replace ``module.name`` (looked up at call time by its callers) with a timed wrapper;
    False when ``ser`` no longer has it (the timer then stays 0 and its time counts as the
    stage's rest)."""
    original = getattr(module, name, None)
    if not callable(original):
        return False

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            timers[key] += time.perf_counter() - began

    setattr(module, name, wrapper)
    return True


def _timed_generator(module: Any, name: str, timers: dict[str, float], key: str) -> bool:
    """As :func:`_timed` for a generator function: only the time spent inside it counts."""
    original = getattr(module, name, None)
    if not callable(original):
        return False

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        items = original(*args, **kwargs)
        while True:
            began = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                return
            finally:
                timers[key] += time.perf_counter() - began
            yield item

    setattr(module, name, wrapper)
    return True


def _patch_timers(timers: dict[str, float]) -> list[str]:
    """Time what a stage does besides training: the data fingerprint, downloading ``runs:/``
    inputs, logging outputs as artifacts, fine-tuning's export and pyfunc logging, and
    clustering's feature pass and assignment (its k-means times are in its stats). Returns
    the timers that found nothing to time."""
    from ser import pipelines
    from ser.stages import cluster, finetune

    found = {
        "data_print_s": _timed(pipelines, "_data_print", timers, "data_print_s"),
        "inputs_s": _timed(pipelines, "_with_local_inputs", timers, "inputs_s"),
        "log_outputs_s": _timed(pipelines, "_log_outputs", timers, "log_outputs_s"),
        "finish_finetune_s": _timed(pipelines, "_finish_finetune", timers, "finish_finetune_s"),
        "export_s": _timed(finetune, "export_model", timers, "export_s"),
        # The feature pass: one function over the fold's files, or a generator of features.
        "extract_s": (_timed(cluster, "_extract_share", timers, "extract_s")
                      or _timed_generator(cluster, "_extract", timers, "extract_s")),
        "assign_s": _timed(cluster, "assign_all", timers, "assign_s"),
    }  # fmt: skip
    return [key for key, ok in found.items() if not ok]


def _local_path(uri: str) -> Path:
    from urllib.parse import unquote, urlparse

    parsed = urlparse(uri)
    return Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(uri)


def _stage_config(stage: str, overrides: Mapping[str, Any]) -> Any:
    """The stage's config as ``recipe=paper`` resolves it, then the measurement's overrides."""
    from ser import config as C
    from ser import pipelines, recipes

    entries = {"pretrain_w2v1": C.Phase1Entry, "cluster": C.ClusterEntry,
               "pretrain_w2v2": C.Phase2Entry, "tapt_pretrain": C.TaptEntry,
               "finetune": C.FinetuneEntry}  # fmt: skip
    resolved = recipes.resolve(entries[stage](recipe="paper"))
    cls = pipelines.STAGES[stage].config_cls
    values = {f.name: getattr(resolved, f.name) for f in dataclasses.fields(cls)}
    values.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    return cls(**values)


FACTS_REFERENCE_S = 3.5  # ../shared/FACTS.md: wav2vec2-base size, batch 4 x 3 s, fwd + bwd


def calibrate(steps: int = 4) -> dict[str, Any]:
    """FACTS.md's reference workload, to tell how fast this machine is right now: a
    wav2vec2-base-size model (random init, layerdrop off), batch 4 x 3 s, forward + backward."""
    import torch
    from transformers import Wav2Vec2Model

    from ser.models.backbones import preset_config

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = Wav2Vec2Model(preset_config("base", layerdrop=0.0)).to(device).train()
    wav = torch.randn(4, 3 * SAMPLE_RATE, device=device)
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        model(wav).last_hidden_state.pow(2).mean().backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return {"seconds": statistics.median(times[1:]), "times": times,
            "load": os.getloadavg()[0]}  # fmt: skip


def child(spec_path: Path) -> None:
    """Run one stage as ``spec_path`` says and write what was measured next to it."""
    import logging

    began = time.perf_counter()
    spec = json.loads(spec_path.read_text())
    if spec["stage"] == "calibrate":
        Path(spec["result"]).write_text(json.dumps(calibrate()))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import mlflow
    import torch

    from ser import pipelines
    from ser.stages.contract import StageContext

    imported = time.perf_counter()
    mlflow.set_tracking_uri(spec["tracking_uri"])
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        mlflow.create_experiment(EXPERIMENT, artifact_location=spec["artifact_location"])
    mlflow.set_experiment(EXPERIMENT)
    stage = spec["stage"]
    config = _stage_config(stage, spec["overrides"])
    probe = _probe_class()()
    timers = dict.fromkeys(("extract_s", "assign_s", "data_print_s", "inputs_s", "log_outputs_s",
                            "finish_finetune_s", "export_s"), 0.0)
    untimed = _patch_timers(timers)
    context = StageContext(callback_factory=lambda index, name: [probe])
    cache = Path(spec["output_root"]) / getattr(pipelines, "INPUT_CACHE", ".inputs")
    cached = file_sizes(cache)
    start = time.perf_counter()
    outcome = pipelines.execute_stage(stage, config, force=True,
                                      output_root=spec["output_root"], context=context)
    finished = time.perf_counter()
    run = mlflow.get_run(outcome.run_id)
    model_uri = run.data.tags.get("ser.model_uri", "")
    model_dir = None
    if model_uri.startswith("models:/"):
        model = mlflow.get_logged_model(model_uri.removeprefix("models:/").split("/")[0])
        model_dir = _local_path(model.artifact_location)
    with sqlite3.connect(spec["tracking_uri"].removeprefix("sqlite:///")) as db:
        rows = db.execute("SELECT COUNT(*) FROM metrics WHERE run_uuid = ?",
                          (outcome.run_id,)).fetchone()[0]  # fmt: skip
    result = {
        "stage": stage,
        "config": dataclasses.asdict(config),
        "run_id": outcome.run_id,
        "output_dir": str(outcome.output_dir),
        "outputs": file_sizes(outcome.output_dir),
        "artifacts": file_sizes(_local_path(run.info.artifact_uri)),
        "model_artifacts": file_sizes(model_dir) if model_dir else {},
        "tmp": file_sizes(Path(tempfile.gettempdir())),
        # ser's cache of downloaded input URIs (under output_root), what this stage added.
        "input_cache": {k: v for k, v in file_sizes(cache).items() if k not in cached},
        "metric_rows": int(rows),
        "import_s": imported - began,
        "stage_s": finished - start,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "cuda_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "cuda_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "timers": timers,
        "untimed": untimed,
        "probe": probe.summary(),
    }
    if stage == "cluster":
        stats = Path(outcome.output_dir) / spec["fold"] / "clusters" / "cluster_stats.json"
        result["cluster_stats"] = json.loads(stats.read_text())
    Path(spec["result"]).write_text(json.dumps(result))


def file_sizes(folder: Path) -> dict[str, int]:
    """Disk used (allocated blocks, as ``du``) by every file under ``folder``."""
    sizes: dict[str, int] = {}
    if not folder.exists():
        return sizes
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = Path(dirpath) / name
            try:
                sizes[str(path.relative_to(folder))] = path.lstat().st_blocks * 512
            except FileNotFoundError:  # removed while we walk
                continue
    return sizes


def disk_used(folder: Path) -> int:
    return sum(file_sizes(folder).values())


# =========================================================================== the parent


@dataclasses.dataclass
class Plan:
    """What the measurement runs on: the corpus, the fold and the subsets."""

    corpus: Path
    meta: dict[str, Any]
    fold: str  # the fold file's stem, the same for every stage ("label_1")
    full_label: Path
    subsets: dict[str, Path]  # stage -> a label file named like the fold
    notes: list[str]


def stratified(items: Mapping[str, str], n: int, rng: np.random.Generator) -> dict[str, str]:
    """``n`` items drawn at random with every class present in proportion (at least one)."""
    if n >= len(items):
        return dict(items)
    by_class: dict[str, list[str]] = {}
    for name, label in sorted(items.items()):
        by_class.setdefault(label, []).append(name)
    classes = sorted(by_class)
    counts = iemocap_like.apportion(n, [len(by_class[c]) for c in classes])
    chosen: dict[str, str] = {}
    for label, count in zip(classes, counts, strict=True):
        for name in rng.choice(by_class[label], size=min(count, len(by_class[label])),
                               replace=False):  # fmt: skip
            chosen[str(name)] = label
    return chosen


def make_plan(args: argparse.Namespace, work: Path) -> Plan:
    folder = Path(args.corpus or f"data/paper_scale/n{args.utterances}-seed{args.seed}")
    meta = iemocap_like.ensure_corpus(folder, args.utterances, args.seed)
    from ser.data.labels import read_label_file, write_label_file

    full = folder / iemocap_like.LABEL_DIR / f"label_{args.fold}.json"
    fold = read_label_file(full)
    rng = np.random.default_rng(args.seed)
    batch = scaled_batch(args.batch_scale)
    sizes = {
        "pretrain_w2v1": max(args.phase1_train, math.ceil(args.steps * batch / 0.9) + 2),
        "cluster": args.cluster_train,
        "finetune": args.steps * batch,
    }
    subsets: dict[str, Path] = {}
    notes = []
    for stage, n in sizes.items():
        train = stratified(fold.train, n, rng)
        test = stratified(fold.test, args.test_utterances, rng)
        path = work / "labels" / stage / full.name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_label_file(path, {"Train": train, "Val": {}, "Test": test})
        subsets[stage] = path
        notes.append(f"{stage}: Train subset of {len(train)} of {len(fold.train)} files "
                     f"(stratified, seeded), Test {len(test)} of {len(fold.test)}")
    subsets["pretrain_w2v2"] = subsets["cluster"]
    subsets["tapt_pretrain"] = full
    notes[1] += "; phase 2 trains on the same subset (it needs every Train file's labels)"
    notes.append(f"tapt_pretrain: the whole fold ({len(fold.train)} Train files)")
    return Plan(folder, meta, full.stem, full, subsets, notes)


def scaled_batch(scale: float) -> int:
    return max(1, round(64 * scale))


def stage_overrides(stage: str, args: argparse.Namespace, plan: Plan,
                    inputs: Mapping[str, str]) -> dict[str, Any]:
    """What the measurement changes in the paper's config of ``stage``."""
    common: dict[str, Any] = {
        "datadir": str(plan.corpus / iemocap_like.AUDIO_DIR),
        "labelpath": str(plan.subsets[stage]),
        "seed": args.seed,
    }
    if stage == "cluster":
        return {**common, "pretrained_path": inputs["pretrain_w2v1"],
                "num_clusters": list(args.num_clusters)}
    hardware = {"accelerator": "gpu" if args.device == "cuda" else "cpu",
                "devices": "1", "precision": args.precision or ("32" if args.device == "cpu"
                                                                 else "16-mixed")}  # fmt: skip
    batch = scaled_batch(args.batch_scale)
    steps = {"training_step": args.steps, "checkpoint_every": max(args.steps - 1, 1),
             "batch_size": batch}  # fmt: skip
    if stage == "pretrain_w2v1":  # validation + checkpoint at the last step only
        return {**common, **hardware, **steps, "checkpoint_every": args.steps, "w2v1": args.w2v1}
    if stage == "pretrain_w2v2":
        return {**common, **hardware, **steps, "backbone": args.wav2vec2,
                "clusterpath": inputs["cluster"], "warmup_step": min(100, args.steps)}
    if stage == "tapt_pretrain":
        return {**common, **hardware, **steps, "backbone": args.wav2vec2,
                "warmup_step": min(100, args.steps)}
    source = ({"pretrained_path": inputs["tapt_pretrain"]} if "tapt_pretrain" in inputs
              else {"backbone": args.wav2vec2})
    return {**common, **hardware, **source, "batch_size": batch, "max_epochs": 1, "num_exps": 1}


def run_child(stage: str, spec: dict[str, Any], work: Path, timeout: float
              ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Run one stage in its own process; sample its disk every 0.5 s. Returns the child's
    result (None on failure) and what this process observed."""
    spec_path = work / f"{stage}.spec.json"
    spec_path.write_text(json.dumps(spec))
    tmp = Path(spec["tmpdir"])
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp), "MLFLOW_TRACKING_URI": spec["tracking_uri"],
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    env.pop("MLFLOW_RUN_ID", None)
    log_path = work / f"{stage}.log"
    outputs = Path(spec["output_root"]) / stage
    cache = Path(spec["output_root"]) / INPUT_CACHE
    cache_start = disk_used(cache)
    began = time.perf_counter()
    peak = {"outputs": 0, "tmp": 0, "both": 0}
    print(f"[{time.strftime('%H:%M:%S')}] {stage}: running (log {log_path})", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child",
                                 str(spec_path)], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        timed_out = False
        while proc.poll() is None:
            out_now = disk_used(outputs) + disk_used(cache) - cache_start
            tmp_now = disk_used(tmp)
            peak = {"outputs": max(peak["outputs"], out_now), "tmp": max(peak["tmp"], tmp_now),
                    "both": max(peak["both"], out_now + tmp_now)}  # fmt: skip
            if time.perf_counter() - began > timeout:
                timed_out = True
                os.killpg(proc.pid, signal.SIGTERM)  # the process group this call started
                try:
                    proc.wait(10)  # Lightning catches SIGTERM and may not stop at once
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.5)
    observed = {"wall_s": time.perf_counter() - began, "peak_disk": peak,
                "returncode": proc.wait(), "timed_out": timed_out, "log": str(log_path)}
    result_path = Path(spec["result"])
    if proc.returncode == 0 and result_path.is_file():
        result = json.loads(result_path.read_text())
        print(f"[{time.strftime('%H:%M:%S')}] {stage}: done in {observed['wall_s']:.0f} s",
              flush=True)
        return result, observed
    tail = log_path.read_text(errors="replace").splitlines()[-25:]
    why = "timed out" if timed_out else f"failed (exit {proc.returncode})"
    print(f"[{time.strftime('%H:%M:%S')}] {stage}: {why}; log tail:\n  " + "\n  ".join(tail),
          flush=True)
    return None, observed


# --------------------------------------------------------------------------- analysis


def step_timing(probe: Mapping[str, Any]) -> dict[str, Any]:
    """Seconds per step after the first, from clean step-to-step intervals (no validation or
    checkpoint in between), the checkpoint write time, and the audio of the timed steps."""
    steps = [s for s in probe["steps"] if "end" in s]
    events = sorted((t, kind) for t, kind in probe["events"])
    bounds: list[float] = []
    if steps:
        # A step lasts until the next one starts; the last one until its epoch ends.
        last = next((t for t, kind in events
                     if kind in ("epoch_end", "train_end") and t >= steps[-1]["end"]),
                    steps[-1]["end"])  # fmt: skip
        bounds = [s["start"] for s in steps[1:]] + [last]

    def between(lo: float, hi: float) -> list[str]:
        return [kind for t, kind in events if lo <= t < hi and kind not in ("step",)]

    clean, gaps, dirty = [], [], []
    for i, step in enumerate(steps):
        inside = between(step["end"], bounds[i])
        kinds = set(inside) - {"epoch_end"}
        if not kinds:
            gaps.append(bounds[i] - step["end"])
            if i > 0:
                clean.append(i)
        elif "checkpoint" in kinds:
            dirty.append(i)
    seconds = [bounds[i] - steps[i]["start"] for i in clean]
    normal_gap = statistics.median(gaps) if gaps else 0.0
    eval_s = {(e["start"]): e["end"] - e["start"] for e in probe["evals"]}
    ckpt_s = []
    for i in dirty:
        window = bounds[i] - steps[i]["end"]
        window -= sum(d for t, d in eval_s.items() if steps[i]["end"] <= t < bounds[i])
        ckpt_s.append(max(window - normal_gap, 0.0))
    train_end = [t for t, kind in events if kind == "train_end"]
    # Without a monitored metric Lightning writes last.ckpt only when training ends
    # (ModelCheckpoint.on_train_end, after this probe's): fine-tuning without a Val split.
    at_end = [t for t, kind in events if kind == "checkpoint" and train_end and t >= train_end[-1]]
    for t in at_end:
        later = [u for u, kind in events if u > t and kind != "checkpoint"]
        ckpt_s.append((later[0] if later else t) - t)
    timed = [steps[i] for i in clean]
    return {
        "steps": len(steps),
        "timed": len(timed),
        "s_per_step": statistics.median(seconds) if seconds else None,
        "items": statistics.fmean(s["items"] for s in timed) if timed else None,
        "padded": statistics.fmean(s["padded"] for s in timed) if timed else None,
        "cropped": statistics.fmean(s["cropped"] for s in timed) if timed else None,
        "real": statistics.fmean(s["real"] for s in timed) if timed else None,
        "checkpoint_s": statistics.fmean(ckpt_s) if ckpt_s else None,
        "checkpoint_saves": len(ckpt_s),
        "checkpoint_at_train_end_only": bool(at_end) and not dirty,
        "first_step_s": (bounds[0] - steps[0]["start"]) if steps else None,
        "loop_s": (train_end[-1] - steps[0]["start"]) if steps and train_end else None,
        "all_finite": all(s.get("finite", True) for s in steps),
        # The process's peak (getrusage) when the last step ended: what training itself needs,
        # before the stage's final checkpoint, saving, test and logging.
        "step_rss": steps[-1].get("max_rss") if steps else None,
    }


def eval_timing(probe: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    evals = [e for e in probe["evals"] if e["kind"] == kind and e["items"]]
    if not evals:
        return None
    seconds = sum(e["end"] - e["start"] for e in evals)
    audio = sum(e["real"] for e in evals) / SAMPLE_RATE
    return {"count": len(evals), "items": sum(e["items"] for e in evals), "seconds": seconds,
            "s_per_audio_s": seconds / audio if audio else None}


@dataclasses.dataclass
class FoldFacts:
    """The corpus as the full recipe sees it, per fold."""

    train: list[list[int]]  # lengths in samples of each fold's Train files
    test: list[list[int]]
    frames: list[int]  # phase-1 20 ms frames of each fold's Train audio


def fold_facts(meta: Mapping[str, Any], w2v1: str) -> FoldFacts:
    from ser.models.emotion_w2v1 import w2v1_frames_20ms
    from ser.models.wav2vec1 import Wav2Vec1Config

    config = Wav2Vec1Config.preset(w2v1)
    items = iemocap_like.utterances_of(meta)
    sessions = sorted({u.session for u in items})
    train = [[u.samples for u in items if u.session != s] for s in sessions]
    test = [[u.samples for u in items if u.session == s] for s in sessions]
    frames = [sum(max(int(w2v1_frames_20ms(n, config)), 0) for n in fold) for fold in train]
    return FoldFacts(train, test, frames)


def full_batch_audio(stage: str, lengths: Sequence[int], seed: int) -> float:
    """Mean samples the model processes per step at the paper's batch, from ser's own sampler
    over ``lengths`` (padded to the longest; phase 1: cropped to the shortest)."""
    from ser import recipes
    from ser.config import FinetuneConfig, Phase1Config
    from ser.data.sampling import BucketBatchSampler
    from ser.training import NUM_BUCKETS, SECONDS_PER_64

    max_len = int(10.0 * SAMPLE_RATE)
    capped = np.minimum(np.asarray(lengths), max_len)
    if stage in ("tapt_pretrain", "pretrain_w2v2"):
        sampler = BucketBatchSampler(capped.tolist(),
                                     max_batch_samples=SECONDS_PER_64 * SAMPLE_RATE,
                                     num_buckets=NUM_BUCKETS, max_len=max_len,
                                     dynamic_batch_rule="sum", seed=seed)  # fmt: skip
    elif stage == "pretrain_w2v1":
        keep = np.random.default_rng(seed).permutation(len(capped))
        part = capped[keep[round(recipes.PAPER[Phase1Config]["valid_fraction"] * len(keep)):]]
        sampler = BucketBatchSampler(part.tolist(), batch_size=64, num_buckets=NUM_BUCKETS,
                                     max_len=max_len, seed=seed)  # fmt: skip
        capped = part
        return float(np.mean([len(b) * capped[b].min() for b in sampler.global_batches(0)]))
    else:
        batch = recipes.PAPER[FinetuneConfig]["batch_size"]
        sampler = BucketBatchSampler(capped.tolist(), batch_size=batch, num_buckets=1,
                                     drop_last=True, max_len=max_len, seed=seed)  # fmt: skip
    return float(np.mean([len(b) * capped[b].max() for b in sampler.global_batches(0)]))


def scale_kind(relpath: str) -> str:
    """How a file's size grows from the measured fold subset to a whole fold."""
    name = Path(relpath).name
    if name == "split.json":
        return "train_files"
    if name.startswith("clusters") and name.endswith(".json"):
        return "frames"
    if name == "results.json":
        return "test_files"
    return "fixed"


def multiplicity(relpath: str, fold: str, folds: int, repeats: int) -> int:
    """How many copies of a measured file the whole recipe makes: per fold, per fine-tuning
    run (fold x repeat), or once per stage."""
    parts = Path(relpath).parts
    if fold not in parts:
        return 1
    rest = parts[parts.index(fold) + 1:]
    return folds * (repeats if rest and rest[0].startswith("run_") else 1)


def projected_bytes(files: Mapping[str, int], ratios: Mapping[str, float], fold: str,
                    folds: int, repeats: int) -> float:
    return sum(size * ratios[scale_kind(rel)] * multiplicity(rel, fold, folds, repeats)
               for rel, size in files.items())  # fmt: skip


# --------------------------------------------------------------------------- report


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.2f} s" if s < 10 else f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.1f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def analyse(args: argparse.Namespace, plan: Plan, results: Mapping[str, dict[str, Any]],
            observed: Mapping[str, dict[str, Any]], run: Mapping[str, Any]) -> str:
    from ser import recipes
    from ser.config import (
        FinetuneConfig,
        Phase1Config,
        Phase2Config,
        TaptConfig,
    )

    paper = recipes.PAPER
    facts = fold_facts(plan.meta, args.w2v1)
    folds = len(facts.train)
    repeats = paper[FinetuneConfig]["num_exps"]
    f = args.fold - 1
    batch = scaled_batch(args.batch_scale)
    cuda = args.device == "cuda"
    steps_full = {
        "pretrain_w2v1": paper[Phase1Config]["training_step"],
        "pretrain_w2v2": paper[Phase2Config]["training_step"],
        "tapt_pretrain": paper[TaptConfig]["training_step"],
    }
    epochs = paper[FinetuneConfig]["max_epochs"]
    ft_batch = paper[FinetuneConfig]["batch_size"]
    lines = [
        "# Paper-scale benchmark (`recipe=paper`)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {platform.node() or 'this machine'}: "
        f"{os.cpu_count()} CPU cores"
        + (f", {next((r['cuda_name'] for r in results.values() if r.get('cuda_name')), 'GPU')}"
           if cuda else ", no GPU")
        + f"; device `{args.device}`, precision "
        f"`{args.precision or ('32' if not cuda else '16-mixed')}`; batch scale "
        f"{args.batch_scale:g} (batch {batch} instead of 64; dynamic batches "
        f"{250 * batch / 64:g} s of audio instead of 250 s); {args.steps} optimizer steps per "
        f"step-based stage; backbones: wav2vec 2.0 `{args.wav2vec2}`, wav2vec 1.0 `{args.w2v1}`; "
        f"k = {', '.join(map(str, args.num_clusters))}; whole run "
        f"{fmt_s(run['seconds'])}; load average {run['load_start']:.1f} at the start, "
        f"{run['load_end']:.1f} over the last 5 min at the end (the cores are shared); code "
        f"{run.get('code', 'unknown')}.",
        "",
        f"Corpus `{plan.corpus}`: {len(plan.meta['files'])} utterances "
        f"({sum(sum(t) for t in facts.test) / SAMPLE_RATE / 3600:.1f} h), fold `{plan.fold}` "
        f"(Train {len(facts.train[f])}, Test {len(facts.test[f])}).",
        "",
        "What ran on the one fold (everything else is the paper's config):",
        "",
        *[f"- {note}" for note in plan.notes],
        "- step-based stages: `training_step` = steps, `checkpoint_every` = steps - 1 (one "
        "checkpoint inside the measurement; phase 1: = steps, so one validation and its "
        "checkpoints at the last step), warmup <= steps; "
        "fine-tuning: `max_epochs=1`, `num_exps=1` over the Train subset (steps x batch files), "
        "then its test on the Test subset; it starts from TAPT's backbone as a `runs:/` URI.",
        "",
        "## Measured, one fold",
        "",
    ]
    rows = []
    timing: dict[str, dict[str, Any]] = {}
    full_audio: dict[str, float] = {}
    for stage in STAGES:
        if stage not in observed:
            continue
        res, obs = results.get(stage), observed[stage]
        if res is None:
            why = "timed out" if obs["timed_out"] else f"failed (exit {obs['returncode']})"
            rows.append([stage, why, *["-"] * 11, fmt_s(obs["wall_s"])])
            continue
        t = step_timing(res["probe"]) if stage in STEP_STAGES else {}
        timing[stage] = t
        measured = t.get("s_per_step")
        per_full = by_audio = utt_s = None
        audio_key = "cropped" if stage == "pretrain_w2v1" else "padded"
        if measured is not None:
            per_full = measured / args.batch_scale
            full_audio[stage] = full_batch_audio(stage, facts.train[f], args.seed)
            by_audio = measured * full_audio[stage] / t[audio_key]
            utt_s = t["items"] / measured
        if stage == "cluster":
            stats = res["cluster_stats"]
            kmeans = sum(v["kmeans_seconds"] for v in stats["per_k"].values())
            what = (f"{stats['files']} files, {stats['frames_total']:,} frames: features "
                    f"{fmt_s(res['timers']['extract_s'])}, k-means {fmt_s(kmeans)}, "
                    f"assignment {fmt_s(res['timers']['assign_s'])}")
        else:
            what = (f"{t['steps']} steps, {t['timed']} timed; {t['items']:.1f} utt, "
                    f"{t[audio_key] / SAMPLE_RATE:.1f} s audio per step" if t.get("timed") else
                    f"{t.get('steps', 0)} steps")  # fmt: skip
        ckpt = sum(res["probe"]["checkpoint_files"].values()) or None
        rows.append([
            stage, what, fmt_s(measured), fmt_s(per_full), fmt_s(by_audio),
            f"{utt_s:.2f}" if utt_s else "-",
            fmt_bytes(res["peak_rss"]) + (f" ({fmt_bytes(t['step_rss'])} by the last step)"
                                          if t.get("step_rss") else "")
            + (f" / GPU {fmt_bytes(res['cuda_peak'])}" if cuda else ""),
            (fmt_bytes(ckpt) + f" ({fmt_s(t.get('checkpoint_s'))})") if ckpt else "-",
            fmt_bytes(sum(res["outputs"].values())), fmt_bytes(obs["peak_disk"]["both"]),
            fmt_bytes(sum(res["tmp"].values()) + sum(res.get("input_cache", {}).values())),
            fmt_bytes(sum(res["artifacts"].values())),
            fmt_bytes(sum(res["model_artifacts"].values()) or None), fmt_s(obs["wall_s"]),
        ])
        if cuda and not t.get("all_finite", True):
            rows[-1][1] += "; NON-FINITE LOSS"
    lines += table(
        ["stage", "what was measured", "s/step measured", "s/step x 1/scale",
         "s/step full batch (by audio)", "utt/s", "peak RSS", "checkpoints (write)",
         "outputs at end", "disk peak (outputs, inputs, $TMPDIR)", "input copies",
         "MLflow run artifacts",
         "logged model", "stage wall"],
        rows,
    )
    finite = [s for s in timing if not timing[s].get("all_finite", True)]
    lines += [
        "",
        "s/step: median of the step-to-step intervals after the first step with no checkpoint "
        "or validation inside (data loading, forward, backward, optimizer, logging). 'by "
        "audio': measured seconds per processed sample times the samples a paper-size batch "
        "holds on this fold (ser's sampler: fine-tuning's random batches of 64 are padded to "
        "10 s almost always, which a scaled-down batch is not; phase 1 crops each batch to its "
        "shortest item). Peak RSS: of the stage's process (getrusage), and in brackets the same "
        "peak as it stood when the last training step ended. Disk peak: the stage's output "
        "folder, what it adds to ser's input cache and its $TMPDIR, sampled every 0.5 s "
        "(Lightning writes each checkpoint into $TMPDIR first, then moves it).",
        f"Training losses: {'all finite' if not finite else 'NOT finite in ' + ', '.join(finite)}.",
        "",
    ]
    for stage in ("pretrain_w2v1", "finetune"):
        res = results.get(stage)
        kind = "validation" if stage == "pretrain_w2v1" else "test"
        e = eval_timing(res["probe"], kind) if res else None
        if e:
            lines.append(f"- {stage} {kind}: {e['count']} run(s) over {e['items']} utterances "
                         f"in {fmt_s(e['seconds'])} ({e['s_per_audio_s']:.3f} s per second of "
                         "audio).")
    untimed = sorted({key for res in results.values() for key in res.get("untimed", [])})
    if untimed:
        lines.append(f"- not timed (ser no longer has the function they wrapped; their time "
                     f"counts as the stage's rest): {', '.join(untimed)}.")
    for stage, res in results.items():
        timers = res["timers"]
        parts = [f"{what} {fmt_s(timers[key])}" for key, what in TIMER_NAMES.items()
                 if timers.get(key)]
        lines.append(f"- {stage}: in {fmt_s(res['stage_s'])} of `execute_stage` (after "
                     f"{fmt_s(res['import_s'])} of imports): " + ", ".join(parts) + ".")
    lines.append("")

    # ---------------------------------------------------------------- projection
    proj: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    for stage, res in results.items():
        if stage in STEP_STAGES and not timing.get(stage, {}).get("s_per_step"):
            notes.append(f"{stage}: no step could be timed; not projected.")
            continue
        proj[stage], note = project_stage(stage, res, observed[stage], timing.get(stage, {}),
                                          full_audio.get(stage), plan, facts, args, results)
        notes.append(note)
    lines += ["## Projection: the whole recipe on this machine", "",
              f"{folds} folds, {repeats} fine-tuning runs per fold; TAPT and phase 2 "
              f"{steps_full['tapt_pretrain']:,} steps, phase 1 {steps_full['pretrain_w2v1']:,}, "
              f"fine-tuning {epochs} epochs at batch {ft_batch}; step times 'by audio', "
              "checkpoints as often as the recipe writes them.", ""]
    lines += [f"- {note}" for note in notes]
    lines.append("")
    rows = []
    for stage in STAGES:
        if stage in proj:
            p = proj[stage]
            rows.append([stage, fmt_s(p["compute"]), fmt_bytes(p["outputs"]),
                         fmt_bytes(p["inputs"]), fmt_bytes(p["artifacts"]),
                         fmt_bytes(p["transient"]), f"{p['metric_rows']:,.0f}"])
    lines += table(["stage (5 folds)", "compute", "outputs", "input copies", "MLflow artifacts",
                    "transient (checkpoints / features)", "metric rows in the MLflow DB"], rows)
    lines += [
        "",
        "Input copies: what ser downloads from `runs:/` URIs into `<output_root>/.inputs/` "
        "(kept, reused by later runs; a local artifact store is copied all the same) plus "
        "anything left in $TMPDIR. Fine-tuning's are TAPT's backbones as measured; in V-FT it "
        "has none, in P-TAPT it copies phase 2's backbones (counted as phase 2's outputs).",
        "",
    ]
    slow = (run.get("calibration") or {}).get("seconds", 0.0) / FACTS_REFERENCE_S
    rows = []
    kept_total = 0.0
    missing_any = []
    for method, stages in METHODS.items():
        missing = [s for s in stages if s not in proj]
        missing_any += missing
        compute = sum(proj[s]["compute"] for s in stages if s in proj)
        kept = sum(proj[s]["outputs"] + proj[s]["artifacts"] + proj[s]["inputs"]
                   for s in stages if s in proj)  # fmt: skip
        if method == "V-FT" and "finetune" in proj:
            kept -= proj["finetune"]["inputs"]  # from a preset: nothing to download
        if method == "P-TAPT" and "finetune" in proj:
            kept += proj.get("pretrain_w2v2", {}).get("outputs", 0.0) - proj["finetune"]["inputs"]
        kept_total += kept
        row = [method, fmt_s(compute) + (f" (without {', '.join(missing)})" if missing else "")]
        if slow:
            row.append(fmt_s(compute / slow))
        rows.append([*row, fmt_bytes(kept)])
    header = ["method", "compute on this machine"]
    if slow:
        header.append("compute at FACTS.md's speed")
    lines += table([*header, "outputs + input copies + MLflow artifacts"], rows)
    transient = max((p["transient"] for p in proj.values()), default=0.0)
    peak = kept_total + transient
    ok_total, ok_peak = kept_total < GOAL_TOTAL_GB * GB, peak <= GOAL_PEAK_GB * GB
    inputs_total = kept_total - sum(p["outputs"] + p["artifacts"] for p in proj.values())
    lines += [
        "",
        f"**All three methods keep {fmt_bytes(kept_total)} of outputs, input copies and MLflow "
        f"artifacts (goal < {GOAL_TOTAL_GB:g} GB: {verdict(ok_total)}); peak {fmt_bytes(peak)} "
        f"= everything kept + the largest transient ({fmt_bytes(transient)}), an upper bound "
        f"for any order of the stages (goal <= {GOAL_PEAK_GB:g} GB: {verdict(ok_peak)}).** "
        f"Of the total, input copies are {fmt_bytes(inputs_total)}: without them "
        f"{fmt_bytes(kept_total - inputs_total)} kept, peak "
        f"{fmt_bytes(peak - inputs_total)}.",
    ]
    if slow:
        lines.append(
            f"Machine speed: FACTS.md's reference workload (wav2vec2-base size, batch 4 x 3 s, "
            f"forward + backward) took {run['calibration']['seconds']:.1f} s per step at the "
            f"start of this run against {FACTS_REFERENCE_S:g} s in FACTS.md (load average "
            f"{run['calibration']['load']:.1f}): the cores ran x{slow:.1f} slower than when "
            "FACTS.md was measured; 'compute at FACTS.md's speed' divides by that.")
    per_row, db_rows = run["db"]
    rows_full = sum(p["metric_rows"] for p in proj.values())
    if db_rows:
        lines.append(
            f"MLflow database: each metric row costs {per_row:.0f} B (table and indexes, "
            f"measured by adding rows to a copy); {db_rows:,} rows here, and the recipe logs "
            f"about {rows_full:,.0f} ({fmt_bytes(rows_full * per_row)}; not in the totals).")
    if missing_any:
        lines.append(f"Missing from the projection (stage failed or not run): "
                     f"{', '.join(sorted(set(missing_any)))}.")
    lines += [
        "",
        "Scaling rules: model files, checkpoints and centroids are fixed per fold; `split.json` "
        "grows with the Train files, cluster label JSONs with the frames, `results.json` with "
        "the Test files; a file under the fold's folder counts once per fold (fine-tuning's "
        "`run_<r>` files once per run), the rest once per stage.",
        "",
    ]
    return "\n".join(lines)


TIMER_NAMES = {
    "data_print_s": "hashing the label files' audio (reuse key)",
    "inputs_s": "downloading `runs:/` inputs",
    "log_outputs_s": "logging outputs as artifacts",
    "finish_finetune_s": "metrics + pyfunc model logging",
    "export_s": "exporting the model",
    "extract_s": "phase-1 features",
    "assign_s": "nearest-centroid assignment",
}
ONCE_TIMERS = ("data_print_s", "finish_finetune_s", "export_s")  # once per stage
PER_FOLD_TIMERS = ("inputs_s", "log_outputs_s")  # grow with the folds (downloads, uploads)


def project_stage(stage: str, res: Mapping[str, Any], obs: Mapping[str, Any],
                  t: Mapping[str, Any], full_audio: float | None, plan: Plan, facts: FoldFacts,
                  args: argparse.Namespace, results: Mapping[str, Any],
                  ) -> tuple[dict[str, float], str]:
    """One stage of the whole recipe (5 folds; fine-tuning 5 x 5 runs): compute, disk, and
    the sentence that says how."""
    from ser import pipelines, recipes
    from ser.config import FinetuneConfig

    paper = recipes.PAPER
    config = paper[pipelines.STAGES[stage].config_cls]
    folds = len(facts.train)
    repeats = paper[FinetuneConfig]["num_exps"]
    epochs = paper[FinetuneConfig]["max_epochs"]
    ft_batch = paper[FinetuneConfig]["batch_size"]
    lengths = plan_lengths(plan.meta)
    label = json.loads(Path(plan.subsets[stage]).read_text())
    sub_train = [lengths[n] for n in label["Train"]]
    sub_test = [lengths[n] for n in label["Test"]]
    ratios = {"fixed": 1.0, "frames": 1.0,
              "train_files": statistics.fmean(len(x) for x in facts.train) / len(sub_train),
              "test_files": statistics.fmean(len(x) for x in facts.test) / max(len(sub_test), 1)}
    cluster = results.get("cluster")
    if stage in ("cluster", "pretrain_w2v2") and cluster:
        ratios["frames"] = statistics.fmean(facts.frames) / cluster["cluster_stats"]["frames_total"]
    train_audio = [sum(x) for x in facts.train]
    timers = res["timers"]
    # Once per stage: the process start and imports, hashing the corpus (the whole label
    # folder's audio at full scale), the final MLflow logging; per fold: downloads and uploads.
    corpus_audio = sum(lengths.values())
    hashed = sum(sub_train) + sum(sub_test)
    once = (obs["wall_s"] - res["stage_s"] + timers["data_print_s"] * corpus_audio / hashed
            + timers["finish_finetune_s"] + timers["export_s"])
    per_fold_io = sum(timers[name] for name in PER_FOLD_TIMERS)
    ckpt_files = res["probe"]["checkpoint_files"]
    ckpt_total, ckpt_max = sum(ckpt_files.values()), max(ckpt_files.values(), default=0)
    test_s = sum(e["end"] - e["start"] for e in res["probe"]["evals"] if e["kind"] == "test")
    at_end = t.get("checkpoint_s") if t.get("checkpoint_at_train_end_only") else 0.0
    rest = (res["stage_s"] - (t.get("loop_s") or 0.0) - test_s - (at_end or 0.0)
            - sum(timers[name] for name in (*ONCE_TIMERS, *PER_FOLD_TIMERS))
            - (timers["extract_s"] + timers["assign_s"] if stage == "cluster" else 0.0))
    rest = max(rest, 0.0)  # model build, loaders, saving outputs: once per fold / run
    if stage == "cluster":
        stats = res["cluster_stats"]
        cap = config["sample_cap_per_centroid"] * max(args.num_clusters)
        kmeans = sum(v["kmeans_seconds"] for v in stats["per_k"].values())
        compute = once
        for k in range(folds):
            sample = min(config["sample_ratio"] * facts.frames[k], cap)
            grow = facts.frames[k] / stats["frames_total"]
            compute += (timers["extract_s"] * train_audio[k] / sum(sub_train)
                        + kmeans * sample / stats["frames_sampled"]
                        + (timers["assign_s"] + rest) * grow + per_fold_io)
        transient = max(facts.frames) * FEATURE_BYTES
        note = (f"cluster: per fold the features ({fmt_s(timers['extract_s'])} measured), "
                f"k-means on all frames up to {cap:,} ({fmt_s(kmeans)}), assignment and label "
                f"files, scaled linearly from the measured {stats['frames_total']:,} frames to "
                f"each fold's ({statistics.fmean(facts.frames):,.0f} on average, "
                f"x{statistics.fmean(facts.frames) / stats['frames_total']:.0f}); temporary "
                f"feature file up to {fmt_bytes(transient)}; {folds} folds = {fmt_s(compute)}.")
        full_steps = 0
    elif stage == "finetune":
        step = t["s_per_step"] * (full_audio or 0.0) / t["padded"]
        full_steps = sum(epochs * (len(x) // ft_batch) for x in facts.train) * repeats
        runs = folds * repeats
        writes = runs * (1 if t.get("checkpoint_at_train_end_only") else epochs)
        e = eval_timing(res["probe"], "test")
        tests = e["s_per_audio_s"] * sum(sum(x) for x in facts.test) / SAMPLE_RATE * repeats \
            if e else 0.0
        compute = (full_steps * step + writes * (t["checkpoint_s"] or 0.0) + tests
                   + runs * rest + folds * per_fold_io + once)
        transient = ckpt_total  # each run writes its own last.ckpt once
        when = ("only when a run ends: no Val split, so no monitored checkpoint"
                if t.get("checkpoint_at_train_end_only") else "every epoch")
        note = (f"finetune: {folds} folds x {repeats} runs x {epochs} epochs = {full_steps:,} "
                f"steps x {fmt_s(step)} + {writes} checkpoint writes ({when}) "
                f"x {fmt_s(t['checkpoint_s'])} + every Test utterance {repeats} times "
                f"({fmt_s(tests)}) + {fmt_s(rest)} per run (model build, loaders) + "
                f"{fmt_s(once)} once (start-up, hashing, export, pyfunc logging) = "
                f"{fmt_s(compute)}.")
    else:
        audio = t["cropped" if stage == "pretrain_w2v1" else "padded"]
        step = t["s_per_step"] * (full_audio or 0.0) / audio
        per_fold = config["training_step"]
        full_steps = per_fold * folds
        writes = per_fold // config["checkpoint_every"]
        validations = 0.0
        e = eval_timing(res["probe"], "validation")
        if e:  # phase 1: one validation over 10 % of Train per checkpoint
            valid_audio = config["valid_fraction"] * statistics.fmean(train_audio)
            validations = writes * e["s_per_audio_s"] * valid_audio / SAMPLE_RATE
        compute = once + folds * (per_fold * step + writes * (t["checkpoint_s"] or 0.0)
                                  + validations + rest + per_fold_io)
        transient = ckpt_total + ckpt_max  # the old checkpoint(s) while the new one is written
        note = (f"{stage}: per fold {per_fold:,} steps x {fmt_s(step)} + {writes} checkpoint "
                f"writes x {fmt_s(t['checkpoint_s'])}"
                + (f" + {writes} validations ({fmt_s(validations)})" if e else "")
                + f" + {fmt_s(rest + per_fold_io)} (model build, saving, MLflow up/downloads); "
                f"{folds} folds + {fmt_s(once)} once = {fmt_s(compute)}.")
    outputs = projected_bytes(res["outputs"], ratios, plan.fold, folds, repeats)
    artifacts = projected_bytes(res["artifacts"], ratios, plan.fold, folds, repeats)
    model = sum(res["model_artifacts"].values())
    inputs = (projected_bytes(strip_tmp_root(res["tmp"]), ratios, plan.fold, folds, repeats)
              + projected_bytes(res.get("input_cache", {}), ratios, plan.fold, folds, repeats))
    rows_per_step = res["metric_rows"] / max(t.get("steps") or 1, 1)
    return ({"compute": compute, "outputs": outputs, "artifacts": artifacts + model,
             "inputs": inputs, "transient": transient,
             "metric_rows": rows_per_step * full_steps if full_steps else res["metric_rows"]
             * folds}, note)  # fmt: skip


def db_stats(path: Path, probe_rows: int = 20_000) -> tuple[float, int]:
    """Bytes one more metric row costs the MLflow SQLite database (table and indexes), found by
    adding ``probe_rows`` copies of a logged row (new steps) to a copy of it; and its rows."""
    if not path.is_file():
        return 0.0, 0
    copy = path.with_name("probe-" + path.name)
    shutil.copyfile(path, copy)
    try:
        with sqlite3.connect(copy) as db:
            rows = int(db.execute("SELECT COUNT(*) FROM metrics").fetchone()[0])
            names = [r[1] for r in db.execute("PRAGMA table_info(metrics)")]
            template = db.execute("SELECT * FROM metrics ORDER BY LENGTH(key) DESC LIMIT 1"
                                  ).fetchone()  # fmt: skip
            if template is None:
                return 0.0, rows

            def pages() -> int:
                count = db.execute("PRAGMA page_count").fetchone()[0]
                return int(count) * int(db.execute("PRAGMA page_size").fetchone()[0])

            before = pages()
            step, stamp = names.index("step"), names.index("timestamp")
            fresh = []
            for i in range(probe_rows):
                row = list(template)
                row[step], row[stamp] = 10**9 + i, int(row[stamp]) + i
                fresh.append(row)
            marks = ", ".join("?" * len(names))
            db.executemany(f"INSERT INTO metrics ({', '.join(names)}) VALUES ({marks})", fresh)
            db.commit()
            return (pages() - before) / probe_rows, rows
    finally:
        copy.unlink(missing_ok=True)


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def plan_lengths(meta: Mapping[str, Any]) -> dict[str, int]:
    return {row["name"]: int(row["samples"]) for row in meta["files"]}


def other_cluster(res: Mapping[str, Any]) -> float:
    """Clustering time that is neither features, k-means nor assignment (JSON, start-up)."""
    kmeans = sum(v["kmeans_seconds"] for v in res["cluster_stats"]["per_k"].values())
    return max(res["stage_s"] - res["timers"]["extract_s"] - res["timers"]["assign_s"] - kmeans,
               0.0)


def strip_tmp_root(files: Mapping[str, int]) -> dict[str, int]:
    """$TMPDIR files with the download folder's own name dropped (``tmpXYZ/w2v1/label_1/..``
    -> ``w2v1/label_1/..``), so the fold rules apply."""
    return {str(Path(*Path(rel).parts[1:])) if len(Path(rel).parts) > 1 else rel: size
            for rel, size in files.items()}  # fmt: skip


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=" ".join((__doc__ or "").split("\n\n")[0].split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--corpus", default=None,
                        help="folder of the synthetic corpus, reused when present; default: "
                             "data/paper_scale/n<utterances>-seed<seed>")
    parser.add_argument("--utterances", type=int, default=iemocap_like.IEMOCAP_UTTERANCES,
                        help="corpus size; class and session counts scale with it")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus and subsets")
    parser.add_argument("--fold", type=int, default=1, choices=range(1, 6),
                        help="the fold (test session) that is measured")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="stages to measure (cluster needs pretrain_w2v1, pretrain_w2v2 "
                             "needs cluster: added when missing)")
    parser.add_argument("--wav2vec2", default="base",
                        help="wav2vec 2.0 backbone preset (base: wav2vec2-base's size)")
    parser.add_argument("--w2v1", default="large",
                        help="wav2vec 1.0 preset (large: wav2vec_large.pt's structure)")
    parser.add_argument("--num-clusters", type=int, nargs="+", default=[64, 512, 4096],
                        help="cluster counts")
    parser.add_argument("--steps", type=int, default=4,
                        help="optimizer steps per step-based stage (the first is not timed; "
                             "fine-tuning: its Train subset is steps x batch files)")
    parser.add_argument("--batch-scale", type=float, default=None,
                        help="multiplies the recipe's batch sizes (64, and 250 s of audio for "
                             "dynamic batches); default 0.125 on cpu, 1 on cuda")
    parser.add_argument("--phase1-train", type=int, default=160,
                        help="Train files of phase 1's subset (10 %% of them validate)")
    parser.add_argument("--cluster-train", type=int, default=64,
                        help="Train files clustered (and trained on by phase 2)")
    parser.add_argument("--test-utterances", type=int, default=16,
                        help="Test files in the subsets (fine-tuning tests on them)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the stages train")
    parser.add_argument("--precision", choices=("32", "16-mixed", "bf16-mixed"), default=None,
                        help="default: 32 on cpu, the recipe's 16-mixed on cuda")
    parser.add_argument("--stage-timeout", type=float, default=1800,
                        help="seconds after which a stage is stopped and reported as missing")
    parser.add_argument("--workdir", default=None,
                        help="where the temporary run folder goes (default: the system's temp)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary folder (outputs, MLflow store, logs)")
    parser.add_argument("--out", default="benchmarks/results/paper_scale.md",
                        help="Markdown file for the report")
    parser.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                        help="first time FACTS.md's reference workload (wav2vec2-base size, "
                             "batch 4 x 3 s, forward + backward: 3.5 s there) to tell how "
                             "loaded the shared cores are")
    parser.add_argument("--report-from", default=None,
                        help="remake the report from a work folder kept with --keep")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_scale is None:
        args.batch_scale = 0.125 if args.device == "cpu" else 1.0
    if not 0 < args.batch_scale <= 1:
        parser.error("--batch-scale must be in (0, 1]")
    if args.steps < 3:
        parser.error("--steps must be >= 3 (the first step is not timed, one holds a checkpoint)")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(Path(args.child))
        return
    if args.report_from:
        write_report(*load_run(Path(args.report_from), args.out))
        return
    began, load_start, code = time.perf_counter(), os.getloadavg()[0], git_state()
    wanted = set(args.stages)
    for stage in list(wanted):
        while stage in NEEDS:
            stage = NEEDS[stage]
            wanted.add(stage)
    stages = [s for s in STAGES if s in wanted]
    work = Path(tempfile.mkdtemp(prefix="ser-paper-scale-", dir=args.workdir))
    print(f"work folder {work}", flush=True)
    try:
        plan = make_plan(args, work)
        tracking = f"sqlite:///{work / 'mlflow.db'}"
        calibration = None
        if args.calibrate:
            spec = {"stage": "calibrate", "tracking_uri": tracking, "output_root": str(work),
                    "tmpdir": str(work / "tmp" / "calibrate"),
                    "result": str(work / "calibrate.result.json")}  # fmt: skip
            calibration, _ = run_child("calibrate", spec, work, args.stage_timeout)
        results: dict[str, dict[str, Any]] = {}
        observed: dict[str, dict[str, Any]] = {}
        uris: dict[str, str] = {}
        outputs = {"pretrain_w2v1": "w2v1", "cluster": "clusters", "tapt_pretrain": "backbone",
                   "pretrain_w2v2": "backbone"}  # fmt: skip
        for stage in stages:
            need = NEEDS.get(stage)
            if need and need not in uris:
                print(f"{stage}: skipped, {need} did not finish", flush=True)
                continue
            spec = {
                "stage": stage,
                "overrides": stage_overrides(stage, args, plan, uris),
                "tracking_uri": tracking,
                "artifact_location": (work / "mlartifacts").as_uri(),
                "output_root": str(work / "outputs"),
                "tmpdir": str(work / "tmp" / stage),
                "result": str(work / f"{stage}.result.json"),
                "fold": plan.fold,
            }
            result, seen = run_child(stage, spec, work, args.stage_timeout)
            observed[stage] = seen
            (work / f"{stage}.observed.json").write_text(json.dumps(seen))
            if result is not None:
                results[stage] = result
                if stage in outputs:
                    uris[stage] = f"runs:/{result['run_id']}/{outputs[stage]}"
        run = {"args": {k: v for k, v in vars(args).items() if k != "out"},
               "plan": {"corpus": str(plan.corpus), "fold": plan.fold,
                        "full_label": str(plan.full_label),
                        "subsets": {k: str(v) for k, v in plan.subsets.items()},
                        "notes": plan.notes},
               "seconds": time.perf_counter() - began, "load_start": load_start, "code": code,
               "load_end": os.getloadavg()[1], "db": db_stats(work / "mlflow.db"),
               "calibration": calibration}  # fmt: skip
        (work / RUN_JSON).write_text(json.dumps(run))
        write_report(args, plan, results, observed, run)
    finally:
        if args.keep:
            print(f"kept {work} (python {Path(__file__).name} --report-from {work} remakes the "
                  "report)", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


RUN_JSON = "run.json"


def git_state() -> str:
    """The commit measured, and whether ser/ differs from it (read-only git commands)."""
    def git(*words: str) -> str:
        try:
            return subprocess.run(["git", *words], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout.strip()  # fmt: skip
        except (OSError, subprocess.CalledProcessError):
            return ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--", "ser").splitlines()
    return head + (f" with {len(changed)} uncommitted file(s) under ser/" if changed else "")


def load_run(work: Path, out: str) -> tuple[argparse.Namespace, Plan, dict[str, dict[str, Any]],
                                             dict[str, dict[str, Any]], dict[str, Any]]:
    """What a kept work folder holds, to remake its report."""
    run = json.loads((work / RUN_JSON).read_text())
    args = argparse.Namespace(**run["args"], out=out)
    saved = run["plan"]
    corpus = Path(saved["corpus"])
    meta = iemocap_like.read_metadata(corpus)
    if meta is None:
        raise SystemExit(f"{corpus}: the corpus of this run is gone")
    plan = Plan(corpus, meta, saved["fold"], Path(saved["full_label"]),
                {k: Path(v) for k, v in saved["subsets"].items()}, saved["notes"])
    results, observed = {}, {}
    for stage in STAGES:
        if (work / f"{stage}.observed.json").is_file():
            observed[stage] = json.loads((work / f"{stage}.observed.json").read_text())
        if (work / f"{stage}.result.json").is_file():
            results[stage] = json.loads((work / f"{stage}.result.json").read_text())
    return args, plan, results, observed, run


def write_report(args: argparse.Namespace, plan: Plan, results: Mapping[str, dict[str, Any]],
                 observed: Mapping[str, dict[str, Any]], run: Mapping[str, Any]) -> None:
    report = analyse(args, plan, results, observed, run)
    print("\n" + report, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n", encoding="utf-8")
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
