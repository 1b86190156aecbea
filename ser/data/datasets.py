"""Datasets of utterances (with emotion labels, without labels, with frame pseudo-labels) and
the collate functions that pad them into batches.

Training crops: each item is cut to at most ``max_samples`` at an offset drawn from a generator
seeded by ``(seed, epoch, index)``, so a run is reproducible and each epoch sees other windows of
long utterances; no global random state is used, so neither a worker's seed nor a resumed run's
history changes a crop. The epoch is the one given with the index, ``dataset[EpochIndex(epoch,
i)]`` (what ``ser.data.sampling.ResumableLoader`` asks for), else the one of ``set_epoch``.
Workers keep their own copy of the dataset (persistent ones across epochs) and never see
``set_epoch``: with workers, index with ``EpochIndex``. Evaluation items are whole.

Every dataset has ``lengths`` (samples per item as ``__getitem__`` returns it) for
``ser.data.sampling.BucketBatchSampler``. Pass ``lengths`` (samples per file name) when the files
were already checked; otherwise the headers are checked here with ``ser.audio.check_audio_files``,
which raises one error listing every unusable file before any training starts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ser.audio import check_audio_files, crop, read_audio
from ser.data.frames import (
    FRAME_HOP,
    IGNORE_INDEX,
    align_labels,
    conv_output_length,
    crop_frames,
    label_frame_count,
)
from ser.errors import SerInputError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
Item = dict[str, Any]


class EpochIndex(NamedTuple):
    """An item index with the epoch whose training crop to cut."""

    epoch: int
    index: int


class _AudioFiles(Dataset):
    """Audio files by name under one directory, with per-epoch reproducible training crops."""

    def __init__(
        self,
        audio_dir: PathLike,
        names: Sequence[str],
        *,
        max_samples: int,
        train: bool,
        seed: int,
        downmix: bool,
        lengths: Mapping[str, int] | None,
        random_crop: bool = True,
    ) -> None:
        if max_samples < 0:
            raise SerInputError(f"max_samples must be >= 0 (0: no limit), got {max_samples}")
        if seed < 0:
            raise SerInputError(f"seed must be >= 0, got {seed}")
        if not names:
            raise SerInputError(f"no audio files given for {audio_dir}; is the split empty?")
        self.audio_dir = Path(audio_dir)
        self.names = list(names)
        self.max_samples = max_samples
        self.train = train
        self.seed = seed
        self.downmix = downmix
        self.random_crop = random_crop
        self.epoch = 0
        self._file_lengths = self._read_lengths(lengths)

    def _read_lengths(self, lengths: Mapping[str, int] | None) -> list[int]:
        if lengths is None:
            paths = [str(self.audio_dir / name) for name in self.names]
            samples = check_audio_files(paths, downmix=self.downmix)
            return [samples[path] for path in paths]
        missing = [name for name in self.names if name not in lengths]
        if missing:
            raise SerInputError(
                f"lengths lacks {len(missing)} of {len(self.names)} files, e.g. {missing[:3]}; "
                "pass the samples of every file, or lengths=None to read them from the headers"
            )
        return [int(lengths[name]) for name in self.names]

    @property
    def crops(self) -> bool:
        return self.train and self.max_samples > 0

    @property
    def lengths(self) -> list[int]:
        """Samples of each item as returned (capped at ``max_samples`` when training)."""
        if self.crops:
            return [min(length, self.max_samples) for length in self._file_lengths]
        return list(self._file_lengths)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's training crops (seeded by seed, epoch and item index)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.names)

    def _rng(self, index: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, index])

    def _read(self, index: int) -> np.ndarray:
        return read_audio(self.audio_dir / self.names[index], downmix=self.downmix)

    def _read_cropped(self, index: int, epoch: int) -> np.ndarray:
        """The item's audio, with ``epoch``'s training crop."""
        wav = self._read(index)
        if not self.crops:
            return wav
        if self.random_crop:
            return crop(wav, self.max_samples, self._rng(index, epoch))
        return wav[: self.max_samples]

    def _locate(self, index: int | EpochIndex) -> tuple[int, int]:
        """``(item, epoch)``: an ``EpochIndex`` brings its epoch, a plain index uses set_epoch's."""
        epoch = self.epoch
        if isinstance(index, tuple):
            epoch, index = index
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        return index % len(self), int(epoch)


