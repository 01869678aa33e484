"""Probes an attacker or an unlucky user on the same machine would try, as tables: hostile folders
and markers, locks that are FIFOs or links, checkpoints resumed beside someone's files, image
bombs, YAML alias bombs, nested and oversized multipart forms, slow clients, tampered ONNX
folders, full and read-only disks, kills in the middle of a write.

Each case must end in one ``error:`` line (or a 4xx answer from the demo), never a traceback or a
hang, and leave every file that was there before byte-identical. Commands run in-process through
``captioning.cli.main`` (test_malformed_inputs.run_cli), except where a kill needs a process of
its own. ``SUMMARY`` counts the cases tried and those that gave a traceback (reported by
``test_summary``; the goal is none).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from PIL import Image

from captioning.files import MARKER, mark_folder
from test_malformed_inputs import run_cli, running_demo, world  # noqa: F401 (world: a fixture)

REPO = Path(__file__).resolve().parents[1]
SUMMARY = {"tried": 0, "tracebacks": 0, "not_one_line": 0, "files_changed": 0}
#: Every case runs under this alarm: a hang fails the case instead of the suite.
HANG_SECONDS = 120


def files_of(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` (links, FIFOs and devices are not read: a link to
    /dev/zero would never end)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if not path.is_symlink() and path.is_file():
            found[str(path.relative_to(root))] = path.read_bytes()
    return found


@contextlib.contextmanager
def deadline(seconds: int = HANG_SECONDS):
    def hung(signum, frame):
        raise TimeoutError(f"no answer in {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def probe(argv: list, keep: Path, *, errors: int | None = 1, allow_success: bool = False) -> str:
    """Run ``captioning ARGV``; count it; assert no traceback, no hang, every regular file under
    ``keep`` unchanged, and ``errors`` ``error:`` lines with a failing status (None: at least
    one). -> stderr."""
    before = files_of(keep)
    with deadline():
        code, out, err, failure = run_cli([str(a) for a in argv])
    SUMMARY["tried"] += 1
    if failure is not None or "Traceback" in err:
        SUMMARY["tracebacks"] += 1
        pytest.fail(f"traceback for {argv}:\n{failure or err[-3000:]}")
    after = files_of(keep)
    changed = [name for name, data in before.items() if after.get(name) != data]
    if changed:
        SUMMARY["files_changed"] += 1
        pytest.fail(f"{argv} changed or removed {changed}")
    if code == 0 and allow_success:
        return err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    if code in (0, None) or (len(lines) != errors if errors is not None else not lines):
        SUMMARY["not_one_line"] += 1
        pytest.fail(f"{argv}: status {code}, stderr {err[-1500:]!r}")
    return err


@pytest.fixture(scope="module")
def extra(world, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    """What the probes need beside the world: a small dataset in the karpathy format."""
    from captioning.data.examples import write_example_dataset

    root = tmp_path_factory.mktemp("hostile")
    captions, images = write_example_dataset(root / "example", 6, image_size=32)
    return SimpleNamespace(root=root, captions=captions, images=images)


@pytest.fixture
def place(tmp_path):
    """A folder of the user's, with files the project must never touch."""
    (tmp_path / "cat.png").write_bytes(b"the user's cat")
    (tmp_path / "notes.txt").write_text("the user's notes")
    return tmp_path


# ------------------------------------------------------------------------------ folders and markers

#: command -> (the kind of folder it writes, argv with DIR standing for the folder)
COMMANDS: dict[str, tuple[str, Callable[[SimpleNamespace, SimpleNamespace, Path], list]]] = {
    "train": ("run", lambda w, x, d: ["train", "--config", REPO / "configs" / "tiny.yaml", "--set",
                                      f"data.root={json.dumps(str(w.root / 'data'))}", "--max-epochs", "1",
                                      "--no-progress", "--out-dir", d]),
    "export": ("model", lambda w, x, d: ["export", "--checkpoint", w.ckpt, "--out", d]),
    "evaluate": ("evaluation", lambda w, x, d: ["evaluate", "--results", w.results, "--annotations", w.annotations,
                                                "--metrics", "bleu", "--tokenizer", "simple", "--out-dir", d]),
    "caption --heatmaps": ("figures", lambda w, x, d: ["caption", "--checkpoint", w.ckpt, w.image, "--heatmaps", d]),
    "prepare --make-example": ("example", lambda w, x, d: ["prepare", "--make-example", d, "--num-images", "4"]),
    "prepare --out": ("prepared", lambda w, x, d: ["prepare", "--format", "karpathy", "--captions", x.captions,
                                                   "--images", x.images, "--out", d, "--workers", "1"]),
}


def _genuine_marker(tmp: Path, kind: str) -> Path:
    """A marker the project wrote, for another folder."""
    other = tmp / "elsewhere"
    other.mkdir(exist_ok=True)
    mark_folder(other, kind)
    return other / MARKER


def _copied(d: Path, kind: str) -> None:
    (d / MARKER).write_bytes(_genuine_marker(d.parent, kind).read_bytes())


