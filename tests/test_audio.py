from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ser import audio
from ser.audio import MIN_SAMPLES, check_audio_files, crop, read_audio, resample, write_wav
from ser.config import SAMPLE_RATE
from ser.errors import SerInputError


def _sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _wav(path: Path, data: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    sf.write(path, data, rate, subtype="PCM_16")
    return path


# --- read_audio ---------------------------------------------------------------------------


def test_read_audio_returns_mono_float32(tmp_path: Path) -> None:
    wave = _sine(440, 0.1, SAMPLE_RATE)
    wav = read_audio(_wav(tmp_path / "a.wav", wave))
    assert wav.dtype == np.float32 and wav.shape == wave.shape
    np.testing.assert_allclose(wav, wave, atol=1e-4)  # PCM_16 quantisation


def test_read_audio_accepts_exactly_min_samples(tmp_path: Path) -> None:
    path = _wav(tmp_path / "a.wav", np.zeros(MIN_SAMPLES, np.float32))
    assert read_audio(path).shape == (MIN_SAMPLES,)


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "nope.wav"


def _corrupt(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt.wav"
    path.write_bytes(b"RIFF\x00\x00garbage, not a wav header at all")
    return path


def _empty(tmp_path: Path) -> Path:
    return _wav(tmp_path / "empty.wav", np.zeros(0, np.float32))


def _short(tmp_path: Path) -> Path:
    return _wav(tmp_path / "short.wav", np.zeros(MIN_SAMPLES - 1, np.float32))


def _rate(tmp_path: Path) -> Path:
    return _wav(tmp_path / "cd.wav", _sine(440, 0.1, 44_100), 44_100)


def _stereo(tmp_path: Path) -> Path:
    return _wav(tmp_path / "stereo.wav", np.zeros((1000, 2), np.float32))


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (_missing, "missing"),
        (_corrupt, "not readable as audio"),
        (_empty, r"shorter than 400 samples \(25 ms.*\(empty\)"),
        (_short, r"shorter than 400 samples.*\(399 samples\)"),
        (_rate, r"not sampled at 16000 Hz \(44100 Hz\).*ser-prepare-iemocap.*sox in\.wav -r 16000"),
        (_stereo, r"not mono \(2 channels\).*--downmix"),
    ],
)
def test_read_audio_errors_name_file_and_remedy(tmp_path: Path, make, pattern: str) -> None:
    path = make(tmp_path)
    with pytest.raises(SerInputError, match=pattern) as info:
        read_audio(path)
    assert str(path) in str(info.value)


def test_downmix_averages_channels(tmp_path: Path) -> None:
    stereo = np.stack([np.full(800, 0.5), np.full(800, -0.1)], axis=1).astype(np.float32)
    wav = read_audio(_wav(tmp_path / "s.wav", stereo), downmix=True)
    assert wav.shape == (800,)
    np.testing.assert_allclose(wav, 0.2, atol=1e-4)


# --- check_audio_files ----------------------------------------------------------------------


def test_check_audio_files_returns_samples_per_path(tmp_path: Path) -> None:
    a = _wav(tmp_path / "a.wav", np.zeros(1234, np.float32))
    b = _wav(tmp_path / "b.wav", np.zeros((900, 2), np.float32))
    assert check_audio_files([a, str(b)], downmix=True) == {str(a): 1234, str(b): 900}


def test_check_audio_files_reads_only_headers_of_integer_pcm(tmp_path: Path, monkeypatch) -> None:
    path = _wav(tmp_path / "a.wav", np.zeros(1000, np.float32))

    def no_decoding(*args, **kwargs):
        raise AssertionError("check_audio_files decoded samples")

    monkeypatch.setattr(sf, "read", no_decoding)
    monkeypatch.setattr(sf.SoundFile, "read", no_decoding)
    assert check_audio_files([path]) == {str(path): 1000}


def test_check_audio_files_groups_every_problem(tmp_path: Path) -> None:
    good = [_wav(tmp_path / f"ok{i}.wav", np.zeros(1000, np.float32)) for i in range(3)]
    wrong_rate = [
        _wav(tmp_path / f"rate{i}.wav", np.zeros(1000, np.float32), 8000) for i in range(7)
    ]
    paths = [
        *good,
        *wrong_rate,
        _stereo(tmp_path),
        _short(tmp_path),
        _empty(tmp_path),
        _corrupt(tmp_path),
        _missing(tmp_path),
    ]
    with pytest.raises(SerInputError) as info:
        check_audio_files(paths)
    message = str(info.value)
    assert message.startswith(f"12 of {len(paths)} audio files cannot be used")
    for kind_line in [
        "missing (no such file): 1 file(s)",
        "not readable as audio (corrupt, truncated or not an audio file): 1 file(s)",
        "shorter than 400 samples (25 ms, the shortest input wav2vec 2.0 accepts): 2 file(s)",
        "not sampled at 16000 Hz: 7 file(s)",
        "not mono: 1 file(s)",
    ]:
        assert kind_line in message
    # The first five of a kind are listed, the rest counted; every kind says what to do.
    assert f"{wrong_rate[4]} (8000 Hz)" in message
    assert str(wrong_rate[5]) not in message
    assert "... and 2 more" in message
    assert message.count("->") == 5
    assert not any(str(path) in message for path in good)


def _float_wav(path: Path, data: np.ndarray) -> Path:
    sf.write(path, data, SAMPLE_RATE, subtype="FLOAT")
    return path


