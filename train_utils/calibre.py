"""The optic disc, zone B around it, and the vessel calibres cohort studies report there: the central retinal
artery and vein equivalents (CRAE, CRVE) and their ratio (AVR).

``find_disc`` finds the disc in a photograph: the bright region, about a
seventh of the field of view (FOV) across, where the wide vessels converge.
``measure_calibres`` takes the vessels of an artery/vein map that cross zone
B (half a disc diameter to one disc diameter beyond the disc's margin),
measures each across its centreline, to a fraction of a pixel, in the
photograph (``photograph_widths``: the width at half the vessel's depth) or,
without one, in the map (``vessel_widths``: between the map's edges), and
combines the six widest of each class by Knudtson's revised formulas
(``knudtson``). Its row is the calibre columns of ``measurements.csv``;
docs/measurements.md has every definition, formula and source. Needs
scikit-image, skan and SciPy (the measurements' optional packages).
"""
import math
from typing import NamedTuple

import numpy as np

from .imaging import ARTERY, AV_UNCERTAIN, VEIN, fov_diameter

# The disc is looked for with the FOV brought to this diameter (pixels): a disc is then about 35 pixels across.
DISC_SEARCH_DIAMETER = 256
# A disc's diameter as a share of the FOV's: about 1.8 mm of a 45-degree FOV's 13 mm is 0.14; a 30-degree
# camera's disc is about 0.2. An edge found outside this range is not believed.
DISC_RANGE_FOV = (0.09, 0.26)
# The brightness cue weighs this much against the vessels' (both standardised). A swollen, bleeding disc is
# darker than the retina beside it (STARE im0005): on the 65 development photographs, 0.5 to 0.8 find every
# disc and 0.85 or more miss that one. Within that range the calibres' agreement with the experts' labels
# varies by about as much as it does between neighbouring values, and is best from 0.8 on.
DISC_BRIGHTNESS_WEIGHT = 0.8
DISC_TYPICAL_FOV = 0.14  # the diameter given when the disc's edge cannot be found
# Zone B: from this many disc diameters beyond the disc's margin to this many (Knudtson et al. 2003).
ZONE_B = (0.5, 1.0)
# The skeleton of the zone's vessels is drawn at most this many pixels a disc diameter; widths are still read
# from the map at its own resolution.
SKELETON_DISC_PX = 160
# A vessel counts as crossing zone B when its centreline starts within this many disc diameters beyond the
# zone's inner circle and goes further (zone_vessels), and has at least MIN_POINTS width readings in the zone.
ENTRY_TOLERANCE = 0.05
MIN_POINTS = 3
# Knudtson's revised formulas: the six widest vessels of a class, and each pair's constant.
WIDEST = 6
KNUDTSON = {ARTERY: 0.88, VEIN: 0.95}
# Fewer vessels of a class than this in zone B: the equivalent is still given, but ``calibre_qc`` says so.
MIN_VESSELS = 4
PROFILE_STEP = 0.25  # pixels between the samples of a width profile
# Under this share of zone B inside the FOV, the zone is not measured (``zone_outside_fov``). A disc centred on
# the FOV's very edge keeps about 0.45 of it, and the vessels found there still decide by their count.
MIN_ZONE_INSIDE = 0.4

COLUMNS = ("disc_x_px", "disc_y_px", "disc_diameter_px", "disc_diameter_fov", "disc_diameter_um", "disc_found_by",
           "arterioles_measured", "venules_measured", "crae_px", "crae_fov", "crae_um",
           "crve_px", "crve_fov", "crve_um", "avr", "calibre_widths_from", "calibre_qc")


class Disc(NamedTuple):
    """The optic disc in a photograph's pixels: centre (x, y) and diameter, and how it was found."""
    x: float
    y: float
    diameter: float
    found_by: str  # "photograph" (edge measured), "photograph_typical" (typical size), "vessels", "vessels_typical"


class Vessel(NamedTuple):
    """One vessel measured in zone B: its class, median width (photograph pixels), the centreline points where
    it was read ``[n, 2]`` (row, column), the normals there and the widths read."""
    cls: int
    width: float
    points: np.ndarray
    normals: np.ndarray
    widths: np.ndarray