def _older(d: Path, kind: str) -> None:
    (d / MARKER).write_text(json.dumps({"kind": kind, "written_by": "show-attend-tell", "version": "0.1"}))


def _linked(d: Path, kind: str) -> None:
    (d / MARKER).symlink_to(_genuine_marker(d.parent, kind))


def _fifo(d: Path, kind: str) -> None:
    os.mkfifo(d / MARKER)


def _dev_zero(d: Path, kind: str) -> None:
    (d / MARKER).symlink_to("/dev/zero")


def _folder(d: Path, kind: str) -> None:
    (d / MARKER).mkdir()


def _not_json(d: Path, kind: str) -> None:
    (d / MARKER).write_text("{kind: run")


def _huge(d: Path, kind: str) -> None:
    (d / MARKER).write_text(json.dumps({"kind": kind, "pad": " " * (2 << 20)}))


def _other_kind(d: Path, kind: str) -> None:
    mark_folder(d, "study" if kind != "study" else "run")


def _edited_id(d: Path, kind: str) -> None:
    mark_folder(d, kind)
    record = json.loads((d / MARKER).read_text())
    (d / MARKER).write_text(json.dumps({**record, "id": ""}))


MARKERS: list[tuple[str, Callable[[Path, str], None]]] = [
    ("no marker", lambda d, kind: None),
    ("a copied marker", _copied),
    ("a marker of an older version", _older),
    ("a marker linked from elsewhere", _linked),
    ("a FIFO marker", _fifo),
    ("a marker linked to /dev/zero", _dev_zero),
    ("a folder as the marker", _folder),
    ("a marker that is not JSON", _not_json),
    ("a 2 MB marker", _huge),
    ("a marker of another kind", _other_kind),
    ("a marker without its id", _edited_id),
]


@pytest.mark.parametrize("marker,make", MARKERS, ids=[m for m, _ in MARKERS])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_folder_of_the_users_is_never_written(world, extra, place, command, marker, make):  # noqa: F811
    kind, argv = COMMANDS[command]
    out = place / "theirs"
    out.mkdir()
    for name in ("cat.png", "dataset_example.json", "config.yaml", "best.ckpt"):
        (out / name).write_bytes(b"the user's " + name.encode())
    make(out, kind)
    probe(argv(world, extra, out), place)


FOLDER_PATHS: list[tuple[str, Callable[[Path], Path]]] = [
    ("a link to nothing", lambda p: (p / "gone").symlink_to(p / "nothing") or p / "gone"),
    ("a file", lambda p: p / "notes.txt"),
]


@pytest.mark.parametrize("what,make", FOLDER_PATHS, ids=[w for w, _ in FOLDER_PATHS])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_folder_path_that_is_no_folder_is_refused(world, extra, place, command, what, make):  # noqa: F811
    out = make(place)
    probe(COMMANDS[command][1](world, extra, out), place)
    assert not (place / "nothing").exists()


# ------------------------------------------------------------------------------ locks

LOCKS: list[tuple[str, Callable[[Path], None]]] = [
    ("a FIFO", lambda p: os.mkfifo(p)),
    ("a link to /dev/zero", lambda p: p.symlink_to("/dev/zero")),
    ("a link to a user's file", lambda p: p.symlink_to(p.parent.parent / "notes.txt")),
    ("a link to nothing", lambda p: p.symlink_to(p.parent / "nothing")),
    ("a folder", lambda p: p.mkdir()),
]


@pytest.mark.parametrize("what,make", LOCKS, ids=[w for w, _ in LOCKS])
def test_a_run_lock_that_is_not_a_file_is_refused_at_once(world, extra, place, what, make):  # noqa: F811
    out = place / "run"
    out.mkdir()
    mark_folder(out, "run")
    make(out / "train.lock")
    err = probe(COMMANDS["train"][1](world, extra, out), place)
    assert "train.lock" in err and not (out / "nothing").exists()


# ------------------------------------------------------------------------------ other outputs

BENCHMARK_OUTS: list[tuple[str, Callable[[Path], Path]]] = [
    ("a user's JSON file", lambda p: (p / "mine.json").write_text('{"mine": 1}') and p / "mine.json"),
    ("a link to a user's file", lambda p: (p / "out.json").symlink_to(p / "notes.txt") or p / "out.json"),
    ("a folder", lambda p: p),
]


@pytest.mark.parametrize("what,make", BENCHMARK_OUTS, ids=[w for w, _ in BENCHMARK_OUTS])
def test_benchmark_never_overwrites_a_file_it_did_not_write(place, what, make):
    out = make(place)
    err = probe(["benchmark", "--quick", "--out", out], place)
    assert "--out" in err


