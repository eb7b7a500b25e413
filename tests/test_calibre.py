"""The optic disc, the widths of vessels across them, Knudtson's formulas and the calibre columns
(train_utils/calibre.py), on drawn vessels and synthetic photographs whose answers are known."""
import csv
import math
import os

import numpy as np
import pytest

pytest.importorskip("skimage", reason="the calibres need the optional extras (requirements-extras.txt)")
pytest.importorskip("skan", reason="the calibres need the optional extras (requirements-extras.txt)")

from tests.conftest import run_script  # noqa: E402
from train_utils import calibre as C  # noqa: E402
from train_utils.measurements import AV_COLUMNS, MeasurementsFile, measure_av  # noqa: E402
from train_utils.synthetic import synthetic_fundus, write_synthetic  # noqa: E402

# ---------------------------------------------------------------------------
# Knudtson's revised formulas, against values worked by hand


def test_knudtson_six_arterioles_worked_by_hand():
    # 10, 9, 8, 7, 6, 5 -> pairs (10, 5), (9, 6), (8, 7), whose squares are 0.88^2 = 0.7744 times
    #   125, 117, 113: 96.8, 90.6048, 87.5072
    # -> (96.8, 87.5072) paired, 90.6048 carried: square 0.7744 x 184.3072 = 142.72750
    # -> 0.88 sqrt(142.72750 + 90.6048) = 0.88 sqrt(233.33230) = 0.88 x 15.27522 = 13.44219
    assert C.knudtson([10, 9, 8, 7, 6, 5], 0.88) == pytest.approx(13.44219, abs=1e-4)
    assert C.knudtson([5, 7, 9, 6, 10, 8], 0.88) == pytest.approx(13.44219, abs=1e-4)  # order does not matter


def test_knudtson_takes_the_six_widest_and_carries_the_odd_middle_one():
    # Venules 20, 18, 15, 12, 11, 10 of 20, 18, 15, 12, 11, 10, 3, 2 (the two narrowest left out): pairs
    #   (20, 10), (18, 11), (15, 12), squares 0.95^2 = 0.9025 times 500, 445, 369: 451.25, 401.6125, 333.0225
    # -> (451.25, 333.0225) paired, 401.6125 carried: square 0.9025 x 784.2725 = 707.80593
    # -> 0.95 sqrt(707.80593 + 401.6125) = 0.95 sqrt(1109.41843) = 0.95 x 33.30793 = 31.64253
    assert C.knudtson([20, 18, 15, 12, 11, 10, 3, 2], 0.95) == pytest.approx(31.64253, abs=1e-4)
    # Five: (12, 4), (8, 5) paired, 6 carried: squares 0.7744 x 160 = 123.904, 0.7744 x 89 = 68.9216, 36
    # -> (123.904, 36) paired, 68.9216 carried: square 0.7744 x 159.904 = 123.82966
    # -> 0.88 sqrt(123.82966 + 68.9216) = 0.88 sqrt(192.75126) = 0.88 x 13.88349 = 12.21747
    assert C.knudtson([12, 8, 6, 5, 4], 0.88) == pytest.approx(12.21747, abs=1e-4)
    assert C.knudtson([7.5], 0.88) == 7.5  # one vessel: its own width
    assert C.knudtson([3, 4], 0.95) == pytest.approx(0.95 * 5)
    assert math.isnan(C.knudtson([], 0.88))


# ---------------------------------------------------------------------------
# widths across drawn vessels of known width


def straight_vessel(width, angle, size=160):
    """A bar of ``width`` through the image's centre at ``angle`` degrees: the pixels whose centres lie within
    width / 2 of its axis; (mask, centreline points, normals) of its middle stretch."""
    a = math.radians(angle)
    direction, normal = np.array([math.sin(a), math.cos(a)]), np.array([math.cos(a), -math.sin(a)])
    c = (size - 1) / 2 + 0.3  # not on a pixel's edge, where a bar of odd width would take a row more
    yy, xx = np.mgrid[0:size, 0:size]
    mask = np.abs((yy - c) * normal[0] + (xx - c) * normal[1]) <= width / 2
    s = np.linspace(-40, 40, 81)
    return mask, c + s[:, None] * direction[None, :], np.repeat(normal[None, :], len(s), axis=0)


