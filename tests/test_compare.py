"""scripts/compare.py and captioning.study: the none/soft/hard study end to end on tiny settings.

The fast tests evaluate tiny untrained checkpoints (--checkpoints) with hand-written training logs
beside them; the slow one trains 2 seeds x 3 arms with configs/tiny.yaml. Every table cell
of report.md is recomputed here from the metrics files, independently of captioning.study.collect.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
import torch
from PIL import Image

from captioning.console import CommandFailed, Interrupted
from captioning.study import collect, results
from captioning.study.report import cell
from captioning.study.runs import StudyError, parse_checkpoints, study_overrides
from conftest import TINY_YAML, own_copy
from captioning.study import run as compare  # captioning compare (scripts/compare.py)

REPO = Path(__file__).resolve().parents[1]

SECTIONS = ("## Results", "## Grounding by word kind", "## Learning curves", "## Training signal",
            "## Attention maps: the same test images, soft and hard",
            "## Hard attention at test time: expected, argmax and sampled locations", "## Settings")
CAPTION_COLUMNS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


# ------------------------------------------------------------------------------ helpers


def table_rows(report: str, first_header: str) -> tuple[list[str], dict[str, list[str]]]:
    """The markdown table whose header row starts with ``first_header`` -> (header, {first cell: cells})."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return header, rows


def expected_cell(files: list[Path], key: str) -> str:
    """mean ± sample std on the 0-100 scale, computed straight from evaluate.py's metrics files."""
    values = []
    for path in files:
        data = json.loads(path.read_text())
        factor = {"0-1": 100.0, "0-100": 1.0}[data["scale"]]
        if data["metrics"].get(key) is not None:  # null: not measured (e.g. grounding without object words)
            values.append(data["metrics"][key] * factor)
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else None
    return cell({"mean": statistics.fmean(values), "std": std, "n": len(values)}, 1, len(files))


def check_tables_match_metrics_files(out: Path, folders: dict[str, list[str]]) -> None:
    """Both summary tables and the hard-mode table equal what the metrics files say."""
    report = (out / "report.md").read_text()
    titles = dict((title, key) for key, title in collect.METRICS)
    header, rows = table_rows(report, "arm")
    assert header[2:] == list(CAPTION_COLUMNS)
    for attention, names in folders.items():
        files = [out / name / "eval" / "metrics_test.json" for name in names]
        for column, value in zip(header[2:], rows[attention][2:]):
            assert value == expected_cell(files, titles[column]), (attention, column)
        assert rows[attention][1] == str(len(names))
    header, rows = table_rows(report, "hard arm, mode")
    for mode in ("expected", "argmax", "sample"):
        files = [out / name / ("eval" if mode == "expected" else f"eval-{mode}") / "metrics_test.json"
                 for name in folders["hard"]]
        for column, value in zip(header[1:], rows[f"hard {mode}"][1:]):
            assert value == expected_cell(files, titles[column]), (mode, column)
    # At least one number is a real measurement, not n/a everywhere.
    assert any(c != "n/a" for c in rows["hard expected"][1:])


def check_report_sections(out: Path, examples: int) -> str:
    report = (out / "report.md").read_text()
    for section in SECTIONS:
        assert section in report, section
    figures = out / "figures"
    for name in ("learning_curves.png", "training_signal.png"):
        with Image.open(figures / name) as img:
            assert img.format == "PNG" and img.width > 500
        assert f"(figures/{name})" in report
    maps = sorted(figures.glob("attention_*.png"))
    assert len(maps) == examples
    for path in maps:
        assert f"(figures/{path.name})" in report
    assert "python scripts/compare.py" in report  # the one command that regenerates it
    summary = json.loads((out / "summary.json").read_text())
    assert summary["study"]["invocations"][-1]["environment"]["versions"]["torch"] == torch.__version__
    return report


