"""JPEG 2000 codestreams: header facts, and decoding a window at a reduced resolution (OpenJPEG).

OpenJPEG can decode just a window of an image (``opj_set_decode_area``),
touching only the code-blocks that intersect it, at any resolution level
(``opj_set_decoded_resolution_factor``). On a real Hologic mammogram, whose
breast fills a quarter of the 4915-pixel-wide frame, that makes the crop's
decode several times cheaper than the whole frame's. No installed Python
binding exposes the window: Pillow offers only ``reduce``, imagecodecs and
pylibjpeg-openjpeg neither; glymur does, but needs a system libopenjp2 (not on
PyPI) and Python >= 3.11. So this module calls, with :mod:`ctypes`, the
libopenjp2 that Pillow's wheel already bundles (or the system's), and
:func:`library` returns None where none can be loaded; callers then fall back
to Pillow.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import struct
from pathlib import Path

import numpy as np

Box = tuple[int, int, int, int]

_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_CODEC_J2K, _CODEC_JP2 = 0, 2
_READ_CHUNK = 1 << 20
_END_OF_STREAM = ctypes.c_size_t(-1).value
#: opj_dparameters_t is ~8.3 KB in OpenJPEG 2.x; only the library reads or writes it.
_PARAMETERS_BYTES = 1 << 15
#: The oldest OpenJPEG whose window decode skips the code-blocks outside the window.
_MIN_VERSION = (2, 3)


class OpenJpegError(ValueError):
    """OpenJPEG refused the codestream or the request; the message is the library's."""


class _Component(ctypes.Structure):
    _fields_ = [("dx", ctypes.c_uint32), ("dy", ctypes.c_uint32), ("w", ctypes.c_uint32),
                ("h", ctypes.c_uint32), ("x0", ctypes.c_uint32), ("y0", ctypes.c_uint32),
                ("prec", ctypes.c_uint32), ("bpp", ctypes.c_uint32), ("sgnd", ctypes.c_uint32),
                ("resno_decoded", ctypes.c_uint32), ("factor", ctypes.c_uint32),
                ("data", ctypes.POINTER(ctypes.c_int32)), ("alpha", ctypes.c_uint16)]


class _Image(ctypes.Structure):
    _fields_ = [("x0", ctypes.c_uint32), ("y0", ctypes.c_uint32), ("x1", ctypes.c_uint32),
                ("y1", ctypes.c_uint32), ("numcomps", ctypes.c_uint32),
                ("color_space", ctypes.c_int), ("comps", ctypes.POINTER(_Component)),
                ("icc_profile_buf", ctypes.c_void_p), ("icc_profile_len", ctypes.c_uint32)]


_READ = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_SKIP = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
_SEEK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, ctypes.c_void_p)
_MESSAGE = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_void_p)
_IMAGE_P = ctypes.POINTER(_Image)
_P = ctypes.c_void_p
_SIGNATURES = {
    "opj_version": (ctypes.c_char_p, []),
    "opj_stream_create": (_P, [ctypes.c_size_t, ctypes.c_int]),
    "opj_stream_set_read_function": (None, [_P, _READ]),
    "opj_stream_set_skip_function": (None, [_P, _SKIP]),
    "opj_stream_set_seek_function": (None, [_P, _SEEK]),
    "opj_stream_set_user_data_length": (None, [_P, ctypes.c_uint64]),
    "opj_stream_destroy": (None, [_P]),
    "opj_create_decompress": (_P, [ctypes.c_int]),
    "opj_set_error_handler": (ctypes.c_int, [_P, _MESSAGE, _P]),
    "opj_set_default_decoder_parameters": (None, [_P]),
    "opj_setup_decoder": (ctypes.c_int, [_P, _P]),
    "opj_read_header": (ctypes.c_int, [_P, _P, ctypes.POINTER(_IMAGE_P)]),
    "opj_set_decoded_resolution_factor": (ctypes.c_int, [_P, ctypes.c_uint32]),
    "opj_set_decode_area": (ctypes.c_int, [_P, _IMAGE_P] + [ctypes.c_int32] * 4),
    "opj_decode": (ctypes.c_int, [_P, _P, _IMAGE_P]),
    "opj_end_decompress": (ctypes.c_int, [_P, _P]),
    "opj_destroy_codec": (None, [_P]),
    "opj_image_destroy": (None, [_IMAGE_P]),
}