@pytest.mark.parametrize("angle", [0, 17, 45, 62, 90, 133])
@pytest.mark.parametrize("width", [2, 3.5, 5, 8, 12.5, 20])
def test_width_of_a_straight_vessel(width, angle):
    mask, points, normals = straight_vessel(width, angle)
    measured = np.median(C.vessel_widths(mask, points, normals, 30))
    # The drawn bar holds whole pixels, so its width along a normal is the true one to within a pixel at any
    # single point; the edges' interpolation and the median over the stretch bring it within 0.5 px or 5 %.
    assert abs(measured - width) <= max(0.5, 0.05 * width), measured


@pytest.mark.parametrize("width", [2, 4.5, 9, 20])
@pytest.mark.parametrize("radius", [45, 90])
def test_width_of_a_curved_vessel_with_normals_from_its_centreline(width, radius):
    size = 2 * radius + 60
    c = size / 2
    yy, xx = np.mgrid[0:size, 0:size]
    mask = np.abs(np.hypot(yy - c, xx - c) - radius) <= width / 2
    theta = np.linspace(0.2, 2.8, 200)  # an ordered centreline along the arc, normals from it
    points = np.stack([c + radius * np.sin(theta), c + radius * np.cos(theta)], axis=1)
    widths = C.vessel_widths(mask, points, C.normals_of(points), 30)
    assert abs(np.median(widths) - width) <= max(0.5, 0.05 * width)


def test_width_is_read_from_a_centreline_a_pixel_off_and_none_without_an_edge():
    mask, points, normals = straight_vessel(6, 30)
    off = points + 1.2 * normals  # a centreline drawn at a coarser scale
    assert np.median(C.vessel_widths(mask, off, normals, 30)) == pytest.approx(6, abs=0.5)
    assert np.isnan(C.vessel_widths(mask, points, normals, 2.5)).all()  # edges beyond max_width
    assert np.isnan(C.vessel_widths(np.zeros_like(mask), points, normals, 30)).all()  # no vessel there


def photograph_of(mask, depth=60.0, blur=0.6, seed=0):
    """A grey photograph of ``mask``'s vessels: a retina of 150 with a gentle slope across, each vessel ``depth``
    darker, blurred by a Gaussian of ``blur`` pixels (the optics; a blur much wider than a vessel widens it at
    half depth, as a camera's does), with a little noise."""
    from scipy import ndimage

    h, w = mask.shape
    grey = 150 + np.linspace(-10, 10, w)[None, :] - depth * np.asarray(mask, dtype=np.float64)
    grey = ndimage.gaussian_filter(grey, blur) + np.random.default_rng(seed).normal(0, 1.0, (h, w))
    return grey.astype(np.float32)


@pytest.mark.parametrize("angle", [0, 17, 45, 62, 90, 133])
@pytest.mark.parametrize("width", [2, 3.5, 5, 8, 12.5, 20])
def test_width_at_half_depth_in_a_photograph(width, angle):
    mask, points, normals = straight_vessel(width, angle)
    grey = photograph_of(mask)
    for guess in (width, 0.7 * width + 1, 1.3 * width):  # the map's width, right or some way off
        measured = np.nanmedian(C.photograph_widths(grey, points, C.normals_of(points), guess))
        assert abs(measured - width) <= max(0.5, 0.05 * width), (guess, measured)