class Calibres(NamedTuple):
    """The calibre columns of one photograph (``COLUMNS``), the disc (or None) and the measured vessels."""
    row: dict
    disc: object
    vessels: list


def _scipy_ndimage():
    from scipy import ndimage  # a dependency of scikit-image, one of the measurements' packages
    return ndimage


# ---------------------------------------------------------------------------
# the optic disc


def _shrink(values, factor):
    """A float [H, W] array resized by ``factor`` with Pillow's box filter (each new pixel the mean it covers)."""
    from PIL import Image

    h, w = values.shape
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return np.asarray(Image.fromarray(np.asarray(values, dtype=np.float32)).resize(size, Image.BOX))


def _shrink_rgb(image, factor):
    """The mean of red and green (where the disc is brightest) of an RGB uint8 photograph resized by
    ``factor`` with the box filter, as float [h, w]."""
    from PIL import Image

    h, w = image.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    small = np.asarray(Image.fromarray(np.ascontiguousarray(image[..., :3])).resize(size, Image.BOX), dtype=np.float32)
    return small[..., :2].mean(axis=2)


def _masked_blur(values, weights, sigma):
    """The Gaussian mean of ``values`` over the pixels ``weights`` trusts (normalised convolution): the dark
    outside of the FOV, or a vessel, does not pull the mean down."""
    nd = _scipy_ndimage()
    num = nd.gaussian_filter(values * weights, sigma, mode="constant")
    den = nd.gaussian_filter(weights, sigma, mode="constant")
    return num / np.maximum(den, 1e-6)


def _standardised(values, where):
    inside = values[where]
    spread = inside.std()
    return (values - inside.mean()) / spread if spread > 0 else np.zeros_like(values)


def find_disc(fov, image=None, vessels=None):
    """The optic disc (``Disc``) of a photograph whose FOV is ``fov`` (bool [H, W]), from the photograph
    (RGB uint8 [H, W, 3]) and its vessel mask (bool [H, W]), either of which may be None; None when neither
    is given or the FOV is empty.

    Where: the FOV is brought to ``DISC_SEARCH_DIAMETER`` pixels. Two maps,
    each standardised inside the FOV, are added (the first weighed by
    ``DISC_BRIGHTNESS_WEIGHT``) and the disc is their maximum: the
    photograph's brightness (red plus green, the vessels left
    out) at the disc's scale over that of a region three times wider, and the
    density of wide vessels (the squared share of each pixel the vessels
    cover, which weighs wide vessels over thin ones) at the disc's scale.
    Size: on 72 rays from the centre, 0.03 to 0.16 FOV diameters long, where
    the brightness falls fastest; twice the median of these radii, believed
    when the rays agree (half of them within 20 % of it) and the diameter is
    within ``DISC_RANGE_FOV``, else the typical diameter ``DISC_TYPICAL_FOV``.
    ``found_by`` says which: ``photograph`` or ``vessels`` (what it was found
    in), with ``_typical`` when the size is the typical one.
    """
    nd = _scipy_ndimage()
    fov = np.asarray(fov, dtype=bool)
    if (image is None and vessels is None) or not fov.any():
        return None
    diameter = fov_diameter(fov)
    factor = min(1.0, DISC_SEARCH_DIAMETER / diameter)
    inside = _shrink(fov, factor) >= 0.5
    core = nd.binary_erosion(inside, iterations=2)
    if not core.any():
        return None
    d = diameter * factor  # the FOV's diameter where the disc is looked for
    score = np.zeros(inside.shape)
    share = _shrink(np.asarray(vessels) & fov, factor) if vessels is not None else np.zeros(inside.shape)
    clear = inside * (1.0 - share)  # where the photograph's own brightness is seen
    bright = None
    if image is not None:
        grey = _shrink_rgb(image, factor)
        bright = _masked_blur(grey, clear, 0.008 * d)  # vessels filled in from the pixels beside them
        local = _masked_blur(grey, clear, 0.035 * d) / np.maximum(_masked_blur(grey, clear, 0.12 * d), 1e-3)
        score += DISC_BRIGHTNESS_WEIGHT * _standardised(local, core)
    if vessels is not None:
        score += _standardised(_masked_blur(share ** 2, inside.astype(np.float64), 0.04 * d), core)
    score[~core] = -np.inf
    cy, cx = np.unravel_index(int(np.argmax(score)), score.shape)
    radius, measured = _disc_radius(bright, inside, (cy, cx), d) if bright is not None else (None, False)
    found = "photograph" if image is not None else "vessels"
    if not measured:
        radius, found = DISC_TYPICAL_FOV * d / 2, found + "_typical"
    to_photo = 1 / factor
    return Disc(float((cx + 0.5) * to_photo - 0.5), float((cy + 0.5) * to_photo - 0.5),
                float(2 * radius * to_photo), found)


