"""The measurements of vessel masks (train_utils/measurements.py) on shapes whose answer is known, their
invariance to resolution, measure.py and predict.py --measure, and the agreement statistics."""
import csv
import math
import os
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.conftest import run_script
from tests.test_predict import spread_unet, write_checkpoint

pytest.importorskip("skimage", reason="the measurements need the optional extras (requirements-extras.txt)")
pytest.importorskip("skan", reason="the measurements need the optional extras (requirements-extras.txt)")

from train_utils import measurements as M  # noqa: E402
from train_utils.errors import UserError  # noqa: E402
from train_utils.synthetic import write_synthetic_drive  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def disc(size):
    """A circular FOV filling a ``size`` x ``size`` image (its fitted diameter is ``size`` within 0.5 %)."""
    yy, xx = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2
    return (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2) ** 2


def graph_of(mask, min_length=0, step=4):
    return M.skeleton_graph(mask, min_length, step)


def tortuosity_of(mask, step=4, min_length=10):
    """(tortuosity, segments counted) of a mask, spurs under ``min_length`` pixels pruned and not counted."""
    g = graph_of(mask, min_length, step)
    arcs = M.arc_lengths(g.paths, step)
    return M.tortuosity(arcs, M.chord_lengths(g.paths), (g.kinds != 3) & (arcs >= min_length))


# ---------------------------------------------------------------------------
# each formula on a shape whose answer is known


@pytest.mark.parametrize("angle, width", [(0, 1), (45, 1), (0, 5), (22.5, 5), (60, 5), (100, 5)])
def test_straight_line_has_tortuosity_one(angle, width):
    a = math.radians(angle)
    x0, y0 = 150 - 120 * math.cos(a), 150 - 120 * math.sin(a)
    canvas = Image.new("L", (300, 300), 0)
    ImageDraw.Draw(canvas).line([(x0, y0), (300 - x0, 300 - y0)], fill=255, width=width)
    tort, n = tortuosity_of(np.asarray(canvas) > 0)
    assert n == 1
    # Exactly 1 for a one-pixel line along an axis or a diagonal. An oblique line's skeleton steps in a
    # staircase, which the resampled arc keeps within 1 % (the 8-connected length alone gives up to 1.08), and
    # a wide line's bends by a pixel or two towards a corner at each end: 1.5 % in all.
    assert tort == pytest.approx(1.0, abs=1e-9 if width == 1 else 0.015)