def test_check_audio_files_names_float_files_with_nan_or_inf_samples(tmp_path: Path) -> None:
    clean = _float_wav(tmp_path / "clean.wav", _sine(220, 0.1, SAMPLE_RATE))
    nan, inf = (_sine(220, 0.1, SAMPLE_RATE) for _ in range(2))
    nan[[5, 700]] = np.nan
    inf[-1] = -np.inf
    paths = [clean, _float_wav(tmp_path / "nan.wav", nan), _float_wav(tmp_path / "inf.wav", inf)]
    with pytest.raises(SerInputError) as info:
        check_audio_files(paths)
    message = str(info.value)
    assert "holding NaN or infinite samples" in message and "2 file(s)" in message
    assert f"{paths[1]} (2 of 1600 samples)" in message and f"{paths[2]} (1 of" in message
    assert str(clean) not in message
    assert check_audio_files([clean]) == {str(clean): 1600}


def test_a_stage_refuses_nan_audio_before_training(corpus, tmp_path: Path) -> None:  # noqa: ANN001
    from ser.config import FinetuneConfig
    from ser.data.labels import read_label_file
    from ser.stages import finetune

    audio_dir = tmp_path / "audio"
    shutil.copytree(corpus.audio_dir, audio_dir)
    fold = read_label_file(corpus.label_files[0], audio_dir)
    victim = audio_dir / sorted(fold.train)[0]
    wav = read_audio(victim)
    wav[100] = np.nan
    victim.unlink()
    _float_wav(victim, wav)
    out = tmp_path / "out"
    config = FinetuneConfig(datadir=str(audio_dir), labelpath=str(fold.path), output_dir=str(out),
                            max_epochs=1)
    with pytest.raises(SerInputError, match="NaN or infinite samples") as info:
        finetune.run(config)
    assert str(victim) in str(info.value)
    assert not out.exists()


def test_check_audio_files_downmix_accepts_stereo(tmp_path: Path) -> None:
    path = _stereo(tmp_path)
    with pytest.raises(SerInputError, match="not mono"):
        check_audio_files([path])
    assert check_audio_files([path], downmix=True) == {str(path): 1000}


# --- crop -----------------------------------------------------------------------------------


def test_random_crop_is_a_window_of_the_audio() -> None:
    wav = np.arange(10_000, dtype=np.float32)
    starts = set()
    for seed in range(20):
        piece = crop(wav, 1000, np.random.default_rng(seed))
        assert piece.shape == (1000,)
        start = int(piece[0])
        np.testing.assert_array_equal(piece, wav[start : start + 1000])
        starts.add(start)
    assert len(starts) > 10  # different seeds give different windows


def test_random_crop_is_reproducible_with_the_same_seed() -> None:
    wav = np.arange(10_000, dtype=np.float32)
    first = crop(wav, 500, np.random.default_rng(3))
    np.testing.assert_array_equal(first, crop(wav, 500, np.random.default_rng(3)))


def test_random_crop_reaches_both_ends() -> None:
    wav = np.arange(12, dtype=np.float32)
    rng = np.random.default_rng(0)
    starts = {int(crop(wav, 10, rng)[0]) for _ in range(200)}
    assert starts == {0, 1, 2}


@pytest.mark.parametrize(
    ("length", "max_samples", "rng"),
    [
        (5000, 1000, None),  # evaluation: whole utterance
        (500, 1000, np.random.default_rng(0)),  # already short enough
        (5000, 0, np.random.default_rng(0)),  # no limit
        (5000, -1, np.random.default_rng(0)),
    ],
)
def test_crop_returns_whole_utterance(length: int, max_samples: int, rng) -> None:
    wav = np.arange(length, dtype=np.float32)
    np.testing.assert_array_equal(crop(wav, max_samples, rng), wav)


# --- resample -------------------------------------------------------------------------------


@pytest.mark.parametrize(("orig", "target"), [(44_100, 16_000), (8_000, 16_000), (48_000, 16_000)])
def test_resample_length_and_frequency(orig: int, target: int) -> None:
    wave = _sine(1000, 0.5, orig)
    out = resample(wave, orig, target)
    assert out.dtype == np.float32
    assert abs(len(out) - len(wave) * target / orig) <= 1
    spectrum = np.abs(np.fft.rfft(out))
    peak_hz = np.fft.rfftfreq(len(out), 1 / target)[np.argmax(spectrum)]
    assert abs(peak_hz - 1000) <= 2  # bin width is 2 Hz for 0.5 s


def test_resample_identity_when_rates_match() -> None:
    wave = np.linspace(-1, 1, 100)
    out = resample(wave, 16_000, 16_000)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, wave, rtol=1e-6)


def test_resample_rejects_bad_rates() -> None:
    with pytest.raises(SerInputError, match="orig_sr=0"):
        resample(np.zeros(10), 0, 16_000)


# --- write_wav ------------------------------------------------------------------------------


def test_write_wav_round_trip_pcm16_and_clips(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.wav"
    wave = _sine(300, 0.1, SAMPLE_RATE)
    wave[:10] = 1.5  # beyond full scale must clip, not wrap around to negative values
    write_wav(path, wave)
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
    back = read_audio(path)
    assert np.all(back[:10] > 0.99)
    np.testing.assert_allclose(back[10:], wave[10:], atol=1e-4)


def test_write_wav_is_atomic(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "out.wav"
    write_wav(path, np.zeros(1000, np.float32))
    before = path.read_bytes()
    real_write = sf.write

    def half_write_then_fail(file, data, *args, **kwargs):
        real_write(file, data[:10], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(audio.sf, "write", half_write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_wav(path, np.ones(2000, np.float32) * 0.5)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.wav"]  # no temporary file left