def _disc_radius(bright, inside, centre, d, rays=72):
    """(radius, believed) of the disc around ``centre`` in the smoothed brightness ``bright``: the median over
    ``rays`` rays of the radius where the brightness falls fastest."""
    nd = _scipy_ndimage()
    radii = np.arange(0.03 * d, 0.16 * d, 0.5)
    angles = np.linspace(0, 2 * np.pi, rays, endpoint=False)
    rows = centre[0] + np.sin(angles)[:, None] * radii[None, :]
    cols = centre[1] + np.cos(angles)[:, None] * radii[None, :]
    profiles = nd.map_coordinates(bright, [rows, cols], order=1, mode="nearest")
    seen = nd.map_coordinates(inside.astype(np.float32), [rows, cols], order=0, mode="constant") > 0
    slope = np.gradient(profiles, axis=1)
    slope[~seen] = np.inf  # an edge outside the FOV is the FOV's
    usable = seen.any(axis=1)
    if usable.sum() < rays // 4:
        return None, False
    edges = radii[np.argmin(slope[usable], axis=1)]
    radius = float(np.median(edges))
    agree = np.mean(np.abs(edges - radius) <= 0.2 * radius) >= 0.5
    low, high = (r * d / 2 for r in DISC_RANGE_FOV)
    return radius, bool(agree and low <= radius <= high)


# ---------------------------------------------------------------------------
# a vessel's width across it


def normals_of(points, reach=3):
    """Unit normals ``[n, 2]`` (row, column) of an ordered centreline ``points`` [n, 2]: each the tangent from
    the point ``reach`` before to the one ``reach`` after, turned a quarter."""
    p = np.asarray(points, dtype=np.float64)
    n = len(p)
    idx = np.arange(n)
    tangent = p[np.minimum(idx + reach, n - 1)] - p[np.maximum(idx - reach, 0)]
    length = np.linalg.norm(tangent, axis=1, keepdims=True)
    tangent = tangent / np.where(length > 0, length, 1)
    return np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)