def write_fake_training(folder: Path, bleu: list[float], hard: bool, seconds: float) -> None:
    """train.py's metrics.json and a Lightning-style logs/metrics.csv with known validation curves."""
    (folder / "logs").mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"train_seconds": seconds, "global_step": 4 * len(bleu),
                                                    "epochs": len(bleu)}))
    keys = ["epoch", "step", "train/attention_entropy", "val/bleu_4", "val/elapsed_s"]
    if hard:
        keys += ["train/baseline", "train/reinforce_signal_var", "train/reinforce_signal_sq"]
    rows = []
    for epoch, value in enumerate(bleu):
        for step in range(4 * epoch, 4 * epoch + 4):
            row = {"epoch": epoch, "step": step, "train/attention_entropy": 2.0 - 0.01 * step}
            if hard:  # every other step sampled locations; the others log NaN
                sampled = step % 2 == 0
                row.update({"train/baseline": 0.1 * step, "train/reinforce_signal_var": 0.01 if sampled else "nan",
                            "train/reinforce_signal_sq": 0.02 if sampled else "nan"})
            rows.append(row)
        rows.append({"epoch": epoch, "step": 4 * epoch + 3, "val/bleu_4": value, "val/elapsed_s": 10.0 * (epoch + 1)})
    with (folder / "logs" / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


# ------------------------------------------------------------------------------ fast: given checkpoints

CURVES = {"soft-a": [0.10, 0.30, 0.50], "soft-b": [0.20, 0.40, 0.60], "hard-a": [0.05, 0.25, 0.45],
          "hard-b": [0.30, 0.35, 0.50], "none-a": [0.30, 0.40, 0.50]}


@pytest.fixture(scope="module")
def checkpoints(untrained, tmp_path_factory):
    """Five untrained tiny checkpoints (two per attention mechanism, one without attention, different
    weights) on an 8-image test split."""
    root = tmp_path_factory.mktemp("compare")
    paths = {}
    for i, name in enumerate(CURVES):
        attention = name.split("-")[0]
        run = untrained(f"model.attention={attention}", f"train.seed={i}", config=TINY_YAML, seed=i)
        paths[name] = own_copy(run.ckpt, root / "runs" / name)
        write_fake_training(paths[name].parent, CURVES[name], attention == "hard", seconds=100.0 + 10 * i)
    return SimpleNamespace(root=root, paths=paths)


@pytest.fixture(scope="module")
def given_study(checkpoints):
    out = checkpoints.root / "study"
    p = checkpoints.paths
    argv = ["--checkpoints", f"soft={p['soft-a']},{p['soft-b']}", f"hard={p['hard-a']},{p['hard-b']}",
            f"none={p['none-a']}",
            "--out-dir", str(out), "--metrics", "bleu", "--beam-size", "2", "--examples", "2"]
    assert compare.main(argv) == 0
    return SimpleNamespace(out=out, argv=argv)


def test_attention_figures_draw_the_image_as_the_model_saw_it(checkpoints, tmp_path, monkeypatch):
    """A photo whose EXIF says 'turn 90 degrees' is captioned upright; its figure is drawn upright too."""
    from captioning import visualization
    from captioning.study import examples

    photo = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), "red").save(photo, exif=exif)
    drawn = []
    monkeypatch.setattr(examples, "first_test_images", lambda run, limit: [(1, photo)])
    monkeypatch.setattr(visualization, "attention_figure",
                        lambda image, *args, **kwargs: drawn.append(image.size) or Image.new("RGB", (8, 8)))
    runs = [SimpleNamespace(name=name, attention=name.split("-")[0], checkpoint=checkpoints.paths[name])
            for name in ("soft-a", "hard-a")]
    plan = SimpleNamespace(out_dir=tmp_path / "study", runs=runs, beam_size=1, max_len=5)
    examples.decode_examples(plan, count=1, log=lambda line: None)
    assert drawn == [(20, 40), (20, 40)]


def test_examples_never_generate_a_runs_synthetic_set_elsewhere(checkpoints, tmp_path):
    """A run whose synthetic set lived in a folder this machine lacks is refused, not regenerated there."""
    from captioning.study import examples

    ckpt = torch.load(checkpoints.paths["soft-a"], weights_only=False)
    gone = tmp_path / "elsewhere" / "data"
    ckpt["hyper_parameters"]["config"]["data"]["root"] = str(gone)
    moved = tmp_path / "moved.ckpt"
    torch.save(ckpt, moved)
    with pytest.raises(StudyError, match="is not on this machine"):
        examples.first_test_images(SimpleNamespace(checkpoint=moved), 2)
    assert not gone.exists()


def test_given_checkpoints_report_has_every_section(given_study):
    report = check_report_sections(given_study.out, examples=2)
    assert "given checkpoints" in report
    assert "--checkpoints" in report


