"""Every script's command line: its flags, their help and defaults, and its example commands, built without
importing torch, so that ``--help`` and a mistyped flag are answered at once.

A script parses its arguments with these parsers first, then re-executes itself
with a fast allocator (train_utils/allocator.py) and only then loads torch.
The same idea has the same flag in every script: ``--weights`` a checkpoint,
``--output-dir`` a folder, ``--output`` a file, ``--dataset`` a file layout,
``--tta`` flip averaging, ``--tile-size`` tiled prediction, ``--amp`` mixed
precision. Older spellings (``--save_best``, ``--eval-tta``) are still
accepted, but not shown.

``python -m train_utils.cli --write-flag-reference docs/training.md`` rewrites
the flag tables of docs/training.md from train.py's and train_multi_GPU.py's
parsers (``flag_reference``).
"""
import argparse
import ast
import importlib.util
import os

import src

from .errors import UserError, run_cli
from .files import atomic_write
from .settings import CROP_SIZE, DEMO, FOV_MODES, RECIPES, TUTORIAL, Flag, default_text, shown_default

# export.py's formats (and the suffix predict.py recognises each by) and its ONNX opset.
EXPORT_FORMATS = {"onnx": ".onnx", "pt2": ".pt2", "pth": ".pth"}
ONNX_OPSET = 18
# The model shipped in the repository (docs/model_card.md), found wherever the scripts are run from.
SHIPPED_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights",
                               "unet_vessels.pth")
SHIPPED_AV_WEIGHTS = os.path.join(os.path.dirname(SHIPPED_WEIGHTS), "unet_av.pth")  # arteries and veins
# Where predict.py and export.py look for weights without --weights: what train.py writes by default, then
# what train.py --demo writes, then the shipped model.
DEFAULT_WEIGHTS = tuple(os.path.join(d, "best_model.pth") for d in (TUTORIAL["output_dir"], DEMO["output_dir"]))
PREDICTIONS_DIR = "predictions"
MEASUREMENTS_DIR, MEASUREMENTS_CSV = "measurements", "measurements.csv"
EXTRAS_INSTALL = "pip install -r requirements-extras.txt"
# Masks are measured resized so that their FOV is this many pixels across (--measure-diameter; 0: as they are):
# the shipped model's smallest working scale (its --fov-diameter), so every camera's masks are measured alike.
MEASURE_DIAMETER = 700
# app.py's page: where it listens (this machine only, unless asked), and the largest photograph it takes. 25
# megapixels hold every fundus camera's photograph (HRF's 3504 x 2336 are 8.2; a DSLR-based camera's 6000 x 4000
# are 24); a 24-megapixel one takes the page about 1 GB above the 1 GB it holds at rest, so 48 would take 2. The
# shipped model sees a 700-pixel FOV: more pixels add time and memory, not vessels it can find. predict.py takes
# any size.
APP_HOST, APP_PORT, APP_MAX_MEGAPIXELS = "127.0.0.1", 7860, 25.0
APP_KEEP_UPLOADS_S = 300.0  # a request queued behind one with the same upload starts well within this
REFERENCE_BEGIN, REFERENCE_END = "<!-- flag-reference: begin -->", "<!-- flag-reference: end -->"


def dataset_names():
    """The names of ``my_dataset.DATASETS``, read from my_dataset.py's source without running it: importing
    my_dataset loads torch (its Dataset classes), which ``--help`` does not wait for."""
    path = importlib.util.find_spec("my_dataset").origin
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["DATASETS"]:
            return tuple(ast.literal_eval(key) for key in node.value.keys)
    raise RuntimeError(f"no DATASETS = {{...}} in {path}")


def examples(doc):
    """``examples:`` and the example commands of a script's docstring (its lines starting with ``python`` or
    ``torchrun``, and their continuation lines), for the end of ``--help``."""
    lines, continued = [], False
    for line in (doc or "").splitlines():
        if continued or line.strip().startswith(("python ", "torchrun ")):
            lines.append("  " + line.strip() if not continued else "      " + line.strip())
            continued = line.rstrip().endswith("\\")
    return "examples:\n" + "\n".join(lines) if lines else None


def new_parser(description, doc=None, add_help=True, **kw):
    """A parser whose ``--help`` keeps the description's line breaks and ends with ``doc``'s examples."""
    return argparse.ArgumentParser(description=description, epilog=examples(doc), add_help=add_help,
                                   formatter_class=argparse.RawDescriptionHelpFormatter, **kw)


