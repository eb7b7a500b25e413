"""The scripts' command lines: one flag per idea, hidden older spellings, help with defaults and examples,
answered without loading torch; the progress line, predict.py's quick-start defaults and the flag reference."""
import argparse
import os
import re
import shutil
import subprocess
import sys

import pytest

import predict
import train
from tests.conftest import ROOT, TINY_TRAIN
from tests.test_predict import spread_unet, write_checkpoint
from train_utils import cli, prediction
from train_utils.errors import UserError
from train_utils.synthetic import write_synthetic_drive

# Each entry point: (command, its parser, the arguments it needs, a mistyped value).
SCRIPTS = {
    "train.py": (["train.py"], cli.train_parser, [], ["--epochs", "x"]),
    "train_multi_GPU.py": (["train_multi_GPU.py"], cli.train_multi_gpu_parser, [], ["--world-size", "x"]),
    "predict.py": (["predict.py"], cli.predict_parser, ["--img", "x.png"], ["-b", "x"]),
    "export.py": (["export.py"], cli.export_parser, [], ["--format", "x"]),
    "app.py": (["app.py"], cli.app_parser, [], ["--port", "x"]),
    "compute_mean_std.py": (["compute_mean_std.py"], cli.compute_mean_std_parser, [], ["--split", "x"]),
    "my_dataset.py": (["my_dataset.py"], cli.synthetic_parser, [], ["--num-train", "x"]),
    "synthetic": (["-m", "train_utils.synthetic"], cli.synthetic_parser, [], ["--dataset", "x"]),
}
# The older spellings each script still accepts without showing them.
HIDDEN = {
    "train.py": {"--channels_last", "--no-channels_last", "--start_epoch", "--eval-tta", "--no-eval-tta",
                 "--val-tile-size", "--save_best", "--no-save_best"},
    "predict.py": {"--roi_mask", "--save_prob", "--channels_last", "--no-channels_last"},
    "export.py": set(),
    "app.py": set(),
    "compute_mean_std.py": set(),
    "my_dataset.py": {"--out", "--layout"},
}
HIDDEN["train_multi_GPU.py"] = HIDDEN["train.py"] | {"--sync_bn", "--world_size", "--dist_url"}
HIDDEN["synthetic"] = HIDDEN["my_dataset.py"]


