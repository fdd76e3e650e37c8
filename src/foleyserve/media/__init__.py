"""Video in, audio out: probing, frame sampling, the two visual preprocessors, WAV/FLAC and MP4 muxing.

Everything goes through PyAV (no ffmpeg binary), numpy and torch (no torchvision, no PIL). The parts:

* ``source``: opening a file or bytes, telling a broken video from no video (``describe_non_video``),
  header facts (``probe``) and the request budget (``check_budget``).
* ``decode``: ``decode_frames``, the official ``get_frames_av`` sampling for every rate in ONE decode
  pass. Each sampled frame is preprocessed as it is decoded (8 fps -> the 512x512 SigLIP2 input,
  25 fps -> the 224x224 Synchformer input), so a clip's full-resolution frames are never held.
* ``preprocess``: the SigLIP2 and Synchformer preprocessing (see its docstring for the exact
  Pillow behaviour followed).
* ``output``: ``write_audio`` and ``mux``. The official writes a mono float32 WAV (torchaudio) and muxes
  with ``ffmpeg -c:v copy -c:a aac -ac 2 -af pan=stereo|c0=c0|c1=c0 -b:a 192k`` without ``-shortest``.

Timestamps are measured from the container's start time when that is positive (an MPEG-TS clip
usually starts at 1.4 s), which is what the ffmpeg CLI does to the official's output video; an MP4
normally starts at 0, where this changes nothing.
"""

from foleyserve.media.decode import DecodedVideo, check_min_frames, decode_frames
from foleyserve.media.output import MuxResult, Waveform, mux, write_audio
from foleyserve.media.preprocess import (
    SIGLIP_SIZE,
    SYNC_SIZE,
    pil_bilinear_resize,
    siglip_frames,
    siglip_pixels,
    synchformer_frames,
    synchformer_pixels,
    synchformer_size,
)
from foleyserve.media.source import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SECONDS,
    MAX_SECONDS,
    MIN_SYNC_FRAMES,
    SAMPLE_RATE,
    SIGLIP_FPS,
    SYNC_FPS,
    MediaError,
    VideoInfo,
    VideoSource,
    check_budget,
    describe_non_video,
    probe,
)

__all__ = [
    "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_SECONDS", "MAX_SECONDS", "MIN_SYNC_FRAMES", "SAMPLE_RATE", "SIGLIP_FPS",
    "SIGLIP_SIZE", "SYNC_FPS", "SYNC_SIZE", "DecodedVideo", "MediaError", "MuxResult", "VideoInfo", "VideoSource",
    "Waveform", "check_budget", "check_min_frames", "decode_frames", "describe_non_video", "mux",
    "pil_bilinear_resize", "probe", "siglip_frames", "siglip_pixels", "synchformer_frames", "synchformer_pixels",
    "synchformer_size", "write_audio",
]