CACHES: list[tuple[str, Callable[[Path], None]]] = [
    ("a user's files", lambda d: ((d / "train.npy").write_bytes(b"the user's array"), (d / "a.txt").write_text("x"))),
    ("a user's train.npy alone", lambda d: (d / "train.npy").write_bytes(b"the user's array")),
    ("a user's train.json alone", lambda d: (d / "train.json").write_text('{"mine": 1}')),
    ("a copied marker", lambda d: _copied(d, "features")),
    ("a FIFO marker", lambda d: _fifo(d, "features")),
    ("a linked train.npy", lambda d: mark_folder(d, "features") and (d / "train.npy").symlink_to(d.parent / "notes.txt")),
]


@pytest.mark.parametrize("what,make", CACHES, ids=[w for w, _ in CACHES])
def test_a_feature_cache_folder_of_someone_elses_is_refused(place, what, make):
    from captioning.data.feature_cache import FeatureCacheError, claim_cache_folder

    cache = place / "cache"
    cache.mkdir()
    make(cache)
    before = files_of(place)
    SUMMARY["tried"] += 1
    with deadline(), pytest.raises(FeatureCacheError) as info:
        claim_cache_folder(cache)
    assert "\n" not in str(info.value) and files_of(place) == before


def test_a_feature_cache_written_before_folders_were_marked_is_adopted(tmp_path):
    from captioning.data.feature_cache import claim_cache_folder
    from captioning.files import folder_kind

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "train.json").write_text('{"format": 1}')
    (tmp_path / "cache" / "train.npy").write_bytes(b"")
    claim_cache_folder(tmp_path / "cache")
    assert folder_kind(tmp_path / "cache") == "features"


# ------------------------------------------------------------------------------ links inside our folders


def test_evaluate_writes_nothing_through_a_linked_eval_folder(world, place):  # noqa: F811
    """The default eval/ beside a results file is the project's choice: a link there leads to a
    folder nobody named, and is refused."""
    import shutil

    (place / "photos").mkdir()
    (place / "photos" / "dog.png").write_bytes(b"the user's dog")
    shutil.copy(world.results, place / "results.json")
    (place / "eval").symlink_to(place / "photos")
    err = probe(["evaluate", "--results", place / "results.json", "--annotations", world.annotations, "--metrics",
                 "bleu", "--tokenizer", "simple"], place)
    assert "link" in err and sorted(p.name for p in (place / "photos").iterdir()) == ["dog.png"]


def _example_files():
    from captioning.data.formats import FORMATS

    return [(fmt, name) for fmt, f in FORMATS.items() if hasattr(f, "write_example") for name in f.example_files]


@pytest.mark.parametrize("fmt, name", _example_files())
def test_make_example_writes_no_caption_file_through_a_link(place, fmt, name):
    """Every file a format's example writer makes (the Flickr8k split lists too) is refused as a link."""
    folder = place / "example"
    folder.mkdir()
    mark_folder(folder, "example")
    (folder / name).symlink_to(place / "notes.txt")
    err = probe(["prepare", "--make-example", folder, "--example-format", fmt, "--num-images", "4"], place)
    assert f"{folder / name} is a link" in err and (place / "notes.txt").read_text() == "the user's notes"


# ------------------------------------------------------------------------------ resume


def _checkpoint_in(world, folder: Path, **record) -> Path:  # noqa: F811
    ckpt = torch.load(world.ckpt, map_location="cpu", weights_only=False)
    ckpt.update({"epoch": 0, "global_step": 0, "optimizer_states": [{"state": {}, "param_groups": [{"params": []}]}],
                 "loops": {"fit_loop": {}}}, **record)  # the training state's parts, as training saves them
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, folder / "last.ckpt")
    return folder / "last.ckpt"


def _downloads(place: Path, world) -> Path:  # noqa: F811
    return _checkpoint_in(world, place / "Downloads")


def _copied_marker(place: Path, world) -> Path:  # noqa: F811
    ckpt = _checkpoint_in(world, place / "Downloads")
    (ckpt.parent / MARKER).write_bytes(_genuine_marker(place, "run").read_bytes())
    return ckpt


def _other_run(place: Path, world) -> Path:  # noqa: F811
    folder = place / "run"
    folder.mkdir()
    mark_folder(folder, "run")
    return _checkpoint_in(world, folder, run_folder_id="the id of another run's folder")


def _linked_attention(place: Path, world) -> Path:  # noqa: F811
    folder = place / "run"
    folder.mkdir()
    ident = mark_folder(folder, "run")
    (place / "photos").mkdir()
    (folder / "attention").symlink_to(place / "photos")
    return _checkpoint_in(world, folder, run_folder_id=ident)


RESUMES = [("a downloaded checkpoint", _downloads), ("beside a copied marker", _copied_marker),
           ("another run's checkpoint", _other_run), ("a run folder with a linked attention/", _linked_attention)]


@pytest.mark.parametrize("what,make", RESUMES, ids=[w for w, _ in RESUMES])
def test_resume_writes_only_into_its_own_run_folder(world, place, what, make):  # noqa: F811
    ckpt = make(place, world)
    for name in ("cat.png", "metrics.json"):
        (ckpt.parent / name).write_bytes(b"the user's " + name.encode())
    err = probe(["train", "--resume", ckpt, "--max-epochs", "2", "--no-progress"], place)
    assert "--out-dir" in err or "link" in err