@pytest.mark.parametrize("width", [3, 6, 14])
def test_width_in_a_photograph_of_a_curved_artery_with_a_light_reflex(width):
    size, radius = 260, 90
    c = size / 2
    yy, xx = np.mgrid[0:size, 0:size]
    off = np.hypot(yy - c, xx - c) - radius
    mask = np.abs(off) <= width / 2
    grey = photograph_of(mask)
    grey += (25 * np.exp(-0.5 * (off / (0.12 * width)) ** 2) * mask).astype(np.float32)  # the reflex, in the middle
    theta = np.linspace(0.2, 2.8, 200)
    points = np.stack([c + radius * np.sin(theta), c + radius * np.cos(theta)], axis=1)
    widths = C.photograph_widths(grey, points, C.normals_of(points), width)
    assert abs(np.nanmedian(widths) - width) <= max(0.5, 0.05 * width)


def test_no_photograph_width_beside_another_vessel_or_without_a_vessel():
    mask, points, normals = straight_vessel(6, 30)
    flat = np.full(mask.shape, 150, dtype=np.float32)
    assert np.isnan(C.photograph_widths(flat, points, normals, 6)).all()  # nothing darker there
    assert np.isnan(C.photograph_widths(flat + 60 * mask, points, normals, 6)).all()  # lighter, not a vessel


# ---------------------------------------------------------------------------
# zone B: vessels from a disc of known place and size


def radial_map(size=400, disc=(200.3, 180.4, 60.0), arteries=(), veins=(), branch=None):
    """An artery/vein map (uint8) of straight vessels leaving a disc ``disc`` = (y, x, diameter) radially, the
    arteries' ``(angle, width)`` and the veins'; ``branch`` = (angle, trunk width, branch width): an artery that
    splits in two in the middle of zone B."""
    y0, x0, d = disc
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.zeros((size, size), dtype=np.uint8)

    def segment(cls, start, angle, width, length):
        a = math.radians(angle)
        u = np.array([math.sin(a), math.cos(a)])
        along = (yy - start[0]) * u[0] + (xx - start[1]) * u[1]
        across = np.abs(-(yy - start[0]) * u[1] + (xx - start[1]) * u[0])
        out[(along >= 0) & (along <= length) & (across <= width / 2)] = cls
        return start + length * u

    for cls, vessels in ((1, arteries), (2, veins)):
        for angle, width in vessels:
            segment(cls, np.array([y0, x0]), angle, width, 2.2 * d)
    if branch:
        angle, trunk, thin = branch
        fork = segment(1, np.array([y0, x0]), angle, trunk, 1.25 * d)  # the middle of zone B: 1.0 to 1.5 d
        for turn in (-25, 25):
            segment(1, fork, angle + turn, thin, d)
    return out


def test_zone_vessels_widths_and_a_branching_vessel_measured_before_it_branches():
    disc = C.Disc(180.4, 200.3, 60.0, "given")
    widths = (4, 6, 9)
    classes = radial_map(arteries=[(a, w) for a, w in zip((0, 120, 240), widths)], branch=(60, 7, 4))
    fov = np.ones(classes.shape, dtype=bool)
    found = C.zone_vessels(classes == 1, fov, disc, 1)
    assert sorted(round(v.width) for v in found) == [4, 6, 7, 9]  # the branches (4 px) are not vessels of their own
    for v in found:
        r = np.hypot(v.points[:, 0] - disc.y, v.points[:, 1] - disc.x)
        assert (r >= 60 - 1e-9).all() and (r <= 90 + 1e-9).all()  # read inside zone B only
        if round(v.width) == 7:
            assert r.max() <= 1.25 * 60 + 5  # the trunk is read up to its fork


