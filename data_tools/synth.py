"""``tricoclr-data synth``: the project's built-in, labelled, multimodal video dataset.

Real ``.mp4`` files (H.264 video, AAC mono audio, written with PyAV), procedurally generated and
deterministic for a seed, in UCF101's layout::

    OUT/videos/<ClassName>/v_<ClassName>_g<NN>_c01.mp4
    OUT/splits/classInd.txt      "1 RedStripedDiscSwingDrum"            (1-based)
    OUT/splits/trainlist01.txt   "RedStripedDiscSwingDrum/v_..._g01_c01.mp4 1"
    OUT/splits/testlist01.txt    "RedStripedDiscSwingDrum/v_..._g08_c01.mp4"
    OUT/classes.json             each class's (appearance, motion, sound) factors

It is the embedded default data of the demo and the tests: the demo pre-trains an RGB encoder
alone (InfoNCE), with an optical-flow oracle (CoCLR) and with flow + audio oracles (TriCoCLR), and
evaluates only the RGB encoder (kNN retrieval, linear probe) on these class labels. So the data
must make "does flow help, does audio help?" measurable.

What a class is
---------------
A class is a triple of factors, one per modality:

- appearance (RGB): a shape, a texture and a hue, e.g. ``RedStripedDisc``;
- motion (optical flow): a trajectory or a deformation, e.g. ``Swing`` (horizontal sinusoid),
  ``Orbit`` (circle), ``Pulse`` (breathing scale, divergent flow);
- sound (audio): a rhythm, a pitch pattern and a timbre, e.g. ``Drum`` (low percussive thumps
  at 2 Hz), ``Flute`` (legato sine arpeggio), ``Buzz`` (rising sawtooth note once a second).

A sound is also *seen*, as a drum is: the object's brightness follows the sound's amplitude
envelope, ``gain = 1 - TRACE_DEPTH + TRACE_DEPTH * envelope`` (TRACE_DEPTH = 0.15, so at most a
15 % dimming between notes). The trace is faint next to the per-video brightness nuisance
(x0.75 to x1.2) and the object's texture contrast, so an RGB encoder has no reason to attend to
it unless an audio oracle makes it salient; it is the only thing that tells some classes apart
in RGB (see "twins" below).

Class table (deterministic, any ``--classes`` from 2 to 98)
----------------------------------------------------------
Classes come in *twins*: class ``c`` is in group ``g = c // 2`` with twin bit ``v = c % 2``.
With ``G = ceil(N / 2)`` groups and ``n = max(2, ceil(sqrt(G)))``, write ``g = q * n + r``:

    appearance = r                    (n appearances used)
    motion     = (q + r) mod n        (n motions used)
    sound      = (q + 2 r + v) mod (n + 1)   (n + 1 sounds used)

``(r, q) -> (appearance, motion)`` is one-to-one, so every group has its own (appearance,
motion) pair and the two twins of a group differ only in their sound: all classes differ in the
triple, and each twin pair is separated by the sound alone. With the default 10 classes
(n = 3, 4 sounds):

    ===  ==================  ======  =====
    c    appearance          motion  sound
    ===  ==================  ======  =====
    1    RedStripedDisc      Swing   Drum
    2    RedStripedDisc      Swing   Flute
    3    RedCheckedSquare    Orbit   Buzz
    4    RedCheckedSquare    Orbit   Bell
    5    BlueStripedSquare   Pulse   Drum
    6    BlueStripedSquare   Pulse   Flute
    7    RedStripedDisc      Orbit   Flute
    8    RedStripedDisc      Orbit   Buzz
    9    RedCheckedSquare    Pulse   Bell
    10   RedCheckedSquare    Pulse   Drum
    ===  ==================  ======  =====

Of its 45 class pairs, 5 share appearance and motion (only the sound separates them), 2 share
appearance and sound (only the motion), 2 share motion and sound (only the appearance), 6 share
appearance only, 6 motion only, 4 sound only, 20 share nothing. Each modality alone confuses
some classes (an appearance covers up to 4 classes, a motion up to 4, a sound up to 3), and
appearance is partly shared even *within* the library: the first two appearances are both red,
the first and third both striped, the second and third both square, so an encoder that latches
on colour confuses 8 of the 10 classes. What an RGB encoder can tell apart: by appearance alone
3 groups (of 4, 4 and 2 classes), with motion 5 twin pairs, with the sound's visual trace all 10.

The libraries hold 8 appearances, 8 motions and 8 sounds, so ``n <= 7`` and ``N <= 98``.
These properties (each factor alone confuses a pair, a twin pair exists, all triples differ)
hold for every N from 4 to 98 (tested). With 2 or 3 classes each class has its own sound (the
table then has 3 sounds), so the sound alone separates them; the table is still valid.

Per-video nuisance (independent of the class, strong on purpose)
----------------------------------------------------------------
Background colours (any hue, saturation 0-0.55, value 0.15-0.85) and texture (flat, gradient,
stripes, checker, blobs), or a shared scene's (below); object hue any (``--object-colour video``,
the default) or within +-10 deg of the appearance's (``class``), saturation 0.65-1, value 0.7-1; object
radius 0.11-0.17 of the frame; centre offset +-0.08; motion speed x0.8-1.25 and phase (the
"start time": the pattern is at a random point of its cycle at t = 0, the streams themselves
both start at 0); global brightness x0.75-1.2; Gaussian pixel noise sigma 1.5-5 levels;
loudness -12..0 dB; detune +-1 semitone; tempo x0.95-1.05; sound phase; a noise floor.

Scenes, camera and colour (what real video has, issue 15)
---------------------------------------------------------
In real video the camera moves, the backdrop changes within a clip and many videos are filmed
in similar places, while what defines an action is shared across videos. The first version drew
a static backdrop of its own for every video and coloured the object by its class: a backdrop
that identifies the instance in every frame is the easiest cue for instance discrimination
(InfoNCE), and it is class noise here. By default now (``synthesize``'s ``scenes``, ``camera``,
``colour``; ``--scenes 0 --static-camera --object-colour class`` gives the first version's
data, pixel for pixel):

- ``--scenes`` (``SCENES`` = 8): backdrops come from a pool of shared scenes, one per video,
  drawn independently of the class, so videos of different classes share backdrops;
- a panning camera: the backdrop is a canvas ``CANVAS`` times the frame's side, and the frame
  (which follows the object) slides over it at ``CAMERA_SPEED`` frame widths per second in a
  random direction, turning back at the canvas's edges;
- ``--object-colour video``: the object's hue is per-video nuisance, so the appearance is its
  shape and texture (the names keep the library's hue word).

Determinism
-----------
Every random draw of a video comes from ``numpy.random.default_rng([seed, class, video])``, so
the output does not depend on ``--workers`` or on the order videos are made in. x264 runs with
one thread per video (parallelism is across videos), and the same seed gives the same decoded
frames and audio samples (tested).

Speed: frames are rendered with numpy on the object's bounding box only, over a precomputed
background; x264 ``ultrafast``, crf 23, yuv420p; AAC at the encoder's default bit rate. Measured on
the 2-core development machine: about 0.22 s of CPU per 10-second 128 x 128 video (rendering, x264
and AAC about a third each), so the default 10 x 10 set takes ~23 CPU-seconds (~12 s wall with
``--workers 2`` on idle cores) and ~20 MB.
"""

