"""A web page on this machine for the vessels of fundus photographs: drop them into a browser, see the vessels,
their measurements and times, download the results.

    python app.py                                          # the shipped model, at http://127.0.0.1:7860
    python app.py --weights save_weights/best_model.pth --port 8080
    python app.py --host 0.0.0.0 --auth-file users.txt     # a lab's server: every interface, with passwords

The page runs predict.py's own steps on each photograph (``train_utils/prediction.py``: ``read_photo``,
``predict_photo``, ``save_outputs``, ``measurements_table``), so what it offers for download is what
``predict.py --save-prob --overlay --measure`` writes for the same file: ``<stem>.png``, ``<stem>_prob.png``,
``<stem>_overlay.png`` and ``measurements.csv``; with "arteries and veins" ticked, what ``predict.py --av`` adds
(``<stem>_av.png``, the artery and vein probabilities, the ``artery_`` and ``vein_`` measurements), from the
artery/vein model (``--av-weights``). It needs Gradio (``pip install -r requirements-extras.txt``), works
without the internet (no analytics, no fonts or scripts from elsewhere) and keeps no photograph: an upload is
deleted ``--keep-uploads`` seconds after the last request that used it (a visitor who sends the same file
meanwhile shares it), and the results within the hour. Without ``--weights`` it takes the model predict.py
would take: on a fresh clone, the shipped one. docs/app.md has the options, a lab's server and a Hugging Face
Space.
"""
import argparse
import atexit
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time

from train_utils.cli import app_parser, predict_parser, weights_or_default

# Before Gradio is imported anywhere: it reads these when it loads (no usage statistics sent, no update check).
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

if __name__ == "__main__":
    cli_args = app_parser(doc=__doc__).parse_args()  # --help and a mistyped flag answered before anything loads

from train_utils.cohort import attempt, failure_reason  # noqa: E402
from train_utils.errors import UserError, run_cli  # noqa: E402
from train_utils.extras import require  # noqa: E402
from train_utils.imaging import find_mask, stem_of  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_CARD = os.path.join(HERE, "docs", "model_card.md")
GRADIO_PURPOSE = "the web page (app.py)"
# Results stay downloadable this long, then Gradio's cache sweep (every RESULTS_SWEEP_S) deletes them.
RESULTS_KEPT_S, RESULTS_SWEEP_S = 3600, 600
MAX_PHOTOS = 32  # a submission's photographs: one at a time, so the next visitor's wait stays short
MAX_UPLOAD = "200mb"  # one file; a 25-megapixel photograph is 75 MB as an uncompressed TIFF
QUEUE_SIZE = 16  # submissions waiting; more are refused with a message, so a crowd cannot grow the memory
# The measurements the page shows (measurements.csv has every column): the FOV-relative ones, the same for
# every camera, and the skeleton's counts.
SHOWN = ("vessel_area_density", "length_density_fov", "mean_width_px", "tortuosity", "fractal_dimension",
         "segments", "junctions", "end_points")
AV_SHOWN = tuple(f"{kind}_{name}" for name in ("vessel_area_density", "mean_width_px", "tortuosity")
                 for kind in ("artery", "vein")) + ("crae_px", "crve_px", "avr", "calibre_qc")


def gradio():
    """The gradio module; a one-line error naming the install command when it is missing."""
    return require(GRADIO_PURPOSE, "gradio")


# ---------------------------------------------------------------------------
# the page's work: predict.py's steps on each photograph dropped


