"""Audio: decoded PyAV frames -> mono waveform placed by timestamps -> log-mel aligned to video.

torchaudio's own file loader needs a backend package we do not use, so PyAV decodes (inside the
same pass as the video, see data_tools.decode) and torchaudio only resamples and computes the
mel spectrogram.

Alignment: spectrogram step ``j`` is centred on video time ``t0 + j / steps_per_second``, where
``t0`` is the time of output video frame 0. Audio before ``t0`` is trimmed; a gap before the
first audio sample, or after the last, is digital silence (log(offset) after the log).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np
import torch
import torchaudio

from tricoclr.data import schema

# Gaps between audio frames shorter than this are timestamp jitter, not missing audio.
GAP_TOLERANCE_SECONDS = 0.01
# |sample| above this (full scale 1.0) is damage, not overshoot: decoders overshoot by a few
# percent at most, and a 1e30 sample would overflow the float32 mel power to infinity.
DAMAGED_SAMPLE_PEAK = 1000.0


@dataclass(frozen=True)
class AudioConfig:
    """Log-mel parameters; the defaults give 128 mel bins and exactly 128 steps per second."""

    sample_rate: int = schema.AUDIO_SAMPLE_RATE
    n_mels: int = schema.AUDIO_N_MELS
    n_fft: int = schema.AUDIO_N_FFT
    steps_per_second: int = schema.AUDIO_STEPS_PER_SECOND
    log_offset: float = schema.AUDIO_LOG_OFFSET
    silence_peak: float = 1e-4  # peak |amplitude| below this (full scale 1.0) is silence

    def __post_init__(self):
        if self.sample_rate % self.steps_per_second:
            raise ValueError(
                f"audio sample rate {self.sample_rate} is not a multiple of {self.steps_per_second} steps per second"
            )
        if self.n_fft < self.hop:
            raise ValueError(f"n_fft {self.n_fft} is shorter than the hop {self.hop}")

    @property
    def hop(self) -> int:
        return self.sample_rate // self.steps_per_second

    def as_meta(self, steps: int) -> dict:
        """The ``audio`` object of a sample's meta."""
        return {
            "sample_rate": self.sample_rate,
            "n_mels": self.n_mels,
            "n_fft": self.n_fft,
            "hop": self.hop,
            "steps_per_second": self.steps_per_second,
            "steps": steps,
            "log_offset": self.log_offset,
            "f_min": 0.0,
            "f_max": self.sample_rate / 2,
            "mel_scale": "htk",
            "power": 2.0,
            "dtype": "float16",
        }


class AudioCollector:
    """Accumulates decoded audio frames as one mono float32 waveform at the source rate.

    Channels are averaged (a mean, so 5.1 and stereo keep their level). Each frame is placed at
    its presentation time: a gap longer than GAP_TOLERANCE_SECONDS is filled with silence and
    an overlap is trimmed, so later samples stay aligned with the video even if packets were lost.
    """

    def __init__(self):
        self.rate: int | None = None
        self.start_time: Fraction | None = None
        self.blocks: list[np.ndarray] = []
        self.samples = 0
        self.gaps_filled = 0

    def add(self, frame: av.AudioFrame) -> None:
        mono = frame_to_mono(frame)
        if self.rate is None:
            self.rate = frame.sample_rate
            self.start_time = _frame_time(frame) or Fraction(0)
        elif frame.sample_rate != self.rate:
            raise ValueError(f"audio sample rate changed mid-stream ({self.rate} -> {frame.sample_rate} Hz)")
        time = _frame_time(frame)
        if time is not None:
            position = int(round((time - self.start_time) * self.rate))
            if position - self.samples > GAP_TOLERANCE_SECONDS * self.rate:
                self._append(np.zeros(position - self.samples, np.float32))
                self.gaps_filled += 1
            elif self.samples - position > GAP_TOLERANCE_SECONDS * self.rate:
                mono = mono[self.samples - position :]
        self._append(mono)

    def _append(self, block: np.ndarray) -> None:
        if block.size:
            self.blocks.append(block)
            self.samples += block.size

    def waveform(self) -> np.ndarray:
        return np.concatenate(self.blocks) if self.blocks else np.zeros(0, np.float32)


def _frame_time(frame: av.AudioFrame) -> Fraction | None:
    if frame.pts is None or frame.time_base is None:
        return None
    return frame.pts * frame.time_base


def frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    """One decoded frame -> float32 mono in [-1, 1], whatever its sample format and channels."""
    data = frame.to_ndarray()
    if not frame.format.is_planar:  # packed: (1, samples * channels), interleaved
        data = data.reshape(-1, len(frame.layout.channels)).T
    samples = data.astype(np.float32)
    if data.dtype == np.uint8:
        samples = (samples - 128.0) / 128.0
    elif data.dtype.kind == "i":
        samples /= float(np.iinfo(data.dtype).max) + 1.0
    return np.ascontiguousarray(samples.mean(axis=0))


@dataclass
class AudioResult:
    """The log-mel spectrogram of a video (or why there is none)."""

    log_mel: np.ndarray | None  # float16 (n_mels, steps), None when there is no usable audio
    steps: int
    silent: bool = False
    covered_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # damage that makes the video ``partial``
    unusable: str | None = None  # why the audio is not kept, in plain words (None: it is, or it is silent)