def parse_args(parser, argv=None):
    """What was typed: flags left out are absent (their values come from ``resolve_settings``)."""
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------
# train.py and train_multi_GPU.py


def train_parser(add_help=True, doc=None):
    """train.py's flags, grouped as the run's steps; a flag left out takes its value from the settings' layers."""
    parser = new_parser("PyTorch U-Net training on DRIVE. A flag left out takes the value --recipe, --demo, the "
                        "dataset\nor the --resume checkpoint gives it, else the tutorial's default shown here "
                        "(train_utils/settings.py).", doc, add_help, argument_default=argparse.SUPPRESS)
    parser.flag_groups = []  # (Flag of each group), in --help's order: the flag reference of docs/training.md
    for title, add in (("data", _data_flags), ("model", _model_flags), ("optimisation", _optimisation_flags),
                       ("recipe and augmentation", _recipe_flags), ("evaluation", _evaluation_flags),
                       ("output", _output_flags)):
        parser.flag_groups.append(Flag(parser.add_argument_group(title), title))
        add(parser.flag_groups[-1])
    return parser


def _data_flags(data):
    data("--data-path", dest="data_path", metavar="PATH", nargs="+", help="drive: the folder that holds DRIVE/; "
         "other datasets: the folder their archive unpacks to (see my_dataset.py); one per --dataset")
    data("--dataset", dest="dataset", choices=dataset_names(), nargs="+", metavar="NAME",
         help=f"file layout and split of --data-path ({', '.join(dataset_names())}); several train one model "
              "on all of them, each drawn equally often")
    data("--val-split", dest="val_split", type=int, metavar="N", nargs="+",
         help="validate (and pick best_model.pth) on N held-out training images instead of the test split, "
              "which only --test-only then reads; with several datasets N of each, or one N per dataset")
    data("--val-seed", dest="val_seed", type=int, metavar="N", help="seed of --val-split's choice of images")
    data("--val-images", dest="val_images", nargs="+", metavar="NAME",
         help="validate on these training images (file names), instead of --val-split's seeded choice")
    data("--fov", dest="fov", choices=FOV_MODES, help="field of view of images without a FOV mask: estimate it "
         "from the dark border as predict.py does, or count all pixels")
    data("--num-classes", dest="num_classes", type=int, metavar="N",
         help="foreground classes (background excluded)")
    data("--fov-diameter", dest="fov_diameter", type=int, metavar="PX",
         help="resize every photograph so that its field of view is PX pixels across (training, validation "
              "and predict.py; scores and masks stay at the photograph's size); 0: each at its own size")
    data("--fov-diameter-max", dest="fov_diameter_max", type=int, metavar="PX",
         help="with --fov-diameter: photographs whose field of view is wider keep their own scale up to PX "
              "pixels across (a high-resolution camera's fine vessels stay wide enough to see); 0: every "
              "photograph at --fov-diameter")
    data("--data-on-device", dest="data_on_device", action=argparse.BooleanOptionalAction,
         help="keep the training images in the device's memory and make each batch there: the random resize, "
              "rotation, flips and crop of its crops in one batched resample (crop-first, as --crop-first), "
              "no loader workers; the same crops as --crop-first for a seed. The validation images are "
              "preprocessed once and kept there too")
    data("--base-size", dest="base_size", type=int, metavar="PX", help="random resize of the shorter side to "
         "--scale-range x this (default: the dataset's; drive 565, else the median shorter side of the training "
         "images; 0, the default with --fov-diameter: each image's own shorter side at its working scale)")
    data("--crop-size", dest="crop_size", type=int, metavar="PX",
         help=f"training crop in pixels (default: {CROP_SIZE}, or --base-size if smaller)")
    data("--scale-range", dest="scale_range", type=float, nargs=2, metavar=("MIN", "MAX"),
         help="training images are resized by a random factor in [MIN, MAX] of --base-size")
    data("--mean", dest="mean", type=float, nargs=3, metavar=("R", "G", "B"), help="input normalisation "
         "(default: the dataset's, from compute_mean_std.py; ImageNet's with --pretrained-backbone)")
    data("--std", dest="std", type=float, nargs=3, metavar=("R", "G", "B"), help="as --mean")
    data("-j", "--workers", dest="workers", type=int, metavar="N",
         help="data-loading worker processes (default: 0 on the CPU, else min(cpus, batch size, 8))")