from __future__ import annotations

import argparse
import colorsys
import dataclasses
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

# ---- factor libraries -----------------------------------------------------------------------

TRACE_DEPTH = 0.15  # how much the object dims between notes: the sound's faint visual trace
# Scenes and camera (see "Scenes, camera and colour" in the module docstring). A scene is a
# backdrop several videos share; the camera follows the object and pans over a scene canvas
# CANVAS times the frame's side at CAMERA_SPEED frame widths per second (a slow pan: ~0.1-0.3
# of the frame moves past in a 2-second window).
SCENES = 8
CANVAS = 1.6
CAMERA_SPEED = (0.05, 0.15)
OBJECT_COLOURS = ("class", "video")
MAX_CLASSES = 98  # n <= 7 appearances/motions (n + 1 <= 8 sounds): G <= 49 groups


@dataclass(frozen=True)
class Appearance:
    """What the object looks like: a shape, a texture painted on it and a hue (degrees)."""

    name: str
    shape: str
    texture: str
    hue: float


@dataclass(frozen=True)
class Motion:
    """How the object moves: ``kind`` selects a trajectory/deformation, ``hz`` its base rate."""

    name: str
    kind: str
    hz: float


@dataclass(frozen=True)
class Sound:
    """What the object sounds like.

    rhythm: ``bar`` seconds, note ``onsets`` and ``durations`` as fractions of the bar, an
    ``envelope`` shape ('percussive' decays with ``decay`` s; 'sustained' ramps in and out;
    'tremolo' is one continuous note whose loudness oscillates at 1 / bar Hz).
    pitch pattern: ``base_hz`` times 2 ** (semitones / 12) per note, plus ``sweep`` semitones
    glided over each note. timbre: 'sine', 'saw', 'square', 'bell', 'drum', 'clap', 'whistle'.
    """

    name: str
    timbre: str
    base_hz: float
    bar: float
    onsets: tuple[float, ...]
    durations: tuple[float, ...]
    semitones: tuple[float, ...]
    sweep: float
    envelope: str
    decay: float = 0.1


# Ordered so the first three already share attributes pairwise (hue, texture, shape): colour or
# shape alone never identifies an appearance.
APPEARANCES: tuple[Appearance, ...] = (
    Appearance("RedStripedDisc", "disc", "striped", 0.0),
    Appearance("RedCheckedSquare", "square", "checked", 0.0),
    Appearance("BlueStripedSquare", "square", "striped", 225.0),
    Appearance("BlueSpottedDisc", "disc", "spotted", 225.0),
    Appearance("GreenSplitTriangle", "triangle", "split", 125.0),
    Appearance("GreenSpottedCross", "cross", "spotted", 125.0),
    Appearance("YellowCheckedTriangle", "triangle", "checked", 55.0),
    Appearance("YellowSplitDiamond", "diamond", "split", 55.0),
)

# Ordered so the first three have the most different flow fields (translation, rotation of the
# position, divergence). Amplitudes keep peak speeds at 2-4 px per frame at 128 px / 30 fps,
# comfortably inside what Farneback tracks.
MOTIONS: tuple[Motion, ...] = (
    Motion("Swing", "swing", 0.6),
    Motion("Orbit", "orbit", 0.5),
    Motion("Pulse", "pulse", 0.8),
    Motion("Bounce", "bounce", 0.45),
    Motion("Spin", "spin", 0.5),
    Motion("Figure8", "figure8", 0.4),
    Motion("Zigzag", "zigzag", 0.5),
    Motion("Squash", "squash", 0.7),
)