@functools.lru_cache(maxsize=4)
def _mel_transform(config: AudioConfig) -> torchaudio.transforms.MelSpectrogram:
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=config.sample_rate,
        n_fft=config.n_fft,
        hop_length=config.hop,
        n_mels=config.n_mels,
        center=True,
        power=2.0,
        mel_scale="htk",
    )


def spectrogram_steps(frames: int, fps: float, config: AudioConfig) -> int:
    """Steps that cover ``frames`` video frames exactly (128 per second by default)."""
    return schema.audio_step_for_frame(frames, fps, config.steps_per_second)


def aligned_log_mel(collector: AudioCollector, t0: float, frames: int, fps: float, config: AudioConfig) -> AudioResult:
    """The log-mel spectrogram of the video's time span [t0, t0 + frames / fps).

    Returns ``log_mel=None`` with ``silent=True`` when the audio is digital silence (the caller
    then records the video as having no audio, see docs/schema.md), and ``log_mel=None`` with
    ``unusable`` set when the video spans less than half a spectrogram step (one frame at an
    output rate above 2 * steps_per_second). Any other length, one frame included, gives
    ``steps`` steps. Samples that are not numbers or beyond DAMAGED_SAMPLE_PEAK (a damaged float
    PCM stream) are replaced by silence, so the stored spectrogram is always finite.
    """
    steps = spectrogram_steps(frames, fps, config)
    wave = collector.waveform()
    if collector.rate is None or wave.size == 0:
        return AudioResult(None, steps, notes=["audio stream decoded to no samples"])
    if steps < 1:
        return AudioResult(
            None,
            0,
            unusable=(
                f"audio not kept: the video's {frames} frame(s) at {fps:g} fps span less than half a "
                f"spectrogram step (1/{config.steps_per_second} s)"
            ),
        )
    damaged = ~(np.abs(wave) <= DAMAGED_SAMPLE_PEAK)  # also true for NaN
    damaged_samples = int(np.count_nonzero(damaged))
    if damaged_samples:
        wave = np.where(damaged, np.float32(0.0), wave)
    wave_t = torch.from_numpy(wave)
    if collector.rate != config.sample_rate:
        wave_t = torchaudio.functional.resample(wave_t, collector.rate, config.sample_rate)
    aligned, covered = _align(wave_t, float(collector.start_time) - t0, steps * config.hop, config.sample_rate)
    result = AudioResult(None, steps, covered_seconds=covered)
    if damaged_samples:
        result.problems.append(
            f"{damaged_samples} audio sample(s) were not numbers or far beyond full scale "
            "(a damaged float stream) and became silence"
        )
    peak = float(aligned.abs().max()) if aligned.numel() else 0.0
    if peak < config.silence_peak:
        result.silent = True
        return result
    video_seconds = frames / fps
    if covered < video_seconds - 0.5:
        result.notes.append(f"audio covers {covered:.2f} s of the {video_seconds:.2f} s of video; the rest is silence")
    if collector.gaps_filled:
        result.notes.append(f"{collector.gaps_filled} gap(s) in the audio filled with silence")
    result.log_mel = log_mel(aligned, config)[:, :steps].numpy().astype(np.float16)
    return result


def _align(wave: torch.Tensor, offset_seconds: float, length: int, rate: int) -> tuple[torch.Tensor, float]:
    """Shift ``wave`` (which starts ``offset_seconds`` after the video) onto the video's clock
    and pad or cut it to ``length`` samples; also return the seconds actually covered by audio."""
    offset = int(round(offset_seconds * rate))
    if offset > 0:
        wave = torch.cat([torch.zeros(offset), wave])
    elif offset < 0:
        wave = wave[-offset:]
    covered = min(wave.numel(), length) - max(offset, 0)
    if wave.numel() < length:
        wave = torch.cat([wave, torch.zeros(length - wave.numel())])
    return wave[:length], max(covered, 0) / rate


def log_mel(wave: torch.Tensor, config: AudioConfig) -> torch.Tensor:
    """float32 (n_mels, len / hop + 1) log-mel of a mono waveform at config.sample_rate.

    With ``center=True`` torchaudio returns one step more than ``len / hop`` (the extra frame is
    centred on the last sample); callers cut to the steps they need. Centring reflects
    ``n_fft / 2`` samples at each end, which needs a longer waveform: a shorter one (a video of
    one or two frames: 500 samples at 30 fps and the defaults) is first padded at its end with
    digital silence to ``n_fft / 2 + 1`` samples (its steps keep their times; the padding only
    stands for silence after its end).
    """
    wave = wave.to(torch.float32)
    shortest = config.n_fft // 2 + 1
    if wave.numel() < shortest:
        wave = torch.nn.functional.pad(wave, (0, shortest - wave.numel()))
    mel = _mel_transform(config)(wave)
    return torch.log(mel + config.log_offset)


def mel_bin_for_frequency(frequency: float, config: AudioConfig) -> int:
    """The mel bin whose triangular filter responds most to a pure tone of ``frequency`` Hz."""
    fbanks = torchaudio.functional.melscale_fbanks(
        n_freqs=config.n_fft // 2 + 1,
        f_min=0.0,
        f_max=config.sample_rate / 2,
        n_mels=config.n_mels,
        sample_rate=config.sample_rate,
        mel_scale="htk",
    )
    fft_bin = int(round(frequency * config.n_fft / config.sample_rate))
    return int(fbanks[fft_bin].argmax())
