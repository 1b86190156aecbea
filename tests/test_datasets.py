from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from ser.data.datasets import (
    AudioOnlyDataset,
    FrameLabelDataset,
    UtteranceDataset,
    collate_audio,
    collate_frame_labels,
    collate_utterances,
)
from ser.data.frames import FRAME_HOP, conv_output_length, label_frame_count
from ser.data.sampling import BucketBatchSampler
from ser.errors import SerInputError

SR = 16_000
SCALE = 2.0**-20  # sample i holds i * SCALE exactly in float32, so a crop reveals its offset
# not multiples of 320, one shorter than the crop below, one exactly the crop
LENGTHS = {"a.wav": 3_000, "b.wav": 8_000, "c.wav": 12_345, "d.wav": 20_017, "e.wav": 40_961}
CROP = 8_000
CLASSES = ["anger", "happy", "sad"]
ITEMS = {"a.wav": "sad", "b.wav": "anger", "c.wav": "happy", "d.wav": "sad", "e.wav": "anger"}


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("audio")
    for name, length in LENGTHS.items():
        ramp = np.arange(length, dtype=np.float32) * SCALE
        sf.write(folder / name, ramp, SR, subtype="FLOAT")
    return folder


def offset_of(wav: torch.Tensor) -> int:
    """Where in its file a (cropped) ramp starts, checking that it is contiguous."""
    positions = torch.round(wav.double() / SCALE).long()
    assert torch.equal(positions, positions[0] + torch.arange(len(wav)))
    return int(positions[0])


def crops(dataset: UtteranceDataset | AudioOnlyDataset | FrameLabelDataset) -> list[int]:
    return [offset_of(dataset[i]["input_values"]) for i in range(len(dataset))]


def test_training_crops_are_random_windows_of_at_most_max_samples(audio_dir: Path) -> None:
    dataset = UtteranceDataset(audio_dir, ITEMS, CLASSES, max_samples=CROP, train=True)
    assert dataset.lengths == [min(n, CROP) for n in LENGTHS.values()]
    for i, name in enumerate(ITEMS):
        item = dataset[i]
        assert item["input_values"].dtype == torch.float32
        assert len(item["input_values"]) == dataset.lengths[i]
        assert item["name"] == name
        assert item["label"] == CLASSES.index(ITEMS[name])
        assert 0 <= offset_of(item["input_values"]) <= LENGTHS[name] - dataset.lengths[i]


def test_training_crops_repeat_per_epoch_and_change_between_epochs(audio_dir: Path) -> None:
    first = UtteranceDataset(audio_dir, ITEMS, CLASSES, max_samples=CROP, train=True, seed=1)
    second = UtteranceDataset(audio_dir, ITEMS, CLASSES, max_samples=CROP, train=True, seed=1)
    offsets = []
    for epoch in range(3):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        offsets.append(crops(first))
        assert crops(second) == offsets[-1]
    assert offsets[0] != offsets[1] != offsets[2]
    other_seed = UtteranceDataset(audio_dir, ITEMS, CLASSES, max_samples=CROP, train=True, seed=2)
    assert crops(other_seed) != offsets[0]


def test_truncation_from_the_start_when_not_random(audio_dir: Path) -> None:
    dataset = UtteranceDataset(
        audio_dir, ITEMS, CLASSES, max_samples=CROP, train=True, random_crop=False
    )
    assert crops(dataset) == [0] * len(ITEMS)
    assert [len(dataset[i]["input_values"]) for i in range(len(dataset))] == dataset.lengths


def test_evaluation_items_are_whole(audio_dir: Path) -> None:
    dataset = UtteranceDataset(audio_dir, ITEMS, CLASSES, max_samples=CROP, train=False)
    assert dataset.lengths == list(LENGTHS.values())
    assert [len(dataset[i]["input_values"]) for i in range(len(dataset))] == dataset.lengths
    assert crops(dataset) == [0] * len(ITEMS)


def test_audio_only_dataset(audio_dir: Path) -> None:
    names = ["e.wav", "a.wav"]
    dataset = AudioOnlyDataset(audio_dir, names, max_samples=CROP, train=True, seed=5)
    assert len(dataset) == 2 and dataset.lengths == [CROP, LENGTHS["a.wav"]]
    item = dataset[0]
    assert set(item) == {"input_values", "name"} and item["name"] == "e.wav"
    assert len(item["input_values"]) == CROP


def test_given_lengths_skip_the_header_check(audio_dir: Path) -> None:
    lengths = {name: n + 1 for name, n in LENGTHS.items()}
    dataset = UtteranceDataset(audio_dir, ITEMS, CLASSES, lengths=lengths)
    assert dataset.lengths == [n + 1 for n in LENGTHS.values()]
    del lengths["c.wav"]
    with pytest.raises(SerInputError, match=r"lengths lacks 1 of 5 files, e.g. \['c.wav'\]"):
        UtteranceDataset(audio_dir, ITEMS, CLASSES, lengths=lengths)


def test_input_errors(audio_dir: Path) -> None:
    with pytest.raises(SerInputError, match="neutral"):
        UtteranceDataset(audio_dir, {**ITEMS, "a.wav": "neutral"}, CLASSES)
    with pytest.raises(SerInputError, match="missing.wav"):
        UtteranceDataset(audio_dir, {**ITEMS, "missing.wav": "sad"}, CLASSES)
    with pytest.raises(SerInputError, match="max_samples"):
        AudioOnlyDataset(audio_dir, ["a.wav"], max_samples=-1)
    with pytest.raises(SerInputError, match="no audio files"):
        AudioOnlyDataset(audio_dir, [])
    with pytest.raises(IndexError):
        AudioOnlyDataset(audio_dir, ["a.wav"])[1]