class Segmenter:
    """The models, loaded once (the vessels', and the arteries' and veins' when there is one), and the page's one
    action, ``segment``."""

    def __init__(self, args):
        from train_utils import prediction
        from train_utils.measurements import check_available, warm_up

        check_available()  # the measurements' packages, before the page opens
        warm_up()  # skan compiles while the model loads and the page starts, not on the first photograph
        self.prediction = prediction
        self.weights = weights_or_default(args.weights)
        self.settings = prediction_settings(args)
        prediction.check_args(self.settings)
        self.net = self._open(self.weights, args.device)
        self.av_weights = av_weights(args.av_weights)
        self.av_net = self._open(self.av_weights, args.device) if self.av_weights else None
        if self.av_net is not None:
            prediction.check_model(self.av_net, argparse.Namespace(av=True))
        self.tta = bool(self.net.saved.get("eval_tta", False))  # as predict.py's default
        self.max_pixels = args.max_megapixels * 1e6
        self.uploads = Uploads(args.keep_uploads)
        atexit.register(self.uploads.sweep, True)
        self.work_dir = tempfile.mkdtemp(prefix="unet-app-")
        atexit.register(shutil.rmtree, self.work_dir, True)

    def _open(self, weights, device):
        from train_utils.distributed_utils import resolve_device
        onnx = weights.lower().endswith(".onnx")
        return self.prediction.open_network(weights, resolve_device("cpu" if onnx else device), self.settings)

    def describe(self):
        import src
        shown = os.path.relpath(self.weights)
        return f"{src.describe(**self.net.kwargs)} from '{self.weights if shown.startswith('..') else shown}'"

    def segment(self, photos, masks, tta, av=False):
        """For the photographs (and FOV masks) dropped: yields the page's outputs after each photograph (the
        gallery, the measurements, the downloads, the status; the upload boxes emptied at the end), with
        ``av`` from the artery/vein model. The uploads are held while it works (``Uploads``) and its own
        copies deleted once the last outputs are in Gradio's cache."""
        gr = gradio()
        photos, masks = unique(photos), unique(masks)
        folder = tempfile.mkdtemp(dir=self.work_dir)
        self.uploads.hold(photos + masks)
        try:
            if not photos:
                raise gr.Error("Drop one or more photographs first.")
            if len(photos) > MAX_PHOTOS:
                raise gr.Error(f"{len(photos)} photographs dropped: the page takes {MAX_PHOTOS} at a time "
                               "(predict.py takes a folder of any size).")
            gone = [os.path.basename(p) for p in photos + masks if not os.path.isfile(p)]
            if gone:
                raise gr.Error(f"{', '.join(gone)}: no longer on the server (uploads are deleted "
                               f"{self.uploads.keep_s:g} s after their results are shown); drop again.")
            if av and self.av_net is None:
                raise gr.Error("This page has no artery/vein model (start it with --av-weights).")
            yield from self._segment(gr, photos, masks, bool(tta), folder, bool(av))
        finally:
            self.uploads.release(photos + masks)
            shutil.rmtree(folder, ignore_errors=True)

    def _segment(self, gr, photos, masks, tta, folder, av):
        prediction, net = self.prediction, self.av_net if av else self.net
        settings = argparse.Namespace(**{**vars(self.settings), "tta": tta, "output_dir": os.path.join(folder, "out"),
                                         "av": av, "threshold": net.threshold})  # the model's own threshold
        readable = Readable(photos + masks, folder)
        try:
            mask_files = match_masks(photos, masks, os.path.join(folder, "masks"))
            plans = prediction.output_paths(settings, photos, [m for m in mask_files if isinstance(m, str)])
            table = prediction.measurements_table(settings, plans, photos)
        except UserError as e:
            raise gr.Error(readable(e)) from None
        done, lines = [], []
        for path, mask_file, plan in zip(photos, mask_files, plans):
            name, t0 = os.path.basename(path), time.perf_counter()
            try:
                if isinstance(mask_file, Exception):
                    raise mask_file
                check_pixels(path, self.max_pixels)
                photo = prediction.read_photo(path, mask_file, net.fov_diameter, net.multiple, net.kwargs["model"],
                                              net.fov_diameter_max)
                probs, tiles = prediction.predict_photo(net, photo, settings)
                prediction.save_outputs(probs, photo.image, photo.fov, plan, settings, table, stem_of(path))
                del probs
            except Exception as e:  # noqa: BLE001 - that photograph's failure, shown on the page; the rest go on
                lines.append(f"**{name}**: {readable(e)}")
                print(f"failed: {name}: {failure_reason(e)}", file=sys.stderr, flush=True)
                continue
            seconds = time.perf_counter() - t0
            h, w = photo.image.shape[:2]
            done.append((name, plan, seconds))
            lines.append(f"**{name}**: {w}x{h}" + (f", {tiles} tiles" if tiles > 1 else "")
                         + photo.note.replace(", FOV", ", field of view") + f", {seconds:.2f} s")
            del photo
            yield self.outputs(gr, done, lines, table, settings, last=False)
        if not done:
            yield self.outputs(gr, done, lines, table, settings, last=True)
            raise gr.Error(" ".join(ln.replace("**", "") for ln in lines))
        yield self.outputs(gr, done, lines, table, settings, last=True)

    def outputs(self, gr, done, lines, table, settings, last):
        """(gallery, measurements, downloads, status, photographs box, masks box) for the page."""
        gallery, files = [], []
        for name, plan, _ in done:
            if settings.av:
                gallery += [(plan.overlay, f"{name}: arteries (red) and veins (blue)"),
                            (plan.av, f"{name}: artery/vein map")]
            else:
                gallery += [(plan.overlay, f"{name}: vessels")]
            gallery += [(plan.prob, f"{name}: probability"), (plan.mask, f"{name}: mask")]
            files += plan.written(settings)
        shown = SHOWN + (AV_SHOWN if settings.av else ())
        rows = table.read()
        data = [[name, f"{seconds:.2f}"] + [rows[stem_of(name)][c] for c in shown]
                for name, _, seconds in done]
        if done:
            files.append(table.path)
        status = "\n\n".join(lines) + ("" if last else "\n\nworking on the next photograph ...")
        keep = gr.update() if not last else None  # the uploads are deleted: their boxes emptied
        return gallery, {"headers": ["photograph", "seconds", *shown], "data": data}, files, status, keep, keep