def test_given_checkpoints_numbers_match_the_metrics_files(given_study):
    check_tables_match_metrics_files(given_study.out, {"soft": ["soft-ckpt0", "soft-ckpt1"],
                                                       "hard": ["hard-ckpt0", "hard-ckpt1"], "none": ["none-ckpt0"]})
    summary = json.loads((given_study.out / "summary.json").read_text())
    for run in summary["runs"]:
        data = json.loads((given_study.out / run["eval"]["expected"]["file"]).read_text())
        assert data["decode"]["beam_size"] == 2  # the study's decoder settings reached evaluate.py
        for key, value in run["eval"]["expected"]["values"].items():
            assert value == pytest.approx(data["metrics"][key] * {"0-1": 100.0, "0-100": 1.0}[data["scale"]])


def test_steps_to_target_and_training_time_come_from_the_logs(given_study):
    """Target = 0.8 x the lowest best validation BLEU-4 (45 -> 36); first validation at or above it."""
    report = (given_study.out / "report.md").read_text()
    lines = report.splitlines()
    second = [i for i, line in enumerate(lines) if line.startswith("| arm |")][1]  # the second table
    header = [c.strip() for c in lines[second].strip("|").split("|")]
    rows = {line.strip("|").split("|")[0].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in lines[second + 2:second + 5]}
    assert "steps to val BLEU-4 >= 36.0" in header
    col = header.index("steps to val BLEU-4 >= 36.0")
    # soft-a reaches 50 at its 3rd validation (step 12), soft-b 40 at its 2nd (step 8): 10 ± 2.8.
    assert rows["soft"][col] == f"10 ± {statistics.stdev([12, 8]):.0f}" == "10 ± 3"
    assert rows["hard"][col] == "12 ± 0"
    assert rows["soft"][header.index("time to val BLEU-4 >= 36.0 (s)")] == "25 ± 7"  # 30 s and 20 s
    assert rows["soft"][header.index("training time (s)")] == "105 ± 7"  # 100 s and 110 s
    assert rows["none"][col] == "8"  # one run: 40 at its 2nd validation


def test_report_measures_each_arm_against_the_control(given_study):
    """Difference of the means to the no-attention arm, and whether it exceeds the seed spread."""
    report = (given_study.out / "report.md").read_text()
    header, rows = table_rows(report, "arm")
    summary = json.loads((given_study.out / "summary.json").read_text())
    assert summary["arms"] == ["none", "soft", "hard"]
    control_header = next(line for line in report.splitlines() if "BLEU-4 minus none" in line)
    cells = [c.strip() for c in control_header.strip("|").split("|")]
    assert cells[:3] == ["arm", "BLEU-4 minus none", "seed spread"]
    table = summary["table"]
    diff = table["soft"]["bleu_4"]["mean"] - table["none"]["bleu_4"]["mean"]
    lines = report.splitlines()
    start = lines.index(next(line for line in lines if "BLEU-4 minus none" in line))
    soft = [c.strip() for c in lines[start + 2].strip("|").split("|")]
    assert soft[0] == "soft" and soft[1] == f"{diff:+.1f}"
    spread = max(table["soft"]["bleu_4"]["std"] or 0, table["none"]["bleu_4"]["std"] or 0)
    assert soft[2] == f"{spread:.1f} ({'beyond' if abs(diff) > spread else 'within'})"
    assert "## Grounding by word kind" in report


def test_the_t_test_note_states_the_studys_run_counts(given_study):
    """report.md says how many runs an arm has (1 to 2 here), not a fixed 3."""
    from captioning.study.report import _significance_text

    report = (given_study.out / "report.md").read_text()
    assert "With 1 to 2 runs an arm, only large differences" in report and "With 3 runs" not in report
    one = {"arms": ["none", "soft"],
           "table": {arm: {"runs": 1, "bleu_4": {"values": [20.0]}} for arm in ("none", "soft")}}
    assert "With 1 run an arm, only large differences" in " ".join(_significance_text(one))


def test_rerun_skips_finished_evaluations(given_study, capsys):
    capsys.readouterr()
    assert compare.main(given_study.argv) == 0
    err = capsys.readouterr().err
    assert "compare: evaluated" not in err and "compare: training" not in err
    study = json.loads((given_study.out / "study.json").read_text())
    assert len(study["invocations"]) == 2
    assert study["invocations"][-1]["did"] == {"trained": [], "evaluated": [], "in_parallel": []}