def test_resume_into_a_new_folder_is_the_way_out(world, place):  # noqa: F811
    """What the refusals advise works: the checkpoint continues in a new folder of its own."""
    ckpt = _downloads(place, world)
    (ckpt.parent / "cat.png").write_bytes(b"the user's cat")
    from captioning.training.run_folder import check_out_dir

    check_out_dir(place / "new", resume=ckpt)
    assert sorted(p.name for p in (place / "new").iterdir()) == [MARKER]
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["cat.png", "last.ckpt"]


def test_resume_set_patience_takes_effect():
    """Lightning's EarlyStopping restored the checkpoint's patience over the new one."""
    from captioning.training.trainer import ConfiguredEarlyStopping

    saved = ConfiguredEarlyStopping(monitor="val/bleu4", mode="max", patience=10)
    saved.wait_count = 4
    resumed = ConfiguredEarlyStopping(monitor="val/bleu4", mode="max", patience=1000000)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.patience == 1000000 and resumed.wait_count == 4


def test_a_checkpoints_recorded_workdir_is_read_never_written(world, place):  # noqa: F811
    """A relative data.root is looked for in the folder the training ran in only when the data is
    there; else it stays relative to where the command runs, so nothing is generated in the other
    folder (an evaluate once generated a whole dataset in another user's folder)."""
    from captioning.checkpoint import at_workdir
    from captioning.config import Config
    from captioning.data.synthetic.write import dataset_dir

    elsewhere = place / "another user"
    (elsewhere / "data").mkdir(parents=True)  # the folder is there, the dataset is not
    SUMMARY["tried"] += 1
    cfg = at_workdir(Config(), str(elsewhere))
    assert not Path(cfg.data.root).is_absolute()
    dataset_dir(elsewhere / cfg.data.root, cfg.data.synthetic).mkdir(parents=True)
    assert at_workdir(Config(), str(elsewhere)).data.root == str(elsewhere / cfg.data.root)