def _model_flags(model):
    model("--model", dest="model", choices=src.MODEL_NAMES, help="network (src.MODELS)")
    model("--base-c", dest="base_c", type=int, metavar="N",
          help="U-Net width: channels of the first stage (--recipe fast: 32 with AMP, else 16)")
    model("--pretrained-backbone", dest="pretrained_backbone", metavar="PATH",
          help="local torchvision ImageNet weight file for the vgg16/mobilenet encoder")
    model("--init-weights", dest="init_weights", metavar="PATH",
          help="start from the weights of a checkpoint or exported .pth of the same --model/--base-c; a vessel "
          "model's vessel output starts every class (an artery/vein model from weights/unet_vessels.pth)")
    model("--channels-last", dest="channels_last", action=argparse.BooleanOptionalAction,
          aliases=("--channels_last",), help="NHWC memory format for training (default: on CUDA, and on the CPU "
          "with bfloat16 AMP); validation uses it unless --no-channels-last")
    model("--compile", dest="compile", action="store_true", help="torch.compile the model")


def _optimisation_flags(opt):
    opt("--device", dest="device", help="cpu, cuda or cuda:N (default: cuda if present, else cpu)")
    opt("-b", "--batch-size", dest="batch_size", type=int, metavar="N",
        help="images per step (per process under DDP)")
    opt("--epochs", dest="epochs", type=int, metavar="N", help="number of total epochs to train")
    opt("--start-epoch", dest="start_epoch", type=int, metavar="N", aliases=("--start_epoch",),
        help="first epoch (--resume continues from its checkpoint's)")
    opt("--stop-epoch", dest="stop_epoch", type=int, metavar="N", help="stop after epoch N of the --epochs "
        "schedule (e.g. a time-limited job); --resume checkpoint.pth continues it")
    opt("--opt", dest="opt", choices=["sgd", "adamw"], help="optimiser (sgd uses --momentum)")
    opt("--lr", dest="lr", type=float, help="initial learning rate")
    opt("--momentum", dest="momentum", type=float, help="SGD momentum")
    opt("--wd", "--weight-decay", dest="weight_decay", type=float, metavar="WD", help="weight decay")
    opt("--lr-schedule", dest="lr_schedule", choices=["poly", "cosine"],
        help="per-step decay after the 1-epoch warm-up: (1 - progress) ** 0.9 or cosine to 0")
    opt("--amp", dest="amp", action=argparse.BooleanOptionalAction, help="mixed precision: float16 on CUDA, "
        "bfloat16 on the CPU (--recipe fast: where it is faster, CUDA and CPUs with bfloat16 hardware)")
    opt("--amp-dtype", dest="amp_dtype", choices=["float16", "bfloat16"], help="with --amp: the autocast dtype")
    opt("--seed", dest="seed", type=int, help="seed every random generator")
    opt("--deterministic", dest="deterministic", action="store_true", help="use deterministic algorithms only")


def _recipe_flags(recipe):
    recipe("--recipe", dest="recipe", choices=sorted(RECIPES), help="tutorial: the tutorial's run; fast: AdamW + "
           "cosine, 4 crops of 256 per image in batches of 4, rotation and colour jitter, AMP where it is faster "
           "(then base_c 32, else 16), flip-averaged validation every 10 epochs, 50 epochs")
    recipe("--crops-per-image", dest="crops_per_image", type=int, metavar="N",
           help="random crops of every training image per epoch")
    recipe("--rotate", dest="rotate", type=float, metavar="DEG",
           help="random rotation in [-DEG, DEG] degrees (with the resize, flips and crop, sampled crop-first)")
    recipe("--crop-first", dest="crop_first", action=argparse.BooleanOptionalAction,
           help="sample the random resize, rotation, flips and crop as one resample of the crop (default: with "
                "--rotate); --no-crop-first transforms the whole image one step after another")
    recipe("--color-jitter", dest="color_jitter", type=float, metavar="S",
           help="random brightness and contrast in [1-S, 1+S], gamma in [exp(-S), exp(S)]")
    recipe("--noise", dest="noise", type=float, metavar="S",
           help="add Gaussian noise of a standard deviation drawn from [0, S] (image in 0..1) to half the "
                "training crops: photographs from noisier cameras than the training ones")
    recipe("--skeleton-recall", dest="skeleton_recall", type=float, metavar="W",
           help="add W x the skeleton recall loss to the tutorial's criterion: 1 - the share of the label's "
                "centreline the vessel probability covers, which weighs thin vessels as much as wide ones")
    recipe("--demo", dest="demo", action="store_true",
           help="write a small synthetic DRIVE-format sample (if absent) and train on it on the CPU")