def test_a_checkpoint_file_replaced_since_its_evaluation_is_evaluated_again(checkpoints, tmp_path, capsys):
    """Another model written over a given checkpoint's path: its evaluation is the old model's, so it is
    done again (and the log says why); the unchanged checkpoint's evaluations are kept."""
    import shutil

    p = checkpoints.paths
    soft = own_copy(p["soft-a"], tmp_path / "soft")
    out = tmp_path / "study"
    argv = ["--checkpoints", f"soft={soft}", f"hard={p['hard-a']}", "--out-dir", str(out), "--metrics", "bleu",
            "--beam-size", "1", "--max-len", "4", "--examples", "1"]
    assert compare.main(argv) == 0
    shutil.copyfile(p["soft-b"], soft)  # another model, the same size: only its modification time tells
    capsys.readouterr()
    assert compare.main(argv) == 0
    err = capsys.readouterr().err
    assert f"{soft} changed since soft-ckpt0 was evaluated" in err
    study = json.loads((out / "study.json").read_text())
    assert study["invocations"][-1]["did"]["evaluated"] == ["soft-ckpt0:soft"]
    assert compare.main(argv) == 0  # evaluated once: the next invocation keeps it
    assert json.loads((out / "study.json").read_text())["invocations"][-1]["did"]["evaluated"] == []


# ------------------------------------------------------------------------------ fast: pieces and bad input


def test_scale_key_is_read(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"scale": "0-1", "metrics": {"bleu_4": 0.25, "cider": 1.5}}))
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"scale": "0-100", "metrics": {"bleu_4": 25.0, "pointing_game": 40.0}}))
    assert collect.read_eval(old, tmp_path)["values"] == {"bleu_4": 25.0, "cider": 150.0}
    assert collect.read_eval(new, tmp_path)["values"] == {"bleu_4": 25.0, "pointing_game": 40.0}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"scale": "percent", "metrics": {}}))
    with pytest.raises(StudyError, match="scale"):
        collect.read_eval(bad, tmp_path)


def test_log_reader_counts_steps_and_drops_unsampled_steps(tmp_path):
    write_fake_training(tmp_path, [0.1, 0.2], hard=True, seconds=1.0)
    log = collect.read_log(tmp_path)
    assert log["curve"]["step"] == [4, 8]  # optimizer steps taken (Lightning logs index 3 and 7)
    assert log["curve"]["bleu_4"] == pytest.approx([10.0, 20.0])
    assert log["curve"]["elapsed_s"] == [10.0, 20.0]
    assert log["signal"]["reinforce_signal_var"]["step"] == [1, 3, 5, 7]  # NaN rows left out
    assert len(log["signal"]["attention_entropy"]["step"]) == 8


def test_study_defaults_apply_only_without_config(tmp_path):
    overrides, defaults = study_overrides(None, ["optim.lr=0.001"])
    assert overrides == ["data.synthetic.num_train=2000", "train.max_epochs=6", "optim.lr=0.001"]
    assert set(defaults) == {"data.synthetic.num_train", "train.max_epochs"}
    overrides, defaults = study_overrides(None, ["train.max_epochs=3"])  # the user's value wins
    assert overrides == ["data.synthetic.num_train=2000", "train.max_epochs=3"] and set(defaults) == {
        "data.synthetic.num_train"}
    assert study_overrides(tmp_path / "coco.yaml", []) == ([], {})


@pytest.mark.parametrize("items, message", [
    (["soft=a.ckpt"], "both mechanisms"),
    (["soft"], "soft=A.ckpt"),
    (["medium=a.ckpt", "hard=b.ckpt"], "soft=A.ckpt"),
    (["soft=missing.ckpt", "hard=missing2.ckpt"], "does not exist"),
])
def test_bad_checkpoint_lists_fail_with_one_line(items, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StudyError, match=message):
        parse_checkpoints(items)