# ------------------------------------------------------------------------------ images


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, *chunks: bytes, idat: bytes | None = None) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, with a tiny (too short) body."""
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    body = _chunk(b"IDAT", zlib.compress(b"\0" * 64) if idat is None else idat)
    return b"\x89PNG\r\n\x1a\n" + header + b"".join(chunks) + body + _chunk(b"IEND", b"")


def _jpeg_claiming(width: int, height: int) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    at = data.index(b"\xff\xc0") + 5  # SOF0: length (2), precision (1), then height and width
    data[at:at + 4] = struct.pack(">HH", height, width)
    return bytes(data)


def _gif_claiming(width: int, height: int) -> bytes:
    return (b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + b"," + struct.pack("<HHHH", 0, 0, 1, 1)
            + b"\x00\x02\x02\x44\x01\x00;")


def _bmp_claiming(width: int, height: int) -> bytes:
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + 64, 0, 0, 54) + header + b"\0" * 64


def _ztxt(size: int) -> bytes:
    return _chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"a" * size, 1))


def _itxt(size: int) -> bytes:
    return _chunk(b"iTXt", b"Comment\0\1\0\0\0" + zlib.compress(b"a" * size, 1))


IMAGES: list[tuple[str, Callable[[], bytes]]] = [
    ("PNG 13000x13000", lambda: png(13000, 13000)),
    ("PNG 8000x8000", lambda: png(8000, 8000)),
    ("PNG 1x60000000", lambda: png(1, 60_000_000)),
    ("PNG 60000x60000", lambda: png(60000, 60000)),
    ("PNG with an 8 MB zTXt", lambda: png(8, 8, _ztxt(8 << 20))),
    ("PNG with an 8 MB iTXt", lambda: png(8, 8, _itxt(8 << 20))),
    ("PNG with a bad CRC", lambda: png(8, 8)[:-5] + b"\0\0\0\0\0"),
    ("PNG whose pixels are missing", lambda: png(100, 100, idat=b"")),
    ("JPEG claiming 24000x24000", lambda: _jpeg_claiming(24000, 24000)),
    ("JPEG claiming 65000x65000", lambda: _jpeg_claiming(65000, 65000)),
    ("GIF claiming 65535x65535", lambda: _gif_claiming(65535, 65535)),
    ("BMP claiming 30000x30000", lambda: _bmp_claiming(30000, 30000)),
]


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bombs")
    paths = {}
    for n, (name, make) in enumerate(IMAGES):
        suffix = ".png" if name.startswith("PNG") else "." + name.split()[0].lower().replace("jpeg", "jpg")
        paths[name] = root / f"bomb{n}{suffix}"
        paths[name].write_bytes(make())
    return paths


@pytest.mark.parametrize("name", [n for n, _ in IMAGES])
def test_image_bombs_in_the_cli(world, bombs, name):  # noqa: F811
    err = probe(["caption", "--checkpoint", world.ckpt, bombs[name]], bombs[name].parent)
    assert bombs[name].name in err


@pytest.mark.parametrize("name", [n for n, _ in IMAGES])
def test_image_bombs_in_the_api(world, bombs, name):  # noqa: F811
    from captioning.data.transforms import ImageLoadError

    SUMMARY["tried"] += 1
    with deadline(), pytest.raises(ImageLoadError) as info:
        world.captioner.caption(bombs[name])
    assert str(bombs[name]) in str(info.value) and "\n" not in str(info.value)


def test_a_13000_square_png_stays_far_below_a_gigabyte(world, bombs):  # noqa: F811
    """Refused from its header: the process's peak memory does not grow by the 500 MB its
    pixels would take. Measured in a process of its own, by the kernel's high-water mark of its
    memory since exec (VmHWM; ru_maxrss would count the parent's memory at the fork)."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs /proc/self/status (Linux) to read the peak memory")
    code = ("import sys\nfrom captioning.data.transforms import ImageLoadError, load_image\n"
            "try:\n    load_image(sys.argv[1])\nexcept ImageLoadError as err:\n    print('refused', err)\n"
            "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", code, str(bombs["PNG 13000x13000"])], capture_output=True, text=True,
                         timeout=HANG_SECONDS, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.split("\n")
    assert out[0].startswith("refused") and "CAPTIONING_MAX_IMAGE_PIXELS" in out[0]
    assert int(out[1]) < 1024


def test_the_pixel_bound_is_the_users_to_raise(world, bombs, monkeypatch):  # noqa: F811
    from captioning.data.transforms import ImageLoadError, load_image

    monkeypatch.setenv("CAPTIONING_MAX_IMAGE_PIXELS", "not a number")
    err = probe(["caption", "--checkpoint", world.ckpt, world.image], world.image.parent)
    assert "CAPTIONING_MAX_IMAGE_PIXELS" in err
    small = bombs["PNG 8000x8000"].with_name("real.png")
    Image.new("RGB", (300, 200)).save(small)
    monkeypatch.setenv("CAPTIONING_MAX_IMAGE_PIXELS", "50000")
    with pytest.raises(ImageLoadError, match="300x200 pixels, more than the 50,000"):
        load_image(small)
    monkeypatch.setenv("CAPTIONING_MAX_IMAGE_PIXELS", "60000")
    assert load_image(small).size == (300, 200)


FOLDER_ENTRIES: list[tuple[str, Callable[[Path], None]]] = [
    ("a link to nothing", lambda p: p.symlink_to(p.parent / "nothing.jpg")),
    ("a FIFO", lambda p: os.mkfifo(p)),
    ("a folder", lambda p: p.mkdir()),
    ("a socket", lambda p: socket.socket(socket.AF_UNIX).bind(str(p))),
    ("a link to /dev/zero", lambda p: p.symlink_to("/dev/zero")),
]


@pytest.mark.parametrize("what,make", FOLDER_ENTRIES, ids=[w for w, _ in FOLDER_ENTRIES])
def test_every_bad_entry_of_a_folder_is_named(world, tmp_path, what, make):  # noqa: F811
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (24, 24), (10, 100, 200)).save(photos / name)
    make(photos / "bad.png")
    before = files_of(photos)
    with deadline():
        code, out, err, failure = run_cli(["caption", "--checkpoint", str(world.ckpt), str(photos)])
    SUMMARY["tried"] += 1
    if failure is not None:
        SUMMARY["tracebacks"] += 1
        pytest.fail(failure)
    assert code != 0 and len(out.splitlines()) == 2, (out, err)
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        line for line in err.splitlines() if "bad.png" in line] and "bad.png" in err
    assert files_of(photos) == before


# ------------------------------------------------------------------------------ YAML bombs

LAUGHS = "\n".join(["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] + [
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)])

YAML = [
    ("billion laughs in --config", "config", LAUGHS),
    ("billion laughs under a real key in --config", "config", "train:\n  laughs: " + LAUGHS.replace("\n", "\n  ")),
    ("a merge key in --config", "config", "base: &b {lr: 1}\noptim:\n  <<: *b\n"),
    ("billion laughs in --set", "set", "train.max_epochs=[&a [1, 1, 1, 1], [*a, *a, *a], [*a, *a]]"),
    ("one alias in --set", "set", "optim.lr=[&a 1, *a]"),
    ("an alias as a key in --set", "set", "model.x={&k a: 1, *k : 2}"),
]


@pytest.mark.parametrize("what,where,text", YAML, ids=[w for w, _, _ in YAML])
def test_yaml_aliases_are_refused_at_once(world, place, what, where, text):  # noqa: F811
    args = ["train", "--no-progress", "--out-dir", place / "run", "--max-epochs", "1"]
    if where == "config":
        (place / "bomb.yaml").write_text(text)
        args += ["--config", place / "bomb.yaml"]
    else:
        args += ["--set", text]
    started = time.monotonic()
    err = probe(args, place)
    assert "aliases" in err and time.monotonic() - started < 10