def _evaluation_flags(evaluation):
    evaluation("--tta", dest="eval_tta", action=argparse.BooleanOptionalAction, aliases=("--eval-tta",),
               help="validate on the softmax averaged over the image and its two flips (as predict.py --tta)")
    evaluation("--eval-every", dest="eval_every", type=int, metavar="N",
               help="validate every N epochs (and always after the last one)")
    evaluation("--tile-size", dest="val_tile_size", type=int, metavar="PX", aliases=("--val-tile-size",),
               help="validation images larger than this are predicted in tiles, as predict.py does (0: never)")
    evaluation("--val-batch-size", dest="val_batch_size", type=int, metavar="N",
               help="validation images per forward pass, images of one size together (the scores are the same "
                    "for any N; a GPU is busier with several)")
    evaluation("--test-only", dest="test_only", action="store_true",
               help="only evaluate the weights of --resume (or --weights) on the test split")


def _output_flags(output):
    output("--output-dir", dest="output_dir", metavar="DIR", help="checkpoints, logs and pictures go here")
    output("--resume", "--weights", dest="resume", metavar="PATH", help="checkpoint to continue training from; "
           "with --test-only, the weights to evaluate (--weights, as predict.py names it)")
    output("--save-best", dest="save_best", action=argparse.BooleanOptionalAction, aliases=("--save_best",),
           help="keep best_model.pth (best validation dice); --no-save-best keeps model_N.pth of every epoch")
    output("--print-freq", dest="print_freq", type=int, metavar="N", help="print every N steps")
    output("--plots", dest="plots", action=argparse.BooleanOptionalAction,
           help="write curves.png after every epoch and val_preview.png for the best model")
    output("--tensorboard", dest="tensorboard", action="store_true", help="also log the metrics and the preview "
           "for TensorBoard in OUTPUT_DIR/tensorboard (needs: pip install tensorboard)")
    output("--debug", dest="debug", action="store_true", help="show tracebacks")


def train_multi_gpu_parser(add_help=True, doc=None):
    """train_multi_GPU.py's flags: train.py's and the distributed ones."""
    parser = new_parser("PyTorch U-Net DDP training on DRIVE (under torchrun); train.py's flags and the distributed "
                        "ones.", doc, add_help, parents=[train_parser(add_help=False)],
                        argument_default=argparse.SUPPRESS)
    flag = Flag(parser.add_argument_group("distributed"), "distributed")
    parser.flag_groups = [flag]
    flag("--sync-bn", dest="sync_bn", action="store_true", aliases=("--sync_bn",),
         help="synchronise BatchNorm statistics across processes")
    flag("--world-size", dest="world_size", type=int, metavar="N", aliases=("--world_size",),
         help="kept for the original's command lines: torchrun's WORLD_SIZE decides")
    flag("--dist-url", dest="dist_url", metavar="URL", aliases=("--dist_url",),
         help="url used to set up the process group")
    flag("--dist-timeout", dest="dist_timeout", type=float, metavar="MIN",
         help="minutes a collective may wait for a lost process before the run fails")
    return parser


# ---------------------------------------------------------------------------
# predict.py, export.py, compute_mean_std.py, my_dataset.py


def _weights_flag(flag, what):
    flag("--weights", dest="weights", default=None, metavar="PATH", help=f"{what} (default: "
         f"{DEFAULT_WEIGHTS[0]}, else {DEFAULT_WEIGHTS[1]}, which train.py --demo writes, else the shipped "
         "model weights/unet_vessels.pth)")


