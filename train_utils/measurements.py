"""Measurements of a vessel mask inside its field of view (density, calibre, tortuosity, fractal dimension,
the skeleton's graph), the ``measurements.csv`` they are written to, and the agreement of two sets of them.

Every function takes numpy arrays (bool ``[H, W]`` masks) and returns plain
numbers; ``measure`` returns one photograph's row, which ``predict.py
--measure`` and ``measure.py`` both write. Lengths and widths are given in
pixels (``_px``), in units of the FOV's diameter (``_fov``: the same for the
same eye whatever the camera's resolution) and, with a pixel size or a FOV
angle, in micrometres (``_um``). docs/measurements.md has every formula and
its reference. The skeleton is scikit-image's and its graph is skan's: both
are optional packages (requirements-extras.txt), imported on first use.
"""
import math
from typing import NamedTuple

import numpy as np

from . import calibre
from .cli import MEASURE_DIAMETER
from .cohort import RowLog
from .errors import UserError
from .extras import require
from .imaging import ARTERY, VEIN, fov_diameter

# Micrometres of retina per degree of visual angle (Drasdo & Fowler 1974, the Gullstrand schematic eye): turns
# a camera's FOV angle into a pixel size, as --fov-angle does.
UM_PER_DEGREE = 288.0
# Box sides of the fractal dimension: the FOV's diameter over 2**k for these k (D/8 .. D/128).
BOX_SIZE_POWERS = range(3, 8)
# The skeleton's centreline is resampled every D/128 pixels (at least 2 skeleton pixels) before its length is
# summed: an 8-connected staircase overstates oblique lengths by up to 8 %, the resampled one by under 1 %.
ARC_STEP_FOV = 1 / 128
# Spurs and specks (pieces ending in a tip) shorter than this many FOV diameters are pruned from the skeleton;
# tortuosity counts segments at least this long. D/50 is about the width of the widest vessels near the disc.
MIN_SEGMENT_FOV = 0.02

# The columns of measurements.csv, in order: the photograph's name, then its measurements.
COLUMNS = ("image", "fov_diameter_px", "measured_at_px", "pixel_size_um", "fov_diameter_um", "vessel_area_density",
           "skeleton_length_px", "skeleton_length_fov", "skeleton_length_um",
           "length_density_per_px", "length_density_fov", "length_density_per_mm",
           "mean_width_px", "mean_width_fov", "mean_width_um",
           "tortuosity", "tortuosity_segments", "fractal_dimension", "segments", "junctions", "end_points")
# Measured again for arteries and veins apart (predict.py --av --measure, measure.py --av), as columns
# ``artery_<name>`` and ``vein_<name>`` after ``COLUMNS``.
AV_MEASURED = ("vessel_area_density", "length_density_per_px", "length_density_fov", "length_density_per_mm",
               "mean_width_px", "mean_width_fov", "mean_width_um", "tortuosity", "fractal_dimension")
AV_PREFIXES = ("artery_", "vein_")
# ... and then the optic disc and the calibres of zone B's vessels (calibre.py).
AV_COLUMNS = COLUMNS + tuple(prefix + name for prefix in AV_PREFIXES for name in AV_MEASURED) + calibre.COLUMNS
# The features whose agreement with the experts' labels is reported (benchmarks/measure_agreement.py).
FEATURES = ("vessel_area_density", "length_density_fov", "mean_width_fov", "tortuosity", "fractal_dimension",
            "segments", "junctions", "end_points")
EXTRAS_PURPOSE = "measuring vessels (predict.py --measure, measure.py)"


def _libraries():
    """(skimage.morphology, skan): a one-line error naming the install command when either is missing."""
    return require(EXTRAS_PURPOSE, "skimage.morphology", "skan", packages=["scikit-image", "skan"])


def check_available():
    """Fail at once, before any work, when the optional packages are missing."""
    _libraries()