# ------------------------------------------------------------------------------ the demo


@pytest.fixture(scope="module")
def server(world):  # noqa: F811
    with running_demo(world, timeout=5.0) as running:
        yield running


def _post(body: bytes, content_type: str = "multipart/form-data; boundary=b0") -> bytes:
    return (f"POST /api/caption?method=greedy HTTP/1.0\r\nContent-Type: {content_type}\r\nContent-Length: "
            f"{len(body)}\r\n\r\n").encode("latin-1") + body


def _nested(levels: int) -> bytes:
    body = b"x"
    for n in reversed(range(levels)):
        body = (b"--b%d\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\nContent-Type: "
                b"multipart/mixed; boundary=b%d\r\n\r\n" % (n, n + 1) + body + b"\r\n--b%d--\r\n" % n)
    return body


def _continuations(count: int) -> bytes:
    parts = "".join(f"; filename*{i}*=UTF-8''{'%41' * 20}" for i in range(count))
    return (f"--b0\r\nContent-Disposition: form-data; name=\"file\"{parts}\r\n\r\n").encode() + b"x\r\n--b0--\r\n"


def _parts(count: int) -> bytes:
    return b"".join(b"--b0\r\nContent-Disposition: form-data; name=\"f\"\r\n\r\nx\r\n" for _ in range(count)) + b"--b0--\r\n"


FORMS: list[tuple[str, Callable[[], bytes]]] = [
    ("multipart nested 2000 deep", lambda: _post(_nested(2000))),
    ("multipart nested once", lambda: _post(_nested(2))),
    ("RFC 2231 continuations, 770 kB", lambda: _post(_continuations(7000))),
    ("RFC 2231 continuations, 20 of them", lambda: _post(_continuations(20))),
    ("180,000 parts", lambda: _post(_parts(180000))),
    ("33 parts", lambda: _post(_parts(33))),
    ("a part head of 64 kB", lambda: _post(b"--b0\r\nContent-Disposition: form-data; name=\"file\"\r\nX: "
                                           + b"a" * 65536 + b"\r\n\r\nx\r\n--b0--\r\n")),
    ("a boundary of 5000 bytes", lambda: _post(b"--" + b"b" * 5000 + b"\r\n\r\nx", "multipart/form-data; boundary="
                                                + "b" * 5000)),
    ("a quoted name of 1 MB", lambda: _post(b"--b0\r\nContent-Disposition: form-data; name=\"" + b"\\a" * 500000
                                            + b"\"\r\n\r\nx\r\n--b0--\r\n")),
    ("an image bomb as the file", lambda: _post(b"--b0\r\nContent-Disposition: form-data; name=\"file\"; "
                                                b"filename=\"a.png\"\r\n\r\n" + png(13000, 13000) + b"\r\n--b0--\r\n")),
    ("a zTXt bomb as the body", lambda: _post(png(8, 8, _ztxt(8 << 20)), "image/png")),
    ("a GIF bomb as the body", lambda: _post(_gif_claiming(65535, 65535), "image/gif")),
]


def _ask(server, request: bytes, wait: float = 60.0) -> bytes:
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=wait) as sock:
        sock.sendall(request)
        answer = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
    return answer


@pytest.mark.parametrize("name,make", FORMS, ids=[n for n, _ in FORMS])
def test_hostile_forms_get_a_4xx_in_time(world, server, capfd, name, make):  # noqa: F811
    request = make()
    started = time.monotonic()
    with deadline():
        answer = _ask(server, request)
    SUMMARY["tried"] += 1
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else None
    log = capfd.readouterr().err
    if "Traceback" in log or status is None or status >= 500:
        SUMMARY["tracebacks"] += 1
        pytest.fail(f"{name}: status {status}, answer {answer[:300]!r}, log {log[-2000:]}")
    assert 400 <= status < 500 and "\n" not in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert time.monotonic() - started < 30  # a parse whose cost grew faster than the body took minutes


def _get_page(server) -> tuple[int | None, float]:
    started = time.monotonic()
    answer = _ask(server, b"GET / HTTP/1.0\r\n\r\n", wait=30)
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else None
    return status, time.monotonic() - started


SLOW_CLIENTS = [("8 idle connections", 8, b""), ("8 clients trickling header bytes", 8, b"G"),
                ("8 clients trickling a body", 8, b"POST /api/caption HTTP/1.0\r\nContent-Length: 1000\r\n\r\n"),
                ("72 idle connections", 72, b""), ("600 idle connections", 600, b"")]