def predict_parser(add_help=True, doc=None):
    parser = new_parser("Predict retinal vessel masks with a trained U-Net.", doc, add_help)
    flag = Flag(parser)
    _weights_flag(flag, "checkpoint written by train.py, or an .onnx model written by export.py (run with "
                        "onnxruntime on the CPU)")
    # Both names shown: argparse counts a required flag as given only under its own action, not a hidden alias's.
    flag("--img", "--input", dest="img", required=True, metavar="PATH",
         help="an image file (.tif/.png/.jpg/.gif/.bmp/.ppm/.pgm, also gzip-compressed as .ppm.gz) or a folder")
    flag("--roi-mask", dest="roi_mask", default=None, metavar="PATH", aliases=("--roi_mask",),
         help="FOV mask file, or a folder holding <stem>_mask.* (DRIVE: NN_test_mask.gif for NN_test.tif, HRF: "
              "NN_h_mask.tif for NN_h.jpg) or <stem>.* for every image (default: estimate the FOV from the image)")
    flag("--output-dir", dest="output_dir", default=PREDICTIONS_DIR, metavar="DIR",
         help="folder for <stem>.png (and <stem>_prob.png, <stem>_overlay.png) of every input")
    flag("--output", dest="output", default=None, metavar="FILE.png",
         help="one image's mask file instead (_prob.png, _overlay.png beside it); a folder means --output-dir")
    flag("--save-prob", dest="save_prob", action="store_true", aliases=("--save_prob",),
         help="also write <stem>_prob.png: foreground probability as 0..255")
    flag("--overlay", dest="overlay", action="store_true",
         help="also write <stem>_overlay.png: the prediction drawn over the photograph")
    flag("--device", dest="device", default=None, help="cpu, cuda or cuda:N (default: cuda if present, else cpu)")
    flag("--amp", dest="amp", default=False, action=argparse.BooleanOptionalAction,
         help="mixed precision: float16 on CUDA, bfloat16 on the CPU")
    flag("--amp-dtype", dest="amp_dtype", default=None, choices=["float16", "bfloat16"],
         help="with --amp: the autocast dtype")
    flag("--tta", dest="tta", default=None, action=argparse.BooleanOptionalAction,
         help="average the softmax over the image and its horizontal and vertical flips (default: as the "
              "checkpoint's training validated, i.e. on for --recipe fast)")
    flag("--threshold", dest="threshold", default=None, type=float, metavar="P",
         help="vessel where its probability (1 - P(background)) exceeds P (default: the model's own, which "
              "export.py --threshold stores; else the more likely class)")
    flag("-b", "--batch-size", dest="batch_size", default=1, type=int, metavar="N",
         help="tiles (or whole images of the same size at the model's scale) per forward pass")
    flag("-j", "--workers", dest="workers", default=None, type=int, metavar="N",
         help="threads that read photographs ahead of the network (and one that writes the outputs behind it); "
              "0: one thing at a time (default: 0 when the model runs on the CPU, whose cores the network keeps "
              "busy, else 1)")
    flag("--tile-size", dest="tile_size", default=TUTORIAL["val_tile_size"], type=int, metavar="PX",
         help="images larger than this (either side) are predicted in tiles of this size, rounded down to a "
              "multiple of 16 (32 for the backbone models); 0: never tile")
    flag("--tile-overlap", dest="tile_overlap", default=128, type=int, metavar="PX",
         help="overlap between neighbouring tiles, blended with a raised-cosine ramp")
    flag("--channels-last", dest="channels_last", default=True, action=argparse.BooleanOptionalAction,
         aliases=("--channels_last",), help="NHWC memory format (faster convolutions)")
    flag("--av", dest="av", action="store_true",
         help="arteries and veins: also write <stem>_av.png, each pixel's class (0 background, 1 artery, 2 vein) "
              "as a palette PNG (red artery, blue vein); --overlay draws them so, --save-prob adds "
              "<stem>_artery_prob.png and <stem>_vein_prob.png, --measure adds artery_ and vein_ columns, the optic "
              "disc, CRAE, CRVE and AVR "
              "(default weights: the shipped artery/vein model weights/unet_av.pth)")
    flag("--measure", dest="measure", action="store_true",
         help=f"also measure each mask (vessel density, width, tortuosity, fractal dimension, the skeleton's "
              f"segments, junctions and end points) into {MEASUREMENTS_CSV} beside the masks, one row per "
              f"photograph; with --overlay, the skeleton is drawn too (needs: {EXTRAS_INSTALL})")
    _measurement_flags(flag)
    flag("--debug", dest="debug", action="store_true", help="show tracebacks")
    return parser


def _measurement_flags(flag):
    """How masks are measured (predict.py --measure, measure.py): the scale, and micrometres."""
    flag("--measure-diameter", dest="measure_diameter", default=MEASURE_DIAMETER, type=int, metavar="PX",
         help="with the measurements: measure each mask resized so that its FOV is PX pixels across, so that "
              "photographs of every resolution are measured alike (0: at its own size)")
    flag("--pixel-size", dest="pixel_size", default=None, type=float, metavar="UM",
         help="with the measurements: micrometres a pixel, to add the _um columns")
    flag("--fov-angle", dest="fov_angle", default=None, type=float, metavar="DEG",
         help="with the measurements: the degrees the FOV spans (DRIVE, HRF: 45; CHASE_DB1: 30; STARE: 35), to "
              "add the _um columns at 288 um of retina a degree")