# Every sound has its own rhythm, so its envelope (and hence its visual trace) differs from
# every other one, and its own pitch range / timbre, so log-mel spectrograms differ too.
SOUNDS: tuple[Sound, ...] = (
    Sound("Drum", "drum", 110.0, 0.5, (0.0,), (0.3,), (0.0,), -12.0, "percussive", 0.09),
    Sound("Flute", "sine", 660.0, 1.2, (0.0, 1 / 3, 2 / 3), (0.3, 0.3, 0.3), (0.0, 4.0, 7.0), 0.0, "sustained"),
    Sound("Buzz", "saw", 220.0, 1.0, (0.0,), (0.6,), (0.0,), 12.0, "sustained"),
    Sound("Bell", "bell", 880.0, 1.5, (0.0,), (0.95,), (0.0,), 0.0, "percussive", 0.45),
    Sound("Chirp", "sine", 2600.0, 0.25, (0.0,), (0.36,), (0.0,), -12.0, "sustained"),
    Sound("Organ", "square", 330.0, 1.0, (0.0, 0.375, 0.75), (0.3, 0.3, 0.2), (0.0, -5.0, 2.0), 0.0, "sustained"),
    Sound("Whistle", "whistle", 1500.0, 0.4, (0.0,), (0.4,), (0.0,), 0.0, "tremolo"),
    Sound("Clap", "clap", 3000.0, 1.0, (0.0, 0.15), (0.12, 0.12), (0.0, 0.0), 0.0, "percussive", 0.04),
)


@dataclass(frozen=True)
class ClassSpec:
    """One class: its 0-based index, UCF101-style CamelCase name and its three factors."""

    index: int
    name: str
    appearance: Appearance
    motion: Motion
    sound: Sound


def factor_indices(n_classes: int) -> list[tuple[int, int, int]]:
    """(appearance, motion, sound) library indices of each class (see the module docstring)."""
    if not 1 <= n_classes <= MAX_CLASSES:
        raise ValueError(f"classes must be in 1..{MAX_CLASSES}, got {n_classes}")
    groups = math.ceil(n_classes / 2)
    n = max(2, math.ceil(math.sqrt(groups)))
    triples = []
    for c in range(n_classes):
        g, twin = divmod(c, 2)
        q, r = divmod(g, n)
        triples.append((r, (q + r) % n, (q + 2 * r + twin) % (n + 1)))
    return triples


def class_table(n_classes: int) -> list[ClassSpec]:
    """The deterministic class table for ``n_classes`` classes."""
    table = []
    for index, (a, m, s) in enumerate(factor_indices(n_classes)):
        appearance, motion, sound = APPEARANCES[a], MOTIONS[m], SOUNDS[s]
        name = appearance.name + motion.name + sound.name
        table.append(ClassSpec(index, name, appearance, motion, sound))
    return table


# ---- per-video nuisance ----------------------------------------------------------------------


@dataclass(frozen=True)
class Nuisance:
    """Everything about one video that is not its class (all drawn from the video's RNG)."""

    bg_kind: str
    bg_rgb1: tuple[float, float, float]
    bg_rgb2: tuple[float, float, float]
    bg_angle: float
    bg_freq: float
    bg_phase: float
    object_rgb: tuple[float, float, float]
    radius: float
    centre: tuple[float, float]
    speed: float
    motion_phase: float
    brightness: float
    noise_sigma: float
    loudness_db: float
    detune: float
    tempo: float
    sound_phase: float
    noise_floor: float
    scene: int = -1  # index into the shared scene pool; -1: the video's own backdrop
    camera_start: tuple[float, float] = (0.0, 0.0)  # canvas position at t = 0, frame widths
    camera_velocity: tuple[float, float] = (0.0, 0.0)  # frame widths per second; 0: static


BACKGROUND_KINDS = ("flat", "gradient", "stripes", "checker", "blobs")


def hsv_to_rgb(hue_deg: float, saturation: float, value: float) -> tuple[float, float, float]:
    """HSV (hue in degrees) to an RGB triple in [0, 1]."""
    r, g, b = colorsys.hsv_to_rgb((hue_deg % 360.0) / 360.0, saturation, value)
    return (float(r), float(g), float(b))


def sample_nuisance(
    rng: np.random.Generator, appearance: Appearance, scenes: int = 0, camera: bool = False, colour: str = "class"
) -> Nuisance:
    """Draw one video's nuisance parameters.

    ``colour`` "class": the object's hue stays within 10 degrees of its appearance's hue;
    "video": any hue (shape and texture remain the appearance). ``scenes`` > 0: the video is
    filmed in one of that many shared scenes (drawn here, its backdrop is the scene's);
    ``camera``: a panning camera with a random start and velocity (``CAMERA_SPEED``). The draws
    for the scene, camera and free hue come after all others (and only when asked for), so the
    rest of a video's nuisance does not depend on these options.
    """
    if colour not in OBJECT_COLOURS:
        raise ValueError(f"colour must be one of {OBJECT_COLOURS}, got {colour!r}")
    nuisance = _sample_base_nuisance(rng, appearance)
    changes: dict = {}
    # Drawn only when asked for, so that with every option off a video's random stream is the
    # first version's and its data are reproduced pixel for pixel.
    if scenes > 0:
        changes["scene"] = int(rng.integers(0, scenes))
    if camera:
        changes["camera_start"] = tuple(float(v) for v in rng.uniform(0.0, CANVAS - 1.0, 2))
        speed, angle = rng.uniform(*CAMERA_SPEED), rng.uniform(0, 2 * math.pi)
        changes["camera_velocity"] = (float(speed * math.cos(angle)), float(speed * math.sin(angle)))
    if colour == "video":
        r, g, b = nuisance.object_rgb
        _, saturation, value = colorsys.rgb_to_hsv(r, g, b)
        changes["object_rgb"] = hsv_to_rgb(rng.uniform(0, 360), saturation, value)
    return dataclasses.replace(nuisance, **changes)


def scene_backdrop(seed: int, scene: int) -> dict:
    """The backdrop fields (``bg_*``) of shared scene ``scene``: the same for every video filmed
    in it (its own RNG, ``[seed, 1000 + scene, 0]``, which no video's ``[seed, class, video]``
    with class < 98 can equal)."""
    rng = np.random.default_rng([seed, 1000 + scene, 0])
    base = _sample_base_nuisance(rng, APPEARANCES[0])
    return {f: getattr(base, f) for f in ("bg_kind", "bg_rgb1", "bg_rgb2", "bg_angle", "bg_freq", "bg_phase")}