def run_timed_imports(command, *args):
    """Run an entry point with ``-X importtime``: (CompletedProcess, names of the modules it imported)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-X", "importtime", *command, *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    imported = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    return r, imported


def help_entries(text):
    """{option line: its help text} of every option --help lists (help on the same line or the lines below)."""
    entries, current = {}, None
    for line in text.split("\nexamples:\n")[0].splitlines():
        m = re.match(r"^  (-\S.*?)(?:\s{2,}(\S.*))?$", line)
        if m:
            current = m.group(1)
            entries[current] = m.group(2) or ""
        elif current and re.match(r"^\s{4,}\S", line):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_and_argument_errors_need_no_torch(name):
    command, make_parser, _, mistyped = SCRIPTS[name]
    r, imported = run_timed_imports(command, "--help")
    assert r.returncode == 0, r.stderr
    assert "torch" not in imported and "numpy" not in imported, "--help loaded torch or numpy"
    flags_part = r.stdout.split("\nexamples:\n")[0]  # the examples may show other programs' flags (torchrun's)
    assert not re.search(r"--\w+_", flags_part), "an underscore spelling is shown"
    entries = help_entries(r.stdout)
    assert all(text.strip() for text in entries.values()), [k for k, v in entries.items() if not v.strip()]
    shown = {s for action in make_parser()._actions if action.help != argparse.SUPPRESS for s in action.option_strings}
    assert shown == {s.split()[0].rstrip(",") for entry in entries for s in entry.split(", ")}
    examples = r.stdout.split("\nexamples:\n")[1].splitlines()
    assert examples and all(re.match(r"^  (python|torchrun) |^      --", line) for line in examples)
    assert "(default: " in r.stdout

    r, imported = run_timed_imports(command, *mistyped)
    assert r.returncode == 2 and "torch" not in imported
    assert re.match(r"^\S+: error: argument .*invalid", r.stderr.splitlines()[-1]), r.stderr


def test_an_unknown_dataset_is_one_error_line_naming_the_choices():
    r, imported = run_timed_imports(["train.py"], "--dataset", "nosuch")
    assert r.returncode == 2 and "torch" not in imported
    assert r.stderr.splitlines()[-1] == ("train.py: error: argument --dataset: invalid choice: 'nosuch' (choose "
                                         "from 'drive', 'chase_db1', 'stare', 'hrf', 'folder', 'drive_av', 'hrf_av')")


def test_the_parsers_dataset_names_are_the_registry():
    from my_dataset import DATASETS
    assert cli.dataset_names() == tuple(DATASETS)


def test_the_parsers_load_without_torch():
    code = ("import sys\nfrom train_utils import cli\n"
            "for make in (cli.train_parser, cli.train_multi_gpu_parser, cli.predict_parser, cli.export_parser,\n"
            "             cli.compute_mean_std_parser, cli.synthetic_parser, cli.app_parser):\n"
            "    make().format_help()\n"
            "cli.flag_reference()\n"
            "import src; src.MODEL_NAMES\n"
            "print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def value_for(action):
    """A value the flag accepts (not its default), as typed."""
    if action.nargs == 0:
        return []
    value = str(action.choices[-1]) if action.choices else "2" if action.type in (int, float) else "x"
    return [value] * (action.nargs if isinstance(action.nargs, int) else 1)


@pytest.mark.parametrize("name", [n for n in SCRIPTS if n != "synthetic"])
def test_each_hidden_alias_parses_as_its_flag(name):
    _, make_parser, needed, _ = SCRIPTS[name]
    parser = make_parser()
    hidden = [a for a in parser._actions if a.help == argparse.SUPPRESS]
    assert {s for a in hidden for s in a.option_strings} == HIDDEN[name]
    for action in hidden:
        flag = next(a for a in parser._actions if a.dest == action.dest and a.help != argparse.SUPPRESS)
        for alias in action.option_strings:
            negative = alias.startswith("--no-")
            canonical = next(s for s in flag.option_strings if s.startswith("--") and s.startswith("--no-") == negative)
            typed = vars(parser.parse_args(needed + [alias] + value_for(action)))
            assert action.dest in typed
            assert typed == vars(parser.parse_args(needed + [canonical] + value_for(flag))), alias


def test_train_flags_keep_their_settings_names():
    args = train.parse_args(train.get_args_parser(), ["--tta", "--tile-size", "64", "--weights", "w.pth"])
    assert (args.eval_tta, args.val_tile_size, args.resume) == (True, 64, "w.pth")
    args = train.parse_args(train.get_args_parser(), ["--no-eval-tta", "--val-tile-size", "32"])
    assert (args.eval_tta, args.val_tile_size) == (False, 32)


# ---------------------------------------------------------------------------
# the progress line


def test_progress_line_counts_the_time_left_at_the_runs_pace(tmp_path):
    log = train.EpochLog(tmp_path, True, first_epoch=2, last_epoch=10, epochs=50)
    # 2 epochs (2 and 3) in 72 s: 6 more to the last epoch (9) at 36 s each
    assert log.progress(3, 72.0) == "epoch 4/50 done: 0:01:12 elapsed, about 0:03:36 left"
    assert log.progress(9, 3600) == "epoch 10/50 done: 1:00:00 elapsed, about 0:00:00 left"


def test_training_prints_the_progress_after_each_validated_epoch(drive_root, tmp_path, capsys):
    args = train.parse_args(train.get_args_parser(), [str(a) for a in (
        "--data-path", drive_root, "--output-dir", tmp_path, "--epochs", 3, "--eval-every", 2, "--no-plots",
        *TINY_TRAIN)])
    train.main(args)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if re.match(r"epoch \d+/\d+ done", ln)]
    assert [ln.split(":")[0] for ln in lines] == ["epoch 2/3 done", "epoch 3/3 done"]
    assert all(re.fullmatch(r"epoch \d/3 done: \d+:\d\d:\d\d elapsed, about \d+:\d\d:\d\d left", ln) for ln in lines)
    assert lines[-1].endswith("about 0:00:00 left")


# ---------------------------------------------------------------------------
# predict.py after train.py --demo


@pytest.fixture()
def quick_start(tmp_path, monkeypatch):
    """A folder laid out as after ``python train.py --demo`` (a tiny sample and a checkpoint), as the cwd."""
    write_synthetic_drive(str(tmp_path / "data" / "synthetic"), num_train=0, num_test=1, height=64, width=60)
    os.makedirs(tmp_path / "save_weights" / "demo")
    write_checkpoint(tmp_path / "save_weights" / "demo" / "best_model.pth", spread_unet(2), 1)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def predict_as_typed(*argv):
    predict.main(predict.get_args_parser().parse_args([str(a) for a in argv]))


def test_predict_as_typed_after_the_demo(quick_start, capsys):
    predict_as_typed("--img", "data/synthetic/DRIVE/test/images/01_test.tif", "--device", "cpu")
    assert "no --weights given: using 'save_weights/demo/best_model.pth'" in capsys.readouterr().out
    assert (quick_start / "predictions" / "01_test.png").is_file()
    # A full run's weights come first.
    shutil.copy(quick_start / "save_weights" / "demo" / "best_model.pth", quick_start / "save_weights")
    predict_as_typed("--img", "data/synthetic/DRIVE/test/images/01_test.tif", "--device", "cpu")
    assert "using 'save_weights/best_model.pth'" in capsys.readouterr().out


def test_predict_without_weights_or_shipped_model_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "SHIPPED_WEIGHTS", str(tmp_path / "weights" / "unet_vessels.pth"))
    write_synthetic_drive(str(tmp_path), num_train=0, num_test=1, height=64, width=60)
    with pytest.raises(UserError, match=r"no --weights given.*the shipped model '.*unet_vessels.pth' is missing: "
                                        r"restore it \(git checkout -- weights\), train \(python train.py --demo\) "
                                        r"or pass --weights PATH"):
        predict_as_typed("--img", tmp_path / "DRIVE" / "test" / "images" / "01_test.tif")


def test_predict_output_dir_output_file_and_the_older_output_folder(quick_start):
    image = "data/synthetic/DRIVE/test/images/01_test.tif"
    predict_as_typed("--img", image, "--output-dir", "dir", "--device", "cpu")
    predict_as_typed("--img", image, "--output", "one.png", "--save-prob", "--device", "cpu")
    predict_as_typed("--img", image, "--output", "folder", "--device", "cpu")  # a folder, as before
    written = ("dir/01_test.png", "one.png", "one_prob.png", "folder/01_test.png")
    assert all((quick_start / p).is_file() for p in written)
    with pytest.raises(UserError, match="masks are written as PNG"):
        predict_as_typed("--img", image, "--output", "one.jpg")


def test_predict_amp_dtype_reaches_the_model(quick_start, monkeypatch):
    import torch
    seen = []
    real = prediction.predict_probabilities

    def spy(*args, **kwargs):
        seen.append(kwargs["amp_dtype"])
        return real(*args, **kwargs)

    monkeypatch.setattr(prediction, "predict_probabilities", spy)
    image = "data/synthetic/DRIVE/test/images/01_test.tif"
    for flags in ([], ["--amp"], ["--amp", "--amp-dtype", "float16"], ["--no-amp", "--amp-dtype", "float16"]):
        predict_as_typed("--img", image, "--device", "cpu", *flags)
    assert seen == [None, torch.bfloat16, torch.float16, None]


def test_predict_and_export_share_the_default_weights(quick_start, capsys):
    assert cli.weights_or_default("mine.pth") == "mine.pth"
    assert cli.weights_or_default(None) == os.path.join("save_weights", "demo", "best_model.pth")
    assert "no --weights given" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# the flag reference of docs/training.md


def test_docs_flag_reference_is_the_parsers():
    with open(os.path.join(ROOT, "docs", "training.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split(cli.REFERENCE_BEGIN, 1)[1].split(cli.REFERENCE_END, 1)[0]
    assert section == "\n" + cli.flag_reference(), \
        "docs/training.md's flag reference is stale: python -m train_utils.cli --write-flag-reference docs/training.md"


def test_write_flag_reference_replaces_only_its_section(tmp_path):
    doc = tmp_path / "t.md"
    doc.write_text(f"# Training\n\nbefore\n{cli.REFERENCE_BEGIN}\nstale\n{cli.REFERENCE_END}\nafter\n")
    r = subprocess.run([sys.executable, "-m", "train_utils.cli", "--write-flag-reference", str(doc)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert doc.read_text() == (f"# Training\n\nbefore\n{cli.REFERENCE_BEGIN}\n{cli.flag_reference()}"
                               f"{cli.REFERENCE_END}\nafter\n")
    reference = cli.flag_reference()
    assert "| `--tta`, `--no-tta` | `off` |" in reference and "--eval-tta" not in reference
    assert "### distributed (train_multi_GPU.py)" in reference and "| `--dist-url URL` | `env://` |" in reference
    doc.write_text("no markers")
    with pytest.raises(UserError, match="no <!-- flag-reference: begin -->"):
        cli.write_flag_reference(str(doc))