def vessel_widths(mask, points, normals, max_width):
    """The width (pixels, NaN where none) of the vessel ``mask`` (bool or a [0, 1] map, [H, W]) across each
    centreline point ``points`` [n, 2] (row, column; pixel centres at integers) along its ``normals``.

    The mask is sampled on the normal every ``PROFILE_STEP`` pixels by
    bilinear interpolation; the vessel's two edges are where this profile
    crosses one half on either side of the run of samples at or above one
    half nearest the point (within 1.5 pixels: a centreline drawn at a coarser
    scale may sit a pixel off), each placed between its two samples by linear
    interpolation. No edge within ``max_width`` of the point: NaN.
    """
    nd = _scipy_ndimage()
    points, normals = np.asarray(points, dtype=np.float64), np.asarray(normals, dtype=np.float64)
    if not len(points):
        return np.zeros(0)
    t = np.arange(-max_width, max_width + PROFILE_STEP / 2, PROFILE_STEP)
    rows = points[:, 0, None] + t[None, :] * normals[:, 0, None]
    cols = points[:, 1, None] + t[None, :] * normals[:, 1, None]
    profile = nd.map_coordinates(np.asarray(mask, dtype=np.float32), [rows, cols], order=1, mode="constant")
    vessel = profile >= 0.5
    m, centre = len(t), len(t) // 2
    idx = np.arange(m)
    near = vessel & (np.abs(t) <= 1.5)[None, :]
    found = near.any(axis=1)
    start = np.argmin(np.where(near, np.abs(idx - centre), m), axis=1)
    right = ~vessel & (idx[None, :] > start[:, None])
    left = ~vessel & (idx[None, :] < start[:, None])
    has = found & right.any(axis=1) & left.any(axis=1)
    j = np.argmax(right, axis=1)  # first sample past the right edge
    i = m - 1 - np.argmax(left[:, ::-1], axis=1)  # last sample before the left edge
    n = np.arange(len(points))
    jr, il = np.clip(j, 1, m - 1), np.clip(i, 0, m - 2)

    def crossing(a, b):  # where the profile crosses one half between samples a and b (b = a +- 1)
        pa, pb = profile[n, a], profile[n, b]
        share = (pa - 0.5) / np.where(pa != pb, pa - pb, 1)
        return t[a] + share * (t[b] - t[a])

    width = crossing(jr - 1, jr) - crossing(il + 1, il)
    return np.where(has, width, np.nan)


def photograph_widths(grey, points, normals, width, smooth=5):
    """The widths (pixels, NaN where none) of one vessel in the photograph ``grey`` (float [H, W], vessels
    darker than the retina around them) across its centreline ``points`` [n, 2] (ordered along the vessel),
    along ``normals``, where the map gives it the width ``width``.

    The profile along each normal is sampled every ``PROFILE_STEP`` pixels
    and averaged with those of the ``smooth`` points around it along the
    vessel. The map's edge may lie up to a margin (half the width, at least
    3 pixels) from the photograph's. The profile's background is the mean of
    the medians of its two sides beyond that margin (out to twice the width);
    its floor the lowest sample within the map's width. Each edge is where
    the profile, followed inwards from the margin, first falls below half way
    from the background to the floor (placed between two samples by linear
    interpolation): the width at half the vessel's depth, which a light
    reflex along an artery's middle does not split. NaN where the profile
    starts below half way (another vessel beside it) or the vessel is not
    darker than its background.
    """
    nd = _scipy_ndimage()
    points, normals = np.asarray(points, dtype=np.float64), np.asarray(normals, dtype=np.float64)
    if not len(points):
        return np.zeros(0)
    half = width / 2
    slack = max(3.0, width / 2)  # how far the map's edge may lie from the photograph's
    outer = max(2 * width, half + slack + 2)
    t = np.arange(-outer, outer + PROFILE_STEP / 2, PROFILE_STEP)
    rows = points[:, 0, None] + t[None, :] * normals[:, 0, None]
    cols = points[:, 1, None] + t[None, :] * normals[:, 1, None]
    profile = nd.map_coordinates(np.asarray(grey, dtype=np.float32), [rows, cols], order=1, mode="nearest")
    if smooth > 1:
        profile = nd.uniform_filter1d(profile, min(smooth, len(profile)), axis=0, mode="nearest")
    bg = half + slack
    background = (np.median(profile[:, t <= -bg], axis=1) + np.median(profile[:, t >= bg], axis=1)) / 2
    floor = profile[:, np.abs(t) <= max(half, 1)].min(axis=1)
    level = (background + floor) / 2
    n = np.arange(len(points))
    edges = []
    for side in (-1, 1):
        idx = np.flatnonzero((side * t >= 0) & (side * t <= half + slack))
        idx = idx[np.argsort(-side * t[idx])]  # from the margin beyond the map's edge inwards
        seg = profile[:, idx]
        below = seg < level[:, None]
        k = np.argmax(below, axis=1)  # the first sample below half way
        found = below.any(axis=1) & (k > 0)
        k = np.clip(k, 1, len(idx) - 1)
        pa, pb = seg[n, k - 1], seg[n, k]
        share = (pa - level) / np.where(pa != pb, pa - pb, 1)
        edge = np.abs(t[idx[k - 1]] + share * (t[idx[k]] - t[idx[k - 1]]))
        edges.append(np.where(found, edge, np.nan))
    return np.where(background > floor, edges[0] + edges[1], np.nan)