def warm_up():
    """Start compiling skan's numba functions (about 3 s of one core, once a process) on a tiny skeleton in a
    background thread, so that it overlaps the caller's own start-up (predict.py: the model, the first
    prediction) instead of delaying the first photograph. Returns the thread."""
    import threading

    tiny = np.zeros((8, 8), dtype=bool)
    tiny[4, 1:7] = tiny[1:7, 4] = True

    def compile_once():
        try:
            _skan_graph(skeleton_of(tiny))
        except Exception:  # noqa: BLE001 - the real call reports any failure
            pass

    thread = threading.Thread(target=compile_once, name="skan-warm-up", daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------------------
# one measurement each


def resample_mask(mask, factor):
    """``mask`` (bool) resized by ``factor``: the share of each new pixel it covers (box filter when shrinking,
    bilinear when enlarging, Pillow's), kept where at least one half."""
    if factor == 1:
        return np.asarray(mask, dtype=bool)
    from PIL import Image

    h, w = mask.shape
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    image = Image.fromarray(np.asarray(mask, dtype=np.float32))
    return np.asarray(image.resize(size, Image.BOX if factor < 1 else Image.BILINEAR)) >= 0.5


def vessel_area_density(vessels, fov):
    """Vessel pixels over FOV pixels (dimensionless, the same in every unit).

    The vessel (area) density of e.g. OCT-angiography and fundus studies;
    AutoMorph (Zhou et al., TVST 2022) reports it for fundus photographs.
    """
    inside = int(np.count_nonzero(fov))
    return np.count_nonzero(vessels & fov) / inside if inside else math.nan


def skeleton_of(vessels):
    """The vessels' centrelines, one pixel wide (bool): scikit-image's ``skeletonize`` (Zhang & Suen 1984)."""
    morphology, _ = _libraries()
    return morphology.skeletonize(np.asarray(vessels, dtype=bool))


def arc_lengths(paths, step):
    """Length in pixels of each path (an ``[n, 2]`` array of pixel centres, in order): the polyline through
    every ``step``-th point and the last one. ``step`` 1 is the 8-connected length (1 or sqrt 2 a step)."""
    lengths = np.zeros(len(paths))
    for i, p in enumerate(paths):
        idx = np.arange(0, len(p), step)
        if idx[-1] != len(p) - 1:
            idx = np.append(idx, len(p) - 1)
        lengths[i] = np.linalg.norm(np.diff(p[idx].astype(np.float64), axis=0), axis=1).sum()
    return lengths


def chord_lengths(paths):
    """Straight-line distance in pixels between the two ends of each path."""
    return np.array([float(np.linalg.norm(np.subtract(p[-1], p[0], dtype=np.float64))) for p in paths])


def tortuosity(arcs, chords, counted):
    """The length-weighted mean of arc over chord of the ``counted`` segments, and how many they are.

    The distance metric of tortuosity (arc length over chord length; Grisan
    et al., IEEE TMI 2008, discuss it and its limits), per segment between
    junctions and end points, averaged with each segment weighted by its arc
    length: sum(arc * arc / chord) / sum(arc). Dimensionless, >= 1; NaN
    without a counted segment.
    """
    counted = np.asarray(counted, dtype=bool) & (np.asarray(chords) > 0)
    arcs, chords = np.asarray(arcs, dtype=np.float64)[counted], np.asarray(chords, dtype=np.float64)[counted]
    if not len(arcs):
        return math.nan, 0
    return float(np.sum(arcs * (arcs / chords)) / np.sum(arcs)), int(len(arcs))


def box_counts(mask, sizes, origin=(0, 0)):
    """For each box side ``s`` (pixels, need not be whole), the number of boxes of the grid of side ``s``
    starting at ``origin`` (row, column) that hold at least one pixel of ``mask``."""
    ys, xs = np.nonzero(mask)
    ys, xs = ys - origin[0], xs - origin[1]
    counts = []
    for s in sizes:
        by, bx = (ys // s).astype(np.int64), (xs // s).astype(np.int64)
        width = int(bx.max()) + 1 if len(bx) else 1
        counts.append(len(np.unique(by * width + bx)))
    return np.array(counts)


def fractal_dimension(mask, sizes, origin=(0, 0)):
    """Box-counting (Minkowski-Bouligand) dimension of ``mask``: the least-squares slope of log N(s) against
    log(1/s) over the box sides ``sizes`` (Mainster, Eye 1990; Liew et al., Ophthalmology 2008).

    A line gives 1, a filled square 2, the Sierpinski carpet log 8 / log 3.
    Dimensionless; NaN when the mask is empty.
    """
    counts = box_counts(mask, sizes, origin)
    if (counts == 0).any():
        return math.nan
    slope, _ = np.polyfit(-np.log(np.asarray(sizes, dtype=np.float64)), np.log(counts), 1)
    return float(slope)


def box_sizes(diameter):
    """The box sides of a photograph's fractal dimension: its FOV diameter over 8, 16, ..., 128 (pixels)."""
    return [diameter / 2 ** k for k in BOX_SIZE_POWERS]


def check_flags(pixel_size, fov_angle, diameter_to):
    """A ``UserError`` for --pixel-size and --fov-angle together, either not positive, or a negative
    --measure-diameter."""
    if diameter_to < 0:
        raise UserError(f"--measure-diameter must be >= 0 (got {diameter_to})")
    if pixel_size is not None and fov_angle is not None:
        raise UserError("give --pixel-size or --fov-angle, not both: each sets the micrometres of a pixel")
    for flag, value in (("--pixel-size", pixel_size), ("--fov-angle", fov_angle)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UserError(f"{flag} must be a positive number (got {value})")
    if fov_angle is not None and fov_angle >= 180:
        raise UserError(f"--fov-angle is the degrees the field of view spans, under 180 (got {fov_angle})")


def pixel_size_um(diameter_px, pixel_size=None, fov_angle=None):
    """Micrometres per pixel: ``pixel_size`` as given, or the FOV angle's retina (``UM_PER_DEGREE`` a degree,
    Drasdo & Fowler 1974) over the FOV diameter in pixels; None without either."""
    if pixel_size:
        return float(pixel_size)
    if fov_angle:
        return fov_angle * UM_PER_DEGREE / diameter_px
    return None


# ---------------------------------------------------------------------------
# the skeleton's graph


class SkeletonGraph(NamedTuple):
    """The pruned skeleton of a mask and its graph."""
    skeleton: np.ndarray  # bool [H, W]
    paths: list  # [n, 2] int arrays of (row, column), one per segment between junctions and end points
    kinds: np.ndarray  # skan's branch types: 0 tip-tip, 1 tip-junction, 2 junction-junction, 3 cycle
    junctions: np.ndarray  # [J, 2] (row, column) centres of the junctions
    end_points: np.ndarray  # [E, 2] (row, column)


def _skan_graph(skeleton):
    """(skan.Skeleton, branch types) of a skeleton image; (None, []) when it has no segment."""
    _, skan = _libraries()
    if np.count_nonzero(skeleton) < 2:
        return None, np.zeros(0, dtype=int)
    graph = skan.Skeleton(skeleton)
    if graph.n_paths == 0:
        return None, np.zeros(0, dtype=int)
    ends = graph.paths.indices
    src, dst = ends[graph.paths.indptr[:-1]], ends[graph.paths.indptr[1:] - 1]
    deg_src, deg_dst = graph.degrees[src], graph.degrees[dst]
    kinds = np.full(len(src), 2)  # as skan.summarize classifies them
    kinds[(deg_src == 1) | (deg_dst == 1)] = 1
    kinds[(deg_src == 1) & (deg_dst == 1)] = 0
    kinds[src == dst] = 3
    return graph, kinds


def _paths(graph):
    return [np.rint(graph.path_coordinates(i)).astype(np.int64) for i in range(graph.n_paths)] if graph else []


def skeleton_graph(vessels, min_length, step):
    """The skeleton of ``vessels`` with its spurs and specks (pieces ending in a tip, shorter than
    ``min_length`` pixels) pruned once, as skan's ``Skeleton.prune_paths`` does, and its segments.

    Junctions are the 8-connected clusters of skeleton pixels with more than
    two neighbours in skan's graph (one junction, however many pixels it
    has); end points are pixels with one neighbour.
    """
    from scipy import ndimage  # a dependency of scikit-image

    skeleton = skeleton_of(vessels)
    graph, kinds = _skan_graph(skeleton)
    if graph is not None:
        short = arc_lengths(_paths(graph), step) < min_length
        prune = np.flatnonzero(short & ((kinds == 0) | (kinds == 1)))
        if len(prune):
            graph = graph.prune_paths(prune)
            skeleton = np.asarray(graph.skeleton_image, dtype=bool)
            graph, kinds = _skan_graph(skeleton)
    if graph is None:
        empty = np.zeros((0, 2), dtype=np.int64)
        return SkeletonGraph(skeleton, [], kinds, empty, empty)
    coords = np.rint(graph.coordinates).astype(np.int64)
    degree = np.zeros(skeleton.shape, dtype=np.int64)
    degree[coords[:, 0], coords[:, 1]] = graph.degrees
    labels, n = ndimage.label(degree > 2, structure=np.ones((3, 3)))
    junctions = (np.rint(np.array(ndimage.center_of_mass(labels > 0, labels, range(1, n + 1)))).astype(np.int64)
                 if n else np.zeros((0, 2), dtype=np.int64))
    return SkeletonGraph(skeleton, _paths(graph), kinds, junctions.reshape(-1, 2), np.argwhere(degree == 1))


# ---------------------------------------------------------------------------
# one photograph's row


class Measurement(NamedTuple):
    """One photograph's row (``COLUMNS``), the skeleton it was measured on (for the overlay), the factor
    from the photograph's pixels to the skeleton's and, of an artery/vein map, its ``calibre.Calibres``."""
    row: dict
    graph: SkeletonGraph
    scale: float
    calibres: object = None


def measure(vessels, fov, name="", pixel_size=None, fov_angle=None, diameter_to=MEASURE_DIAMETER):
    """The measurements of one vessel mask inside its field of view.

    ``vessels`` and ``fov`` are bool ``[H, W]``; vessels outside the FOV are
    not counted. The FOV diameter D is ``imaging.fov_diameter``'s circle fit
    (the scale ``--fov-diameter`` uses). Both masks are resized so that D is
    ``diameter_to`` pixels (``resample_mask``; 0: as they are) and measured
    there: photographs of every resolution are measured at one, and the
    ``_px`` columns are converted back to the photograph's own pixels.
    ``pixel_size`` (micrometres a pixel of the photograph) or ``fov_angle``
    (degrees the FOV spans) add the ``_um`` columns.
    """
    fov = np.asarray(fov, dtype=bool)
    vessels = np.asarray(vessels, dtype=bool) & fov
    diameter = fov_diameter(fov)
    um = pixel_size_um(diameter, pixel_size, fov_angle)
    factor = diameter_to / diameter if diameter_to else 1.0
    fov = resample_mask(fov, factor)
    vessels = resample_mask(vessels, factor) & fov
    at = diameter * factor  # the FOV's diameter where it is measured
    step = max(2, round(at * ARC_STEP_FOV))
    min_length = MIN_SEGMENT_FOV * at
    graph = skeleton_graph(vessels, min_length, step)
    arcs = arc_lengths(graph.paths, step)
    length, area, fov_area = float(arcs.sum()), int(np.count_nonzero(vessels)), int(np.count_nonzero(fov))
    width = area / length if length > 0 else math.nan
    tort, counted = tortuosity(arcs, chord_lengths(graph.paths), (graph.kinds != 3) & (arcs >= min_length))
    rows, cols = np.flatnonzero(fov.any(axis=1)), np.flatnonzero(fov.any(axis=0))
    origin = (int(rows[0]), int(cols[0])) if len(rows) else (0, 0)  # the grid starts at the FOV's corner
    density = length / fov_area if fov_area else math.nan  # per measured pixel

    def px(value, power=1):  # measured pixels -> the photograph's
        return value / factor ** power

    def in_um(value_px, power=1):
        return value_px * um ** power if um is not None else None

    row = {
        "image": name, "fov_diameter_px": diameter, "measured_at_px": at, "pixel_size_um": um,
        "fov_diameter_um": in_um(diameter), "vessel_area_density": vessel_area_density(vessels, fov),
        "skeleton_length_px": px(length), "skeleton_length_fov": length / at, "skeleton_length_um": in_um(px(length)),
        "length_density_per_px": px(density, -1), "length_density_fov": density * at,
        "length_density_per_mm": in_um(px(density, -1), -1) * 1000 if um is not None else None,
        "mean_width_px": px(width), "mean_width_fov": width / at, "mean_width_um": in_um(px(width)),
        "tortuosity": tort, "tortuosity_segments": counted,
        "fractal_dimension": fractal_dimension(vessels, box_sizes(at), origin),
        "segments": len(graph.paths), "junctions": len(graph.junctions), "end_points": len(graph.end_points),
    }
    return Measurement(row, graph, factor)


def measure_av(classes, fov, name="", pixel_size=None, fov_angle=None, diameter_to=MEASURE_DIAMETER, image=None):
    """``measure`` of an artery/vein map (uint8 ``[H, W]``: 0 background, 1 artery, 2 vein, 3 a vessel of no
    class): every column of the vessels (every class but 0), then ``AV_MEASURED`` of the arteries and of the
    veins alone, then the disc and the calibres (``calibre.measure_calibres``; the disc found in the photograph
    ``image``, RGB [H, W, 3], else in the vessels alone): ``AV_COLUMNS``. The skeleton kept for the overlay is
    the vessels'; the calibres are measured on the map at its own resolution."""
    classes = np.asarray(classes)
    measured = measure(classes != 0, fov, name, pixel_size, fov_angle, diameter_to)
    row = dict(measured.row)
    for cls, prefix in ((ARTERY, AV_PREFIXES[0]), (VEIN, AV_PREFIXES[1])):
        one = measure(classes == cls, fov, name, pixel_size, fov_angle, diameter_to).row
        row.update({prefix + k: one[k] for k in AV_MEASURED})
    calibres = calibre.measure_calibres(classes, fov, image, row["pixel_size_um"], row["fov_diameter_px"])
    row.update(calibres.row)
    return measured._replace(row=row, calibres=calibres)


# ---------------------------------------------------------------------------
# the overlay: what was measured, drawn over the photograph

SKELETON_COLOUR, JUNCTION_COLOUR, END_COLOUR = (255, 255, 0), (255, 0, 0), (0, 160, 255)


def draw_measurement(picture, measured):
    """``picture`` (RGB uint8 ``[H, W, 3]``, the photograph's size) with what ``measured`` (a ``Measurement``)
    measured: the skeleton in yellow, junctions as red discs, end points as blue ones, brought back to the
    photograph's pixels, and with calibres the disc, zone B and the measured vessels (``calibre.draw_calibres``);
    lines and discs grow with the FOV so they stay visible."""
    from PIL import Image
    from scipy import ndimage
    from skimage.draw import disk

    out = picture.copy()
    h, w = out.shape[:2]
    graph, factor = measured.graph, measured.scale
    diameter = measured.row["fov_diameter_px"]
    line = np.asarray(Image.fromarray(graph.skeleton.astype(np.float32)).resize((w, h), Image.BILINEAR)) > 0
    thick = round((diameter / 600 - 1 / factor) / 2)  # a line about D/600 wide
    if thick > 0:
        line = ndimage.binary_dilation(line, iterations=thick)
    out[line] = SKELETON_COLOUR
    radius = max(2.0, diameter / 250)
    for points, colour, r in ((graph.end_points, END_COLOUR, radius * 0.7), (graph.junctions, JUNCTION_COLOUR, radius)):
        for y, x in points:
            out[disk(((y + 0.5) / factor - 0.5, (x + 0.5) / factor - 0.5), r, shape=(h, w))] = colour
    if measured.calibres is not None:
        out = calibre.draw_calibres(out, measured.calibres, diameter)
    return out


# ---------------------------------------------------------------------------
# measurements.csv


def _cell(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    return str(value)


def row_cells(row, columns=COLUMNS):
    """A row as the text of its CSV cells, in ``columns`` order: numbers to 6 significant digits, a missing
    value (no pixel size, no counted segment) empty."""
    return [_cell(row[c]) for c in columns]


class MeasurementsFile(RowLog):
    """``measurements.csv``: one header, one row per photograph (``cohort.RowLog``: each row added whole, a
    torchrun process's rows in a part file of its own). An existing file's columns are checked when the object
    is made, before any work, and a file of other columns is never written to. ``merge`` at the end of a run
    leaves one row per photograph: one measured again replaces its earlier row, the others are kept. With
    ``av``, the columns are ``AV_COLUMNS`` (the arteries' and veins' too).
    """

    def __init__(self, path, rank=None, av=False):
        self.columns = AV_COLUMNS if av else COLUMNS
        super().__init__(path, self.columns, rank)
        self.done = set(self.read())

    def add(self, row):
        self.append(dict(zip(self.columns, row_cells(row, self.columns))))


# ---------------------------------------------------------------------------
# agreement of two measurements of the same photographs (benchmarks/measure_agreement.py)


def icc_a1(*ratings):
    """ICC(A,1) of McGraw & Wong (1996), ICC(2,1) of Shrout & Fleiss (1979): two-way random effects,
    absolute agreement, single measure, of k raters' values of the same n subjects (``ratings``: k
    sequences of n values; here the predicted mask's and the label's):

        (MSR - MSE) / (MSR + (k - 1) MSE + k (MSC - MSE) / n),

    with MSR, MSC and MSE the mean squares of the subjects (rows), the raters
    (columns) and the residual of the two-way ANOVA without interaction.
    NaN for fewer than 2 subjects.
    """
    data = np.stack([np.asarray(r, dtype=np.float64) for r in ratings], axis=1)
    n, k = data.shape
    if n < 2 or k < 2:
        return math.nan
    grand = data.mean()
    ss_rows = k * ((data.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((data.mean(axis=0) - grand) ** 2).sum()
    ss_err = ((data - grand) ** 2).sum() - ss_rows - ss_cols
    msr, msc, mse = ss_rows / (n - 1), ss_cols / (k - 1), ss_err / ((n - 1) * (k - 1))
    denominator = msr + (k - 1) * mse + k * (msc - mse) / n
    return float((msr - mse) / denominator) if denominator > 0 else math.nan


def mean_difference(x, y):
    """Bland & Altman's (1986) mean difference ``x - y`` and the standard deviation of the differences
    (ddof 1; the limits of agreement are mean +- 1.96 SD)."""
    d = np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    return float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else math.nan