def prediction_settings(args):
    """predict.py's settings as its parser gives them, with every output on (--save-prob --overlay --measure)
    and the page's --device and --tile-size: the page predicts, writes and measures as predict.py does."""
    settings = predict_parser().parse_args(["--img", "the page's uploads"])
    vars(settings).update(save_prob=True, overlay=True, measure=True, device=args.device, tile_size=args.tile_size,
                          workers=0)
    return settings


def unique(paths):
    """The uploads' paths, each once (Gradio stores a file dropped twice once, under its content's hash)."""
    return list(dict.fromkeys(paths or []))


def match_masks(photos, masks, folder):
    """Each photograph's FOV mask: none, the one mask dropped with one photograph, else the mask predict.py's
    --roi-mask folder would give it (``<stem>_mask.*``, ``<stem>.*``), or the error that no mask matches."""
    if not masks:
        return [None] * len(photos)
    if len(photos) == 1 and len(masks) == 1:
        return list(masks)
    os.makedirs(folder)
    for path in masks:  # Gradio keeps each upload in a folder of its own: gather them under their names
        link = os.path.join(folder, os.path.basename(path))
        if not os.path.exists(link):
            os.symlink(path, link)
    return [attempt(find_mask, folder, p) for p in photos]


def check_pixels(path, limit):
    """A ``UserError`` for a photograph of more than ``limit`` pixels, read from its header (not decoded)."""
    from train_utils.imaging import image_size
    w, h = image_size(path)
    if w * h > limit:
        raise UserError(f"'{path}' is {w}x{h} pixels ({w * h / 1e6:.1f} megapixels), more than the "
                        f"{limit / 1e6:g} megapixels this page takes: predict it with predict.py, which takes any "
                        f"size, or start the page with --max-megapixels {math.ceil(w * h / 1e6)}")


class Readable:
    """A failure as one line for the page: the uploads' names instead of their paths on the server."""

    def __init__(self, uploads, folder):
        self.names = {p: os.path.basename(p) for p in sorted(uploads, key=len, reverse=True)}
        self.folder = folder

    def __call__(self, error):
        text = failure_reason(error)
        text = text.replace(os.path.join(self.folder, "masks"), "the FOV masks dropped")
        for path, name in self.names.items():
            text = text.replace(path, name)
        return text.replace(os.path.join(self.folder, "out") + os.sep, "").replace(self.folder + os.sep, "")