def test_collate_pads_with_zeros_and_masks_the_padding(audio_dir: Path) -> None:
    dataset = UtteranceDataset(audio_dir, ITEMS, CLASSES)
    items = [dataset[i] for i in (0, 2, 1)]
    batch = collate_utterances(items)
    lengths = [LENGTHS["a.wav"], LENGTHS["c.wav"], LENGTHS["b.wav"]]
    assert batch["input_values"].shape == (3, max(lengths))
    assert batch["attention_mask"].dtype == torch.long
    assert batch["lengths"].tolist() == lengths
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["labels"].tolist() == [2, 1, 0]
    assert batch["names"] == ["a.wav", "c.wav", "b.wav"]
    for row, item, length in zip(batch["input_values"], items, lengths, strict=True):
        assert torch.equal(row[:length], item["input_values"])
        assert torch.all(row[length:] == 0)
    for row, length in zip(batch["attention_mask"], lengths, strict=True):
        assert torch.all(row[:length] == 1) and torch.all(row[length:] == 0)
    assert "labels" not in collate_audio(items)
    with pytest.raises(ValueError, match="empty batch"):
        collate_audio([])


def test_dataloader_with_bucket_sampler(audio_dir: Path) -> None:
    dataset = UtteranceDataset(audio_dir, ITEMS, CLASSES, max_samples=CROP, train=True)
    sampler = BucketBatchSampler(dataset.lengths, max_batch_samples=2 * CROP, max_len=CROP)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_utterances)
    names = []
    for batch in loader:
        assert batch["input_values"].numel() <= 2 * CROP or len(batch["names"]) == 1
        names += batch["names"]
    assert sorted(names) == sorted(ITEMS)


def pseudo_labels(num_sets: int = 2) -> dict[str, list[list[int]]]:
    """Label j of set k is 1000 k + j, as many as the phase-1 model would produce."""
    return {
        name: [[1000 * k + j for j in range(label_frame_count(n))] for k in range(num_sets)]
        for name, n in LENGTHS.items()
    }


@pytest.mark.parametrize("train", [True, False])
def test_frame_labels_follow_the_audio_crop(audio_dir: Path, train: bool) -> None:
    labels = pseudo_labels()
    dataset = FrameLabelDataset(audio_dir, labels, max_samples=CROP, train=train, seed=3)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for i, name in enumerate(dataset.names):
            item = dataset[i]
            start = offset_of(item["input_values"])
            num_samples = len(item["input_values"])
            assert num_samples == dataset.lengths[i]
            assert num_samples == (min(LENGTHS[name], CROP) if train else LENGTHS[name])
            assert start % FRAME_HOP == 0
            frames = conv_output_length(num_samples)
            assert item["frame_labels"].shape == (2, frames)
            assert item["frame_labels"].dtype == torch.long
            for k, row in enumerate(item["frame_labels"].tolist()):
                real = [label for label in row if label != -100]
                first = start // FRAME_HOP
                assert real == list(range(1000 * k + first, 1000 * k + first + len(real)))
                assert row[len(real) :] == [-100] * (frames - len(real))
                # padding only where the file's labels run out
                assert len(real) == min(frames, label_frame_count(LENGTHS[name]) - first)


def test_frame_label_crops_vary_between_epochs(audio_dir: Path) -> None:
    dataset = FrameLabelDataset(audio_dir, pseudo_labels(), max_samples=CROP, seed=3)
    offsets = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        offsets.append(crops(dataset))
    assert offsets[0] != offsets[1] != offsets[2]


def test_collate_frame_labels(audio_dir: Path) -> None:
    dataset = FrameLabelDataset(audio_dir, pseudo_labels(3), max_samples=CROP)
    items = [dataset[i] for i in range(len(dataset))]
    batch = collate_frame_labels(items)
    frames = conv_output_length(batch["input_values"].shape[1])
    assert batch["frame_labels"].shape == (len(items), 3, frames)
    for row, item in zip(batch["frame_labels"], items, strict=True):
        width = item["frame_labels"].shape[1]
        assert torch.equal(row[:, :width], item["frame_labels"])
        assert torch.all(row[:, width:] == -100)
    assert batch["attention_mask"].sum(1).tolist() == [len(i["input_values"]) for i in items]


def test_frame_label_errors_and_warnings(audio_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    labels = pseudo_labels()
    with pytest.raises(SerInputError, match="same number"):
        FrameLabelDataset(audio_dir, {**labels, "a.wav": labels["a.wav"][:1]})
    with pytest.raises(SerInputError, match="differ in length"):
        FrameLabelDataset(audio_dir, {**labels, "a.wav": [[1, 2], [1]]})
    with pytest.raises(SerInputError, match="same number"):
        FrameLabelDataset(audio_dir, {})
    with caplog.at_level(logging.WARNING, logger="ser.data.datasets"):
        FrameLabelDataset(audio_dir, labels)
        assert not caplog.records
        FrameLabelDataset(audio_dir, {**labels, "e.wav": [[0] * 10, [0] * 10]})
    assert "e.wav" in caplog.text and "1 of 5" in caplog.text
