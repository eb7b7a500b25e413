"""app.py, the web page: started on a free port and called over real HTTP (gradio_client), then in a real
browser (the system's headless Chromium, driven by Selenium): predict.py's files for the same photograph (also
with arteries and veins), a readable line for each bad input, clients at once with the same photograph,
nothing of an upload kept, and nothing fetched from elsewhere."""
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, run_script
from tests.test_cohort import checkpoint, photographs
from tests.test_predict import spread_unet, write_checkpoint

EXTRAS = "the page needs the optional extras (requirements-extras.txt)"
pytest.importorskip("gradio", reason=EXTRAS)
gradio_client = pytest.importorskip("gradio_client", reason=EXTRAS)
# .ci/run installs Chromium and sets this: there the browser test must run, never skip.
REQUIRE_BROWSER = os.environ.get("UNET_REQUIRE_BROWSER", "") not in ("", "0")
KEEP_UPLOADS_S = 3  # the page's --keep-uploads here: long enough for the queue to hand a shared upload on


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def files_under(folder):
    return [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``python app.py`` on a tiny checkpoint and a free port, its temporary files in a folder of its own."""
    root = tmp_path_factory.mktemp("app")
    temp = root / "tmp"
    temp.mkdir()
    weights = checkpoint(root / "tiny.pth")
    av_weights = write_checkpoint(root / "tiny_av.pth", spread_unet(3, seed=1), 2)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TMPDIR=str(temp))
    env.pop("GRADIO_TEMP_DIR", None)
    log = open(root / "app.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--weights", weights, "--port",
                             str(free_port()), "--device", "cpu", "--av-weights", av_weights, "--keep-uploads",
                             str(KEEP_UPLOADS_S)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = None
    while url is None and time.perf_counter() - t0 < 120 and proc.poll() is None:
        time.sleep(0.2)
        for line in (root / "app.log").read_text().splitlines():
            if line.startswith("the page is at "):
                url = line.split()[4]
    assert url, (root / "app.log").read_text()
    yield {"url": url, "root": root, "temp": temp, "weights": weights, "av_weights": av_weights, "proc": proc,
           "log": root / "app.log",
           "started_s": time.perf_counter() - t0}
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    log.close()


def client(server, tmp_path):
    return gradio_client.Client(server["url"], download_files=str(tmp_path / "downloads"), verbose=False)


def segment(server, tmp_path, photos, masks=None, tta=False, av=False):
    handle = gradio_client.handle_file
    return client(server, tmp_path).predict([handle(str(p)) for p in photos],
                                            [handle(str(m)) for m in masks] if masks else None, tta, av,
                                            api_name="/segment")


def uploads_gone(server, photo, wait_s=KEEP_UPLOADS_S + 10):
    """Whether, within ``wait_s``, no file under the page's temporary folder holds ``photo``'s bytes."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < wait_s:
        if sha(photo) not in {sha(f) for f in files_under(server["temp"]) if os.path.isfile(f)}:
            return True
        time.sleep(0.5)
    return False


def test_the_page_gives_predict_pys_files_and_keeps_no_upload(server, tmp_path):
    photo = os.path.join(photographs(tmp_path / "in", 1), "p00.png")
    gallery, table, files, status, photos_box, masks_box = segment(server, tmp_path, [photo])
    by_name = {os.path.basename(f): f for f in files}
    assert sorted(by_name) == ["measurements.csv", "p00.png", "p00_overlay.png", "p00_prob.png"]
    r = run_script("predict.py", "--weights", server["weights"], "--img", photo, "--output-dir", tmp_path / "out",
                   "--device", "cpu", "--save-prob", "--overlay", "--measure")
    assert r.returncode == 0, r.stderr
    for name, path in by_name.items():  # the same bytes as predict.py writes
        assert sha(path) == sha(tmp_path / "out" / name), name
    mask = np.array(Image.open(by_name["p00.png"]))
    assert 0.05 < (mask == 255).mean() < 0.95  # the model draws vessels and background: the check means something
    assert [os.path.basename(item["image"]) for item in gallery] == ["p00_overlay.png", "p00_prob.png", "p00.png"]
    assert table["headers"][:2] == ["photograph", "seconds"]
    (row,) = table["data"]
    assert row[0] == "p00.png" and float(row[1]) > 0
    assert "**p00.png**: 90x96" in status and status.endswith(" s")
    assert photos_box is None and masks_box is None  # the upload boxes are emptied: their files are gone
    # Nothing of the upload is left on the server after --keep-uploads seconds: no file holds its bytes, and the
    # page's own copies are gone.
    assert uploads_gone(server, photo)
    work = [d for d in os.listdir(server["temp"]) if d.startswith("unet-app-")]
    assert len(work) == 1 and os.listdir(server["temp"] / work[0]) == []


def test_several_photographs_with_their_fov_masks(server, tmp_path):
    folder = photographs(tmp_path / "in", 2)
    photos = [os.path.join(folder, n) for n in ("p00.png", "p01.png")]
    masks = []
    for k, p in enumerate(photos):  # a FOV mask that keeps the left half: outside it the mask is 0
        fov = np.zeros((96, 90), np.uint8)
        fov[:, :45] = 255
        masks.append(tmp_path / f"p0{k}_mask.png")
        Image.fromarray(fov).save(masks[-1])
    gallery, table, files, status, _, _ = segment(server, tmp_path, photos, masks)
    assert [row[0] for row in table["data"]] == ["p00.png", "p01.png"] and len(gallery) == 6
    for k in range(2):
        mask = np.array(Image.open(next(f for f in files if os.path.basename(f) == f"p0{k}.png")))
        assert mask[:, :45].any() and not mask[:, 45:].any()
    assert "estimated" not in status


def test_arteries_and_veins_on_the_page_are_predict_av_files(server, tmp_path):
    photo = os.path.join(photographs(tmp_path / "in", 1), "p00.png")
    gallery, table, files, status, _, _ = segment(server, tmp_path, [photo], av=True)
    by_name = {os.path.basename(f): f for f in files}
    assert sorted(by_name) == ["measurements.csv", "p00.png", "p00_artery_prob.png", "p00_av.png",
                               "p00_overlay.png", "p00_prob.png", "p00_vein_prob.png"]
    r = run_script("predict.py", "--av", "--weights", server["av_weights"], "--img", photo, "--output-dir",
                   tmp_path / "out", "--device", "cpu", "--save-prob", "--overlay", "--measure")
    assert r.returncode == 0, r.stderr
    for name, path in by_name.items():
        assert sha(path) == sha(tmp_path / "out" / name), name
    assert set(np.unique(np.array(Image.open(by_name["p00_av.png"])))) == {0, 1, 2}
    assert [os.path.basename(item["image"]) for item in gallery] == ["p00_overlay.png", "p00_av.png",
                                                                     "p00_prob.png", "p00.png"]
    assert {"artery_vessel_area_density", "vein_mean_width_px", "crae_px", "avr"} <= set(table["headers"])
    qc = table["data"][0][table["headers"].index("calibre_qc")]
    assert qc == "ok" or qc in {"no_disc", "disc_outside_fov", "zone_outside_fov", "few_arterioles", "few_venules"}


def test_clients_at_once_with_the_same_photograph_each_get_their_result(server, tmp_path):
    """Gradio stores identical uploads once: 8 clients sending the same photograph and 8 sending their own,
    all at the same moment, all get results (16 fit the page's queue), the same for the same photograph."""
    same = os.path.join(photographs(tmp_path / "same", 1, first_seed=40), "p00.png")
    distinct = [os.path.join(photographs(tmp_path / f"d{k}", 1, first_seed=50 + k), "p00.png") for k in range(8)]
    jobs = [(same, k) for k in range(8)] + [(p, 8 + k) for k, p in enumerate(distinct)]

    def one(job):
        path, k = job
        return segment(server, tmp_path / f"client{k}", [path])

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(one, jobs))
    masks = [next(f for f in files if os.path.basename(f) == "p00.png") for _, _, files, _, _, _ in results]
    assert len({sha(m) for m in masks[:8]}) == 1  # the same photograph, the same mask, eight times
    assert all(status.startswith("**p00.png**") for _, _, _, status, _, _ in results)
    assert uploads_gone(server, same) and all(uploads_gone(server, p) for p in distinct)