def av_weights(path):
    """The artery/vein model the page offers: ``--av-weights``, else the shipped one when it is there ('' none);
    a file named but missing is one error line."""
    if path == "":
        return ""
    if path is not None:
        if not os.path.isfile(path):
            raise UserError(f"--av-weights '{path}' not found")
        return path
    from train_utils.cli import SHIPPED_AV_WEIGHTS
    return SHIPPED_AV_WEIGHTS if os.path.isfile(SHIPPED_AV_WEIGHTS) else ""


def remove_upload(path):
    """Delete an uploaded file and the folder Gradio made for it, when empty."""
    try:
        os.remove(path)
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass


class Uploads:
    """The uploads of the page's requests, each deleted ``keep_s`` seconds after the last request using it ended.

    Gradio stores an upload under its content's hash, so visitors who send the same photograph share one
    file: a request holds its files while it works, and a file is deleted only when no request holds it
    and none has used it for ``keep_s`` seconds, long enough for a request queued behind with the same
    bytes to start and hold it too.
    """

    def __init__(self, keep_s):
        if not keep_s >= 0:
            raise UserError(f"--keep-uploads must be 0 or more seconds (got {keep_s:g})")
        self.keep_s = keep_s
        self.lock = threading.Lock()
        self.users = {}  # path -> the requests working on it now
        self.released = {}  # path -> when the last request using it ended

    def hold(self, paths):
        with self.lock:
            for path in paths:
                self.users[path] = self.users.get(path, 0) + 1
                self.released.pop(path, None)

    def release(self, paths):
        now = time.monotonic()
        with self.lock:
            for path in paths:
                self.users[path] -= 1
                if not self.users[path]:
                    del self.users[path]
                    self.released[path] = now
        self.sweep()
        timer = threading.Timer(self.keep_s + 0.1, self.sweep)  # the deletion, even if no request comes again
        timer.daemon = True
        timer.start()

    def sweep(self, everything=False):
        """Delete the uploads no request has used for ``keep_s`` seconds (``everything``: all not in use)."""
        now = time.monotonic()
        with self.lock:
            due = [p for p, t in self.released.items() if everything or now - t >= self.keep_s]
            for path in due:
                del self.released[path]
                remove_upload(path)


# ---------------------------------------------------------------------------
# the page


def about(segmenter, card):
    """The line on what the model is and is not."""
    shipped = os.path.realpath(segmenter.weights) == os.path.realpath(os.path.join(HERE, "weights",
                                                                                   "unet_vessels.pth"))
    what = ("the U-Net shipped with this project, trained on DRIVE, CHASE_DB1, STARE and HRF" if shipped
            else f"{segmenter.describe()}")
    if segmenter.av_net is not None:
        what += (", and tells arteries from veins with a second shipped U-Net"
                 if os.path.realpath(segmenter.av_weights) == os.path.realpath(os.path.join(HERE, "weights",
                                                                                           "unet_av.pth"))
                 else f", and arteries from veins with {segmenter.av_weights}")
    link = " Its [model card](#model-card), below, says what it was trained on and how well it does." \
        if shipped and card else ""
    return (f"Marks the retinal vessels of fundus photographs with {what}. **For research and teaching, not "
            f"for diagnosis**: it is not a medical device, and its masks and measurements must not decide any "
            f"patient's care.{link} Photographs are deleted from the server "
            f"{segmenter.uploads.keep_s:g} seconds after their results are shown; the results stay downloadable "
            "for an hour.")


def model_card():
    """docs/model_card.md for the page, its links to other docs pages as plain text and its pictures left out
    (the page serves neither); empty when the file is not there."""
    if not os.path.isfile(MODEL_CARD):
        return ""
    with open(MODEL_CARD, encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"!\[[^\]]*\]\((?!https?:)[^)]*\)\n?", "", text)
    return re.sub(r"\[([^\]]+)\]\((?!https?:)[^)]*\)", r"\1", text)