def measure_parser(add_help=True, doc=None):
    """measure.py's flags: masks that already exist, measured as predict.py --measure measures its own."""
    parser = new_parser("Measure vessel masks: density, width, tortuosity, fractal dimension and the skeleton's "
                        "graph, per image, inside its field of view.", doc, add_help)
    flag = Flag(parser)
    flag("--masks", dest="masks", required=True, metavar="PATH",
         help="a vessel mask (0/255 or 0/1, as predict.py writes them or as manual labels are) or a folder of them "
              "(<stem>_prob.* and <stem>_overlay.* skipped)")
    flag("--roi-mask", dest="roi_mask", default=None, metavar="PATH", aliases=("--roi_mask",),
         help="FOV mask file, or a folder holding <stem>_mask.* or <stem>.* as predict.py looks (also one whose "
              "stem begins the mask's, and for NN_... the only NN_...: 36_test_mask.gif for 36_manual1.gif)")
    flag("--img", dest="img", default=None, metavar="PATH",
         help="the photographs (file or folder, matched as --roi-mask): without --roi-mask the FOV is estimated "
              "from them as predict.py estimates it; with --overlay they are drawn under the skeleton")
    flag("--output-dir", dest="output_dir", default=MEASUREMENTS_DIR, metavar="DIR",
         help=f"folder for {MEASUREMENTS_CSV} (and <stem>_overlay.png)")
    flag("--overlay", dest="overlay", action="store_true",
         help="also write <stem>_overlay.png: the mask, its skeleton, junctions and end points")
    flag("--av", dest="av", action="store_true",
         help="the masks are artery/vein maps (predict.py --av's <stem>_av.png; in a folder holding them, only "
              "those) or labels (class indices 0 background, 1 artery, 2 vein, 3 uncertain, or red artery, blue "
              "vein, green crossing, white uncertain): the arteries and veins are measured apart too")
    _measurement_flags(flag)
    flag("--debug", dest="debug", action="store_true", help="show tracebacks")
    return parser


def app_parser(add_help=True, doc=None):
    """app.py's flags: the model, where the page listens, who may open it, and what it takes."""
    parser = new_parser("A web page on this machine: drop fundus photographs (and their FOV masks), see their "
                        "vessels, measurements\nand times, download the masks, probability maps and measurements.csv.",
                        doc, add_help)
    flag = Flag(parser)
    _weights_flag(flag, "checkpoint written by train.py, or an .onnx model written by export.py, as predict.py "
                        "takes")
    flag("--av-weights", dest="av_weights", default=None, metavar="PATH",
         help="the artery/vein model the page offers beside the vessels' (default: the shipped "
              "weights/unet_av.pth; '' none)")
    flag("--keep-uploads", dest="keep_uploads", default=APP_KEEP_UPLOADS_S, type=float, metavar="S",
         help="seconds an upload stays on the server after the last request that used it (visitors who send "
              "the same file share it)")
    flag("--host", dest="host", default=os.environ.get("GRADIO_SERVER_NAME", APP_HOST), metavar="ADDRESS",
         help=f"address to listen on: {APP_HOST} is this machine only; 0.0.0.0 every network interface, e.g. a "
              "lab's server (then give --auth); $GRADIO_SERVER_NAME when set, as Hugging Face Spaces set it")
    flag("--port", dest="port", default=int(os.environ.get("GRADIO_SERVER_PORT", APP_PORT)), type=int, metavar="N",
         help="port to listen on ($GRADIO_SERVER_PORT when set)")
    flag("--auth", dest="auth", action="append", default=None, metavar="USER:PASSWORD",
         help="ask for this user name and password before the page opens; repeat for more users")
    flag("--auth-file", dest="auth_file", default=None, metavar="FILE",
         help="users and passwords from FILE, one USER:PASSWORD a line (# comments), kept off the command line")
    flag("--root-path", dest="root_path", default=None, metavar="PATH",
         help="the page's path behind a reverse proxy that serves it under a sub-path, e.g. /vessels")
    flag("--device", dest="device", default=None, help="cpu, cuda or cuda:N (default: cuda if present, else cpu)")
    flag("--tile-size", dest="tile_size", default=TUTORIAL["val_tile_size"], type=int, metavar="PX",
         help="photographs larger than this at the model's scale are predicted in tiles, as predict.py does")
    flag("--max-megapixels", dest="max_megapixels", default=APP_MAX_MEGAPIXELS, type=float, metavar="MP",
         help="refuse larger photographs, before decoding them (predict.py takes any size)")
    flag("--debug", dest="debug", action="store_true", help="show tracebacks (on the console; the page shows one line)")
    return parser