class AudioOnlyDataset(_AudioFiles):
    """Unlabelled audio (TAPT): item -> ``input_values`` (float32 [T]) and ``name``."""

    def __init__(
        self,
        audio_dir: PathLike,
        names: Sequence[str],
        *,
        max_samples: int = 0,
        train: bool = False,
        seed: int = 0,
        downmix: bool = False,
        lengths: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(
            audio_dir,
            names,
            max_samples=max_samples,
            train=train,
            seed=seed,
            downmix=downmix,
            lengths=lengths,
        )

    def __getitem__(self, index: int | EpochIndex) -> Item:
        index, epoch = self._locate(index)
        wav = self._read_cropped(index, epoch)
        return {"input_values": torch.from_numpy(wav), "name": self.names[index]}


class UtteranceDataset(_AudioFiles):
    """Utterances with emotion labels: item -> ``input_values``, ``label`` (class index), ``name``.

    ``items`` maps file names (relative to ``audio_dir``) to labels; ``classes`` fixes the label
    order (class index = position). Training items are cropped at a random offset
    (``random_crop``) or, as the original fine-tuning does, truncated from the start.
    """

    def __init__(
        self,
        audio_dir: PathLike,
        items: Mapping[str, str],
        classes: Sequence[str],
        *,
        max_samples: int = 0,
        train: bool = False,
        seed: int = 0,
        downmix: bool = False,
        lengths: Mapping[str, int] | None = None,
        random_crop: bool = True,
    ) -> None:
        unknown = sorted({label for label in items.values() if label not in classes})
        if unknown:
            raise SerInputError(
                f"labels {unknown} are not among the classes {list(classes)}; fix the label "
                "file or the classes (they usually come from the Train split)"
            )
        super().__init__(
            audio_dir,
            list(items),
            max_samples=max_samples,
            train=train,
            seed=seed,
            downmix=downmix,
            lengths=lengths,
            random_crop=random_crop,
        )
        self.classes = list(classes)
        index_of = {label: i for i, label in enumerate(self.classes)}
        self.labels = [index_of[items[name]] for name in self.names]

    def __getitem__(self, index: int | EpochIndex) -> Item:
        index, epoch = self._locate(index)
        wav = self._read_cropped(index, epoch)
        return {
            "input_values": torch.from_numpy(wav),
            "label": self.labels[index],
            "name": self.names[index],
        }


class FrameLabelDataset(_AudioFiles):
    """Audio with frame pseudo-labels (P-TAPT phase 2).

    ``frame_labels`` maps file names to one label sequence per cluster count (20 ms frames, as
    clustering writes them). Item -> ``input_values`` and ``frame_labels`` (long [K, F]), where F
    is wav2vec 2.0's frame count of the returned audio: labels are cropped at the crop's first
    frame and padded with -100 or cut to F (see ``ser.data.frames``). Training crops start on a
    multiple of 320 samples so that label frames and audio frames start at the same sample.
    """

    def __init__(
        self,
        audio_dir: PathLike,
        frame_labels: Mapping[str, Sequence[Sequence[int]]],
        *,
        max_samples: int = 0,
        train: bool = True,
        seed: int = 0,
        downmix: bool = False,
        lengths: Mapping[str, int] | None = None,
    ) -> None:
        self.num_label_sets = _check_frame_labels(frame_labels)
        super().__init__(
            audio_dir,
            list(frame_labels),
            max_samples=max_samples,
            train=train,
            seed=seed,
            downmix=downmix,
            lengths=lengths,
        )
        self.frame_labels = [frame_labels[name] for name in self.names]
        self._warn_on_label_counts()

    def __getitem__(self, index: int | EpochIndex) -> Item:
        index, epoch = self._locate(index)
        wav = self._read(index)
        start = 0
        if self.crops and len(wav) > self.max_samples:
            last_frame = (len(wav) - self.max_samples) // FRAME_HOP
            start = FRAME_HOP * int(self._rng(index, epoch).integers(0, last_frame + 1))
            wav = wav[start : start + self.max_samples]
        first, stop = crop_frames(start, len(wav))
        labels = [align_labels(seq[first:stop], stop - first) for seq in self.frame_labels[index]]
        return {
            "input_values": torch.from_numpy(wav),
            "frame_labels": torch.tensor(labels, dtype=torch.long).view(len(labels), stop - first),
            "name": self.names[index],
        }

    def _warn_on_label_counts(self) -> None:
        # The phase-1 model yields label_frame_count(L) labels; far off means other audio.
        off = [
            name
            for name, length, labels in zip(
                self.names, self._file_lengths, self.frame_labels, strict=True
            )
            if abs(len(labels[0]) - label_frame_count(length)) > 1
        ]
        if off:
            log.warning(
                "%d of %d files have a number of frame labels that does not match their audio "
                "(e.g. %s); check that the labels were computed from these files",
                len(off),
                len(self.names),
                off[:3],
            )


def _check_frame_labels(frame_labels: Mapping[str, Sequence[Sequence[int]]]) -> int:
    """Number of label sets (cluster counts) per file, the same for every file."""
    counts = {name: len(sets) for name, sets in frame_labels.items()}
    if not counts or min(counts.values()) == 0 or len(set(counts.values())) > 1:
        raise SerInputError(
            "frame_labels must map every file to the same number (>= 1) of label sequences, "
            f"one per cluster count; got counts {sorted(set(counts.values()))} for "
            f"{len(counts)} files"
        )
    ragged = [name for name, sets in frame_labels.items() if len({len(s) for s in sets}) > 1]
    if ragged:
        raise SerInputError(
            f"the label sequences of {len(ragged)} files differ in length between cluster "
            f"counts (e.g. {ragged[:3]}); regenerate the cluster labels"
        )
    return next(iter(counts.values()))


def _pad_audio(batch: Sequence[Item]) -> Item:
    if not batch:
        raise ValueError("cannot collate an empty batch")
    waves = [item["input_values"] for item in batch]
    lengths = torch.tensor([len(wav) for wav in waves], dtype=torch.long)
    input_values = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True, padding_value=0.0)
    mask = torch.arange(input_values.shape[1]) < lengths[:, None]
    return {
        "input_values": input_values,
        "attention_mask": mask.long(),
        "lengths": lengths,
        "names": [item["name"] for item in batch],
    }


def collate_audio(batch: Sequence[Item]) -> Item:
    """Zero-pad to the longest item: ``input_values`` [B, T], ``attention_mask`` [B, T] (1 = real
    sample), ``lengths`` [B], ``names``."""
    return _pad_audio(batch)


def collate_utterances(batch: Sequence[Item]) -> Item:
    """``collate_audio`` plus ``labels`` [B] (class indices)."""
    out = _pad_audio(batch)
    out["labels"] = torch.tensor([item["label"] for item in batch], dtype=torch.long)
    return out


def collate_frame_labels(batch: Sequence[Item]) -> Item:
    """``collate_audio`` plus ``frame_labels`` [B, K, F_max], padded with -100.

    F_max equals wav2vec 2.0's frame count of the padded ``input_values``, since frame counts
    grow with length.
    """
    out = _pad_audio(batch)
    labels = [item["frame_labels"] for item in batch]
    num_frames = int(conv_output_length(out["input_values"].shape[1]))
    padded = torch.full(
        (len(batch), labels[0].shape[0], num_frames), IGNORE_INDEX, dtype=torch.long
    )
    for row, item_labels in zip(padded, labels, strict=True):
        row[:, : item_labels.shape[1]] = item_labels
    out["frame_labels"] = padded
    return out