# ---------------------------------------------------------------------------
# Knudtson's revised formulas


def knudtson(widths, constant, widest=WIDEST):
    """The central retinal vessel equivalent of ``widths`` by Knudtson et al.'s revised formulas (Current Eye
    Research 2003): the ``widest`` widest (fewer: those given), the widest paired with the narrowest, each pair
    combined as ``constant * sqrt(w1**2 + w2**2)`` (0.88 arterioles, 0.95 venules), an odd middle one carried
    to the next round, until one value remains. NaN without a width."""
    values = sorted((float(w) for w in widths), reverse=True)[:widest]
    if not values:
        return math.nan
    while len(values) > 1:
        n = len(values)
        combined = [constant * math.sqrt(values[k] ** 2 + values[n - 1 - k] ** 2) for k in range(n // 2)]
        if n % 2:
            combined.append(values[n // 2])
        values = sorted(combined, reverse=True)
    return values[0]


# ---------------------------------------------------------------------------
# zone B's vessels, and the row


def zone_b(disc):
    """(inner, outer) radii of zone B around the disc's centre, in the disc's pixels."""
    return tuple(disc.diameter / 2 + k * disc.diameter for k in ZONE_B)


def zone_vessels(mask, fov, disc, cls, grey=None):
    """The vessels of one class (``mask`` bool [H, W], the photograph's pixels) that cross zone B, each measured
    before it branches (``Vessel``s).

    The class's centrelines are skan's graph of the skeleton of the region
    around the zone (``SKELETON_DISC_PX`` pixels a disc diameter at most),
    spurs shorter than a tenth of a disc diameter pruned. A centreline path
    (between two junctions or free ends) that starts inside the band from
    the zone's inner circle to ``ENTRY_TOLERANCE`` disc diameters beyond it
    and leaves the band is a vessel crossing the zone. One that starts further
    out begins at a branching, so a vessel that branches in the zone is
    measured on its path from the inner circle to the branching; one that
    ends inside the band is a trunk branching as it enters, and its branches
    are the vessels. Widths are read at the path's points in the zone, those
    within one and a half widths of its ends left out (a junction widens the
    profile) while at least ``MIN_POINTS`` stay: ``vessel_widths`` of the map,
    then, with the photograph's green channel ``grey``, ``photograph_widths``
    there. The vessel's width is their median.
    """
    from .measurements import resample_mask, skeleton_graph  # here: measurements imports this module

    inner, outer = zone_b(disc)
    h, w = mask.shape
    reach = outer + 0.25 * disc.diameter
    top, left = max(0, int(disc.y - reach)), max(0, int(disc.x - reach))
    bottom, right = min(h, int(math.ceil(disc.y + reach)) + 1), min(w, int(math.ceil(disc.x + reach)) + 1)
    if bottom <= top or right <= left:
        return []
    crop = np.asarray(mask[top:bottom, left:right], dtype=bool) & fov[top:bottom, left:right]
    if not crop.any():
        return []
    factor = min(1.0, SKELETON_DISC_PX / disc.diameter)
    small = resample_mask(crop, factor)
    graph = skeleton_graph(small, 0.1 * disc.diameter * factor, 2)
    vessels = []
    max_width = 0.25 * disc.diameter
    for path in graph.paths:
        points = (path + 0.5) / factor - 0.5  # the crop's pixels
        r = np.hypot(points[:, 0] + top - disc.y, points[:, 1] + left - disc.x)
        band = inner + ENTRY_TOLERANCE * disc.diameter
        if r.min() > band:
            continue  # begins at a branching (or a gap) in the zone
        if r.max() < band:
            continue  # a trunk that branches as it enters the zone: its branches begin in the band and count
        in_zone = (r >= inner) & (r <= outer)
        if in_zone.sum() < MIN_POINTS:
            continue
        normals = normals_of(points, reach=max(3, round(3 / factor)) if factor < 1 else 3)
        widths = np.full(len(points), np.nan)
        widths[in_zone] = vessel_widths(crop, points[in_zone], normals[in_zone], max_width)
        read = np.isfinite(widths)
        if read.sum() < MIN_POINTS:
            continue
        # Near a path's end the vessel meets another at a junction (the profile runs into it) or tapers at a tip:
        # readings within a width and a half of either end are left out, unless too few would be left.
        step = np.r_[0, np.cumsum(np.hypot(*np.diff(points, axis=0).T))]
        margin = 1.5 * np.median(widths[read])
        away = read & (step >= margin) & (step <= step[-1] - margin)
        if away.sum() >= MIN_POINTS:
            read = away
        at, across, widths = points[read] + (top, left), normals[read], widths[read]
        if grey is not None:
            widths = photograph_widths(grey, at, across, float(np.median(widths)))
            seen = np.isfinite(widths)
            if seen.sum() < MIN_POINTS:
                continue
            at, across, widths = at[seen], across[seen], widths[seen]
        vessels.append(Vessel(cls, float(np.median(widths)), at, across, widths))
    return vessels


def _crossings(classes, disc):
    """The pieces of a map's vessels of no class (``AV_UNCERTAIN``, where a label leaves a crossing) small
    enough to be a crossing, at most a fifth of a disc diameter across: both vessels pass there, so both
    classes keep them and neither is cut in two. Larger pieces are whole vessels of no class and stay out."""
    nd = _scipy_ndimage()
    uncertain = classes == AV_UNCERTAIN
    if not uncertain.any():
        return uncertain
    labels, n = nd.label(uncertain, structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    small = sizes <= (0.2 * disc.diameter) ** 2
    small[0] = False
    return small[labels]


def _zone_share_inside(fov, disc, samples=180):
    """The share of zone B's middle circle that lies inside the FOV (a disc near the edge loses part of it)."""
    inner, outer = zone_b(disc)
    angles = np.linspace(0, 2 * np.pi, samples, endpoint=False)
    rows = np.rint(disc.y + (inner + outer) / 2 * np.sin(angles)).astype(int)
    cols = np.rint(disc.x + (inner + outer) / 2 * np.cos(angles)).astype(int)
    h, w = fov.shape
    ok = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    return float(np.mean(ok & fov[np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1)]))


def measure_calibres(classes, fov, image=None, um=None, diameter=None):
    """The calibre columns (``Calibres``) of an artery/vein map ``classes`` (uint8 [H, W]: 1 artery, 2 vein,
    3 a vessel of no class) of a photograph ``image`` (RGB [H, W, 3]) with FOV ``fov``. Without the
    photograph, the disc is found in the vessels alone and the widths are read in the map.

    ``um``: micrometres a pixel (None: no ``_um`` values); ``diameter``: the
    FOV's (``fov_diameter``'s, computed when not given). Small pieces of no
    class (a label's crossings) belong to both classes (``_crossings``).
    ``calibre_qc`` is ``ok`` or the first reason the values are not to be
    trusted: ``no_disc``, ``disc_outside_fov``, ``zone_outside_fov`` (under
    ``MIN_ZONE_INSIDE`` of zone B in the FOV), ``few_arterioles``,
    ``few_venules`` (under ``MIN_VESSELS``; the equivalent is still computed
    from those found, and is empty with none).
    """
    classes = np.asarray(classes)
    fov = np.asarray(fov, dtype=bool)
    diameter = diameter or fov_diameter(fov)
    row = dict.fromkeys(COLUMNS)
    row.update(arterioles_measured=0, venules_measured=0)
    disc = find_disc(fov, image, classes != 0)
    if disc is None:
        row["calibre_qc"] = "no_disc"
        return Calibres(row, None, [])

    def units(prefix, value_px):
        row[prefix + "_px"] = value_px
        row[prefix + "_fov"] = value_px / diameter
        row[prefix + "_um"] = value_px * um if um is not None else None

    row.update(disc_x_px=disc.x, disc_y_px=disc.y, disc_found_by=disc.found_by,
               calibre_widths_from="map" if image is None else "photograph")
    units("disc_diameter", disc.diameter)
    h, w = fov.shape
    iy, ix = int(round(disc.y)), int(round(disc.x))
    if not (0 <= iy < h and 0 <= ix < w and fov[iy, ix]):
        row["calibre_qc"] = "disc_outside_fov"
        return Calibres(row, disc, [])
    vessels = []
    grey = None if image is None else np.asarray(image)[..., 1].astype(np.float32)  # vessels darkest in green
    crossings = _crossings(classes, disc)
    for cls, name, column in ((ARTERY, "arterioles", "crae"), (VEIN, "venules", "crve")):
        found = zone_vessels((classes == cls) | crossings, fov, disc, cls, grey)
        vessels += found
        row[name + "_measured"] = min(len(found), WIDEST)
        if found:
            units(column, knudtson([v.width for v in found], KNUDTSON[cls]))
    if row["crae_px"] is not None and row["crve_px"] is not None:
        row["avr"] = row["crae_px"] / row["crve_px"]
    if _zone_share_inside(fov, disc) < MIN_ZONE_INSIDE:
        row["calibre_qc"] = "zone_outside_fov"
    elif row["arterioles_measured"] < MIN_VESSELS:
        row["calibre_qc"] = "few_arterioles"
    elif row["venules_measured"] < MIN_VESSELS:
        row["calibre_qc"] = "few_venules"
    else:
        row["calibre_qc"] = "ok"
    return Calibres(row, disc, vessels)


# ---------------------------------------------------------------------------
# the overlay

DISC_COLOUR, ZONE_COLOUR = (0, 255, 0), (0, 255, 255)
VESSEL_COLOURS = {ARTERY: (255, 160, 160), VEIN: (160, 200, 255)}  # lighter than the map's red and blue


def draw_calibres(picture, calibres, diameter):
    """``picture`` (RGB uint8 [H, W, 3]) with the disc (green), zone B's two circles (cyan) and, on each vessel
    that entered CRAE or CRVE, its centreline where it was read (light red arteries, light blue veins) and a
    white bar across it at its middle reading, as long as its median width, labelled with that width in pixels.
    Lines and letters grow with the FOV's ``diameter``."""
    from PIL import Image, ImageDraw, ImageFont

    disc = calibres.disc
    if disc is None:
        return picture
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    line = max(1, round(diameter / 500))
    for radius, colour in ((disc.diameter / 2, DISC_COLOUR), *((r, ZONE_COLOUR) for r in zone_b(disc))):
        draw.ellipse([disc.x - radius, disc.y - radius, disc.x + radius, disc.y + radius], outline=colour,
                     width=line)
    size = max(10, round(diameter / 45))
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # an older Pillow, or one without FreeType: its small bitmap font
        font = ImageFont.load_default()
    for vessel in counted_vessels(calibres.vessels):
        colour = VESSEL_COLOURS[vessel.cls]
        draw.line([(x, y) for y, x in vessel.points], fill=colour, width=2 * line)
        k = len(vessel.points) // 2
        (y, x), (ny, nx), half = vessel.points[k], vessel.normals[k], vessel.width / 2
        draw.line([(x - nx * half, y - ny * half), (x + nx * half, y + ny * half)], fill=(255, 255, 255),
                  width=2 * line)
        away = half + 0.9 * size
        draw.text((x + nx * away, y + ny * away), f"{vessel.width:.1f}", fill=colour, font=font, anchor="mm",
                  stroke_width=max(1, line), stroke_fill=(0, 0, 0))
    return np.asarray(image)


def counted_vessels(vessels):
    """The vessels of ``vessels`` that enter CRAE and CRVE: the ``WIDEST`` widest of each class."""
    counted = []
    for cls in (ARTERY, VEIN):
        counted += sorted((v for v in vessels if v.cls == cls), key=lambda v: -v.width)[:WIDEST]
    return counted