def export_parser(add_help=True, doc=None):
    parser = new_parser("Export a trained U-Net to ONNX or torch.export (.pt2).", doc, add_help)
    flag = Flag(parser)
    _weights_flag(flag, "checkpoint written by train.py")
    flag("--format", dest="format", choices=sorted(EXPORT_FORMATS), default=None,
         help="onnx (onnxruntime, no PyTorch needed), pt2 (torch.export.load) or pth (a checkpoint holding only "
              "the model, stored in float16: half the size, what weights/ ships) (default: from the --output suffix)")
    flag("--output", dest="output", default=None, metavar="FILE", help="file to write, ending in .onnx, .pt2 or .pth "
         "(default: the checkpoint's name with the format's suffix)")
    flag("--opset", dest="opset", default=ONNX_OPSET, type=int, metavar="N", help="ONNX opset version")
    flag("--threshold", dest="threshold", default=None, type=float, metavar="P",
         help="store the decision threshold predict.py applies to this model's vessel probability (default: "
              "the checkpoint's own, if any; else none: the more likely class)")
    flag("--check", dest="check", default=True, action=argparse.BooleanOptionalAction,
         help="run the exported model on an odd-sized input and compare it with PyTorch before writing (ONNX: "
              "when onnxruntime is installed)")
    flag("--debug", dest="debug", action="store_true", help="show tracebacks")
    return parser


def compute_mean_std_parser(add_help=True, doc=None):
    parser = new_parser("Per-channel mean/std of a dataset's images inside the FOV.", doc, add_help)
    flag = Flag(parser)
    flag("--data-path", dest="data_path", default=TUTORIAL["data_path"], metavar="PATH",
         help="folder that holds DRIVE/, or the folder another dataset's archive unpacks to (as train.py reads it)")
    flag("--dataset", dest="dataset", default=TUTORIAL["dataset"], choices=dataset_names(),
         help="file layout of --data-path")
    flag("--fov", dest="fov", default=TUTORIAL["fov"], choices=FOV_MODES,
         help="images without a FOV mask: estimate the FOV from the dark border, or use all pixels")
    flag("--split", dest="split", default="training", choices=("training", "test"), help="which split to measure")
    flag("--debug", dest="debug", action="store_true", help="show tracebacks")
    return parser


def synthetic_parser(add_help=True, doc=None):
    """``python my_dataset.py`` and ``python -m train_utils.synthetic``: write synthetic data."""
    parser = new_parser("Write synthetic fundus data in a dataset's file layout.", doc, add_help)
    flag = Flag(parser)
    flag("--output-dir", dest="output_dir", default="data/synthetic", metavar="DIR", aliases=("--out",),
         help="root folder; drive writes DRIVE/ inside it")
    flag("--dataset", dest="dataset", default="drive", choices=dataset_names(), aliases=("--layout",),
         help="whose file names, formats and splits")
    flag("--num-train", dest="num_train", default=20, type=int, metavar="N", help="training images")
    flag("--num-test", dest="num_test", default=20, type=int, metavar="N", help="test images")
    flag("--height", dest="height", default=584, type=int, metavar="PX", help="image height, at least 32")
    flag("--width", dest="width", default=565, type=int, metavar="PX", help="image width, at least 32")
    flag("--seed", dest="seed", default=0, type=int, help="the same seed writes the same files")
    flag("--num-classes", dest="num_classes", default=1, type=int, metavar="N",
         help="folder: 2 adds the optic disc as a second class, in palette labels")
    flag("--no-masks", dest="masks", action="store_false",
         help="folder: no masks/ folder, so the FOV is estimated (default: masks written)")
    return parser


def synthetic_main(doc=None):
    """The synthetic-data writer's command line: the flags are checked before its modules (and torch) load."""
    args = synthetic_parser(doc=doc).parse_args()
    from .synthetic import main
    return run_cli(main, args)