@pytest.mark.parametrize("name,count,start", SLOW_CLIENTS, ids=[n for n, _, _ in SLOW_CLIENTS])
def test_slow_clients_do_not_stall_the_page(world, server, name, count, start):  # noqa: F811
    """GET / answers within 2 s while slow clients hold their connections open (loopback only)."""
    socks = []
    stop = threading.Event()

    def trickle():
        while not stop.wait(0.5):
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.send(b"x" if start else b"")

    try:
        for _ in range(count):
            socks.append(socket.create_connection(("127.0.0.1", server.server_port), timeout=10))
            if start:
                socks[-1].sendall(start)
        feeder = threading.Thread(target=trickle, daemon=True)
        if start:
            feeder.start()
        time.sleep(0.5)
        SUMMARY["tried"] += 1
        status, seconds = _get_page(server)
        assert status == 200 and seconds < 2.0, (status, seconds)
    finally:
        stop.set()
        for sock in socks:
            sock.close()


def test_a_trickling_client_is_closed_at_its_deadline(world, server):  # noqa: F811
    """The deadline is the request's, not each read's: a byte every 0.5 s does not keep it open."""
    SUMMARY["tried"] += 1
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=30) as sock:
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 20:
            try:
                sock.send(b"G")
                sock.settimeout(0.5)
                if sock.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
    assert closed and time.monotonic() - started < 15  # the server's timeout here is 5 s


# ------------------------------------------------------------------------------ ONNX folders


def _onnx_meta(folder: Path) -> dict:
    return json.loads((folder / "onnx.json").read_text())


def _retrained(name: str) -> Callable[[Path], None]:
    """The graph ``name`` with its first weight changed: a graph of another model, same shapes."""
    def change(folder: Path) -> None:
        import numpy as np
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(folder / name))
        init = next(t for t in graph.graph.initializer if np.prod(t.dims) > 1)
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 1, init.name))
        onnx.save(graph, str(folder / name))
    return change


def _swap_names(folder: Path) -> None:
    meta = _onnx_meta(folder)
    meta["encoder"], meta["step"] = meta["step"], meta["encoder"]
    (folder / "onnx.json").write_text(json.dumps(meta))


def _grid(folder: Path) -> None:
    meta = json.loads((folder / "config.json").read_text())
    meta["config"]["model"]["encoder"]["grid_size"] += 1
    (folder / "config.json").write_text(json.dumps(meta))


def _drop(key: str) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        meta = _onnx_meta(folder)
        meta.pop(key)
        (folder / "onnx.json").write_text(json.dumps(meta))
    return change


def _shapes(folder: Path) -> None:
    meta = _onnx_meta(folder)
    meta["shapes"]["step"]["outputs"]["alpha"] = ["?", 1]
    (folder / "onnx.json").write_text(json.dumps(meta))


def _weights(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    key = next(iter(state))
    state[key] = state[key] + 1
    save_file(state, str(folder / "model.safetensors"))


ONNX_TAMPERED: list[tuple[str, Callable[[Path], None]]] = [
    ("config.json grid size", _grid),
    ("step.onnx of another model", _retrained("step.onnx")),
    ("encoder.onnx of another model", _retrained("encoder.onnx")),
    ("onnx.json names swapped", _swap_names),
    ("onnx.json without fingerprints", _drop("sha256")),
    ("onnx.json without shapes", _drop("shapes")),
    ("onnx.json with other shapes", _shapes),
    ("model.safetensors of another model", _weights),
]


@pytest.mark.parametrize("name,damage", ONNX_TAMPERED, ids=[n for n, _ in ONNX_TAMPERED])
def test_tampered_onnx_folders_are_refused(world, tmp_path, name, damage):  # noqa: F811
    import shutil

    if world.onnx is None:
        pytest.skip("the ONNX cases need the export extra (onnx, onnxscript, onnxruntime)")
    folder = Path(shutil.copytree(world.onnx, tmp_path / "onnx"))
    damage(folder)
    err = probe(["caption", "--engine", "onnx", "--model", folder, world.image], tmp_path)
    assert "export" in err or "copy the folder" in err


# ------------------------------------------------------------------------------ full and read-only disks


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (root only, where mount works); skipped elsewhere."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs a small file system: mount -t tmpfs as root")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def _full(disk: Path) -> None:
    with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
        while True:
            f.write(b"\0" * 65536)


def _read_only(disk: Path) -> None:
    if subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True).returncode != 0:
        pytest.skip("cannot remount read-only here")


DISKS = [
    ("export into a full disk", _full, lambda w, x, d: ["export", "--checkpoint", w.ckpt, "--out", d / "m"]),
    ("export ONNX into a full disk", _full, lambda w, x, d: ["export", "--checkpoint", w.ckpt, "--out", d / "m",
                                                             "--format", "onnx"]),
    ("export into a read-only disk", _read_only, lambda w, x, d: ["export", "--checkpoint", w.ckpt, "--out", d / "m"]),
    ("prepare into a small disk", lambda d: None,
     lambda w, x, d: ["prepare", "--format", "karpathy", "--captions", x.captions, "--images", x.images, "--out",
                      d / "p", "--image-size", "400", "--workers", "1"]),
    ("prepare with two workers into a small disk", lambda d: None,
     lambda w, x, d: ["prepare", "--format", "karpathy", "--captions", x.captions, "--images", x.images, "--out",
                      d / "p", "--image-size", "400", "--workers", "2"]),
    ("prepare into a read-only disk", _read_only,
     lambda w, x, d: ["prepare", "--format", "karpathy", "--captions", x.captions, "--images", x.images, "--out",
                      d / "p", "--workers", "1"]),
    ("caption --heatmaps into a full disk", _full,
     lambda w, x, d: ["caption", "--checkpoint", w.ckpt, w.image, "--heatmaps", d / "figs"]),
]


