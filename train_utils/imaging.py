"""Image I/O of the vessel datasets: decoding, the label and FOV-mask rules, file names, and the FOV estimate.

Everything here works on numpy arrays (``[H, W, 3]`` photographs, ``[H, W]``
labels and masks); the datasets in my_dataset.py turn them into tensors or
PIL images. Unreadable or mismatched files are one clear ``UserError``.
"""
import gzip
import io
import math
import os

import numpy as np
from PIL import Image, ImageOps

from .errors import UserError

# Label pixels no metric or loss counts (outside the field of view, padding); train_utils.metrics re-exports it.
# Defined here, not there, so that reading files needs no torch (measure.py).
IGNORE_INDEX = 255

# Suffixes Pillow decodes that these datasets use (a trailing .gz is allowed too).
EXIF_ORIENTATION = 0x0112  # the EXIF tag that says how a photograph is turned for display
IMAGE_EXTS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".ppm", ".pgm", ".pbm", ".pnm")


# ---------------------------------------------------------------------------
# file names


def split_ext(name):
    """(stem, extension) with a trailing ``.gz`` kept in the extension: ``im0001.ppm.gz`` -> ``im0001``."""
    base, ext = os.path.splitext(name)
    if ext.lower() == ".gz":
        base, inner = os.path.splitext(base)
        ext = inner + ext
    return base, ext


def stem_of(path):
    """The file name without its folder and extension (and without ``.gz``: ``im0001.ppm.gz`` -> ``im0001``)."""
    return split_ext(os.path.basename(path))[0]


def is_image_name(name):
    ext = split_ext(name)[1].lower()
    return ext.removesuffix(".gz") in IMAGE_EXTS


def list_files(folder):
    """The names of the files in ``folder``, sorted."""
    # Sorted: os.listdir's order differs between file systems, and so would the runs.
    return sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)))


def files_by_stem(folder):
    """{stem: [file names]} of the image files in ``folder`` (``.gz`` allowed); empty if there is no such folder.

    One listing per folder, looked up per image. A stem's names are sorted
    with ``.gif`` first (DRIVE's masks), then by name.
    """
    found = {}
    if os.path.isdir(folder):
        for name in sorted(list_files(folder), key=lambda n: (not n.lower().endswith(".gif"), n)):
            if is_image_name(name):
                found.setdefault(stem_of(name), []).append(name)
    return found