def _candidates() -> list[str]:
    """libopenjp2 files to try: Pillow's bundled copy first (Linux and macOS wheels), then the system's."""
    import PIL

    package = Path(PIL.__file__).resolve().parent
    found = [str(p) for folder in (package.parent / "pillow.libs", package / ".dylibs")
             for p in sorted(folder.glob("libopenjp2*"))]
    system = ctypes.util.find_library("openjp2")
    return found + ([system] if system else [])


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded libopenjp2 (>= 2.3) with its prototypes declared, or None where there is none."""
    for candidate in _candidates():
        try:
            lib = ctypes.CDLL(candidate)
            for name, (restype, argtypes) in _SIGNATURES.items():
                function = getattr(lib, name)
                function.restype, function.argtypes = restype, argtypes
        except (OSError, AttributeError):
            continue
        version = tuple(int(part) for part in lib.opj_version().decode().split(".")[:2])
        if version >= _MIN_VERSION:
            return lib
    return None


def level_window(box: Box, level: int) -> Box:
    """Samples (x0, y0, x1, y1) at 1/2**``level`` resolution that cover ``box`` (original pixels).

    Sample k of a level is centred on original pixel ``2**level * k``; the
    window starts at the sample at or before the box's start.
    """
    step = 2**level
    x0, y0, x1, y1 = box
    return x0 // step, y0 // step, -(-x1 // step), -(-y1 // step)


def jpeg2000_header(frame: bytes) -> tuple[int, int]:
    """(decomposition levels, bit precision) of a J2K codestream (optionally JP2-wrapped)."""
    start = frame.find(_J2K_SOC_SIZ)
    if start < 0:
        raise ValueError("no J2K codestream (SOC/SIZ markers) found")
    # SIZ: marker, Lsiz, Rsiz, 8 x 4-byte sizes, Csiz, then Ssiz of the first component.
    precision = (frame[start + 2 + 40] & 0x7F) + 1
    position = start + 2
    while position + 4 <= len(frame):
        marker, length = struct.unpack(">HH", frame[position : position + 4])
        if marker == 0xFF52:  # COD: Lcod, Scod, SGcod (4 bytes), then the level count
            return frame[position + 9], precision
        if marker in (0xFF90, 0xFF93):  # start of tile / data before any COD
            break
        position += 2 + length
    raise ValueError("no COD marker in the J2K main header")


def _codec_and_stream(frame: bytes) -> tuple[int, bytes]:
    if frame.startswith(_JP2_SIGNATURE):
        return _CODEC_JP2, frame
    start = frame.find(_J2K_SOC_SIZ)
    if start < 0:
        raise OpenJpegError("no J2K codestream (SOC/SIZ markers) found")
    return _CODEC_J2K, frame[start:]


def decode(frame: bytes, level: int = 0, box: Box | None = None) -> np.ndarray:
    """Decode one grayscale JPEG 2000 frame (J2K codestream or JP2 file) at 1/2**``level``.

    ``box`` (x0, y0, x1, y1, original pixels, exclusive ends) limits the
    decode to :func:`level_window` of it; None decodes the whole image.
    Returns the stored unsigned samples (uint8 up to 8 bits, else uint16).
    Raises :class:`OpenJpegError` with OpenJPEG's message on failure, and
    :class:`RuntimeError` when no libopenjp2 is available.
    """
    lib = library()
    if lib is None:
        raise RuntimeError("no libopenjp2 >= 2.3 found (Pillow's bundled copy or the system's)")
    codec_format, data = _codec_and_stream(frame)
    source = np.frombuffer(data, dtype=np.uint8)
    position = 0
    errors: list[str] = []

    def read(destination: int, size: int, _user: int) -> int:
        nonlocal position
        count = min(size, source.size - position)
        if count <= 0:
            return _END_OF_STREAM
        ctypes.memmove(destination, source.ctypes.data + position, count)
        position += count
        return count

    def skip(count: int, _user: int) -> int:
        nonlocal position
        position += count
        return count

    def seek(offset: int, _user: int) -> int:
        nonlocal position
        position = offset
        return int(0 <= offset <= source.size)

    def error(message: bytes, _user: int) -> None:
        errors.append(message.decode(errors="replace").strip())

    callbacks = (_READ(read), _SKIP(skip), _SEEK(seek), _MESSAGE(error))
    stream = lib.opj_stream_create(_READ_CHUNK, 1)
    codec = lib.opj_create_decompress(codec_format)
    image = _IMAGE_P()
    try:
        lib.opj_stream_set_read_function(stream, callbacks[0])
        lib.opj_stream_set_skip_function(stream, callbacks[1])
        lib.opj_stream_set_seek_function(stream, callbacks[2])
        lib.opj_stream_set_user_data_length(stream, source.size)
        lib.opj_set_error_handler(codec, callbacks[3], None)
        parameters = ctypes.create_string_buffer(_PARAMETERS_BYTES)
        lib.opj_set_default_decoder_parameters(parameters)

        def check(ok: int, step: str) -> None:
            if not ok:
                raise OpenJpegError(f"{step} failed: {'; '.join(errors) or 'no message'}")

        check(lib.opj_setup_decoder(codec, parameters), "decoder setup")
        check(lib.opj_read_header(stream, codec, ctypes.byref(image)), "header")
        header = image.contents
        if header.numcomps != 1:
            raise OpenJpegError(f"{header.numcomps} components; expected one (grayscale)")
        check(lib.opj_set_decoded_resolution_factor(codec, level), f"resolution level {level}")
        if box is not None:
            step = 2**level
            x0, y0, x1, y1 = box
            # Start on the level's sample grid, so the window begins at x0 // step exactly.
            check(lib.opj_set_decode_area(codec, image, header.x0 + x0 // step * step,
                                          header.y0 + y0 // step * step, header.x0 + x1,
                                          header.y0 + y1), f"decode area {box}")
        check(lib.opj_decode(codec, stream, image), "decode")
        check(lib.opj_end_decompress(codec, stream), "end of decode")
        component = image.contents.comps[0]
        if component.sgnd:
            raise OpenJpegError("signed samples; expected unsigned")
        samples = np.ctypeslib.as_array(component.data, shape=(component.h, component.w))
        return samples.astype(np.uint8 if component.prec <= 8 else np.uint16)
    finally:
        if image:
            lib.opj_image_destroy(image)
        lib.opj_destroy_codec(codec)
        lib.opj_stream_destroy(stream)