def test_measure_calibres_of_a_synthetic_photograph_of_known_disc_and_widths():
    image, _, fov, disc_mask, _ = synthetic_fundus(420, 420, seed=3, with_disc=True, with_av=True)
    ys, xs = np.nonzero(disc_mask)
    centre, diameter = (ys.mean(), xs.mean()), 2 * math.sqrt(len(ys) / math.pi)
    arteries = [(a, w) for a, w in zip(range(0, 360, 60), (3, 4, 5, 5, 6, 7))]
    veins = [(a + 30, w) for a, w in zip(range(0, 360, 60), (5, 6, 7, 8, 9, 10))]
    classes = radial_map(420, (centre[0], centre[1], diameter), arteries, veins)
    classes[~fov] = 0
    # the disc from the photograph alone (the vessel cue from a map with no vessels)
    found = C.find_disc(fov, image, None)
    assert math.hypot(found.y - centre[0], found.x - centre[1]) <= diameter / 2
    assert 0.75 * diameter <= found.diameter <= 1.3 * diameter
    # the radial vessels drawn into the photograph, darker, blurred a little: widths read there and in the map
    from scipy import ndimage
    dark = ndimage.gaussian_filter((classes != 0).astype(np.float32), 0.8)
    photo = (image * (1 - 0.45 * dark[..., None])).astype(np.uint8)
    for picture, source in ((photo, "photograph"), (None, "map")):
        out = C.measure_calibres(classes, fov, picture, um=2.0)
        row, disc = out.row, out.disc
        assert row["calibre_widths_from"] == source
        assert C._zone_share_inside(fov, disc) == 1.0  # every radial vessel crosses the whole zone in the FOV
        assert (row["arterioles_measured"], row["venules_measured"], row["calibre_qc"]) == (6, 6, "ok")
        assert row["crae_px"] == pytest.approx(C.knudtson([w for a, w in arteries], 0.88), rel=0.05), source
        assert row["crve_px"] == pytest.approx(C.knudtson([w for a, w in veins], 0.95), rel=0.05), source
        assert row["crae_um"] == pytest.approx(2.0 * row["crae_px"])
        assert row["crve_fov"] == pytest.approx(row["crve_px"] / C.fov_diameter(fov))
        assert row["avr"] == pytest.approx(row["crae_px"] / row["crve_px"])
        assert row["disc_diameter_fov"] == pytest.approx(row["disc_diameter_px"] / C.fov_diameter(fov))


def test_a_labels_small_uncertain_pieces_join_both_classes_and_its_whole_uncertain_vessels_neither():
    classes = radial_map(300, (150.3, 150.4, 40.0), arteries=[(a, 5) for a in (0, 90, 180, 270)],
                         veins=[(a, 7) for a in (45, 135, 225, 315)])
    crossing = classes.copy()
    band = slice(150 + 40, 150 + 45)  # rows cut at zone B's inner circle (40 px) under the disc, as a crossing cuts
    crossing[band] = np.where(crossing[band] != 0, 3, 0)
    whole = classes.copy()
    whole[classes == 2] = 3  # the veins of no class: not crossings
    fov = np.ones(classes.shape, dtype=bool)
    disc = C.Disc(150.4, 150.3, 40.0, "given")
    assert C._crossings(crossing, disc).sum() == (crossing == 3).sum()
    assert not C._crossings(whole, disc).any()
    joined = [C.zone_vessels((crossing == cls) | C._crossings(crossing, disc), fov, disc, cls) for cls in (1, 2)]
    assert [len(v) for v in joined] == [4, 4]
    # without them, the artery going down is cut where it enters the zone, and is lost
    assert len(C.zone_vessels(crossing == 1, fov, disc, 1)) == 3


@pytest.mark.parametrize("seed", range(6))
def test_find_disc_on_synthetic_photographs(seed):
    image, vessels, fov, disc_mask = synthetic_fundus(300 + 40 * seed, 320, seed=seed, with_disc=True)
    ys, xs = np.nonzero(disc_mask)
    radius = math.sqrt(len(ys) / math.pi)
    for given in ((image, vessels), (image, None)):  # the vessels alone: test_calibre_qc_names_what_failed
        disc = C.find_disc(fov, *given)
        assert math.hypot(disc.y - ys.mean(), disc.x - xs.mean()) <= radius, given[1] is None
        assert disc.found_by.startswith("photograph")
    assert C.find_disc(fov, None, None) is None


