"""Build the display-matrix inputs with PyAV (no ffmpeg program needed): run it in place.

Needs a PyAV whose ``VideoStream`` has ``set_display_rotation`` (PyAV 18.1, FFmpeg 8, built the
committed files; the tests read them with any PyAV >= 12). Every clip shows the same portrait scene in a player, 48 wide
and 64 tall: the top half red, the bottom half blue, a green 16 x 16 square top-left. Each stores
it turned another way and carries the display matrix that turns it back (FFmpeg's
``av_display_rotation_set`` takes counter-clockwise degrees, the flips mirror after it):

    phone_270.mp4        stored rotated 90 degrees clockwise (64 x 48), matrix: 270 clockwise
    phone_mirror.mp4     stored mirrored left-right (48 x 64), matrix: mirror
    phone_90_mirror.mp4  stored transposed (64 x 48), matrix: 90 clockwise, then mirror
    moving_down.mp4      a texture that moves down 1 px a frame in the player's view, stored
                         rotated like phone_portrait.mp4 (there it moves right), matrix: 90 clockwise
"""

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

HERE = Path(__file__).resolve().parent
FPS = 30


def scene() -> np.ndarray:
    """(64, 48, 3) uint8: what a player shows."""
    image = np.zeros((64, 48, 3), np.uint8)
    image[:32] = (255, 0, 0)
    image[32:] = (0, 0, 255)
    image[:16, :16] = (0, 255, 0)
    return image


def texture(height: int, width: int) -> np.ndarray:
    """A smooth random texture that wraps around (np.roll translates it)."""
    image = np.random.default_rng(0).random((height, width, 3))
    for axis in (0, 1):
        for _ in range(2):
            image = sum(np.roll(image, k, axis=axis) for k in range(-2, 3)) / 5.0
    image = (image - image.min()) / (image.max() - image.min())
    return (image * 255).astype(np.uint8)


def write(path: Path, frames: list[np.ndarray], counter_clockwise: int, hflip: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "20"}
        stream.set_display_rotation(counter_clockwise, hflip=hflip)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def main() -> None:
    shown = scene()
    src = HERE / "src" / "walk"
    write(src / "phone_270.mp4", [np.rot90(shown, k=-1)] * FPS, counter_clockwise=90)
    write(src / "phone_mirror.mp4", [shown[:, ::-1]] * FPS, counter_clockwise=0, hflip=True)
    write(src / "phone_90_mirror.mp4", [shown.transpose(1, 0, 2)] * FPS, counter_clockwise=-90, hflip=True)
    base = texture(64, 48)  # the shown picture: portrait
    moving = [np.rot90(np.roll(base, i, axis=0), k=1) for i in range(20)]  # shown: down 1 px/frame
    write(HERE / "src" / "motion" / "moving_down.mp4", moving, counter_clockwise=-90)


if __name__ == "__main__":
    main()