def scene_rng(seed: int, scene: int) -> np.random.Generator:
    """The RNG of a scene's random backdrop details (blob positions), shared by its videos."""
    return np.random.default_rng([seed, 1000 + scene, 1])


def _sample_base_nuisance(rng: np.random.Generator, appearance: Appearance) -> Nuisance:
    """The nuisance without scene and camera: own backdrop, static, hue near the class's."""
    bg_hue = rng.uniform(0, 360)
    bg_value = rng.uniform(0.15, 0.85)
    bg1 = hsv_to_rgb(bg_hue, rng.uniform(0.0, 0.55), bg_value)
    bg2 = hsv_to_rgb(
        bg_hue + rng.uniform(-60, 60),
        rng.uniform(0.0, 0.55),
        float(np.clip(bg_value * rng.uniform(0.6, 1.4), 0.05, 0.95)),
    )
    obj = hsv_to_rgb(appearance.hue + rng.uniform(-10, 10), rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0))
    return Nuisance(
        bg_kind=str(rng.choice(BACKGROUND_KINDS)),
        bg_rgb1=bg1,
        bg_rgb2=bg2,
        bg_angle=float(rng.uniform(0, math.pi)),
        bg_freq=float(rng.uniform(2.0, 6.0)),
        bg_phase=float(rng.uniform(0, 2 * math.pi)),
        object_rgb=obj,
        radius=float(rng.uniform(0.11, 0.17)),
        centre=(float(rng.uniform(-0.08, 0.08)), float(rng.uniform(-0.08, 0.08))),
        speed=float(rng.uniform(0.8, 1.25)),
        motion_phase=float(rng.uniform(0, 1)),
        brightness=float(rng.uniform(0.75, 1.2)),
        noise_sigma=float(rng.uniform(1.5, 5.0)),
        loudness_db=float(rng.uniform(-12.0, 0.0)),
        detune=float(2 ** (rng.uniform(-1, 1) / 12)),
        tempo=float(rng.uniform(0.95, 1.05)),
        sound_phase=float(rng.uniform(0, 1)),
        noise_floor=float(10 ** (rng.uniform(-50, -38) / 20)),
    )


# ---- audio ----------------------------------------------------------------------------------


def note_events(sound: Sound, seconds: float, tempo: float, phase: float):
    """Onset times, durations and semitone offsets of every note that sounds in [0, seconds].

    ``phase`` (a fraction of a bar) shifts the pattern, so t = 0 falls anywhere in the bar.
    """
    bar = sound.bar / tempo
    first_bar = -1
    last_bar = int(math.ceil(seconds / bar)) + 1
    onsets, durations, semis = [], [], []
    for k in range(first_bar, last_bar):
        for onset, duration, semi in zip(sound.onsets, sound.durations, sound.semitones):
            onsets.append((k + onset - phase) * bar)
            durations.append(duration * bar)
            semis.append(semi)
    return np.array(onsets), np.array(durations), np.array(semis)


def sound_envelope(sound: Sound, t: np.ndarray, tempo: float, phase: float):
    """Amplitude envelope in [0, 1] at times ``t``, and per-sample note state for the pitch.

    Returns (envelope, time since the current note's onset, its duration, its semitones), each
    an array like ``t``. Notes end with a short release, so none stops with a click.
    """
    onsets, durations, semis = note_events(sound, float(t[-1]) + 1e-9, tempo, phase)
    note = np.clip(np.searchsorted(onsets, t, side="right") - 1, 0, len(onsets) - 1)
    tau = t - onsets[note]
    duration = durations[note]
    release = 0.01  # s; a note never stops abruptly (no click, no broadband smear)
    if sound.envelope == "percussive":
        env = np.minimum(tau / 0.004, 1.0) * np.exp(-tau / sound.decay)
    elif sound.envelope == "sustained":
        ramp = min(0.03, 0.25 * float(durations.min()))
        env = np.minimum(tau / ramp, 1.0)
        release = ramp
    elif sound.envelope == "tremolo":
        bar = sound.bar / tempo
        return 0.55 + 0.45 * np.sin(2 * np.pi * (t / bar + phase)), tau, duration, semis[note]
    else:
        raise ValueError(f"unknown envelope {sound.envelope!r}")
    env = env * np.clip((duration - tau) / release, 0.0, 1.0)
    return env, tau, duration, semis[note]


def band_noise(rng: np.random.Generator, n: int, rate: int, low_hz: float, high_hz: float):
    """White noise band-limited to [low_hz, high_hz] by zeroing FFT bins, unit peak."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / rate)
    spectrum[(freqs < low_hz) | (freqs > high_hz)] = 0
    noise = np.fft.irfft(spectrum, n)
    return noise / (np.abs(noise).max() + 1e-12)


def harmonic_sum(phase: np.ndarray, max_hz: float, rate: int, odd_only: bool) -> np.ndarray:
    """Band-limited saw (all harmonics, 1/k) or square (odd harmonics, 1/k) from a phase."""
    ceiling = min(7000.0, 0.45 * rate)  # stay inside the 16 kHz log-mel band, avoid aliasing
    count = max(1, int(ceiling // max_hz))
    ks = range(1, count + 1, 2) if odd_only else range(1, count + 1)
    return sum(np.sin(k * phase) / k for k in ks)


def timbre_wave(sound: Sound, freq: np.ndarray, t: np.ndarray, rate: int, rng: np.random.Generator) -> np.ndarray:
    """The raw waveform of ``sound``'s timbre at instantaneous frequency ``freq`` (Hz)."""
    phase = 2 * np.pi * np.cumsum(freq) / rate
    kind = sound.timbre
    if kind == "sine":
        return np.sin(phase)
    if kind == "whistle":  # a sine with a 5 Hz vibrato of +-1.5 %
        vibrato = freq * (1 + 0.015 * np.sin(2 * np.pi * 5.0 * t))
        return np.sin(2 * np.pi * np.cumsum(vibrato) / rate)
    if kind in ("saw", "square"):
        return harmonic_sum(phase, float(freq.max()), rate, odd_only=kind == "square")
    if kind == "bell":  # inharmonic partials of a struck bell
        ratios, weights = (1.0, 2.76, 5.40), (1.0, 0.6, 0.35)
        return sum(w * np.sin(r * phase) for r, w in zip(ratios, weights))
    if kind == "drum":  # a falling low thump plus a little low-passed noise
        return np.sin(phase) + 0.35 * band_noise(rng, len(t), rate, 30.0, 500.0)
    if kind == "clap":
        return band_noise(rng, len(t), rate, 1200.0, min(6500.0, 0.45 * rate))
    raise ValueError(f"unknown timbre {kind!r}")