def build_page(segmenter):
    """The gr.Blocks of the page, its queue set: one photograph at a time, QUEUE_SIZE submissions waiting."""
    gr = gradio()
    card = model_card()
    with gr.Blocks(title="Retinal vessels: U-Net", analytics_enabled=False, fill_width=True,
                   delete_cache=(RESULTS_SWEEP_S, RESULTS_KEPT_S)) as page:
        gr.Markdown("# Retinal vessels in fundus photographs\n\n" + about(segmenter, card))
        with gr.Row():
            photos = gr.File(label="Photographs (.jpg, .png, .tif, ...): drop one or several", file_count="multiple",
                             type="filepath", height=150, elem_id="photos")
            masks = gr.File(label="FOV masks (optional)", file_count="multiple",
                            type="filepath", height=150, elem_id="masks")
        gr.Markdown("FOV masks: one for one photograph, else each named as the photograph's stem with `_mask` or "
                    "without (`36_test_mask.gif` or `36_test.png` for `36_test.tif`); without them the field of "
                    "view is estimated from the dark border.")
        with gr.Row():
            tta = gr.Checkbox(value=segmenter.tta, label="Average over flips (about 3 times slower)")
            av = gr.Checkbox(value=segmenter.av_net is not None, visible=segmenter.av_net is not None,
                             label="Arteries (red) and veins (blue)", elem_id="av")
            run = gr.Button("Find the vessels", variant="primary", elem_id="run")
        status = gr.Markdown(elem_id="status")
        gallery = gr.Gallery(label="Each photograph: the vessels found (green; ticked, arteries red and veins "
                                   "blue, and their map, with the optic disc in green, zone B between the cyan "
                                   "circles and each vessel's calibre in pixels) and the measured skeleton "
                                   "(yellow; junctions red, end points blue), the vessel probability (white: 1), "
                                   "the mask. Click one to enlarge it.", columns=3, height="auto", object_fit="contain",
                             elem_id="results")
        measurements = gr.Dataframe(label="Measurements (docs/measurements.md; every column in measurements.csv); "
                                          "seconds: the time the photograph took", headers=["photograph", "seconds",
                                                                                            *SHOWN],
                                    interactive=False, elem_id="measurements")
        files = gr.File(label="Downloads: masks, probability maps, overlays, measurements.csv", file_count="multiple",
                        interactive=False, elem_id="downloads")
        if card:
            with gr.Accordion("Model card", open=False, elem_id="model-card"):
                gr.Markdown(card)
        run.click(segmenter.segment, [photos, masks, tta, av], [gallery, measurements, files, status, photos, masks],
                  api_name="segment", concurrency_limit=1)
    return page.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)


def users(args):
    """The (user, password) pairs of --auth and --auth-file; None when neither is given."""
    entries = [(entry, "--auth") for entry in args.auth or []]
    if args.auth_file:
        try:
            with open(args.auth_file, encoding="utf-8") as f:
                entries += [(line.strip(), f"'{args.auth_file}'") for line in f
                            if line.strip() and not line.lstrip().startswith("#")]
        except OSError as e:
            raise UserError(f"--auth-file '{args.auth_file}': {e.strerror or e}") from None
    pairs = []
    for entry, source in entries:
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise UserError(f"{source}: '{entry.split(':')[0]}...' is not USER:PASSWORD")
        pairs.append((user, password))
    if (args.auth_file or args.auth) and not pairs:
        raise UserError(f"--auth-file '{args.auth_file}' names no USER:PASSWORD")
    return pairs or None


def main(args):
    start = time.perf_counter()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a stop (kill, a Space's restart) deletes the files too
    gr = gradio()
    auth = users(args)
    segmenter = Segmenter(args)
    page = build_page(segmenter)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # the system's fonts: nothing fetched
    _, url, _ = page.launch(server_name=args.host, server_port=args.port, auth=auth, root_path=args.root_path,
                            prevent_thread_lock=True, quiet=True, share=False, max_file_size=MAX_UPLOAD,
                            theme=theme, footer_links=["api", "settings"], ssr_mode=False, mcp_server=False)
    print(f"model {segmenter.describe()} on {segmenter.net.device.type}")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not auth:
        print(f"note: listening on {args.host} without --auth: anyone who reaches this port can use the page")
    print(f"the page is at {url} (ready in {time.perf_counter() - start:.1f} s; Ctrl+C stops it)", flush=True)
    try:
        page.block_thread()
    finally:
        page.close()


if __name__ == "__main__":
    run_cli(main, cli_args, debug=cli_args.debug)
