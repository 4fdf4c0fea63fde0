"""Data in the folder layouts users keep: one subfolder per class of images or WAV files, or a flat
folder of WAV files whose names carry the label (FSDD's ``7_jackson_32.wav``).

Images become float32 NCHW model inputs through a ``preprocess.Preprocessing`` (default pixel value
/ 255, in [0, 1]). WAV files (16-bit PCM mono) become
MLPerf-Tiny-KWS-style MFCC frames from ``AudioFrontEnd``, (1, frames, coefficients). Decoded arrays
are cached under ``$SMPQ_CACHE_DIR`` (default ``~/.cache/smpq_edge``), keyed by the folder's
content and the decoding options, so a second load reads one file instead of decoding them all.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import warnings
import zipfile
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import numpy as np

from smpq_edge.inputs.dataset import Dataset, check_labels, check_no_gaps
from smpq_edge.common.errors import UserError
from smpq_edge.common.fileio import write_bytes
from smpq_edge.inputs.preprocess import Preprocessing

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
AUDIO_SUFFIXES = frozenset({".wav"})
CLASSES_FILE = "classes.txt"
VAL_FRACTION = TEST_FRACTION = 0.2
CONTENT_HASH_LIMIT = 1 << 30  # bytes: below this the cache key hashes the files' content, not only their stats
PROGRESS_MIN_FILES = 500
CACHE_VERSION = 1  # bump when decoding changes, so old cache files are not reused


@dataclass(frozen=True)
class ImageOptions:
    channels: int | None = None  # 1 (grey) or 3 (RGB); None: 3 if any file is colour, else 1
    size: tuple[int, int] | None = None  # (H, W); None: the files' size, which must then agree
    resize: bool = False  # bilinear resize to ``size`` instead of stopping at a different size


@dataclass(frozen=True)
class AudioFrontEnd:
    """MFCC features as MLPerf Tiny's keyword-spotting reference computes them with ``tf.signal``:
    Hann-windowed STFT magnitude, ``mel_bands`` triangular mel filters over fmin..fmax, log(x + 1e-6),
    DCT-II (``mfccs_from_log_mel_spectrograms``), the first ``coefficients`` kept. Times are in
    milliseconds and scale with the sample rate (40 ms is 640 samples at 16 kHz, 320 at 8 kHz)."""

    sample_rate: int | None = None  # Hz; None: the files' rate (all files must share it; no resampling)
    clip_ms: float = 1000.0  # every clip is zero-padded or cut to this length
    window_ms: float = 40.0
    hop_ms: float = 20.0
    mel_bands: int = 40
    coefficients: int = 10
    fmin_hz: float = 20.0
    fmax_hz: float = 4000.0
    padding: Literal["end", "center"] = "end"  # where zeros go (and what is cut) to reach clip_ms
    log_offset: float = 1e-6

    def samples(self, rate: int) -> tuple[int, int, int]:
        """(clip, window, hop) in samples at ``rate``."""
        return tuple(int(round(ms * rate / 1000)) for ms in (self.clip_ms, self.window_ms, self.hop_ms))

    def frames(self, rate: int) -> int:
        clip, window, hop = self.samples(rate)
        return 1 + (clip - window) // hop

    def check(self, rate: int, source: str) -> None:
        clip, window, hop = self.samples(rate)
        if self.padding not in ("end", "center"):
            raise UserError(f"{source}: audio padding must be 'end' or 'center', not '{self.padding}'")
        if not (hop > 0 and 0 < window <= clip):
            raise UserError(f"{source}: audio front end needs 0 < window <= clip and hop > 0 "
                            f"(window {window}, clip {clip}, hop {hop} samples at {rate} Hz)")
        if not 0 <= self.fmin_hz < self.fmax_hz <= rate / 2:
            raise UserError(f"{source}: mel band edges {self.fmin_hz}..{self.fmax_hz} Hz must lie within "
                            f"0..{rate / 2:g} Hz (half the {rate} Hz sample rate)")
        if not 0 < self.coefficients <= self.mel_bands:
            raise UserError(f"{source}: {self.coefficients} coefficients from {self.mel_bands} mel bands")

    def describe(self, rate: int) -> dict:
        clip, window, hop = self.samples(rate)
        return {**asdict(self), "sample_rate": rate, "clip_samples": clip, "window_samples": window,
                "hop_samples": hop, "fft_length": 1 << (window - 1).bit_length(), "frames": self.frames(rate),
                "samples": "int16 / 32768, float32 in [-1, 1)", "window_fn": "hann (periodic)",
                "log": f"natural log of mel magnitude + {self.log_offset:g}",
                "implementation": "tf.signal stft, linear_to_mel_weight_matrix, mfccs_from_log_mel_spectrograms"}


@dataclass(frozen=True)
class Listing:
    """What a folder holds, before any file is decoded."""

    root: Path
    kind: Literal["image", "audio"]
    files: tuple[str, ...]  # paths relative to root, '/'-separated (strings: 50,000 Path objects cost seconds)
    labels: np.ndarray  # int64, one per file
    groups: tuple[str, ...] | None  # one per file, from name_pattern's {group}
    class_names: tuple[str, ...]


# --- listing ------------------------------------------------------------------------------------

def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:  # scandir knows file from folder without a stat per entry
            return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise UserError(f"{folder}: cannot read folder ({exc.strerror or exc.__class__.__name__})") from None


def _suffix(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def _media(folder: Path) -> list[str]:
    """Names of the image and WAV files in ``folder``, sorted."""
    return [e.name for e in _entries(folder) if e.is_file() and _suffix(e.name) in IMAGE_SUFFIXES | AUDIO_SUFFIXES]


def _kind(root: Path, files: list[str]) -> Literal["image", "audio"]:
    audio = [f for f in files if _suffix(f) in AUDIO_SUFFIXES]
    if audio and len(audio) != len(files):
        image = next(f for f in files if _suffix(f) in IMAGE_SUFFIXES)
        raise UserError(f"{root}: mixes image and WAV files ({image}, {audio[0]})")
    return "audio" if audio else "image"


def _class_folders(root: Path) -> list[str]:
    """Class names in label order: classes.txt's lines, or the sorted subfolder names."""
    listed = root / CLASSES_FILE
    if not listed.is_file():
        return [e.name for e in _entries(root) if e.is_dir()]
    try:
        names = [line.strip() for line in listed.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{listed}: not a readable text file ({exc.__class__.__name__})") from None
    if len(set(names)) != len(names):
        raise UserError(f"{listed}: names a class twice")
    for name in names:
        if not (root / name).is_dir():
            raise UserError(f"{listed}: names class '{name}' but {root / name} is not a folder")
    return names


def label_map(source: str, names: list[str], listed: bool) -> dict[str, int]:
    """Listed names are labelled by their line; names that are all integers are the labels
    themselves (folder '7' is label 7, as the firmware will print it); other names by sorted order."""
    if listed or not all(re.fullmatch(r"-?\d+", n) for n in names):
        return {n: i for i, n in enumerate(names if listed else sorted(names))}
    labels = {n: int(n) for n in names}
    if min(labels.values()) < 0:
        raise UserError(f"{source}: negative label {min(labels.values())}; labels must be 0..K-1")
    return labels


def _pattern(pattern: str) -> re.Pattern:
    """'{label}_{group}_{index}' -> a regex with named groups label and group; other fields match anything."""
    parts = re.split(r"\{(\w*)\}", pattern)
    regex = "".join(re.escape(p) if i % 2 == 0 else
                    (f"(?P<{p}>.+?)" if p in ("label", "group") else ".+?") for i, p in enumerate(parts))
    try:
        return re.compile(f"^{regex}$")
    except re.error:
        raise UserError(f"name_pattern '{pattern}' names a field twice") from None


def _fields(root: Path, files: list[str], pattern: str | None, field: str) -> list[str] | None:
    if pattern is None or f"{{{field}}}" not in pattern:
        return None
    regex, values = _pattern(pattern), []
    for f in files:
        match = regex.match(os.path.splitext(os.path.basename(f))[0])
        if match is None:
            raise UserError(f"{root / f}: file name does not match name_pattern '{pattern}'")
        values.append(match.group(field))
    return values


def list_folder(root: Path, name_pattern: str | None) -> Listing:
    loose, folders = _media(root), _class_folders(root)
    if loose and folders:
        raise UserError(f"{root}: holds both class subfolders and loose files ({loose[0]}); use one layout")
    if loose:
        return _flat(root, loose, name_pattern)
    if not folders:
        raise UserError(f"{root}: empty folder: no class subfolders and no image or WAV files")
    if name_pattern and "{label}" in name_pattern:
        raise UserError(f"{root}: name_pattern's {{label}} is for a flat folder; here the class folders are the labels")
    files, names = [], []
    for name in folders:
        found = _media(root / name)
        if not found:
            raise UserError(f"{root / name}: class folder has no image or WAV files")
        files += [f"{name}/{f}" for f in found]
        names += [name] * len(found)
    labels = label_map(str(root), folders, listed=(root / CLASSES_FILE).is_file())
    return Listing(root, _kind(root, files), tuple(files), np.array([labels[n] for n in names], np.int64),
                   _optional_tuple(_fields(root, files, name_pattern, "group")), _ordered(labels))


def _flat(root: Path, files: list[str], name_pattern: str | None) -> Listing:
    if name_pattern is None or "{label}" not in name_pattern:
        raise UserError(f"{root}: files but no class subfolders; give a name pattern with {{label}} to read labels "
                        f"from the file names (e.g. '{{label}}_{{group}}_{{index}}' for {files[0]})")
    names = _fields(root, files, name_pattern, "label")
    labels = label_map(str(root), sorted(set(names)), listed=False)
    return Listing(root, _kind(root, files), tuple(files), np.array([labels[n] for n in names], np.int64),
                   _optional_tuple(_fields(root, files, name_pattern, "group")), _ordered(labels))


def _optional_tuple(values: list[str] | None) -> tuple[str, ...] | None:
    return None if values is None else tuple(values)


def _ordered(labels: dict[str, int]) -> tuple[str, ...]:
    return tuple(sorted(labels, key=labels.get))


# --- content key and cache ----------------------------------------------------------------------

def content_key(listing: Listing) -> tuple[str, bool]:
    """sha256 over relative paths, sizes and mtimes, and the bytes of every file when the folder is
    small enough (CONTENT_HASH_LIMIT) that reading it all costs far less than decoding it."""
    paths = [os.path.join(listing.root, f) for f in listing.files]
    stats = [os.stat(p) for p in paths]
    with_content = sum(s.st_size for s in stats) <= CONTENT_HASH_LIMIT
    digest = hashlib.sha256(f"{listing.kind}\n{with_content}\n".encode())
    classes = listing.root / CLASSES_FILE
    if classes.is_file():
        digest.update(classes.read_bytes())
    for f, p, s in zip(listing.files, paths, stats):
        digest.update(f"{f}\0{s.st_size}\0{s.st_mtime_ns}\n".encode())
        if with_content:
            digest.update(_read(p))
    return digest.hexdigest(), with_content


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise UserError(f"{path}: cannot read file ({exc.strerror or exc.__class__.__name__})") from None


def cache_dir() -> Path:
    return Path(os.environ.get("SMPQ_CACHE_DIR") or Path.home() / ".cache" / "smpq_edge")


def cache_path(source_hash: str, options: dict) -> Path:
    key = json.dumps({"version": CACHE_VERSION, "source": source_hash, **options}, sort_keys=True, default=list)
    return cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"


def read_cache(path: Path) -> tuple[np.ndarray, dict] | None:
    """The cached (samples, preprocessing), or None when absent or unreadable (then it is rebuilt)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz["x"], json.loads(str(npz["preprocessing"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def write_cache(path: Path, x: np.ndarray, preprocessing: dict) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, x=x, preprocessing=np.array(json.dumps(preprocessing)))
    try:
        write_bytes(path, buffer.getvalue())
    except (OSError, UserError) as exc:  # a cache is an optimisation: loading goes on without it
        warnings.warn(f"{path}: cannot write the data cache ({exc})", stacklevel=2)


def _progress(listing: Listing, what: str):
    """The listing's files as Paths, with a progress bar when there are many."""
    from tqdm import tqdm

    paths = (listing.root / f for f in listing.files)
    return tqdm(paths, desc=f"{what} {listing.root.name}", unit="file", total=len(listing.files),
                disable=True if len(listing.files) < PROGRESS_MIN_FILES else None)


# --- images -------------------------------------------------------------------------------------

def decode_image(path: Path, channels: int | None) -> np.ndarray:
    """uint8 (H, W, C); grey stays grey unless ``channels`` asks for RGB, and the other way round."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            mode = {1: "L", 3: "RGB"}.get(channels) or ("L" if image.mode in ("1", "L", "LA", "I;16") else "RGB")
            pixels = np.asarray(image.convert(mode))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UserError(f"{path}: not a readable image ({exc.__class__.__name__})") from None
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def _fit(path: Path, pixels: np.ndarray, size: tuple[int, int], resize: bool) -> np.ndarray:
    if pixels.shape[:2] == tuple(size):
        return pixels
    if not resize:
        h, w = pixels.shape[:2]
        raise UserError(f"{path}: image is {h}x{w} (HxW), expected {size[0]}x{size[1]}; pass resize to resize it")
    from PIL import Image

    resized = [np.asarray(Image.fromarray(pixels[:, :, c]).resize(size[::-1], Image.BILINEAR))
               for c in range(pixels.shape[2])]
    return np.stack(resized, axis=-1)


def decode_images(listing: Listing, options: ImageOptions) -> tuple[np.ndarray, dict]:
    """uint8 (N, C, H, W) and the preprocessing record."""
    if options.channels not in (None, 1, 3):
        raise UserError(f"{listing.root}: images can be read with 1 or 3 channels, not {options.channels}")
    images, size = [], options.size
    for path in _progress(listing, "decoding"):
        pixels = decode_image(path, options.channels)
        size = size or pixels.shape[:2]  # without a wanted size, the first image sets it
        images.append(_fit(path, pixels, size, options.resize))
    channels = options.channels or max(p.shape[2] for p in images)
    x = np.stack([np.repeat(p, channels // p.shape[2], axis=2) for p in images]).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x), {"kind": "image", "channels": channels, "size": list(size),
                                     "resize": "bilinear (Pillow)" if options.resize else "none",
                                     "layout": "NCHW"}


# --- audio --------------------------------------------------------------------------------------

def read_wav(path: Path) -> tuple[int, np.ndarray]:
    from scipy.io import wavfile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown chunks (LIST, ...) are harmless
            rate, samples = wavfile.read(path)
    except Exception as exc:  # noqa: BLE001 - scipy's parser fails on bad files in many ways (even UnboundLocalError)
        raise UserError(f"{path}: not a readable WAV file ({exc.__class__.__name__})") from None
    if samples.dtype != np.int16 or samples.ndim != 1:
        channels = 1 if samples.ndim == 1 else samples.shape[1]
        raise UserError(f"{path}: {samples.dtype} samples, {channels} channel(s); expected 16-bit PCM mono")
    if len(samples) == 0:
        raise UserError(f"{path}: WAV file has no samples")
    return int(rate), samples


def _clip(samples: np.ndarray, length: int, padding: str) -> np.ndarray:
    """Zero-pad or cut to ``length``: at the end, or evenly on both sides for 'center'."""
    excess = len(samples) - length
    start = excess // 2 if padding == "center" and excess > 0 else 0
    clip = samples[start:start + length].astype(np.float32) / 32768.0
    before = -excess // 2 if padding == "center" and excess < 0 else 0
    return np.pad(clip, (before, length - len(clip) - before))


def mfcc(clips: np.ndarray, rate: int, front_end: AudioFrontEnd, batch: int = 1024) -> np.ndarray:
    """float32 (N, frames, coefficients) from float32 (N, clip samples)."""
    import tensorflow as tf  # slow to import, so only when audio is decoded

    _, window, hop = front_end.samples(rate)
    weights = None
    out = []
    for start in range(0, len(clips), batch):
        stft = tf.signal.stft(clips[start:start + batch], frame_length=window, frame_step=hop,
                              window_fn=tf.signal.hann_window)
        magnitude = tf.abs(stft)
        if weights is None:
            weights = tf.signal.linear_to_mel_weight_matrix(front_end.mel_bands, magnitude.shape[-1], rate,
                                                            front_end.fmin_hz, front_end.fmax_hz)
        log_mel = tf.math.log(tf.tensordot(magnitude, weights, 1) + front_end.log_offset)
        out.append(tf.signal.mfccs_from_log_mel_spectrograms(log_mel)[..., :front_end.coefficients].numpy())
    return np.concatenate(out).astype(np.float32)


def decode_audio(listing: Listing, front_end: AudioFrontEnd) -> tuple[np.ndarray, dict]:
    """float32 (N, 1, frames, coefficients) and the preprocessing record."""
    rate, clips = front_end.sample_rate, []
    for path in _progress(listing, "reading"):
        file_rate, samples = read_wav(path)
        rate = rate or file_rate  # without a wanted rate, the first file sets it
        if file_rate != rate:
            raise UserError(f"{path}: sample rate {file_rate} Hz, but {rate} Hz expected (no resampling is done)")
        if not clips:
            front_end.check(rate, str(listing.root))
        clips.append(_clip(samples, front_end.samples(rate)[0], front_end.padding))
    return mfcc(np.stack(clips), rate, front_end)[:, None], {"kind": "audio", **front_end.describe(rate),
                                                            "layout": "NCHW (1, frames, coefficients)"}


# --- splits -------------------------------------------------------------------------------------

def _sample_split(listing: Listing, rng: np.random.Generator) -> tuple[list[int], list[int], list[int]]:
    """Stratified: each class is cut 20 % / 20 % / rest, so every class is in every split."""
    val, test, train = [], [], []
    for label, name in enumerate(listing.class_names):
        members = np.flatnonzero(listing.labels == label)
        if len(members) < 3:
            where = listing.root / name if (listing.root / name).is_dir() else f"{listing.root}: class '{name}'"
            raise UserError(f"{where}: {len(members)} file(s); a {VAL_FRACTION:.0%} validation / "
                            f"{TEST_FRACTION:.0%} test split needs at least 3 per class")
        members = rng.permutation(members)
        n_val, n_test = (max(1, int(round(f * len(members)))) for f in (VAL_FRACTION, TEST_FRACTION))
        val += members[:n_val].tolist()
        test += members[n_val:n_val + n_test].tolist()
        train += members[n_val + n_test:].tolist()
    return train, val, test


def _take_groups(order: list[str], sizes: dict[str, int], target: float) -> list[str]:
    """Groups from the front of ``order`` (at least one) while the total moves closer to ``target``."""
    taken, total = [order[0]], sizes[order[0]]
    for group in order[1:]:
        if abs(total + sizes[group] - target) >= abs(total - target):
            break
        taken.append(group)
        total += sizes[group]
    return taken


def _group_split(listing: Listing, rng: np.random.Generator) -> tuple[list[int], list[int], list[int], dict]:
    """Whole groups (speakers) go to test and to val, so a held-out group is new to the model."""
    if listing.groups is None:
        raise UserError(f"{listing.root}: a group split needs a name pattern with {{group}} "
                        f"(e.g. '{{label}}_{{group}}_{{index}}')")
    groups = np.array(listing.groups)
    names, counts = np.unique(groups, return_counts=True)
    if len(names) < 3:
        raise UserError(f"{listing.root}: a group split needs at least 3 groups (one per split), found "
                        f"{len(names)}: {', '.join(names)}")
    order = [str(names[i]) for i in rng.permutation(len(names))]
    sizes = dict(zip(names.tolist(), counts.tolist()))
    test_groups = _take_groups(order[:-2], sizes, TEST_FRACTION * len(groups))
    val_groups = _take_groups(order[len(test_groups):-1], sizes, VAL_FRACTION * len(groups))
    held = set(test_groups) | set(val_groups)
    train = np.flatnonzero(~np.isin(groups, list(held))).tolist()
    val, test = (np.flatnonzero(np.isin(groups, g)).tolist() for g in (val_groups, test_groups))
    return train, val, test, {"val_groups": sorted(val_groups), "test_groups": sorted(test_groups)}


def split_indices(listing: Listing, seed: int, split_by: str) -> tuple[tuple[np.ndarray, ...], dict]:
    """(train, val, test) indices into the listing, each in a seeded random order (so the first test
    samples, which the firmware embeds, cover several classes), and the split's record."""
    rng = np.random.default_rng(seed)
    record = {"by": split_by, "val_fraction": VAL_FRACTION, "test_fraction": TEST_FRACTION}
    if split_by == "group":
        *parts, held = _group_split(listing, rng)
        record.update(held)
    else:
        parts = _sample_split(listing, rng)
        record["stratified"] = True
    return tuple(rng.permutation(np.array(p, np.int64)) for p in parts), record


# --- entry point --------------------------------------------------------------------------------

def decode(listing: Listing, source_hash: str, image: ImageOptions, front_end: AudioFrontEnd) -> tuple[np.ndarray, dict]:
    """All samples, NCHW (uint8 pixels or float32 features), from the cache when the same files were
    decoded the same way."""
    options = asdict(image) if listing.kind == "image" else asdict(front_end)
    # Another JPEG decoder or TensorFlow build may give other numbers, so its version is part of the key.
    library = "pillow" if listing.kind == "image" else "tensorflow"
    path = cache_path(source_hash, {"kind": listing.kind, "library": f"{library} {version(library)}", **options})
    cached = read_cache(path)
    if cached is None:
        x, preprocessing = (decode_images(listing, image) if listing.kind == "image"
                            else decode_audio(listing, front_end))
        write_cache(path, x, preprocessing)
        cached = x, preprocessing
    return cached


def load_folder(root: Path, seed: int, *, image: ImageOptions = ImageOptions(),
                front_end: AudioFrontEnd = AudioFrontEnd(), name_pattern: str | None = None,
                split_by: str = "sample", pixels: Preprocessing = Preprocessing()) -> Dataset:
    """Class subfolders (labels from classes.txt or the sorted folder names) or a flat folder with
    ``name_pattern`` (e.g. '{label}_{group}_{index}'); images or 16-bit mono WAV files. Images
    become model inputs through ``pixels``."""
    listing = list_folder(root, name_pattern)
    if listing.kind != "image" and not pixels.is_default:
        raise UserError(f"{root}: {pixels.options()} applies to image pixels; this folder holds audio, whose "
                        "MFCC features are fed as computed")
    num_classes = int(listing.labels.max()) + 1
    # Before splitting: the split walks the classes by label, which needs labels 0..K-1.
    check_no_gaps(str(root), listing.labels, num_classes)
    parts, split = split_indices(listing, seed, split_by)
    check_labels(str(root), tuple(listing.labels[p] for p in parts), num_classes)
    source_hash, hashed_content = content_key(listing)
    x, preprocessing = decode(listing, source_hash, image, front_end)
    # Images stay uint8 (a quarter of the size) through the cache and the split.
    as_input = pixels.apply if listing.kind == "image" else (lambda a: a)
    arrays = [a for p in parts for a in (as_input(x[p]), listing.labels[p])]
    if listing.kind == "image":
        preprocessing = {**preprocessing, "pixels": pixels.describe(), "input": pixels.to_dict()}
    return Dataset(root.name, *arrays, num_classes=num_classes, source_hash=f"sha256:{source_hash}",
                   class_names=listing.class_names,
                   preprocessing={**preprocessing, "split": split, "content_hashed": hashed_content,
                                  "name_pattern": name_pattern},
                   pixels=pixels if listing.kind == "image" else None)