def synth_audio(
    sound: Sound, nuisance: Nuisance, seconds: float, rate: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One video's mono audio (float32 in [-1, 1]) and its envelope (the visual trace's source)."""
    n = int(math.ceil(seconds * rate - 1e-6))  # covers the video's last frame
    t = np.arange(n) / rate
    env, tau, duration, semis = sound_envelope(sound, t, nuisance.tempo, nuisance.sound_phase)
    glide = sound.sweep * np.clip(tau / duration, 0.0, 1.0)
    freq = sound.base_hz * nuisance.detune * 2.0 ** ((semis + glide) / 12.0)
    wave = timbre_wave(sound, freq, t, rate, rng)
    wave = wave / (np.abs(wave).max() + 1e-12)
    gain = 0.7 * 10 ** (nuisance.loudness_db / 20)
    audio = gain * env * wave + nuisance.noise_floor * rng.standard_normal(n)
    return np.clip(audio, -1.0, 1.0).astype(np.float32), env.astype(np.float32)


def frame_trace(envelope: np.ndarray, rate: int, fps: float, frames: int) -> np.ndarray:
    """Mean envelope over each frame's time span (a short note still shows in its frame)."""
    edges = np.round(np.arange(frames + 1) * rate / fps).astype(np.int64)
    edges = np.clip(edges, 0, len(envelope))
    cumulative = np.concatenate([[0.0], np.cumsum(envelope, dtype=np.float64)])
    counts = np.maximum(edges[1:] - edges[:-1], 1)
    return ((cumulative[edges[1:]] - cumulative[edges[:-1]]) / counts).astype(np.float32)


# ---- video ----------------------------------------------------------------------------------


def triangle_wave(x: np.ndarray) -> np.ndarray:
    """Triangle wave in [-1, 1] with period 1 (constant speed back and forth)."""
    return 4 * np.abs(x - np.floor(x + 0.5)) - 1


def motion_poses(motion: Motion, nuisance: Nuisance, times: np.ndarray) -> dict[str, np.ndarray]:
    """Per-frame pose: centre (cx, cy in frame units, 0 = middle), angle, x/y scale factors."""
    cycles = motion.hz * nuisance.speed * times + nuisance.motion_phase
    w = 2 * np.pi * cycles
    zero, one = np.zeros_like(times), np.ones_like(times)
    dx, dy, angle, sx, sy = zero, zero, zero, one, one
    kind = motion.kind
    if kind == "swing":
        dx = 0.22 * np.sin(w)
    elif kind == "orbit":
        dx, dy = 0.2 * np.cos(w), 0.2 * np.sin(w)
    elif kind == "pulse":
        sx = sy = 1 + 0.35 * np.sin(w)
    elif kind == "bounce":  # |sin| gives the sharp turn at the floor of a bouncing ball
        dy = 0.2 - 0.4 * np.abs(np.sin(w / 2))
    elif kind == "spin":
        angle = w
    elif kind == "figure8":
        dx, dy = 0.22 * np.sin(w), 0.15 * np.sin(2 * w)
    elif kind == "zigzag":  # constant speed along the anti-diagonal
        dx = 0.18 * triangle_wave(cycles)
        dy = -dx
    elif kind == "squash":
        sx, sy = 1 + 0.3 * np.sin(w), 1 - 0.3 * np.sin(w)
    else:
        raise ValueError(f"unknown motion {kind!r}")
    cx = nuisance.centre[0] + dx
    cy = nuisance.centre[1] + dy
    # "* one" broadcasts the constant parts to one value per frame
    return {"cx": cx * one, "cy": cy * one, "angle": angle * one, "sx": sx * one, "sy": sy * one}