@pytest.mark.parametrize("soft, hard", [
    ("soft=a.ckpt,a.ckpt", "hard=b.ckpt"),
    ("soft=a.ckpt", "hard=b.ckpt,./b.ckpt"),
    ("soft=a.ckpt,link.ckpt", "hard=b.ckpt"),  # a link to a.ckpt: the same file under another name
    ("soft=a.ckpt", "hard=b.ckpt,hardlink.ckpt"),
])
def test_a_checkpoint_given_twice_exits_2_before_it_counts_as_two_seeds(soft, hard, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in ("a.ckpt", "b.ckpt"):
        (tmp_path / name).write_bytes(b"a checkpoint")
    (tmp_path / "link.ckpt").symlink_to("a.ckpt")
    (tmp_path / "hardlink.ckpt").hardlink_to(tmp_path / "b.ckpt")
    rc = compare.main(["--checkpoints", soft, hard, "--out-dir", str(tmp_path / "study")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "given twice" in err[0], err
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize("extra, flag", [
    (["--seeds", "5"], "--seeds"),
    (["--arms", "none", "--budget", "default"], "--budget"),  # the first given, in --help's order
    (["--diagnostic-seeds", "4"], "--diagnostic-seeds"),
    (["--jobs", "2"], "--jobs"),
    (["--config", "my.yaml"], "--config"),
    (["--set", "optim.lr=0.1"], "--set"),
    (["--export-results", "results"], "--export-results"),
])
def test_training_options_with_given_checkpoints_exit_2(extra, flag, tmp_path, monkeypatch, capsys):
    """--checkpoints trains nothing: an option that only shapes training is refused, not ignored."""
    monkeypatch.chdir(tmp_path)
    rc = compare.main(["--checkpoints", "soft=a.ckpt", "hard=b.ckpt", "--out-dir", "study", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{flag} applies to training only" in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_unknown_run_name_with_given_checkpoints_exits_2(checkpoints, tmp_path, capsys):
    p = checkpoints.paths
    rc = compare.main(["--checkpoints", f"soft={p['soft-a']}", f"hard={p['hard-a']}", "--out-dir", str(tmp_path),
                       "--runs", "soft-seed0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no run soft-seed0" in err[0] and "soft-ckpt0, hard-ckpt0" in err[0]


def test_checkpoint_of_the_wrong_mechanism_exits_2(checkpoints, capsys, tmp_path):
    p = checkpoints.paths
    rc = compare.main(["--checkpoints", f"soft={p['hard-a']}", f"hard={p['hard-b']}", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "hard-attention checkpoint" in err[0]


def test_folder_trained_with_other_settings_is_refused(tmp_path, capsys):
    from captioning.files import mark_folder

    mark_folder(tmp_path, "study")  # a study folder of an earlier invocation
    run = tmp_path / "soft-seed0"
    run.mkdir()
    (run / "config.yaml").write_text("train:\n  max_epochs: 7\n")
    rc = compare.main(["--out-dir", str(tmp_path), "--seeds", "1", "--set", f"data.root={tmp_path / 'data'}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(err) == 1
    assert "train.max_epochs: 7, now 6" in err[0] and "--out-dir" in err[0]
    assert not (tmp_path / "data").exists()  # refused before generating data or training anything


@pytest.mark.parametrize("error, status, line", [
    (CommandFailed("loss is not finite at step 3; lower optim.lr"), 2,
     "error: training none-seed0 failed: loss is not finite at step 3; lower optim.lr"),
    (Interrupted("files already written are whole"), 130,
     "error: interrupted (Ctrl-C); files already written are whole"),
])
def test_a_failed_training_is_one_line_and_an_interrupted_one_ends_the_study(tmp_path, capsys, monkeypatch,
                                                                             error, status, line):
    from captioning.study import runs
    from captioning.training import run as train

    def fail(argv, prog=None):
        raise error

    monkeypatch.setattr(runs, "prepare_dataset", lambda configs: None)  # nothing to generate: training fails
    monkeypatch.setattr(train, "run", fail)
    rc = compare.main(["--out-dir", str(tmp_path / "study"), "--seeds", "1", "--arms", "none",
                       "--set", f"data.root={tmp_path / 'data'}"])
    assert rc == status
    assert [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")] == [line]


def test_unknown_config_key_exits_2(tmp_path, capsys):
    rc = compare.main(["--out-dir", str(tmp_path), "--set", "model.decoder.hiden_dim=8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "model.decoder.hiden_dim" in err[0]


# ------------------------------------------------------------------------------ slow: train and compare


@pytest.mark.slow
def test_train_two_seeds_end_to_end(tmp_path, capsys):
    """configs/tiny.yaml, 2 epochs, 2 seeds x 3 arms, trained by the study itself."""
    out = tmp_path / "study"
    argv = ["--config", str(REPO / "configs" / "tiny.yaml"), "--set", f"data.root={tmp_path / 'data'}",
            "--set", "train.max_epochs=2", "--seeds", "2", "--arms", "none", "soft", "hard", "--out-dir", str(out),
            "--metrics", "bleu", "cider", "--max-len", "6", "--examples", "2"]
    assert compare.main(argv) == 0
    check_report_sections(out, examples=2)
    check_tables_match_metrics_files(out, {"soft": ["soft-seed0", "soft-seed1"], "hard": ["hard-seed0", "hard-seed1"],
                                           "none": ["none-seed0", "none-seed1"]})
    # The training signal the report plots was logged by the real training runs.
    with (out / "hard-seed0" / "logs" / "metrics.csv").open() as f:
        keys = set(next(csv.reader(f)))
    assert {"train/attention_entropy", "train/baseline", "train/reinforce_signal_var", "train/reinforce_signal_sq",
            "train/reinforce_signal_sq_no_baseline", "val/bleu_4", "val/elapsed_s"} <= keys
    summary = json.loads((out / "summary.json").read_text())
    assert all(r["curve"] and len(r["curve"]["step"]) == 2 for r in summary["runs"])
    assert summary["signal_summary"]["hard"]["reinforce_signal_var"]["late"]["n"] == 2
    # Resume: nothing is trained or evaluated again.
    stamp = (out / "hard-seed1" / "best.ckpt").stat().st_mtime
    capsys.readouterr()
    assert compare.main(argv) == 0
    err = capsys.readouterr().err
    assert "already trained, skipped: none-seed0, soft-seed0, hard-seed0, none-seed1, soft-seed1, hard-seed1" in err
    assert "compare: evaluated" not in err
    assert (out / "hard-seed1" / "best.ckpt").stat().st_mtime == stamp
    # The raw results: one record per run, holding the numbers of the run's own files.
    results_dir = tmp_path / "results"
    assert compare.main([*argv, "--export-results", str(results_dir)]) == 0
    records = {r["name"]: r for r in results.load(results_dir)}
    assert set(records) == {f"{arm}-seed{seed}" for arm in ("none", "soft", "hard") for seed in (0, 1)}
    hard = records["hard-seed1"]
    evaluated = collect.read_eval(out / "hard-seed1" / "eval" / "metrics_test.json", out)["values"]
    assert hard["test"]["expected"]["bleu_4"] == pytest.approx(evaluated["bleu_4"], abs=1e-4)
    assert set(hard["test"]) == {"expected", "argmax", "sample"} and set(records["soft-seed0"]["test"]) == {"expected"}
    assert hard["seed"] == 1 and hard["arm"] == "hard" and "train.max_epochs=2" in hard["overrides"]
    assert len(hard["validation"]["bleu_4"]) == 2 and hard["signal"]["attention_entropy"]["late"] > 0
    for record in records.values():  # where validation chose the first epoch, the last one was scored too
        chose_earlier = record["selection"]["best_epoch"] != record["selection"]["last_epoch"]
        assert chose_earlier == ("test_last" in record)
        assert chose_earlier == (out / record["name"] / "eval-last" / "metrics_test.json").is_file()


# ------------------------------------------------------------------------------ arms, budgets, parts


def test_diagnostic_arms_take_their_own_seed_count_and_a_frozen_arm_needs_its_source(tmp_path):
    from captioning.study.runs import plan_training_runs

    runs = plan_training_runs(tmp_path, 2, ["none", "soft", "hard-arctic-frozen", "hard-loo"], diagnostic_seeds=1)
    assert [r.name for r in runs] == ["none-seed0", "soft-seed0", "hard-arctic-frozen-seed0", "hard-loo-seed0",
                                      "none-seed1", "soft-seed1"]
    frozen = runs[2]
    assert frozen.depends_on == "soft-seed0"
    overrides = frozen.arm_overrides()
    assert "loss.hard_reduction=sum" in overrides and "model.encoder.fine_tune_from=null" in overrides
    assert any(o.startswith("model.encoder.weights=") and "soft-seed0.pt" in o for o in overrides)
    assert runs[3].arm_overrides() == ("loss.samples=4",)
    with pytest.raises(StudyError, match="add arm soft"):
        plan_training_runs(tmp_path, 1, ["hard", "hard-arctic-frozen"])
    with pytest.raises(StudyError, match="add arm soft"):  # seed 1 of the frozen arm has no soft-seed1
        plan_training_runs(tmp_path, 1, ["soft", "hard-arctic-frozen"], diagnostic_seeds=2)


def test_budgets_set_the_synthetic_size_only_without_a_config(tmp_path):
    quick, _ = study_overrides(None, [], "quick")
    assert quick == ["data.synthetic.num_train=2000", "train.max_epochs=6"]
    assert study_overrides(None, ["optim.lr=0.001"], "default") == (["optim.lr=0.001"], {})


def test_a_part_of_a_study_runs_without_jobs_or_runs_of_its_own():
    argv = ["--budget", "default", "--jobs", "2", "--arms", "none", "soft", "--runs", "a", "b", "--seeds", "3",
            "--jobs=4"]
    assert compare.child_argv(argv, "soft-seed1") == ["--budget", "default", "--arms", "none", "soft", "--seeds", "3",
                                                      "--runs", "soft-seed1"]


def test_a_part_of_a_study_with_jobs_runs_its_runs_in_parallel(tmp_path, monkeypatch):
    """--runs A B --jobs 2: the named runs, and only they, go to separate processes two at a time."""
    calls = {}

    def parallel(plan, child_argv, jobs, log):
        calls["parallel"] = ([r.name for r in plan.runs], jobs, child_argv("none-seed1"))
        return []

    def execute(plan, train, evaluate, log, only):
        calls["execute"] = only
        return {"trained": [], "evaluated": []}

    monkeypatch.setattr(compare, "execute_parallel", parallel)
    monkeypatch.setattr(compare, "execute", execute)
    argv = ["--out-dir", str(tmp_path / "study"), "--seeds", "3", "--arms", "none", "soft", "--jobs", "2",
            "--runs", "none-seed1", "soft-seed2"]
    assert compare.main(argv) == 0
    names, jobs, child = calls["parallel"]
    assert names == ["none-seed1", "soft-seed2"] and jobs == 2 and child[-2:] == ["--runs", "none-seed1"]
    assert "--jobs" not in child and calls["execute"] == {"none-seed1", "soft-seed2"}


def test_unknown_run_name_exits_2(tmp_path, capsys):
    rc = compare.main(["--out-dir", str(tmp_path), "--seeds", "1", "--arms", "none", "--runs", "none-seed7"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "none-seed7" in err[0] and "none-seed0" in err[0]


def test_encoder_file_holds_the_runs_trained_encoder(checkpoints, tmp_path):
    """The frozen arm's encoder: loading the file gives the checkpoint's encoder, output for output."""
    from captioning.checkpoint import checkpoint_config, read_checkpoint
    from captioning.config import merge
    from captioning.models.encoder import Encoder
    from captioning.study.runs import write_encoder_file

    path = checkpoints.paths["soft-a"]
    ckpt = read_checkpoint(path)
    cfg, _ = checkpoint_config(ckpt, path)
    trained = Encoder(cfg.model.encoder)
    prefix = "model.encoder."
    trained.load_state_dict({k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)})
    out = tmp_path / "encoders" / "soft-seed0.pt"
    write_encoder_file(path, out)
    loaded = Encoder(merge(cfg.model.encoder, {"weights": str(out), "fine_tune_from": None}))
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(images)[0], trained.eval()(images)[0])
    fresh = Encoder(merge(cfg.model.encoder, {"weights": "none"}))
    assert not torch.allclose(fresh.eval()(images)[0], trained.eval()(images)[0])


@pytest.mark.slow
def test_parallel_parts_train_the_frozen_and_leave_one_out_arms(tmp_path, capsys):
    """--jobs 2: each run in its own process; the frozen arm waits for its soft run's encoder."""
    out = tmp_path / "study"
    argv = ["--config", str(REPO / "configs" / "tiny.yaml"), "--set", f"data.root={tmp_path / 'data'}",
            "--set", "train.max_epochs=1", "--seeds", "1", "--arms", "none", "soft", "hard-arctic-frozen", "hard-loo",
            "--out-dir", str(out), "--metrics", "bleu", "--max-len", "6", "--examples", "1", "--jobs", "2"]
    assert compare.main(argv) == 0
    err = capsys.readouterr().err
    assert err.index("finished soft-seed0") < err.index("started hard-arctic-frozen-seed0")
    for name in ("none-seed0", "soft-seed0", "hard-arctic-frozen-seed0", "hard-loo-seed0"):
        assert (out / "logs" / f"{name}.txt").is_file()
    frozen = yaml.safe_load((out / "hard-arctic-frozen-seed0" / "config.yaml").read_text())
    assert frozen["model"]["encoder"]["fine_tune_from"] is None and frozen["loss"]["hard_reduction"] == "sum"
    assert (out / "encoders" / "soft-seed0.pt").is_file()
    assert yaml.safe_load((out / "hard-loo-seed0" / "config.yaml").read_text())["loss"]["samples"] == 4
    report = (out / "report.md").read_text()
    assert "Welch's t-test" in report  # one run an arm: each arm named once as not tested
    assert "Not tested (one run): " in report and "hard-loo" in report.split("Not tested (one run): ")[1].split("\n")[0]


def test_a_run_another_process_is_training_is_never_cleared(tmp_path):
    """Parts of a study run at once: a run whose folder another live process has locked is refused,
    and its files are left as they are."""
    import os
    import subprocess
    import sys

    from captioning.study.runs import Run, clear_unfinished

    folder = tmp_path / "soft-seed0"
    (folder / "logs").mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"half a run")
    code = ("import sys, time\nfrom captioning.files import RunLock\nRunLock(sys.argv[1], command='train').acquire()\n"
            "print('held', flush=True)\ntime.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder / "train.lock")], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert holder.stdout.readline().strip() == "held"  # the kernel's lock, held by a live process
        run = Run("soft-seed0", "soft", folder, folder / "best.ckpt", 0, folder)
        with pytest.raises(StudyError, match=f"soft-seed0 is being trained by pid {holder.pid}"):
            clear_unfinished(run)
        assert (folder / "last.ckpt").read_bytes() == b"half a run" and (folder / "logs").is_dir()
    finally:
        holder.kill()
        holder.wait()
    clear_unfinished(run)  # the holder is gone, and its lock with it: the leftovers are cleared
    assert not (folder / "last.ckpt").exists()
    assert os.path.exists(folder)


def test_a_folder_of_someone_elses_files_is_refused_and_left_as_it_was(tmp_path, capsys):
    """The study writes report.md, summary.json and study.json: never into a folder it did not make."""
    theirs = tmp_path / "notes"
    theirs.mkdir()
    (theirs / "report.md").write_text("my own report\n")
    rc = compare.main(["--out-dir", str(theirs), "--seeds", "1", "--set", f"data.root={tmp_path / 'data'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not written by show-attend-tell" in err[0] and "--out-dir" in err[0]
    assert sorted(p.name for p in theirs.iterdir()) == ["report.md"]
    assert (theirs / "report.md").read_text() == "my own report\n" and not (tmp_path / "data").exists()


def test_a_study_folder_is_marked_as_the_studys(given_study):
    """An invocation marks its folder, so the next one (a rerun, the report) may write there again."""
    from captioning.files import folder_kind

    assert folder_kind(given_study.out) == "study"


def test_help_states_each_budgets_run_count_as_the_plan_counts_them(tmp_path, capsys):
    """--help says what a study costs before anything starts: the run counts it states are the
    plans' own (the durations come from docs/study.md, where they were measured)."""
    from captioning.study.runs import DEFAULT_ARMS, plan_training_runs

    with pytest.raises(SystemExit) as exc:
        compare.parse_args(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    quick = len(plan_training_runs(tmp_path, 3, list(DEFAULT_ARMS)))
    default = len(plan_training_runs(tmp_path, 10, list(DEFAULT_ARMS), diagnostic_seeds=2))
    assert f"--budget quick (what runs without arguments) trains 7 arms x 3 seeds = {quick} runs, a run 4.5 to 19 " \
           "min" in text
    assert f"--budget default --seeds 10 --diagnostic-seeds 2 trains 3 main arms x 10 seeds + 4 factorial arms x " \
           f"2 seeds = {default} runs, a run 7.5 to 10 min on the otherwise idle CPU" in text
    study = (REPO / "docs" / "study.md").read_text()
    assert "a run took 4.5 to 19 min" in study and "a run took 7.5 to 10 min on the otherwise idle CPU" in study