def test_calibre_qc_names_what_failed():
    fov = np.zeros((300, 300), dtype=bool)
    fov[20:280, 20:280] = True
    assert C.measure_calibres(np.zeros((300, 300), np.uint8), np.zeros((300, 300), bool)).row["calibre_qc"] == \
        "no_disc"
    few = radial_map(300, (150.3, 150.4, 40.0), arteries=[(0, 4), (90, 5)], veins=[(a, 6) for a in (45, 135, 200,
                                                                                                     300)])
    row = C.measure_calibres(few, fov).row  # the disc from the vessels alone: where they meet
    assert abs(row["disc_x_px"] - 150) <= 20 and abs(row["disc_y_px"] - 150) <= 20
    assert row["disc_found_by"] == "vessels_typical"
    assert (row["arterioles_measured"], row["venules_measured"], row["calibre_qc"]) == (2, 4, "few_arterioles")
    assert row["crae_px"] == pytest.approx(0.88 * math.hypot(4, 5), rel=0.08)  # the formula on those found


def test_a_disc_outside_the_fov_or_a_zone_mostly_outside_it_is_named(monkeypatch):
    yy, xx = np.mgrid[0:300, 0:300]
    fov = np.hypot(yy - 149.5, xx - 149.5) <= 150
    band = fov & (yy >= 125) & (yy <= 175)  # a FOV cut above and below: a third of zone B's circle in it
    classes = radial_map(300, (150.3, 150.4, 40.0), arteries=[(a, 4) for a in range(0, 360, 60)])
    for x, inside, reason in ((150.4, band, "zone_outside_fov"), (-30.0, fov, "disc_outside_fov")):
        monkeypatch.setattr(C, "find_disc", lambda *a, x=x: C.Disc(x, 150.3, 40.0, "given"))
        row = C.measure_calibres(classes, inside).row
        assert row["calibre_qc"] == reason and row["disc_x_px"] == x
    # a disc right on the FOV's edge keeps about 0.45 of the zone: measured, its vessels counted
    assert C._zone_share_inside(fov, C.Disc(4.0, 150.3, 40.0, "given")) > C.MIN_ZONE_INSIDE


# ---------------------------------------------------------------------------
# the columns, from measure.py


def test_measure_av_with_the_photograph_writes_every_calibre_column(tmp_path):
    root = tmp_path / "data"
    write_synthetic(str(root), "drive_av", num_train=1, num_test=2, height=300, width=300, seed=5)
    test = root / "DRIVE" / "test"
    r = run_script("measure.py", "--av", "--masks", test / "av", "--roi-mask", test / "mask", "--img",
                   test / "images", "--output-dir", tmp_path / "m", "--fov-angle", "45", "--overlay")
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "m" / "measurements.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == AV_COLUMNS and len(rows) == 2
    for row in rows:
        assert row["calibre_qc"] and row["disc_found_by"].startswith("photograph")
        for column in C.COLUMNS:
            # empty only where a reason says why: no value in a row whose calibre_qc is ok
            assert row[column] != "" or row["calibre_qc"] != "ok", column
            assert row[column] not in ("-1", "nan", "NaN")
        assert float(row["crae_um"]) == pytest.approx(float(row["crae_fov"]) * 45 * 288, rel=1e-4)
    assert os.path.exists(tmp_path / "m" / "01_test_overlay.png")


def test_an_earlier_measurements_file_without_calibre_columns_is_refused_untouched(tmp_path):
    path = tmp_path / "measurements.csv"
    old = ",".join(AV_COLUMNS[:-len(C.COLUMNS)]) + "\n"
    path.write_text(old)
    with pytest.raises(Exception, match="column"):
        MeasurementsFile(str(path), av=True)
    assert path.read_text() == old


def test_measure_av_rows_carry_the_calibres_of_the_same_map():
    image, _, fov, av = synthetic_fundus(360, 360, seed=2, with_av=True)
    classes = np.where(av == 3, 0, av)
    row = measure_av(classes, fov, "x", image=image).row
    alone = C.measure_calibres(classes, fov, image, None, row["fov_diameter_px"]).row
    assert {k: row[k] for k in C.COLUMNS} == alone