@pytest.mark.parametrize("what,fill,argv", DISKS, ids=[w for w, _, _ in DISKS])
def test_full_and_read_only_disks_give_one_line_and_no_partial_file(world, extra, tiny_disk, what, fill, argv):  # noqa: F811
    if "ONNX" in what and world.onnx is None:
        pytest.skip("needs the export extra")
    fill(tiny_disk)
    probe(argv(world, extra, tiny_disk), tiny_disk, errors=None)
    left = [p.name for p in tiny_disk.rglob("*") if p.name.startswith((".tmp-", ".m.", ".p.")) or
            p.name.endswith(".partial") and not any(p.iterdir())]
    assert not left, left


# ------------------------------------------------------------------------------ kills

_EXPORT = """
import sys
from captioning.export.onnx import export_checkpoint
export_checkpoint(sys.argv[1], sys.argv[2], "folder")
"""


def test_a_kill_during_export_leaves_a_folder_that_loads(world, tmp_path):  # noqa: F811
    """SIGKILL at several moments of an export over an existing model folder: the folder then
    holds the old model or the new one, whole, and loads."""
    from captioning import Captioner

    out = tmp_path / "model"
    Captioner.from_checkpoint(world.ckpt, device="cpu").save_pretrained(out)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for delay in (0.0, 1.0, 2.0, 3.0, 4.0, 6.0):
        proc = subprocess.Popen([sys.executable, "-c", _EXPORT, str(world.ckpt), str(out)], env=env,
                                stderr=subprocess.DEVNULL)
        started = time.monotonic()
        while proc.poll() is None and time.monotonic() - started < delay:
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        SUMMARY["tried"] += 1
        Captioner.from_pretrained(out, device="cpu")  # loads: old or new, never a mixture
    proc = subprocess.run([sys.executable, "-c", _EXPORT, str(world.ckpt), str(out)], env=env, timeout=HANG_SECONDS)
    assert proc.returncode == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.")]


def test_prepare_resumes_after_a_kill_and_cleans_its_leftovers(tmp_path):
    """A kill during preparation: the same command again reuses the finished chunks. What a kill
    during the final swap left beside --out (.NAME.old-PID of a dead process) is removed."""
    from captioning.data.examples import write_example_dataset

    # 40 one-image chunks: after the second, enough work is left that the kill lands before the
    # end even when another test process holds the CPU.
    captions, images = write_example_dataset(tmp_path / "example", 40, image_size=32)
    out = tmp_path / "prep"
    argv = [sys.executable, "-m", "captioning", "prepare", "--format", "karpathy", "--captions", str(captions),
            "--images", str(images), "--out", str(out), "--workers", "1", "--chunk-size", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    chunks = out.with_name("prep.partial") / "chunks"
    started = time.monotonic()
    while proc.poll() is None and time.monotonic() - started < HANG_SECONDS:
        if chunks.is_dir() and len(list(chunks.glob("*.json"))) >= 2:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    SUMMARY["tried"] += 1
    if out.is_dir():
        pytest.skip("the preparation finished before it could be killed")
    done = len(list(chunks.glob("*.json")))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    leftover = tmp_path / f".prep.old-{dead}"
    leftover.mkdir()
    mark_folder(leftover, "prepared", name_as=out)
    mine = tmp_path / f".prep.old-{dead}-mine"
    mine.mkdir()  # not the project's: kept
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=HANG_SECONDS)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"({done} chunks already done)" in result.stderr
    assert not leftover.exists() and mine.is_dir()


def test_prepare_overwrite_keeps_files_a_preparation_never_writes(extra, tmp_path):
    out = tmp_path / "prep"
    base = ["prepare", "--format", "karpathy", "--captions", extra.captions, "--images", extra.images, "--out", out,
            "--workers", "1"]
    code, _, err, failure = run_cli([str(a) for a in base])
    assert code in (0, None) and failure is None, err
    (out / "captions_mine.json").write_text("the user's")
    (out / "images_backup.npy").write_bytes(b"the user's")
    probe(base + ["--overwrite"], tmp_path)
    assert (out / "captions_mine.json").read_text() == "the user's"


# ------------------------------------------------------------------------------ the count


def test_summary(capsys):
    """Probes tried, and how many gave a traceback (goal: 0)."""
    with capsys.disabled():
        print(f"\nhostile inputs tried: {SUMMARY['tried']}; tracebacks: {SUMMARY['tracebacks']}; "
              f"not one error line: {SUMMARY['not_one_line']}; existing files changed: {SUMMARY['files_changed']}")
    assert SUMMARY["tracebacks"] == 0
