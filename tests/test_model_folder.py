"""Model folders (Captioner.save_pretrained / from_pretrained) and the API's decoding options, on
a tiny untrained checkpoint built in-process (no training run)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from captioning import Captioner
from captioning.model_folder import FOLDER_FILES, CheckpointError
from captioning.files import MARKER
from captioning.vocab import SPECIALS, Vocabulary
from conftest import TINY_YAML, own_copy

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(untrained, tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    run = untrained("decode.max_len=6", config=TINY_YAML, prefer_word="circle")
    ckpt = own_copy(run.ckpt, root / "run")
    (ckpt.parent / "metrics.json").write_text(json.dumps({
        "metrics": {"bleu_4": 0.4321, "cider": 1.5}, "num_images": 8, "global_step": 12, "epochs": 2,
        "train_seconds": 3.5, "command": "captioning train --config configs/tiny.yaml"}))
    captioner = Captioner.from_checkpoint(ckpt, device="cpu")
    folder = captioner.save_pretrained(root / "model", command="captioning export --checkpoint best.ckpt")
    return SimpleNamespace(root=root, ckpt=ckpt, folder=folder, paths=run.test_paths, captioner=captioner)


def test_folder_holds_the_four_files_and_a_model_card(tiny):
    assert sorted(p.name for p in tiny.folder.iterdir()) == sorted([*FOLDER_FILES, MARKER])
    card = (tiny.folder / "README.md").read_text()
    assert "| BLEU-4 | 43.21 |" in card and "| CIDEr | 150.00 |" in card
    assert "captioning train --config configs/tiny.yaml" in card
    assert "captioning export --checkpoint best.ckpt" in card
    assert json.loads((tiny.folder / "vocab.json").read_text()) == tiny.captioner.vocab.words


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_every_file_of_a_folder_has_the_mode_the_umask_gives(tiny, tmp_path, umask, mode):
    """safetensors' writer makes its file readable by the owner alone; a shared folder needs every
    file readable as the user's umask allows (0644 under 022), and no more than it allows."""
    old = os.umask(umask)
    try:
        folder = tiny.captioner.save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == dict.fromkeys([*FOLDER_FILES, MARKER], mode)