def shape_distance(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance to the shape's edge, in object radii, positive inside."""
    abs_u, abs_v = np.abs(u), np.abs(v)
    if shape == "disc":
        return 1.0 - np.sqrt(u * u + v * v)
    if shape == "square":
        return 0.85 - np.maximum(abs_u, abs_v)
    if shape == "diamond":
        return (1.0 - abs_u - abs_v) / math.sqrt(2)
    if shape == "triangle":  # apex up (image y grows downwards), inradius 0.55
        edge = np.maximum(v, np.maximum(-0.866 * u - 0.5 * v, 0.866 * u - 0.5 * v))
        return 0.55 - edge
    if shape == "cross":
        arm_h = np.minimum(0.35 - abs_v, 1.0 - abs_u)
        arm_v = np.minimum(0.35 - abs_u, 1.0 - abs_v)
        return np.maximum(arm_h, arm_v)
    raise ValueError(f"unknown shape {shape!r}")


def texture_pattern(texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Texture in [0, 1] in object coordinates (moves and turns with the object)."""
    if texture == "striped":
        s = np.sin(2 * np.pi * 1.5 * u)
    elif texture == "checked":
        s = np.sin(2 * np.pi * 1.25 * u) * np.sin(2 * np.pi * 1.25 * v) * 2
    elif texture == "spotted":
        s = np.cos(2 * np.pi * 1.5 * u) * np.cos(2 * np.pi * 1.5 * v) - 0.3
    elif texture == "split":
        s = u + 0.3 * v
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return 0.5 + 0.5 * np.clip(4.0 * s, -1.0, 1.0)


def render_background(nuisance: Nuisance, size: int, rng: np.random.Generator, canvas: float = 1.0) -> np.ndarray:
    """The backdrop (side x side x 3 with side = round(size * canvas), float32, 0..255 with
    brightness applied); patterns keep their frequency per frame width whatever the canvas."""
    side = int(round(size * canvas))
    coords = (np.arange(side, dtype=np.float32) + 0.5) / size - 0.5 * side / size
    x, y = coords[None, :], coords[:, None]
    along = x * math.cos(nuisance.bg_angle) + y * math.sin(nuisance.bg_angle)
    across = -x * math.sin(nuisance.bg_angle) + y * math.cos(nuisance.bg_angle)
    wave = 2 * np.pi * nuisance.bg_freq
    kind = nuisance.bg_kind
    if kind == "flat":
        mix = np.zeros((side, side), np.float32)
    elif kind == "gradient":
        mix = np.clip(0.5 + along * 1.4, 0, 1)
    elif kind == "stripes":
        mix = 0.5 + 0.5 * np.sin(wave * along + nuisance.bg_phase)
    elif kind == "checker":
        mix = 0.5 + 0.5 * np.clip(3 * np.sin(wave * along) * np.sin(wave * across), -1, 1)
    elif kind == "blobs":
        mix = np.zeros((side, side), np.float32)
        half = 0.5 * side / size
        count = max(3, int(round(3 * canvas * canvas)))  # the same density on a larger canvas
        for cx, cy, width in rng.uniform((-half, -half, 0.08), (half, half, 0.25), (count, 3)):
            mix = mix + np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * width**2))
        mix = np.clip(mix, 0, 1)
    else:
        raise ValueError(f"unknown background {kind!r}")
    c1 = np.array(nuisance.bg_rgb1, np.float32)
    c2 = np.array(nuisance.bg_rgb2, np.float32)
    background = c1 * (1 - mix[..., None]) + c2 * mix[..., None]
    return (background * (255.0 * nuisance.brightness)).astype(np.float32)


def camera_offsets(nuisance: Nuisance, times: np.ndarray, size: int, canvas: float) -> np.ndarray:
    """(frames, 2) integer pixel offsets (x, y) of the frame on the canvas: the camera moves at
    its velocity and turns back at the canvas's edges (a pan back and forth)."""
    free = canvas - 1.0
    if free <= 0:
        return np.zeros((len(times), 2), np.int64)
    position = np.array(nuisance.camera_start)[None, :] + np.array(nuisance.camera_velocity)[None, :] * times[:, None]
    bounced = free * (1 - np.abs(1 - np.mod(position / free, 2.0)))  # reflect into [0, free]
    return np.round(bounced * size).astype(np.int64)


def render_frames(
    spec: ClassSpec,
    nuisance: Nuisance,
    trace: np.ndarray,
    fps: float,
    size: int,
    rng: np.random.Generator,
    trace_depth: float = TRACE_DEPTH,
    backdrop_rng: np.random.Generator | None = None,
):
    """Yield the video's frames (size x size x 3 uint8), one per entry of ``trace``.

    ``trace`` (the per-frame sound envelope, 0..1) dims the object by up to ``trace_depth``.
    Only the object's bounding box is recomputed per frame; noise comes from a small bank of
    precomputed fields, picked at random per frame.
    """
    frames = len(trace)
    moving = any(nuisance.camera_velocity)
    canvas = CANVAS if moving else 1.0
    background = render_background(nuisance, size, backdrop_rng if backdrop_rng is not None else rng, canvas)
    offsets = camera_offsets(nuisance, np.arange(frames) / fps, size, canvas)
    noise_bank = rng.standard_normal((8, size, size, 3), dtype=np.float32) * nuisance.noise_sigma
    noise_pick = rng.integers(0, len(noise_bank), frames)
    poses = motion_poses(spec.motion, nuisance, np.arange(frames) / fps)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    colour = np.array(nuisance.object_rgb, np.float32) * (255.0 * nuisance.brightness)
    radius_px = nuisance.radius * size
    for i in range(frames):
        cx, cy, angle = poses["cx"][i], poses["cy"][i], poses["angle"][i]
        sx, sy = poses["sx"][i], poses["sy"][i]
        reach = nuisance.radius * max(sx, sy) * 1.45 + 2.0 / size  # rotated corners + AA edge
        x0, x1 = np.searchsorted(coords, [cx - reach, cx + reach])
        y0, y1 = np.searchsorted(coords, [cy - reach, cy + reach])
        ox, oy = offsets[i]
        frame = background[oy : oy + size, ox : ox + size].copy()  # the camera follows the object
        if x1 > x0 and y1 > y0:
            dx = coords[None, x0:x1] - cx
            dy = coords[y0:y1, None] - cy
            cos, sin = math.cos(angle), math.sin(angle)
            u = (dx * cos + dy * sin) / (nuisance.radius * sx)
            v = (-dx * sin + dy * cos) / (nuisance.radius * sy)
            distance = shape_distance(spec.appearance.shape, u, v)
            alpha = np.clip(0.5 + distance * radius_px * min(sx, sy), 0.0, 1.0)[..., None]
            shade = 0.45 + 0.55 * texture_pattern(spec.appearance.texture, u, v)
            gain = 1.0 - trace_depth + trace_depth * float(trace[i])
            paint = colour * (shade[..., None] * gain)
            region = frame[y0:y1, x0:x1]
            frame[y0:y1, x0:x1] = region + alpha * (paint - region)
        frame += noise_bank[noise_pick[i]]
        yield np.clip(frame, 0, 255).astype(np.uint8)


# ---- writing --------------------------------------------------------------------------------

AUDIO_FRAME_SAMPLES = 1024  # AAC's frame size
# One x264 thread: with more, x264 is still repeatable on one machine, but its output changes with
# the thread count (measured), and "auto" follows the core count, so files would differ between
# machines. Parallelism is across videos (--workers) instead.
X264_OPTIONS = {"preset": "ultrafast", "crf": "23", "threads": "1"}


def encode_audio_until(container, stream, audio: np.ndarray, sent: int, due: int, rate: int) -> int:
    """Encode and mux ``audio[sent:due]`` (rounded up to whole AAC frames); returns new ``sent``."""
    import av

    while sent < min(due, len(audio)):
        chunk = audio[sent : sent + AUDIO_FRAME_SAMPLES]
        block = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
        block.sample_rate = rate
        block.pts = sent
        block.time_base = Fraction(1, rate)
        for packet in stream.encode(block):
            container.mux(packet)
        sent += len(chunk)
    return sent


def write_mp4(path: Path, frames, audio: np.ndarray, fps: int, size: int, rate: int) -> None:
    """Encode frames (H.264, yuv420p) and mono audio (AAC) into ``path``, interleaved.

    Written to a temporary name first and renamed, so an interrupted run leaves no broken file.
    """
    import av  # imported here so the class table is usable without PyAV

    tmp = path.with_name(path.name + ".part")
    with av.open(str(tmp), mode="w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps, options=dict(X264_OPTIONS))
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        sound = container.add_stream("aac", rate=rate, layout="mono")
        sent = 0
        for index, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index
            for packet in video.encode(frame):
                container.mux(packet)
            # keep the audio in step with the video, so the file is interleaved
            sent = encode_audio_until(container, sound, audio, sent, int(round((index + 1) * rate / fps)), rate)
        encode_audio_until(container, sound, audio, sent, len(audio), rate)
        for stream in (video, sound):
            for packet in stream.encode(None):
                container.mux(packet)
    os.replace(tmp, path)


@dataclass(frozen=True)
class VideoJob:
    """Everything a worker needs to make one video (plain data, picklable by multiprocessing)."""

    path: str
    classes: int
    class_index: int
    video_index: int
    seed: int
    seconds: float
    fps: int
    size: int
    audio_rate: int
    scenes: int = 0
    camera: bool = False
    colour: str = "class"


def frame_count(seconds: float, fps: int) -> int:
    """Frames in a video of ``seconds`` at ``fps`` (at least one)."""
    return max(1, int(round(seconds * fps)))


def video_rng(seed: int, class_index: int, video_index: int) -> np.random.Generator:
    """The one RNG of a video: a function of (seed, class, video) only, never of the worker."""
    return np.random.default_rng([seed, class_index, video_index])


def make_video_content(job: VideoJob, trace_depth: float = TRACE_DEPTH, radius: tuple[float, float] | None = None):
    """(spec, nuisance, frame iterator, audio, per-frame trace) of one video, without writing.

    ``radius`` (diagnostics only) redraws the object's radius from that range.
    """
    spec = class_table(job.classes)[job.class_index]
    rng = video_rng(job.seed, job.class_index, job.video_index)
    nuisance = sample_nuisance(rng, spec.appearance, job.scenes, job.camera, job.colour)
    backdrop_rng = None
    if nuisance.scene >= 0:
        nuisance = dataclasses.replace(nuisance, **scene_backdrop(job.seed, nuisance.scene))
        backdrop_rng = scene_rng(job.seed, nuisance.scene)
    if radius is not None:
        nuisance = dataclasses.replace(nuisance, radius=float(rng.uniform(*radius)))
    frames = frame_count(job.seconds, job.fps)
    # the audio spans exactly the frames' time (frames / fps), whatever rounding gave `frames`
    audio, envelope = synth_audio(spec.sound, nuisance, frames / job.fps, job.audio_rate, rng)
    trace = frame_trace(envelope, job.audio_rate, job.fps, frames)
    pixels = render_frames(spec, nuisance, trace, job.fps, job.size, rng, trace_depth, backdrop_rng)
    return spec, nuisance, pixels, audio, trace


def make_video(job: VideoJob) -> str:
    """Render and encode one video; returns its path (the multiprocessing work item)."""
    _, _, pixels, audio, _ = make_video_content(job)
    write_mp4(Path(job.path), pixels, audio, job.fps, job.size, job.audio_rate)
    return job.path


def video_name(class_name: str, video_index: int) -> str:
    """UCF101-style file name: one 'group' per video, one clip per group."""
    return f"v_{class_name}_g{video_index + 1:02d}_c01.mp4"


def train_count(videos_per_class: int, train_fraction: float) -> int:
    """Training videos per class: the fraction, rounded, leaving >= 1 train and >= 1 test."""
    count = int(round(videos_per_class * train_fraction))
    if videos_per_class >= 2:
        count = min(max(count, 1), videos_per_class - 1)
    return count


def write_splits(out: Path, table: list[ClassSpec], videos_per_class: int, train_fraction: float) -> tuple[int, int]:
    """classInd.txt, trainlist01.txt and testlist01.txt in UCF101's format; (#train, #test).

    The first videos of each class (by index) train, the rest test: videos are i.i.d., so any
    fixed rule is an unbiased split, and this one is stable when videos are added.
    """
    splits = out / "splits"
    splits.mkdir(parents=True, exist_ok=True)
    n_train = train_count(videos_per_class, train_fraction)
    train_lines, test_lines = [], []
    for spec in table:
        for video in range(videos_per_class):
            relative = f"{spec.name}/{video_name(spec.name, video)}"
            if video < n_train:
                train_lines.append(f"{relative} {spec.index + 1}")
            else:
                test_lines.append(relative)
    (splits / "classInd.txt").write_text("".join(f"{s.index + 1} {s.name}\n" for s in table))
    (splits / "trainlist01.txt").write_text("".join(line + "\n" for line in train_lines))
    (splits / "testlist01.txt").write_text("".join(line + "\n" for line in test_lines))
    return len(train_lines), len(test_lines)


def describe_classes(table: list[ClassSpec], options: dict) -> dict:
    """The content of classes.json: options, factor counts and each class's factors."""
    return {
        "format": "tricoclr-synth",
        "version": 1,
        "options": options,
        "trace_depth": TRACE_DEPTH,
        "factor_counts": {
            "appearance": len({s.appearance.name for s in table}),
            "motion": len({s.motion.name for s in table}),
            "sound": len({s.sound.name for s in table}),
        },
        "classes": [
            {
                "index": spec.index + 1,
                "name": spec.name,
                "appearance": asdict(spec.appearance),
                "motion": asdict(spec.motion),
                "sound": asdict(spec.sound),
            }
            for spec in table
        ],
    }


def _make_videos(jobs: list, workers: int) -> None:
    """Render every job, in this process or in ``workers`` processes (the same files either way)."""
    if workers <= 1:
        for job in jobs:
            make_video(job)
        return
    # spawn: no fork of a parent that may hold threads (torch, PyAV); output is the same
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        list(pool.map(make_video, jobs, chunksize=1))


def synthesize(
    out,
    classes: int = 10,
    videos_per_class: int = 10,
    seconds: float = 10.0,
    fps: int = 30,
    size: int = 128,
    seed: int = 0,
    workers: int = 1,
    audio_rate: int = 22050,
    train_fraction: float = 0.7,
    scenes: int = SCENES,
    camera: bool = True,
    colour: str = "video",
) -> dict:
    """Write the whole dataset under ``out``; returns a summary (counts, seconds, elapsed).

    ``scenes`` (0: every video its own backdrop), ``camera`` (False: a static camera) and
    ``colour`` ("class" or "video") are the nuisance settings of :func:`sample_nuisance`.
    """
    if scenes < 0 or colour not in OBJECT_COLOURS:
        raise ValueError(f"need scenes >= 0 and colour in {OBJECT_COLOURS}")
    if videos_per_class < 1 or seconds <= 0 or fps < 1 or size < 16 or audio_rate < 8000:
        raise ValueError("need videos_per_class >= 1, seconds > 0, fps >= 1, size >= 16, audio_rate >= 8000")
    started = time.perf_counter()
    out = Path(out)
    table = class_table(classes)
    jobs = []
    for spec in table:
        folder = out / "videos" / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        for video in range(videos_per_class):
            jobs.append(
                VideoJob(
                    str(folder / video_name(spec.name, video)),
                    classes,
                    spec.index,
                    video,
                    seed,
                    float(seconds),
                    int(fps),
                    int(size),
                    int(audio_rate),
                    int(scenes),
                    bool(camera),
                    colour,
                )
            )
    _make_videos(jobs, workers)
    n_train, n_test = write_splits(out, table, videos_per_class, train_fraction)
    options = {
        "classes": classes,
        "videos_per_class": videos_per_class,
        "seconds": seconds,
        "fps": fps,
        "size": size,
        "seed": seed,
        "audio_rate": audio_rate,
        "train_fraction": train_fraction,
        "scenes": scenes,
        "camera": camera,
        "object_colour": colour,
    }
    (out / "classes.json").write_text(json.dumps(describe_classes(table, options), indent=2))
    return {
        "out": str(out),
        "classes": classes,
        "videos": len(jobs),
        "train": n_train,
        "test": n_test,
        "seconds_per_video": float(seconds),
        "total_seconds": float(seconds) * len(jobs),
        "elapsed_s": time.perf_counter() - started,
    }


# ---- command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``tricoclr-data synth``."""
    parser.add_argument("--out", required=True, help="output folder (videos/, splits/, ...)")
    parser.add_argument("--classes", type=int, default=10, help=f"2..{MAX_CLASSES}")
    parser.add_argument("--videos-per-class", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each video")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--size", type=int, default=128, help="frames are size x size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="processes, one video each")
    parser.add_argument("--audio-rate", type=int, default=22050, help="AAC mono sample rate")
    parser.add_argument(
        "--train-fraction", type=float, default=0.7, help="share of each class's videos in trainlist01.txt"
    )
    parser.add_argument(
        "--scenes",
        type=int,
        default=SCENES,
        help="backdrops shared by the videos (each video films one); 0: every video its own",
    )
    parser.add_argument("--static-camera", action="store_true", help="no camera pan (the backdrop does not move)")
    parser.add_argument(
        "--object-colour",
        choices=OBJECT_COLOURS,
        default="video",
        help="the object's hue: drawn per video (default) or near its class's hue",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``synth`` from parsed arguments; prints a one-line summary, returns the exit code."""
    summary = synthesize(
        args.out,
        classes=args.classes,
        videos_per_class=args.videos_per_class,
        seconds=args.seconds,
        fps=args.fps,
        size=args.size,
        seed=args.seed,
        workers=args.workers,
        audio_rate=args.audio_rate,
        train_fraction=args.train_fraction,
        scenes=args.scenes,
        camera=not args.static_camera,
        colour=args.object_colour,
    )
    print(
        f"synth: {summary['videos']} videos ({summary['classes']} classes, "
        f"{summary['train']} train / {summary['test']} test, "
        f"{summary['seconds_per_video']:g} s each) in {summary['out']} "
        f"in {summary['elapsed_s']:.1f} s"
    )
    return 0