def list_inputs(path):
    """The image files to read: ``path`` itself, or every image file of the folder ``path``, sorted."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path)
                       if is_image_name(n) and os.path.isfile(os.path.join(path, n)))
        if not files:
            raise UserError(f"folder '{path}' holds no image files ({', '.join(IMAGE_EXTS)}, or those .gz)")
        return files
    if not os.path.exists(path):
        raise UserError(f"input '{path}' does not exist")
    return [path]


def find_mask(roi, img_path, listing=None):
    """The FOV mask file for ``img_path``: ``roi`` itself, or ``<stem>_mask.*`` / ``<stem>.*`` in the folder ``roi``.
    ``listing``: ``files_by_stem(roi)``, read once for a folder of thousands of photographs."""
    if roi is None:
        return None
    if not os.path.isdir(roi):
        if not os.path.isfile(roi):
            raise UserError(f"--roi-mask '{roi}' does not exist")
        return roi
    found = _by_stem(roi, img_path, (f"{stem_of(img_path)}_mask", stem_of(img_path)), listing)
    if found:
        return found
    stem = stem_of(img_path)
    raise UserError(f"no FOV mask for '{img_path}' in '{roi}' (looked for {stem}_mask.gif, {stem}_mask.* "
                    f"and {stem}.*)")


def _by_stem(folder, path, stems, by_stem=None):
    """The first file of ``folder`` (not ``path`` itself) with one of ``stems``, in that order; else None."""
    by_stem = files_by_stem(folder) if by_stem is None else by_stem  # a stem's names with DRIVE's .gif first
    real = os.path.realpath(path)
    for candidate in stems:
        found = [n for n in by_stem.get(candidate, []) if os.path.realpath(os.path.join(folder, n)) != real]
        if found:
            return os.path.join(folder, found[0])
    return None


def find_companion(folder, path, flag):
    """The file of ``folder`` that belongs to the label or mask ``path`` (its FOV mask, its photograph).

    First as ``find_mask`` looks (``<stem>_mask.*``, ``<stem>.*``); then the
    file whose stem, less ``_mask``, begins ``path``'s stem before a ``_`` or
    ``.`` (CHASE_DB1's ``Image_01L_1stHO`` -> ``Image_01L``, STARE's
    ``im0003.ah`` -> ``im0003``), the longest such; then, for a stem
    ``NN_...`` (DRIVE's ``36_manual1``), the only file whose stem begins
    ``NN_`` (``36_test_mask``). A ``flag`` that names a file is that file.
    """
    if not os.path.isdir(folder):
        if not os.path.isfile(folder):
            raise UserError(f"{flag} '{folder}' does not exist")
        return folder
    stem = stem_of(path)
    found = _by_stem(folder, path, (f"{stem}_mask", stem))
    if found:
        return found
    real = os.path.realpath(path)
    names = [(s.removesuffix("_mask"), n) for s, ns in files_by_stem(folder).items() for n in ns[:1]
             if os.path.realpath(os.path.join(folder, n)) != real]
    prefixed = [(len(s), n) for s, n in names if len(stem) > len(s) and stem.startswith(s) and stem[len(s)] in "_."]
    if prefixed:
        return os.path.join(folder, max(prefixed)[1])
    number = stem.split("_", 1)[0]
    if number.isdigit() and "_" in stem:
        same = [n for s, n in names if s.split("_", 1)[0] == number and "_" in s]
        if len(same) == 1:
            return os.path.join(folder, same[0])
    raise UserError(f"no file for '{path}' in {flag} '{folder}' (looked for {stem}_mask.*, {stem}.*, a stem "
                    f"that begins {stem}, and for NN_... the only NN_...)")


# ---------------------------------------------------------------------------
# decoding


def open_image(path):
    """``PIL.Image.open`` that also reads gzip-compressed files (``.ppm.gz`` as STARE's archives unpack)."""
    if path.lower().endswith(".gz"):
        with gzip.open(path, "rb") as f:
            return Image.open(io.BytesIO(f.read()))
    return Image.open(path)


def _decode(path, convert):
    """``convert(image)`` of the opened file, which is closed again; a missing or broken file is a UserError."""
    try:
        with open_image(path) as im:
            return convert(im)
    except FileNotFoundError:
        raise UserError(f"file '{path}' does not exist") from None
    except (OSError, EOFError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot decode image '{path}': {e}") from None


def _wide_grey(im):
    """The pixels of a one-channel image stored with more than 8 bits, as int64, or None for any other image.

    16-bit files (Pillow's 'I;16' modes, and 'I' for a PNG, which has no
    32-bit pixels) are read; 32-bit integer and floating-point pixels have no
    one faithful 8-bit reading, and raise a ``ValueError`` that says so.
    """
    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):
        return np.array(im).astype(np.int64)
    if im.mode in ("I", "F"):
        kind = "32-bit integer" if im.mode == "I" else "floating-point"
        raise ValueError(f"its pixels are {kind} (mode {im.mode}), which cannot be read as 8-bit without guessing "
                         "their range; save it with 8 or 16 bits per channel")
    return None


def _scaled_16_bit(values):
    """16-bit levels 0..65535 as 8-bit 0..255 (rounded v / 257): scaled by the bit depth, never clipped."""
    return ((values * 255 + 32767) // 65535).astype(np.uint8)


def _photograph(im, mode):
    wide = _wide_grey(im)
    if wide is not None:  # Pillow's convert() would clip 16-bit levels to 255: scale them instead
        im = Image.fromarray(_scaled_16_bit(wide))
    return np.array(im.convert(mode))


def read_image(path, mode):
    """Decode an image file into a numpy array of the given PIL mode ('RGB' or 'L'), closing the file.

    A 16-bit grey image is scaled to 8 bits by its bit depth (16-bit colour
    Pillow reads as 8-bit itself); 32-bit and floating-point images are refused.
    """
    return _decode(path, lambda im: _photograph(im, mode))


def read_photograph(path):
    """An RGB photograph as it is displayed: ``read_image`` with its EXIF orientation applied (a camera or a
    phone adapter stores the pixels as the sensor read them and tags how to turn them)."""
    def displayed(im):
        if im.getexif().get(EXIF_ORIENTATION, 1) != 1:
            im = ImageOps.exif_transpose(im)
        return _photograph(im, "RGB")
    return _decode(path, displayed)


def image_size(path):
    """(width, height) of an image file; decodes only the header unless the file is gzip-compressed."""
    return _decode(path, lambda im: im.size)


# ---------------------------------------------------------------------------
# labels and masks


def binary_from_gray(gray):
    """0/255 (or 0/1) gray levels as a bool map.

    Labels or masks that were resized with interpolation have grey edges: a
    pixel counts as set when it is at least 128 (half of 255). A file whose
    maximum is 1 is read as a 0/1 image.
    """
    if gray.max() == 1:
        return gray == 1
    return gray >= 128


def _check_shape(arr, path, img_path, shape):
    if arr.shape != tuple(shape):
        raise UserError(f"'{path}' is {arr.shape[1]}x{arr.shape[0]} but its image '{img_path}' is "
                        f"{shape[1]}x{shape[0]} (width x height)")
    return arr


def _grey_levels(im):
    """A label's or mask's grey levels, uint8 [H, W]: Pillow's 'L' conversion, except that a 16-bit file keeps
    levels that fit in 8 bits as they are (0/1, 0/255) and is scaled by its bit depth otherwise (0/65535)."""
    wide = _wide_grey(im)
    if wide is None:
        return np.array(im.convert("L"))
    return wide.astype(np.uint8) if wide.max() <= 255 else _scaled_16_bit(wide)


def read_binary(path, img_path, shape):
    """A label or FOV mask as a bool map, checked to be the size (H, W) of its image ``img_path``."""
    return _check_shape(binary_from_gray(_decode(path, _grey_levels)), path, img_path, shape)


def _class_indices(im):
    """The pixel values of a label image as class indices: palette indices for 'P', gray levels otherwise."""
    if im.mode in ("P", "L"):
        return np.array(im)
    if im.mode == "1":
        return np.array(im).astype(np.uint8)
    if im.mode in ("I", "I;16", "I;16B", "I;16L"):
        return np.array(im).astype(np.int64)
    if im.mode in ("RGB", "RGBA"):
        arr = np.array(im)
        if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all():
            return arr[..., 0]  # a grey label saved as RGB (STARE's .ppm)
    raise ValueError(f"a label must be a class-index (grey) or palette image, not mode {im.mode}")


def _grey_palette(im):
    """Whether a palette image's used colours are all grey (a binary mask saved as GIF/PNG with a palette)."""
    palette = np.array(im.getpalette() or [], dtype=np.int64).reshape(-1, 3)
    used = np.unique(np.array(im))
    used = used[used < len(palette)]
    colours = palette[used]
    return bool((colours[:, 0] == colours[:, 1]).all() and (colours[:, 1] == colours[:, 2]).all())


# How far apart the channels of a grey label may be (a grey drawing saved as an RGB JPEG); colours differ by more.
GREY_TOLERANCE = 16


def _label_values(im, num_classes):
    """(values, kind): for a one-class label its "grey" levels, as the tutorial reads DRIVE's GIFs, or its
    "colour" RGB pixels when it is in colour; otherwise (more classes, and colour-palette images, the VOC
    convention) the class "indices"."""
    if num_classes > 1 or (im.mode == "P" and not _grey_palette(im)):
        return _class_indices(im), "indices"
    if len(im.getbands()) >= 3:
        rgb = np.array(im.convert("RGB"))
        if int((rgb.max(axis=2) - rgb.min(axis=2)).max()) > GREY_TOLERANCE:
            return rgb, "colour"
    return _grey_levels(im), "grey"


ONE_CLASS_RULE = ("with --num-classes 1 a label is grey, 0/255 (grey edges allowed) or 0/1 (255 = ignored), or a "
                  "palette PNG of class indices; class indices 0..K need --num-classes K")


def read_label(path, img_path, shape, num_classes=1):
    """A label file as uint8 class indices [H, W], 255 = ignored.

    One foreground class (``num_classes=1``): grey 0/255 images (also 0/1;
    grey soft edges split at 128, see ``_soft_edges``), or 0/1 with 255
    ignored; a colour image, or other grey levels, is a ``UserError`` naming
    the values found. More classes (or a colour palette): class-index or
    palette images holding 0..num_classes, and 255 for ignored pixels.
    """
    try:
        values, kind = _decode(path, lambda im: _label_values(im, num_classes))
    except UserError as e:
        if "a label must be" in str(e):
            raise UserError(f"label '{path}': {str(e).split(': ', 1)[1]}") from None
        raise
    if kind == "colour":
        raise UserError(f"label '{path}' is in colour ({_listed_colours(values)}): {ONE_CLASS_RULE}")
    _check_shape(values, path, img_path, shape)
    present = set(np.unique(values).tolist())
    if kind == "grey":
        if 1 in present and present <= {0, 1, IGNORE_INDEX}:
            return values.astype(np.uint8)
        if not present <= {0, 255} and not _soft_edges(values):
            raise UserError(f"label '{path}' holds the grey levels {_listed(sorted(present))}: {ONE_CLASS_RULE}")
        return binary_from_gray(values).astype(np.uint8)
    bad = sorted(v for v in present if v > num_classes and v != IGNORE_INDEX)
    if bad:
        raise UserError(f"label '{path}' holds class {bad[0]}, but --num-classes {num_classes} allows "
                        f"0..{num_classes} (and {IGNORE_INDEX} for ignored pixels)")
    return values.astype(np.uint8)


# Artery/vein labels: class indices, and the colours they are commonly published in (one channel set at
# 128 or more, the others below it). Crossings (green) and uncertain vessels (white) are vessels of no class.
ARTERY, VEIN, AV_UNCERTAIN = 1, 2, 3
# A target pixel that is a vessel of either class: a vessel-only label's vessels in an artery/vein run
# (train_and_eval.criterion supervises it as 1 - P(background)).
VESSEL_ANY = 254
AV_COLOURS = {(0, 0, 0): 0, (1, 0, 0): ARTERY, (0, 0, 1): VEIN, (0, 1, 0): AV_UNCERTAIN, (1, 1, 1): AV_UNCERTAIN}
AV_RULE = ("an artery/vein label holds class indices 0 background, 1 artery, 2 vein, 3 uncertain (255 ignored), "
           "or colours: black background, red artery, blue vein, green crossing, white uncertain")


def _av_values(im):
    """(values, kind) of an artery/vein label: "indices" of a grey or palette image, or "colour" RGB pixels."""
    if im.mode in ("P", "L", "1", "I", "I;16", "I;16B", "I;16L"):
        return _class_indices(im), "indices"
    rgb = np.array(im.convert("RGB"))
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return rgb[..., 0], "indices"
    return rgb, "colour"


def read_av_label(path, img_path, shape):
    """An artery/vein label as uint8 [H, W]: 0 background, ``ARTERY``, ``VEIN``, ``AV_UNCERTAIN`` (a vessel
    whose class the expert left open, or a crossing), 255 ignored. Class-index images (grey or palette) and
    colour images (``AV_COLOURS``) are read; other values or colours are a ``UserError`` naming them."""
    values, kind = _decode(path, _av_values)
    _check_shape(values[..., 0] if kind == "colour" else values, path, img_path, shape)
    if kind == "colour":
        on = (values >= 128).astype(np.uint8)
        code = on[..., 0] * 4 + on[..., 1] * 2 + on[..., 2]
        table = np.full(8, 255, dtype=np.uint8)
        for (r, g, b), cls in AV_COLOURS.items():
            table[r * 4 + g * 2 + b] = cls
        classes = table[code]
        if (classes == 255).any():
            raise UserError(f"label '{path}' holds the colours {_listed_colours(values[classes == 255])}: {AV_RULE}")
        return classes
    present = set(np.unique(values).tolist())
    bad = sorted(present - {0, ARTERY, VEIN, AV_UNCERTAIN, IGNORE_INDEX})
    if bad:
        raise UserError(f"label '{path}' holds the values {_listed(bad)}: {AV_RULE}")
    return values.astype(np.uint8)


# A grey level is a tone of a label when its uniform 3x3 blocks cover more than this share of the image (and
# 8 blocks): soft edges, however made, cover less than 0.03 %. Tones this close are one (JPEG shifts levels).
REGION_SHARE = 0.001
TONE_SPREAD = 8


def _soft_edges(grey):
    """Whether the levels of a grey label can be a two-tone drawing with soft edges (resized, anti-aliased,
    scanned or saved as JPEG) rather than classes of their own.

    It needs light pixels (>= 128) and levels other than small class indices
    (below 32, besides 255), and at most one dark and one light tone: a level
    is a tone when it fills regions (its uniform 3x3 blocks cover more than
    ``REGION_SHARE`` of the image); 0 and 255, a clean drawing's levels, also
    as thin lines. Soft edges are a thin seam of varying levels.
    """
    counts = np.bincount(grey.ravel(), minlength=256)
    if grey.max() < 128 or not counts[32:255].any():
        return False
    h, w = grey.shape
    centre = grey[1:h - 1, 1:w - 1]
    uniform = np.ones(centre.shape, dtype=bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            uniform &= grey[dy:h - 2 + dy, dx:w - 2 + dx] == centre
    least = max(REGION_SHARE * grey.size, 8)
    tones = np.bincount(centre[uniform], minlength=256) > least
    tones[[0, 255]] |= counts[[0, 255]] > least
    return all(_tone_count(side) <= 1 for side in (tones[:128], tones[128:]))


def _tone_count(tones):
    """How many tones the levels marked in ``tones`` make, levels within ``TONE_SPREAD`` of each other being one."""
    levels = np.flatnonzero(tones)
    return 0 if len(levels) == 0 else 1 + int((np.diff(levels) > TONE_SPREAD).sum())


def _listed(levels, limit=8):
    """``0, 1, 2`` or ``0, 3, 7, ... (187 levels)``."""
    shown = ", ".join(str(v) for v in levels[:limit])
    return shown + (f", ... ({len(levels)} levels)" if len(levels) > limit else "")


def _listed_colours(rgb, limit=4):
    """The most frequent colours of an RGB array: ``(0, 0, 0), (255, 0, 0), ... (57 colours)``."""
    packed = rgb.reshape(-1, 3).astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.int32)
    colours, counts = np.unique(packed, return_counts=True)
    top = colours[np.argsort(-counts, kind="stable")[:limit]]
    shown = ", ".join(str((int(c) >> 16, int(c) >> 8 & 255, int(c) & 255)) for c in top)
    return shown + (f", ... ({len(colours)} colours)" if len(colours) > limit else "")


def palette_image(classes, colours, other=(0, 0, 0)):
    """A palette ('P') image of uint8 class indices: class c drawn in ``colours[c]``, classes beyond in ``other``.

    Class-index PNGs that open in any viewer: predict.py's masks, the synthetic palette labels.
    """
    im = Image.fromarray(classes.astype(np.uint8))  # 'L'; putpalette makes it 'P' with the same indices
    im.putpalette([v for c in range(256) for v in (colours[c] if c < len(colours) else other)])
    return im


# ---------------------------------------------------------------------------
# field of view


def _grow(region: np.ndarray, allowed: np.ndarray, diagonal=False) -> np.ndarray:
    """``region`` dilated by one pixel (4- or 8-neighbourhood), restricted to ``allowed``."""
    g = region.copy()
    g[1:] |= region[:-1]
    g[:-1] |= region[1:]
    g[:, 1:] |= region[:, :-1]
    g[:, :-1] |= region[:, 1:]
    if diagonal:
        g[1:, 1:] |= region[:-1, :-1]
        g[1:, :-1] |= region[:-1, 1:]
        g[:-1, 1:] |= region[1:, :-1]
        g[:-1, :-1] |= region[1:, 1:]
    return g & allowed


def _flood(allowed: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The pixels of ``allowed`` 4-connected to ``seeds``."""
    region = seeds & allowed
    count = int(region.sum())
    while True:
        region = _grow(region, allowed)
        new = int(region.sum())
        if new == count:
            return region
        count = new


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of ``mask``, trying the ones nearest the centre first."""
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w]
    dist = (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2
    remaining, best, best_size = mask.copy(), np.zeros_like(mask), 0
    while remaining.sum() > best_size:
        seed = np.zeros_like(mask)
        seed.flat[np.argmin(np.where(remaining, dist, np.inf))] = True
        comp = _flood(remaining, seed)
        if comp.sum() > best_size:
            best, best_size = comp, int(comp.sum())
        remaining &= ~comp
    return best


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region that does not reach the image border filled."""
    border = np.zeros_like(mask)
    border[[0, -1], :] = True
    border[:, [0, -1]] = True
    return ~_flood(~mask, border)


def estimate_fov(image: np.ndarray, level: float = 0.1, grid: int = 256):
    """The field of view of a fundus photograph (RGB uint8 ``[H, W, 3]``) as a bool ``[H, W]`` map.

    A pixel is bright enough when its brightest channel exceeds the dark
    border's level (1st percentile) by ``level`` of the image's range (to the
    99th percentile). The largest bright region, with its holes (dark vessels,
    lesions) filled, is found on a grid of at most ``grid`` cells a side; its
    inside is kept whole and its rim is taken pixel by pixel from the
    threshold. Returns (fov, threshold).
    """
    bright = image.max(axis=2) if image.ndim == 3 else image
    lo, hi = np.percentile(bright, [1, 99])
    threshold = float(lo + max(level * (hi - lo), 2.0))
    fg = bright > threshold
    h, w = fg.shape
    f = max(1, math.ceil(max(h, w) / grid))
    hc, wc = -(-h // f), -(-w // f)
    padded = np.zeros((hc * f, wc * f), dtype=bool)
    padded[:h, :w] = fg
    coarse = padded.reshape(hc, f, wc, f).mean(axis=(1, 3)) > 0.5
    region = _fill_holes(_largest_component(coarse))
    everywhere = np.ones_like(region)
    core = ~_grow(~region, everywhere, diagonal=True)  # cells whose 8 neighbours are all in the region
    rim = _grow(region, everywhere, diagonal=True) & ~core

    def up(a):
        return np.repeat(np.repeat(a, f, axis=0), f, axis=1)[:h, :w]

    return up(core) | (up(rim) & fg), threshold


def field_of_view(img, mask_path, img_path, fov="estimate"):
    """The FOV of one photograph: its mask file, else estimated (as predict.py does) or everything.

    An empty FOV is a ``UserError`` naming the file: an image with nothing to
    score would make the training loss NaN.
    """
    if mask_path is not None:
        inside = read_binary(mask_path, img_path, img.shape[:2])
        if not inside.any():
            raise UserError(f"the FOV mask '{mask_path}' of image '{img_path}' holds no pixels (it is all black)")
        return inside
    if fov == "all":
        return np.ones(img.shape[:2], dtype=bool)
    if fov == "masks":  # a dataset whose every image has a mask file (its registry entry says so)
        raise UserError(f"no FOV mask file for image '{img_path}'")
    inside = estimate_fov(img)[0]
    if not inside.any():
        raise UserError(f"the FOV estimated for image '{img_path}' holds no pixels (is the photograph blank?); "
                        "give FOV masks, or --fov all")
    return inside


def photo_fov(image, mask_file, path):
    """(FOV of one photograph, a note for its line): its --roi-mask file, else estimated from the dark border.
    A photograph with no field of view (blank, all white or all black) is a UserError."""
    if mask_file:
        fov = read_binary(mask_file, path, image.shape[:2])
        if not fov.any():
            raise UserError(f"the FOV mask '{mask_file}' of '{path}' holds no pixels (it is all black)")
        return fov, ""
    fov, threshold = estimate_fov(image)
    if not fov.any():
        raise UserError(f"'{path}' shows no field of view (no region brighter than its darkest pixels): a blank "
                        "or wholly over- or underexposed photograph?")
    return fov, f", FOV estimated ({fov.mean():.0%} of the image, brightness > {threshold:.0f})"


def check_min_size(paths, min_side, model, sizes=None):
    """A ``UserError`` naming the first image smaller than ``min_side`` pixels a side, the least the model
    ``model`` can predict whole (its poolings would leave nothing of it); ``sizes``: their (width, height)."""
    for path, (w, h) in zip(paths, sizes or (image_size(p) for p in paths)):
        if min(w, h) < min_side:
            raise UserError(f"image '{path}' is {w}x{h} pixels, smaller than the {min_side}x{min_side} the "
                            f"{model} model needs (its size multiple); enlarge it or use larger images")


def load_sample(img_path, label_path, mask_path, num_classes=1, fov="estimate", av=False, vessel_any=False):
    """(image uint8 [H, W, 3], target uint8 [H, W]) with the label's classes inside the FOV and 255 outside.

    ``av``: the label is an artery/vein label (``read_av_label``); its uncertain vessels are ignored (255)
    like the outside of the FOV, never counted as background. ``vessel_any``: a vessel label read for an
    artery/vein model, its vessels ``VESSEL_ANY``."""
    img = read_image(img_path, "RGB")
    if av:
        label = read_av_label(label_path, img_path, img.shape[:2])
        label[label == AV_UNCERTAIN] = IGNORE_INDEX
    elif vessel_any:
        label = read_label(label_path, img_path, img.shape[:2], 1)
        label[label == 1] = VESSEL_ANY
    else:
        label = read_label(label_path, img_path, img.shape[:2], num_classes)
    inside = field_of_view(img, mask_path, img_path, fov)
    return img, np.where(inside, label, IGNORE_INDEX).astype(np.uint8)


# ---------------------------------------------------------------------------
# the FOV's diameter: the scale of a photograph (--fov-diameter)


def fov_diameter(inside: np.ndarray) -> float:
    """The diameter in pixels of the circular field of view ``inside`` (``[H, W]`` bool), clipped or not.

    Vessel widths in pixels grow with the FOV's diameter, so it measures a
    photograph's scale whatever its camera. Many photographs cut the circle at
    the top and bottom (STARE's also at the sides), so neither the widest row
    nor the area gives the diameter: a circle is fitted (least squares, Kasa's
    algebraic fit) to the FOV's edge pixels that do not lie on the image's
    border. Without such an edge (every pixel inside) it is the image's width.
    """
    inside = np.asarray(inside, dtype=bool)
    h, w = inside.shape
    edge = np.zeros_like(inside)
    core = inside[1:-1, 1:-1]
    edge[1:-1, 1:-1] = core & ~(inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:])
    ys, xs = np.nonzero(edge)
    if len(xs) < 16 or not inside.any():
        return float(w)
    x, y = xs.astype(np.float64) + 0.5, ys.astype(np.float64) + 0.5
    # x^2 + y^2 + D x + E y + F = 0 in least squares: centre (-D/2, -E/2), radius^2 = (D^2 + E^2) / 4 - F
    a = np.stack([x, y, np.ones_like(x)], axis=1)
    (d, e, f), *_ = np.linalg.lstsq(a, -(x * x + y * y), rcond=None)
    r2 = (d * d + e * e) / 4 - f
    return 2 * math.sqrt(r2) if r2 > 0 else float(w)


def working_diameter(native: float, diameter: float, diameter_max: float = 0) -> float:
    """The FOV diameter in pixels at which a photograph whose FOV is ``native`` pixels across is seen.

    ``diameter`` alone (``--fov-diameter``): that diameter, whatever the
    camera. With ``diameter_max`` (``--fov-diameter-max``) the photograph keeps
    its own scale between the two and is brought to the nearer bound outside
    them: small photographs are enlarged to ``diameter``, and a high-resolution
    one is reduced no further than ``diameter_max``, so the fine vessels that
    only its resolution shows keep a width the network can resolve. 0: none.
    """
    if not diameter:
        return native
    return min(max(native, diameter), max(diameter, diameter_max))


def fov_scale(inside: np.ndarray, diameter: float, diameter_max: float = 0) -> float:
    """The resize factor that brings the FOV ``inside`` to its ``working_diameter`` (no diameter: 1.0)."""
    if not diameter:
        return 1.0
    native = fov_diameter(inside)
    return working_diameter(native, diameter, diameter_max) / native