def test_card_starts_with_the_metadata_model_hubs_read(tiny):
    card = (tiny.folder / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "show-attend-tell" and meta["pipeline_tag"] == "image-to-text"
    assert meta["license"] == "mit"
    assert {"image-captioning", "soft-attention"} <= set(meta["tags"])
    assert meta["datasets"] == ["show-attend-tell-synthetic"]
    assert meta["metrics"] == ["bleu", "cider"]  # the scores of the run's metrics.json


def test_card_of_save_pretrained_records_the_calls_that_made_it(tiny, tmp_path):
    folder = tiny.captioner.save_pretrained(tmp_path / "m")
    card = (folder / "README.md").read_text()
    block = card.split("written into this folder by:")[1].split("```")[1]
    assert f"captioner = Captioner.from_checkpoint({str(tiny.ckpt)!r})" in block
    assert f"captioner.save_pretrained({str(tmp_path / 'm')!r})" in block


def test_captioner_repr_says_what_model_it_is(tiny):
    text = repr(tiny.captioner)
    params = sum(p.numel() for p in tiny.captioner.model.parameters())
    assert text.startswith(f"Captioner(source={str(tiny.ckpt)!r}, attention='soft', ")
    assert f"words={len(tiny.captioner.vocab)}" in text and f"parameters={params}" in text
    assert "4x4 grid" in text and "device='cpu'" in text


def test_round_trip_gives_the_same_captions(tiny):
    loaded = Captioner.from_pretrained(tiny.folder, device="cpu")
    for kwargs in ({"beam_size": 1}, {"beam_size": 3, "n_best": 2}):
        a = tiny.captioner.caption(tiny.paths, **kwargs)
        b = loaded.caption(tiny.paths, **kwargs)
        assert [c.words for c in a] == [c.words for c in b]
        assert [[x.words for x in c.alternatives] for c in a] == [[x.words for x in c.alternatives] for c in b]
        assert [c.score for c in a] == pytest.approx([c.score for c in b], abs=1e-6)
    assert loaded.config == tiny.captioner.config and loaded.vocab == tiny.captioner.vocab


BLOCK_LIGHTNING = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pytorch_lightning", "lightning", "lightning_fabric", "torchmetrics"):
            raise ImportError(f"{name} is blocked: this process has no Lightning")
sys.meta_path.insert(0, Block())
from captioning import Captioner
captioner = Captioner.from_pretrained(sys.argv[1], device="cpu")
print(captioner.caption(sys.argv[2])[0].text)
assert not [m for m in sys.modules if m.split(".")[0] in ("pytorch_lightning", "lightning")]
"""


def test_folder_loads_where_lightning_cannot_be_imported(tiny):
    expected = tiny.captioner.caption(tiny.paths[0])[0].text
    result = subprocess.run([sys.executable, "-c", BLOCK_LIGHTNING, str(tiny.folder), str(tiny.paths[0])],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == expected


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_damaged_weights_are_a_one_line_error(tiny, tmp_path):
    folder = copy_folder(tiny.folder, tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is damaged") as err:
        Captioner.from_pretrained(folder, device="cpu")
    assert "\n" not in str(err.value)


def test_another_vocabulary_is_a_one_line_error(tiny, tmp_path):
    folder = copy_folder(tiny.folder, tmp_path / "m")
    words = json.loads((folder / "vocab.json").read_text())
    words[4], words[5] = words[5], words[4]  # same size, other vocabulary
    (folder / "vocab.json").write_text(json.dumps(words))
    with pytest.raises(CheckpointError, match="is not the vocabulary this model was saved with") as err:
        Captioner.from_pretrained(folder, device="cpu")
    assert "\n" not in str(err.value)
    (folder / "vocab.json").write_text(json.dumps(list(SPECIALS) + ["cat"]))
    with pytest.raises(CheckpointError, match="2 words|5 words|is not the vocabulary"):
        Captioner.from_pretrained(folder, device="cpu")


def test_weights_of_another_model_name_the_key_that_differs(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_folder(tiny.folder, tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    key = next(k for k in state if k.startswith("decoder.") and k != "decoder.embedding.weight")
    state[key] = torch.zeros(3, 3)  # a decoder of another size
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"weights do not match the model: '{key}' has shape") as err:
        Captioner.from_pretrained(folder, device="cpu")
    assert "\n" not in str(err.value)
    del state[key]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"'{key}' is missing"):
        Captioner.from_pretrained(folder, device="cpu")


@pytest.mark.parametrize("name,content,message", [
    ("config.json", "{not json", "config.json is damaged"),
    ("config.json", "[1, 2]", "not a show-attend-tell model folder"),
    ("vocab.json", "", "vocab.json is damaged"),
])
def test_damaged_json_is_a_one_line_error(tiny, tmp_path, name, content, message):
    folder = copy_folder(tiny.folder, tmp_path / "m")
    (folder / name).write_text(content)
    with pytest.raises(CheckpointError, match=message) as err:
        Captioner.from_pretrained(folder, device="cpu")
    assert "\n" not in str(err.value)


def test_missing_folder_or_file(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Captioner.from_pretrained(tmp_path / "nothing")
    folder = copy_folder(tiny.folder, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        Captioner.from_pretrained(folder, device="cpu")


def test_a_run_folder_given_as_a_model_folder_points_at_its_checkpoint(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.ckpt").write_bytes(Path(tiny.ckpt).read_bytes())
    rc, _, err = run_caption(capsys, "--checkpoint", run, tiny.paths[0])
    assert rc == 2
    assert f"{run} is a training run's folder, not a model folder: give its checkpoint, {run / 'best.ckpt'}" in err


# ------------------------------------------------------------------- decoding options, API


def test_api_n_best_alternatives_and_options(tiny):
    cap = tiny.captioner.caption(tiny.paths[0], beam_size=4, n_best=3)[0]
    assert len(cap.alternatives) == 2
    assert all(a.score <= cap.score + 1e-6 for a in cap.alternatives)
    assert all(a.attention.shape[0] == len(a.words) for a in cap.alternatives)
    assert tiny.captioner.caption(tiny.paths[0], n_best=2)[0].alternatives  # the beam widens to n_best
    long = tiny.captioner.caption(tiny.paths, min_len=5, beam_size=1)
    assert all(len(c.words) >= 5 for c in long)
    assert all("<unk>" not in c.words for c in tiny.captioner.caption(tiny.paths, no_unk=True))


def test_api_sampling_is_repeatable_by_seed(tiny):
    a = tiny.captioner.caption(tiny.paths, temperature=5.0, seed=3)
    b = tiny.captioner.caption(tiny.paths, temperature=5.0, seed=3)
    c = tiny.captioner.caption(tiny.paths, temperature=5.0, seed=4)
    assert [x.words for x in a] == [x.words for x in b]
    assert [x.words for x in a] != [x.words for x in c]
    options = tiny.captioner.options(temperature=0.5, top_k=3)
    assert options.method == "sample" and options.beam_size == 1
    with pytest.raises(ValueError, match="cannot use a beam"):
        tiny.captioner.caption(tiny.paths[0], beam_size=3, temperature=0.5)


# ------------------------------------------------------------------- decoding options, CLI


def run_caption(capsys, *args) -> tuple[int, list[str], str]:
    from captioning import cli

    rc = cli.main(["caption", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err


def test_cli_n_best_sampling_and_min_len(tiny, capsys):
    path = tiny.paths[0]
    rc, out, _ = run_caption(capsys, "--checkpoint", tiny.ckpt, path, "--json", "--beam-size", "4", "--n-best", "3")
    assert rc == 0
    row = json.loads(out[0])
    expected = tiny.captioner.caption(path, beam_size=4, n_best=3)[0]
    assert row["words"] == expected.words and len(row["alternatives"]) == 2
    assert [a["words"] for a in row["alternatives"]] == [a.words for a in expected.alternatives]
    assert row["settings"]["n_best"] == 3
    rc, out, _ = run_caption(capsys, "--checkpoint", tiny.ckpt, path, "--n-best", "2")
    assert rc == 0 and len(out) == 2 and out[1].startswith(f"{path}\t  ")  # the 2nd best, indented
    sampled = [run_caption(capsys, "--checkpoint", tiny.ckpt, *tiny.paths, "--temperature", "5", "--seed", str(s))[1]
               for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    rc, out, _ = run_caption(capsys, "--checkpoint", tiny.ckpt, path, "--json", "--min-len", "5", "--no-unk")
    assert rc == 0 and len(json.loads(out[0])["words"]) >= 5


def test_cli_bad_option_combination_is_a_one_line_error(tiny, capsys):
    rc, out, err = run_caption(capsys, "--checkpoint", tiny.ckpt, tiny.paths[0], "--beam-size", "3",
                               "--temperature", "0.5")
    assert rc == 2 and not out
    assert err.count("\n") == 1 and "cannot use a beam" in err


def test_cli_captions_from_a_model_folder(tiny, capsys):
    rc, out, _ = run_caption(capsys, "--model", tiny.folder, *tiny.paths[:3], "--beam-size", "1")
    assert rc == 0
    assert [line.split("\t")[1] for line in out] == [c.text for c in tiny.captioner.caption(tiny.paths[:3], beam_size=1)]


def test_saving_new_weights_removes_graphs_of_the_old_ones(tiny, tmp_path):
    folder = tiny.captioner.save_pretrained(tmp_path / "m")
    for name in ("onnx.json", "encoder.onnx", "step.onnx"):
        (folder / name).write_text("graphs of earlier weights")
    tiny.captioner.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*FOLDER_FILES, MARKER])


def test_evaluate_takes_the_decoding_options(tiny, tmp_path, capsys):
    from captioning import cli

    rc = cli.main(["evaluate", "--checkpoint", str(tiny.ckpt), "--split", "test", "--metrics", "bleu",
                   "--min-len", "4", "--no-unk", "--beam-size", "1", "--out-dir", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    predictions = json.loads((tmp_path / "predictions_test.json").read_text())
    assert predictions and all(len(p["caption"].split()) >= 4 for p in predictions)
    metrics = json.loads((tmp_path / "metrics_test.json").read_text())
    assert metrics["decode"]["min_len"] == 4 and metrics["decode"]["no_unk"] is True


# ------------------------------------------------------------------- whose folder it is


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_refuses_a_folder_of_someone_elses_files(tiny, tmp_path, capsys):
    """`captioning export --out DIR` replaced a user's README.md, config.json and vocab.json, exit 0."""
    from captioning import cli

    mine = tmp_path / "mine"
    mine.mkdir()
    for name, text in (("README.md", "# my notes\n"), ("config.json", '{"mine": 1}\n'), ("vocab.json", "[]\n")):
        (mine / name).write_text(text)
    before = _snapshot(mine)
    assert cli.main(["export", "--checkpoint", str(tiny.ckpt), "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty and was not written by show-attend-tell" in err
    assert _snapshot(mine) == before
    with pytest.raises(CheckpointError, match="was not written by show-attend-tell"):
        tiny.captioner.save_pretrained(mine)
    assert _snapshot(mine) == before
    # A model folder written before is the project's: exported into again, its other files kept.
    (tiny.folder.parent / "again").mkdir()
    folder = tiny.captioner.save_pretrained(tiny.folder.parent / "again")
    (folder / "notes.txt").write_text("mine")
    assert cli.main(["export", "--checkpoint", str(tiny.ckpt), "--out", str(folder)]) == 0
    assert (folder / "notes.txt").read_text() == "mine"


def test_exporting_a_model_folder_keeps_its_scores_and_training_command(tiny, tmp_path, capsys):
    from captioning import cli

    assert cli.main(["export", "--checkpoint", str(tiny.folder), "--out", str(tmp_path / "copy")]) == 0
    card = (tmp_path / "copy" / "README.md").read_text()
    assert "| BLEU-4 | 43.21 |" in card and "captioning train --config configs/tiny.yaml" in card


def test_export_refuses_a_hard_mode_for_a_folder_without_graphs(tiny, tmp_path, capsys):
    from captioning import cli

    out = tmp_path / "folder"
    assert cli.main(["export", "--checkpoint", str(tiny.ckpt), "--out", str(out), "--hard-mode", "argmax"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--hard-mode chooses the ONNX step's mode: give --format onnx" in err
    assert not out.exists()


def test_export_to_a_read_only_file_system_is_one_line_in_words(tiny, tmp_path, capsys, monkeypatch):
    import errno

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    from captioning import cli

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert cli.main(["export", "--checkpoint", str(tiny.ckpt), "--out", str(tmp_path / "ro" / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "read-only file system" in err and "[Errno" not in err


def test_a_folder_config_out_of_range_is_one_line(tiny, tmp_path):
    """A model folder with "dropout": NaN loaded (folder configs were never validated)."""
    folder = copy_folder(tiny.folder, tmp_path / "m")
    meta = json.loads((folder / "config.json").read_text())
    meta["config"]["model"]["decoder"]["dropout"] = float("nan")
    (folder / "config.json").write_text(json.dumps(meta))  # JSON's NaN, as Python writes it
    with pytest.raises(CheckpointError, match="'model.decoder.dropout' must be a finite number") as err:
        Captioner.from_pretrained(folder, device="cpu")
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------- what the model knows


def test_an_old_checkpoint_without_a_record_says_what_its_config_says(tiny):
    """The fixture's checkpoint is saved without "training_data", as checkpoints were before it was
    kept: the record is inferred from the config (the synthetic set's size is in it)."""
    assert "training_data" not in torch.load(tiny.ckpt, weights_only=True)["hyper_parameters"]
    data = tiny.captioner.training_data
    assert data == {"dataset": "synthetic", "name": "synthetic-v8-seed0-n20-8-8-s32-c5",
                    "vocab_size": len(tiny.captioner.vocab), "train_images": 20}
    assert "trained_on='the built-in synthetic shapes (synthetic-v8-seed0-n20-8-8-s32-c5, 20 training images, " \
           f"{len(tiny.captioner.vocab)} words)'" in repr(tiny.captioner)


def test_a_recorded_training_set_travels_into_the_folder_and_its_card(tiny, tmp_path):
    from captioning.training.module import CaptioningModule

    ckpt = torch.load(tiny.ckpt, weights_only=True)
    record = {"dataset": "coco", "name": "coco2014", "vocab_size": len(tiny.captioner.vocab), "train_images": 113287}
    ckpt["hyper_parameters"]["training_data"] = record
    path = tmp_path / "run" / "best.ckpt"
    path.parent.mkdir()
    torch.save(ckpt, path)
    captioner = Captioner.from_checkpoint(path, device="cpu")
    assert captioner.training_data == record and "113,287 training images" in repr(captioner)
    folder = captioner.save_pretrained(tmp_path / "model")
    assert json.loads((folder / "config.json").read_text())["training_data"] == record
    assert Captioner.from_pretrained(folder, device="cpu").training_data == record
    assert captioner.note_for(["photo.jpg"]) is None  # only a synthetic model owes the note
    module = CaptioningModule.create(captioner.config, captioner.vocab, record)  # what training saves
    assert module.hparams["training_data"] == record


def test_the_card_has_intended_use_limitations_and_onnx_usage(tiny):
    card = (tiny.folder / "README.md").read_text()
    sections = [line for line in card.splitlines() if line.startswith("## ")]
    assert sections.index("## Intended use") < sections.index("## Limitations") < sections.index("## Use")
    limits = card.split("## Limitations")[1].split("## ")[0]
    assert "synthetic-v8-seed0-n20-8-8-s32-c5, 20 training images" in limits
    assert "every image it is given" in limits and "coloured shapes" in limits
    assert "BLEU-4 43.2" in limits and "`captioning train --config configs/tiny.yaml`" in limits
    assert "captioning caption --engine onnx --model" in card and "OnnxCaptioner(" in card
    assert json.loads((tiny.folder / "config.json").read_text())["training_data"] == tiny.captioner.training_data


def test_caption_says_once_that_a_synthetic_model_sees_shapes(tiny, tmp_path, capsys):
    from PIL import Image

    photos = []
    for i in range(3):
        photos.append(tmp_path / f"photo{i}.png")
        Image.new("RGB", (90, 60), (40 * i, 120, 200)).save(photos[-1])
    rc, out, err = run_caption(capsys, "--checkpoint", tiny.ckpt, *photos, tiny.paths[0])
    assert rc == 0 and len(out) == 4
    assert err.splitlines() == [
        "note: this model was trained on the built-in synthetic set (coloured shapes on a plain background): it "
        "describes every image as coloured shapes, whatever the image shows"]
    rc, out, err = run_caption(capsys, "--checkpoint", tiny.ckpt, *tiny.paths[:2])  # the set's own images
    assert rc == 0 and err.splitlines() == [f"model: trained on {tiny.captioner.trained_on}"]
    captioner = Captioner.from_checkpoint(tiny.ckpt, device="cpu")
    with pytest.warns(UserWarning, match="describes every image as coloured shapes") as seen:
        captioner.caption(photos[0], beam_size=1)
        captioner.caption(photos[1], beam_size=1)
    assert len(seen) == 1  # once per captioner


# ------------------------------------------------------------------- the command line's output


def test_a_caption_cut_at_max_len_is_marked_plain_and_json(tiny, capsys):
    path = tiny.paths[0]
    cap = tiny.captioner.caption(path, beam_size=1, max_len=2)[0]
    assert not cap.ended  # the untrained model never ends within two words
    rc, out, _ = run_caption(capsys, "--checkpoint", tiny.ckpt, path, "--beam-size", "1", "--max-len", "2")
    assert rc == 0 and out == [f"{path}\t{cap.text}\t(cut at --max-len 2)"]
    rc, out, _ = run_caption(capsys, "--checkpoint", tiny.ckpt, path, "--beam-size", "1", "--max-len", "2", "--json")
    row = json.loads(out[0])
    assert row["cut"] is True and row["caption"] == cap.text and "attention" not in row
    assert row["training_data"] == tiny.captioner.training_data
    rc, out, _ = run_caption(capsys, "--checkpoint", tiny.ckpt, path, "--json", "--min-len", "0", "--max-len", "6",
                             "--beam-size", "1")
    ended = tiny.captioner.caption(path, beam_size=1)[0]
    assert json.loads(out[0])["cut"] is (not ended.ended)


def test_n_best_prints_every_score_and_json_carries_attention_on_request(tiny, capsys):
    path = tiny.paths[0]
    expected = tiny.captioner.caption(path, beam_size=4, n_best=3)[0]
    rc, out, _ = run_caption(capsys, "--checkpoint", tiny.ckpt, path, "--beam-size", "4", "--n-best", "3")
    assert rc == 0 and len(out) == 3
    scores = [float(line.split("\t")[2]) for line in out]
    assert scores == pytest.approx([round(c.score, 4) for c in [expected, *expected.alternatives]], abs=1e-4)
    rc, out, _ = run_caption(capsys, "--checkpoint", tiny.ckpt, path, "--json", "--with-attention", "--n-best", "2")
    row = json.loads(out[0])
    assert torch.tensor(row["attention"]).shape == (len(row["words"]), 4, 4)
    assert torch.tensor(row["alternatives"][0]["attention"]).shape[0] == len(row["alternatives"][0]["words"])
    with pytest.raises(SystemExit) as exc:
        run_caption(capsys, "--checkpoint", tiny.ckpt, path, "--with-attention")
    assert exc.value.code == 2
    assert "--with-attention adds the attention to --json lines: give --json too" in capsys.readouterr().err


def test_fewer_captions_than_n_best_say_why(tiny, capsys):
    """Sampled draws that repeat a caption are dropped: at a low temperature the 5 draws agree."""
    path = tiny.paths[0]
    rc, out, err = run_caption(capsys, "--checkpoint", tiny.ckpt, path, "--temperature", "0.05", "--n-best", "5",
                               "--seed", "0")
    assert rc == 0 and len(out) < 5
    assert f"note: {path}: {len(out)} distinct caption(s) of the 5 asked: the other draws repeated a caption" in err


# ------------------------------------------------------------------- images as arrays and tensors


def test_caption_takes_paths_pil_images_arrays_and_tensors_alike(tiny):
    import numpy as np
    from PIL import Image

    path = tiny.paths[0]
    pil = Image.open(path).convert("RGB")
    array = np.array(pil)  # [H, W, 3] uint8
    tensor = torch.from_numpy(array).permute(2, 0, 1)  # [3, H, W] uint8, as torchvision's read_image
    caps = tiny.captioner.caption([path, pil, array, tensor, tensor.float() / 255], beam_size=1)
    assert len({tuple(c.words) for c in caps}) == 1
    assert [c.source for c in caps] == [str(path), "<PIL image>", "<array>", "<tensor>", "<tensor>"]
    assert tiny.captioner.caption(array, beam_size=1)[0].words == caps[0].words  # one array: one image


@pytest.mark.parametrize("image,message", [
    ("np.zeros((32, 32), np.uint8)", "an image array must be [H, W, 3] of uint8 (RGB); got an array of shape (32, 32)"),
    ("np.zeros((32, 32, 3), np.float32)", "got an array of shape (32, 32, 3) and dtype float32"),
    ("torch.zeros(2, 3, 32, 32)", "an image tensor must be [3, H, W], uint8 or float in [0, 1]; got a tensor of "
                                  "shape (2, 3, 32, 32)"),
    ("torch.full((3, 8, 8), 255.0)", "a float image tensor must hold values in [0, 1]"),
    ("torch.zeros(3, 8, 8, dtype=torch.int64)", "dtype int64"),
])
def test_an_array_of_another_shape_or_dtype_is_a_one_line_error(tiny, image, message):
    import numpy as np  # noqa: F401  (the parameters name it)

    with pytest.raises(ValueError) as err:
        tiny.captioner.caption(eval(image))
    assert message in str(err.value) and "\n" not in str(err.value)