@pytest.mark.parametrize("sweep", [90, 180, 270])
def test_circular_arc_tortuosity_is_arc_over_chord(sweep):
    radius, size = 100, 260
    yy, xx = np.mgrid[0:size, 0:size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    theta = np.degrees(np.arctan2(yy - size / 2, xx - size / 2)) % 360
    band = (abs(r - radius) <= 3) & (theta <= sweep)
    tort, n = tortuosity_of(band)
    assert n == 1
    # The skeleton stops short of the band's ends: the arc over the chord between the ends it has.
    (path,) = graph_of(band, 10, 4).paths
    ends = [math.atan2(y - size / 2, x - size / 2) for y, x in (path[0], path[-1])]
    turned = abs(ends[1] - ends[0]) % (2 * math.pi)
    turned = turned if abs(turned - math.radians(sweep)) < 1 else 2 * math.pi - turned
    expected = radius * turned / float(np.hypot(*(path[-1] - path[0])))  # about 1.11, 1.57, 3.33
    assert expected == pytest.approx(math.radians(sweep) / (2 * math.sin(math.radians(sweep) / 2)), rel=0.05)
    # The skeleton bends towards a corner of the band's square-cut ends, by a pixel or two: 2 %.
    assert tort == pytest.approx(expected, rel=0.02)


def test_tortuosity_is_the_length_weighted_mean_of_arc_over_chord():
    arcs, chords = np.array([10.0, 30.0, 5.0, 8.0]), np.array([10.0, 20.0, 4.0, 8.0])
    counted = np.array([True, True, False, True])
    expected = sum(a * (a / c) for a, c, k in zip(arcs, chords, counted) if k) / sum(a for a, k in zip(arcs, counted) if k)
    assert M.tortuosity(arcs, chords, counted) == (pytest.approx(expected), 3)
    assert math.isnan(M.tortuosity(arcs, chords, np.zeros(4, dtype=bool))[0])


def test_fractal_dimension_of_a_line_a_square_and_the_sierpinski_carpet():
    sizes = [2, 4, 8, 16, 32, 64]
    line = np.zeros((512, 512), dtype=bool)
    line[100, :] = True
    square = np.ones((512, 512), dtype=bool)
    assert M.fractal_dimension(line, sizes) == pytest.approx(1.0, abs=1e-9)
    assert M.fractal_dimension(square, sizes) == pytest.approx(2.0, abs=1e-9)
    carpet = np.ones((1, 1), dtype=bool)
    for _ in range(5):  # 3^5 = 243 px
        carpet = np.block([[carpet, carpet, carpet], [carpet, np.zeros_like(carpet), carpet],
                           [carpet, carpet, carpet]])
    expected = math.log(8) / math.log(3)
    assert M.fractal_dimension(carpet, [1, 3, 9, 27, 81]) == pytest.approx(expected, abs=1e-9)
    # The photographs' own boxes are the FOV diameter over powers of two, not aligned with the carpet's
    # thirds: box counting is then only near its dimension.
    assert M.fractal_dimension(carpet, M.box_sizes(243)) == pytest.approx(expected, abs=0.06)
    assert math.isnan(M.fractal_dimension(np.zeros((8, 8), dtype=bool), [1, 2]))


def test_box_counts_match_a_loop_over_boxes():
    rng = np.random.default_rng(0)
    mask = rng.random((50, 61)) < 0.02
    for s in (3, 4.5, 10):
        n = 0
        for by in range(math.ceil(50 / s) + 1):
            for bx in range(math.ceil(61 / s) + 1):
                ys, xs = np.nonzero(mask)
                n += bool(((ys // s == by) & (xs // s == bx)).any())
        assert M.box_counts(mask, [s])[0] == n


def test_bar_of_known_width_and_density():
    size, width, length = 600, 8, 400
    fov = disc(size)
    bar = np.zeros_like(fov)
    bar[296:296 + width, 100:100 + length] = True
    row = M.measure(bar, fov, diameter_to=0).row
    assert row["vessel_area_density"] == pytest.approx(width * length / fov.sum())
    assert row["segments"] == 1 and row["junctions"] == 0 and row["end_points"] == 2
    # The skeleton of a bar stops about half its width short of each end: area / length = 8 * 400 / 392.
    assert row["mean_width_px"] == pytest.approx(width, rel=0.03)
    assert row["mean_width_fov"] == pytest.approx(row["mean_width_px"] / row["fov_diameter_px"])
    assert row["fov_diameter_px"] == pytest.approx(size, rel=0.005)
    assert row["tortuosity"] == pytest.approx(1.0, abs=0.001)
    # Measured at another scale (the default resizes the FOV to 700 px), the photograph's pixels are the same,
    # but for whole pixels: the bar's 8 rows become 9.33 at 700, kept as 9 or 10 (0.5 of 9.33: 6 %).
    scaled = M.measure(bar, fov).row
    assert scaled["measured_at_px"] == pytest.approx(700)
    assert scaled["mean_width_px"] == pytest.approx(width, rel=0.06)
    assert scaled["vessel_area_density"] == pytest.approx(row["vessel_area_density"], rel=0.06)


def test_micrometres_from_a_pixel_size_or_a_fov_angle():
    fov = disc(300)
    bar = np.zeros_like(fov)
    bar[148:153, 50:250] = True
    plain = M.measure(bar, fov).row
    assert plain["mean_width_um"] is None and plain["pixel_size_um"] is None
    sized = M.measure(bar, fov, pixel_size=10).row
    assert sized["mean_width_um"] == pytest.approx(10 * plain["mean_width_px"])
    assert sized["skeleton_length_um"] == pytest.approx(10 * plain["skeleton_length_px"])
    assert sized["length_density_per_mm"] == pytest.approx(plain["length_density_per_px"] / 10 * 1000)
    angled = M.measure(bar, fov, fov_angle=45).row
    assert angled["fov_diameter_um"] == pytest.approx(45 * M.UM_PER_DEGREE)
    for args in ((1, 45, 0), (0, None, 0), (None, -3, 0), (None, 200, 0), (None, None, -1)):
        with pytest.raises(UserError):
            M.check_flags(*args)


def test_a_cross_has_one_junction_four_ends_and_loses_its_spur():
    fov = disc(400)
    cross = np.zeros_like(fov)
    cross[197:204, 60:340] = True
    cross[60:340, 197:204] = True
    spur = cross.copy()
    spur[120:124, 204:209] = True  # a 5 px bump on one arm: a spur of the skeleton, pruned
    for mask in (cross, spur):
        row = M.measure(mask, fov, diameter_to=0).row
        assert (row["segments"], row["junctions"], row["end_points"]) == (4, 1, 4)
        assert row["tortuosity_segments"] == 4 and row["tortuosity"] == pytest.approx(1.0, abs=0.01)


def test_an_empty_mask_has_no_width_tortuosity_or_dimension():
    row = M.measure(np.zeros((100, 100), dtype=bool), disc(100)).row
    assert row["vessel_area_density"] == 0 and row["skeleton_length_px"] == 0 and row["segments"] == 0
    cells = dict(zip(M.COLUMNS, M.row_cells(row)))
    assert cells["mean_width_px"] == cells["tortuosity"] == cells["fractal_dimension"] == ""


# ---------------------------------------------------------------------------
# invariance to resolution


def tree(diameter, seed):
    """A vessel tree drawn with its FOV ``diameter`` pixels across: the same branches, in FOV units, at any
    diameter; widths of 6, 5, 4 and 3 pixels at 400 (whole pixels at every multiple of 400)."""
    rng = np.random.default_rng(seed)
    canvas = Image.new("L", (diameter, diameter), 0)
    draw = ImageDraw.Draw(canvas)
    stack = [(0.72, 0.5, a, 0.015, 0) for a in (1.0, 2.2, 3.6, 4.9)]
    while stack:
        x, y, angle, width, depth = stack.pop()
        points, bend = [(x, y)], rng.normal(0, 0.15)
        for _ in range(int(rng.integers(8, 14))):
            angle += bend + rng.normal(0, 0.1)
            x, y = x + 0.02 * math.cos(angle), y + 0.02 * math.sin(angle)
            if (x - 0.5) ** 2 + (y - 0.5) ** 2 > 0.46 ** 2:
                break
            points.append((x, y))
        w = round(width * diameter)
        px = [(u * diameter, v * diameter) for u, v in points]
        draw.line(px, fill=255, width=w, joint="curve")
        for u, v in px:
            draw.ellipse([u - w / 2, v - w / 2, u + w / 2, v + w / 2], fill=255)
        if depth < 3 and len(points) > 4:
            stack += [(x, y, angle + side * rng.uniform(0.4, 0.8), width - 0.0025, depth + 1) for side in (-1, 1)]
    return np.asarray(canvas) > 0, disc(diameter)


# Tolerances, from what drawing at 400 rather than 800 pixels changes: Pillow's lines cover the pixels whose
# centres fall within half the width, so an edge gains up to half a pixel, relatively twice as much at 400 as at
# 800 (3 % of the area on 3-6 px vessels: density and width 5 %); the centreline moves by up to half a pixel
# across a resampling step of D/128 (3 px at 400), which lengthens each step by up to (0.5/3)^2/2 = 1.4 % of
# the arc: tortuosity 0.025; the skeleton stops about half a vessel's width short of each free end, a width
# that is drawn up to a pixel wider at 400, over about 20 free ends in 8 FOV diameters of vessel (lengths 3 %);
# the smallest boxes, D/128 = 3 px at 400, cut partial pixels (dimension 0.03). Measured at 700 px, the
# drawing at 400 is enlarged and the one at 800 shrunk, with the same pixel effects.
TOLERANCE = {"vessel_area_density": ("rel", 0.05), "mean_width_fov": ("rel", 0.05),
             "length_density_fov": ("rel", 0.03), "skeleton_length_fov": ("rel", 0.03),
             "tortuosity": ("abs", 0.025), "fractal_dimension": ("abs", 0.03)}


@pytest.mark.parametrize("diameter_to", [0, M.MEASURE_DIAMETER])
@pytest.mark.parametrize("seed", [1, 3])
def test_the_same_tree_at_two_scales_gives_the_same_fov_relative_values(seed, diameter_to):
    small = M.measure(*tree(400, seed), diameter_to=diameter_to).row
    large = M.measure(*tree(800, seed), diameter_to=diameter_to).row
    assert small["segments"] > 50  # a tree, not a stroke
    for name, (kind, tol) in TOLERANCE.items():
        expected = pytest.approx(small[name], rel=tol) if kind == "rel" else pytest.approx(small[name], abs=tol)
        assert large[name] == expected, name
    assert large["mean_width_px"] == pytest.approx(2 * small["mean_width_px"], rel=0.05)


# ---------------------------------------------------------------------------
# agreement statistics


def icc_loop(x, y):
    """ICC(A,1) for two raters from its definition, one sum at a time."""
    n, k = len(x), 2
    table = [[x[i], y[i]] for i in range(n)]
    grand = sum(sum(r) for r in table) / (n * k)
    row_means = [sum(r) / k for r in table]
    col_means = [sum(table[i][j] for i in range(n)) / n for j in range(k)]
    ss_total = sum((table[i][j] - grand) ** 2 for i in range(n) for j in range(k))
    ss_rows = k * sum((m - grand) ** 2 for m in row_means)
    ss_cols = n * sum((m - grand) ** 2 for m in col_means)
    msr = ss_rows / (n - 1)
    msc = ss_cols / (k - 1)
    mse = (ss_total - ss_rows - ss_cols) / ((n - 1) * (k - 1))
    return (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)


def test_icc_matches_a_loop_and_shrout_and_fleiss():
    x = [1.0, 2.0, 3.5, 4.0, 6.0]
    y = [1.5, 2.0, 3.0, 5.0, 6.5]
    assert M.icc_a1(x, y) == pytest.approx(icc_loop(x, y), abs=1e-12)
    assert M.icc_a1(x, x) == pytest.approx(1.0)
    assert M.icc_a1(x, [v + 10 for v in x]) < 0.2  # absolute agreement: a constant bias costs
    # Shrout & Fleiss (1979), Table 2: six targets, four judges, ICC(2,1) = 0.29
    judges = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]
    assert M.icc_a1(*np.array(judges).T) == pytest.approx(0.29, abs=0.005)
    diff, sd = M.mean_difference(x, y)
    assert diff == pytest.approx(-0.3) and sd == pytest.approx(np.std(np.subtract(x, y), ddof=1))


# ---------------------------------------------------------------------------
# measurements.csv


def test_measurements_file_keeps_earlier_rows_and_refuses_a_foreign_file(tmp_path):
    path = tmp_path / "measurements.csv"
    row = M.measure(*tree(200, 1)).row
    table = M.MeasurementsFile(str(path))
    table.add(dict(row, image="a"))
    table.add(dict(row, image="b"))
    again = M.MeasurementsFile(str(path))  # a later run: a's row replaced, b's kept
    assert again.done == {"a", "b"}
    again.add(dict(row, image="a", segments=1))
    again.merge()  # at the run's end
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == M.COLUMNS and [r[0] for r in rows[1:]] == ["b", "a"]
    assert rows[2][M.COLUMNS.index("segments")] == "1"
    foreign = tmp_path / "other.csv"
    foreign.write_text("name,value\nx,1\n")
    with pytest.raises(UserError, match="not a other.csv of these columns"):
        M.MeasurementsFile(str(foreign))
    assert foreign.read_text() == "name,value\nx,1\n"


# ---------------------------------------------------------------------------
# the scripts


def one_error_line(r):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    """predict.py --measure --overlay on two synthetic photographs with their FOV masks."""
    root = tmp_path_factory.mktemp("measure")
    write_synthetic_drive(str(root / "data"), num_train=0, num_test=2, height=96, width=90)
    test = root / "data" / "DRIVE" / "test"
    ckpt = write_checkpoint(root / "model.pth", spread_unet(2), 1)
    out = root / "out"
    r = run_script("predict.py", "--weights", ckpt, "--img", test / "images", "--roi-mask", test / "mask",
                   "--output-dir", out, "--measure", "--overlay", "--pixel-size", "20", timeout=180)
    assert r.returncode == 0, r.stderr
    return {"root": root, "images": test / "images", "masks": test / "mask", "ckpt": ckpt, "out": out,
            "stdout": r.stdout}


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_measure_py_gives_predict_py_s_rows(predicted, tmp_path):
    rows = read_rows(predicted["out"] / "measurements.csv")
    assert tuple(rows[0]) == M.COLUMNS and [r[0] for r in rows[1:]] == ["01_test", "02_test"]
    assert "(measured in" in predicted["stdout"]
    r = run_script("measure.py", "--masks", predicted["out"], "--roi-mask", predicted["masks"], "--pixel-size", "20",
                   "--output-dir", tmp_path / "m", "--overlay", "--img", predicted["images"])
    assert r.returncode == 0, r.stderr
    assert read_rows(tmp_path / "m" / "measurements.csv") == rows  # the _overlay.png files were skipped
    # the overlays show the skeleton in yellow over the photograph (predict.py's: over its green vessels)
    for folder in (predicted["out"], tmp_path / "m"):
        overlay = np.array(Image.open(folder / "01_test_overlay.png"))
        assert (overlay == M.SKELETON_COLOUR).all(axis=2).sum() > 20


def test_predict_without_measure_writes_what_it_wrote_before(predicted, tmp_path):
    r = run_script("predict.py", "--weights", predicted["ckpt"], "--img", predicted["images"] / "01_test.tif",
                   "--roi-mask", predicted["masks"], "--output-dir", tmp_path, "--overlay", timeout=180)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["01_test.png", "01_test_overlay.png"] and "measured" not in r.stdout
    assert np.array_equal(np.array(Image.open(tmp_path / "01_test.png")),
                          np.array(Image.open(predicted["out"] / "01_test.png")))
    plain = np.array(Image.open(tmp_path / "01_test_overlay.png"))
    assert not (plain == M.SKELETON_COLOUR).all(axis=2).any()


def test_measure_py_bad_input_is_one_line_and_keeps_earlier_results(predicted, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    foreign = out / "measurements.csv"
    foreign.write_text("name,value\n")
    cases = [(["--masks", tmp_path / "nothing"], "does not exist"),
             (["--masks", predicted["out"], "--roi-mask", tmp_path / "nothing"], "does not exist"),
             (["--masks", predicted["out"], "--pixel-size", "2", "--fov-angle", "45"], "not both"),
             (["--masks", predicted["out"]], "not a measurements.csv")]
    for args, message in cases:
        line = one_error_line(run_script("measure.py", *args, "--output-dir", out))
        assert message in line, line
    assert foreign.read_text() == "name,value\n"
    colour = tmp_path / "colour.png"
    Image.fromarray(np.dstack([np.full((40, 40), v, np.uint8) for v in (200, 10, 10)])).save(colour)
    assert "colour" in one_error_line(run_script("measure.py", "--masks", colour, "--output-dir", tmp_path / "c"))


def blocked(module, script):
    """A command running ``script`` as __main__ with ``module`` unimportable, as if not installed."""
    return [sys.executable, "-c", f"import sys, runpy; sys.modules[{module!r}] = None; "
                                  f"sys.argv = [{script!r}] + sys.argv[1:]; "
                                  f"runpy.run_path({os.path.join(ROOT, script)!r}, run_name='__main__')"]


@pytest.mark.parametrize("module, script", [("skan", "measure.py"), ("skimage", "predict.py")])
def test_missing_optional_package_is_one_line_naming_the_install(predicted, tmp_path, module, script):
    args = (["--masks", predicted["out"]] if script == "measure.py" else
            ["--weights", predicted["ckpt"], "--img", predicted["images"], "--roi-mask", predicted["masks"],
             "--measure"])
    line = one_error_line(run_script(blocked(module, script), *args, "--output-dir", tmp_path / "o"))
    assert "pip install -r requirements-extras.txt" in line and ("skan" in line and "scikit-image" in line)
    assert not (tmp_path / "o").exists()  # refused before any work