def write_48_megapixel_header(path):
    """A PNG whose header says 8000 x 6000 pixels, its data cut short: the page must refuse it unread."""
    Image.new("RGB", (8, 8)).save(path)
    data = bytearray(open(path, "rb").read())
    ihdr = bytearray(data[12:29])  # chunk type and its 13 bytes
    ihdr[4:12] = struct.pack(">II", 8000, 6000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    open(path, "wb").write(bytes(data))


def bad_inputs(folder):
    """{file: what the page must say}: not an image, a truncated JPEG, a blank photograph, 48 megapixels."""
    os.makedirs(folder, exist_ok=True)
    text = os.path.join(folder, "notes.png")
    with open(text, "w") as f:
        f.write("not a picture")
    good = os.path.join(photographs(os.path.join(folder, "good"), 1), "p00.png")
    truncated = os.path.join(folder, "cut.jpg")
    Image.open(good).save(truncated, quality=95)
    data = open(truncated, "rb").read()
    open(truncated, "wb").write(data[:len(data) // 2])
    blank = os.path.join(folder, "blank.png")
    Image.new("RGB", (90, 96)).save(blank)
    big = os.path.join(folder, "big.png")
    write_48_megapixel_header(big)
    return {text: "cannot decode image 'notes.png': cannot identify image file 'notes.png'",
            truncated: "cannot decode image 'cut.jpg': image file is truncated",
            blank: "'blank.png' shows no field of view",
            big: "'big.png' is 8000x6000 pixels (48.0 megapixels), more than the 25 megapixels this page takes"}


def test_bad_inputs_get_one_readable_line_and_the_page_goes_on(server, tmp_path):
    cases = bad_inputs(tmp_path / "bad")
    for path, message in cases.items():
        with pytest.raises(gradio_client.exceptions.AppError) as caught:
            segment(server, tmp_path, [path])
        assert message in str(caught.value), (path, str(caught.value))
        assert str(tmp_path) not in str(caught.value) and str(server["temp"]) not in str(caught.value)
    # with a good photograph beside them, the bad ones are lines of the status and the good one is predicted
    good = os.path.join(photographs(tmp_path / "good", 1), "p00.png")
    gallery, table, _, status, _, _ = segment(server, tmp_path, [good, *cases])
    assert [row[0] for row in table["data"]] == ["p00.png"] and len(gallery) == 3
    for message in cases.values():
        assert message in status
    assert server["proc"].poll() is None  # still serving
    for path in cases:
        assert uploads_gone(server, path)


def browser():
    """(chromium, chromedriver) of the system, or a skip (a failure where .ci/run installed them)."""
    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        message = "no chromium and chromedriver here (apt-get install chromium chromium-driver; .ci/run does)"
        if REQUIRE_BROWSER:
            pytest.fail(message)
        pytest.skip(message)
    return chromium, driver


def open_browser(width=1400, height=1500):
    pytest.importorskip("selenium", reason=EXTRAS)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = browser()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def wait_for(driver, script, timeout=60):
    """Poll the JavaScript expression ``script`` until it is truthy; its value."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        value = driver.execute_script(f"return {script}")
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"the page never showed: {script}\n{driver.find_element('tag name', 'body').text[:2000]}")


OVERLAY_SHOWN = ("[...document.querySelectorAll('#results img')].some(i => i.src.endsWith('_overlay.png') && "
                 "i.complete && i.naturalWidth > 0)")


def drop_and_run(driver, url, photo):
    """Open the page, drop ``photo`` on the photographs' box and press the button."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    wait_for(driver, "document.querySelector('#photos input[type=file]')")
    driver.find_element(By.CSS_SELECTOR, "#photos input[type=file]").send_keys(str(photo))
    stem = os.path.splitext(os.path.basename(photo))[0]  # the box shows the name's stem and suffix apart
    wait_for(driver, f"document.querySelector('#photos').innerText.includes({stem!r})")
    driver.find_element(By.CSS_SELECTOR, "#run").click()


def test_the_page_in_a_real_browser(server, tmp_path):
    photo = os.path.join(photographs(tmp_path / "in", 1), "p00.png")
    driver = open_browser()
    try:
        drop_and_run(driver, server["url"], photo)
        wait_for(driver, OVERLAY_SHOWN)
        wait_for(driver, "document.querySelector('#measurements').innerText.includes('p00.png')")
        driver.save_screenshot(str(tmp_path / "page.png"))
        with Image.open(tmp_path / "page.png") as shot:
            assert shot.size[0] >= 1000
        # every script, style, font and picture came from the page's own server
        loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded and {urlparse(u).netloc for u in loaded} == {urlparse(server["url"]).netloc}, loaded
        # a bad file: its line on the page, and the page still works
        notes = tmp_path / "notes.png"
        notes.write_text("not a picture")
        drop_and_run(driver, server["url"], notes)
        wait_for(driver, "document.body.innerText.includes(\"cannot decode image 'notes.png'\")")
    finally:
        driver.quit()
    print(f"screenshot: {tmp_path / 'page.png'}")


def test_a_stopped_page_leaves_no_files(server):
    server["proc"].terminate()
    assert server["proc"].wait(timeout=30) == 0
    assert not [d for d in os.listdir(server["temp"]) if d.startswith("unet-app-")]
    assert not [f for f in files_under(server["temp"]) if f.endswith((".png", ".csv"))]


def test_without_gradio_app_py_is_one_line_naming_the_install(tmp_path):
    code = (f"import sys, runpy; sys.modules['gradio'] = None; sys.argv = ['app.py'] + sys.argv[1:]; "
            f"runpy.run_path({os.path.join(ROOT, 'app.py')!r}, run_name='__main__')")
    r = run_script([sys.executable, "-c", code], "--port", free_port())
    assert r.returncode == 1
    assert r.stderr.strip() == ("error: the web page (app.py) needs the optional package gradio: pip install gradio "
                                "(or pip install -r requirements-extras.txt)")


def test_the_model_card_on_the_page_has_no_links_or_pictures_it_cannot_serve():
    import re

    import app
    card = app.model_card()
    assert card.startswith("# Model card") and "HRF" in card
    assert "![" not in card and not re.search(r"\]\((?!https?:)", card)