def weights_or_default(weights, av=False):
    """``--weights``, or the first of ``DEFAULT_WEIGHTS`` that exists, else the shipped model (saying which);
    one error line if the shipped file is missing too. ``av`` (predict.py --av): the shipped artery/vein model."""
    if weights:
        return weights
    if av:
        if not os.path.isfile(SHIPPED_AV_WEIGHTS):
            raise UserError(f"no --weights given and the shipped artery/vein model '{SHIPPED_AV_WEIGHTS}' is "
                            "missing: restore it (git checkout -- weights) or pass --weights PATH")
        print(f"no --weights given: using the shipped artery/vein model '{os.path.relpath(SHIPPED_AV_WEIGHTS)}' "
              "(docs/model_card.md)")
        return SHIPPED_AV_WEIGHTS
    for path in DEFAULT_WEIGHTS:
        if os.path.isfile(path):
            print(f"no --weights given: using '{path}'")
            return path
    if not os.path.isfile(SHIPPED_WEIGHTS):
        raise UserError(f"no --weights given, neither {' nor '.join(DEFAULT_WEIGHTS)} exists, and the shipped model "
                        f"'{SHIPPED_WEIGHTS}' is missing: restore it (git checkout -- weights), train "
                        "(python train.py --demo) or pass --weights PATH")
    print(f"no --weights given: using the shipped model '{os.path.relpath(SHIPPED_WEIGHTS)}' "
          "(trained on DRIVE, CHASE_DB1, STARE and HRF; docs/model_card.md)")
    return SHIPPED_WEIGHTS


# ---------------------------------------------------------------------------
# the flag reference of docs/training.md


def invocation(action):
    """A flag's spellings with its value, as ``--help`` shows them: ``-b N, --batch-size N``, ``--amp, --no-amp``,
    ``--scale-range LO HI``, ``--model {unet,vgg16}``."""
    if action.nargs == 0:
        return ", ".join(action.option_strings)
    metavar = action.metavar or ("{" + ",".join(map(str, action.choices)) + "}" if action.choices
                                 else action.dest.upper())
    if isinstance(metavar, tuple):
        value = " ".join(metavar)
    elif action.nargs == "+":
        value = f"{metavar} [{metavar} ...]"
    elif action.nargs == "*":
        value = f"[{metavar} ...]"
    elif action.nargs == "?":
        value = f"[{metavar}]"
    elif isinstance(action.nargs, int):
        value = " ".join([metavar] * action.nargs)
    else:
        value = metavar
    return ", ".join(f"{name} {value}" for name in action.option_strings)


def _table(flag):
    """A Markdown table of one group's flags (a ``Flag``; older spellings left out): flag, default, help."""
    rows = ["| flag | default | what it does |", "| --- | --- | --- |"]
    for action in flag.actions:
        names = invocation(action).split(", ")
        default = TUTORIAL.get(action.dest)
        help_text = action.help.removesuffix(default_text(default))  # the default has its own column
        cells = (", ".join(f"`{n}`" for n in names), f"`{shown_default(default)}`" if default_text(default) else "",
                 help_text.replace("|", "\\|").replace("<", "&lt;"))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def flag_reference():
    """The Markdown of docs/training.md's flag reference: train.py's flag groups, then train_multi_GPU.py's own."""
    parts = ["<!-- generated from the parsers by python -m train_utils.cli --write-flag-reference "
             "docs/training.md: edit train_utils/cli.py, not this -->"]
    for flag in train_parser().flag_groups:
        parts += [f"### {flag.title}", _table(flag)]
    for flag in train_multi_gpu_parser().flag_groups:
        parts += [f"### {flag.title} (train_multi_GPU.py)", _table(flag)]
    return "\n\n".join(parts) + "\n"


def write_flag_reference(path):
    """Replace what lies between the flag-reference markers of ``path`` with ``flag_reference()``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if REFERENCE_BEGIN not in text or REFERENCE_END not in text:
        raise UserError(f"'{path}' has no {REFERENCE_BEGIN} ... {REFERENCE_END} section to fill")
    head, rest = text.split(REFERENCE_BEGIN, 1)
    tail = rest.split(REFERENCE_END, 1)[1]

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"{head}{REFERENCE_BEGIN}\n{flag_reference()}{REFERENCE_END}{tail}")

    atomic_write(path, write, suffix=".md")  # the docs page whole or not at all


if __name__ == "__main__":
    reference = argparse.ArgumentParser(description="Rewrite the flag reference of a Markdown file from the parsers")
    reference.add_argument("--write-flag-reference", required=True, metavar="FILE",
                           help="the file whose flag-reference section to rewrite, e.g. docs/training.md")
    run_cli(write_flag_reference, reference.parse_args().write_flag_reference)
