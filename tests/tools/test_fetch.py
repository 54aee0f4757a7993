"""The asset fetcher (ptqkit.fetch, python -m ptqkit.tools.fetch), entirely offline: a mirror served by an
http.server on 127.0.0.1 in a thread, holding small fake checkpoints and a tiny CIFAR-10 tarball in the real
pickle format, whose checksums replace the real ones through the manifest."""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from conftest import REPO
from ptqkit import fetch
from ptqkit.errors import UserError
from ptqkit.tools import fetch as fetch_tool

CLASSES = list(fetch.CIFAR10_CLASSES)
CHECKPOINTS = [e.name for e in fetch.default_manifest()["cifar10"] if e.kind == fetch.FILE]
ARCHIVE = next(e.name for e in fetch.default_manifest()["cifar10"] if e.kind == fetch.CIFAR10_PYTHON)
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


# ---------------------------------------------------------------------------------------------------- the mirror
class Mirror:
    """Serves the files of `folder` on 127.0.0.1; counts the requests; `truncate` names files sent with a
    Content-Length larger than the body, the connection then closed."""

    def __init__(self, folder):
        self.folder = str(folder)
        self.requests: list[str] = []
        self.truncate: set[str] = set()
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                mirror.requests.append(name)
                path = os.path.join(mirror.folder, name)
                if "/" in name or not os.path.isfile(path):
                    self.send_error(404)
                    return
                body = open(path, "rb").read()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if name in mirror.truncate:
                    self.send_header("Content-Length", str(len(body) + 1000))
                    self.end_headers()
                    self.wfile.write(body[:len(body) // 2])
                    self.close_connection = True
                    return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def make_batch(rng, labels) -> dict:
    """A CIFAR-10 python batch as the real files hold it: bytes keys, N x 3072 uint8 rows (CHW), int labels."""
    n = len(labels)
    return {b"batch_label": b"fake", b"labels": [int(x) for x in labels],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


def make_archive(path, rng) -> dict:
    """A tiny cifar-10-python.tar.gz: five train batches of 4 images, a test batch of 10, every class in both
    splits. Returns the batches."""
    train = rng.permutation(np.arange(20) % 10)
    batches = {f"data_batch_{i}": make_batch(rng, train[4 * (i - 1):4 * i]) for i in range(1, 6)}
    batches["test_batch"] = make_batch(rng, rng.permutation(10))
    meta = {b"num_cases_per_batch": 10000, b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in [*batches.items(), ("batches.meta", meta)]:
            blob = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return batches


def digest(path, algorithm="sha256") -> str:
    return hashlib.new(algorithm, open(path, "rb").read()).hexdigest()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def served(tmp_path):
    """(mirror, manifest, batches): the mirror serving fake checkpoints and a fake tarball, and the manifest with
    their checksums."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, name in enumerate(CHECKPOINTS):
        (folder / name).write_bytes(rng.integers(0, 256, 3000 + 1000 * i, dtype=np.uint8).tobytes())
    batches = make_archive(folder / ARCHIVE, rng)
    manifest = {"cifar10": tuple(
        dataclasses.replace(e, digest=digest(folder / e.name, e.algorithm), size=os.path.getsize(folder / e.name))
        for e in fetch.default_manifest()["cifar10"])}
    mirror = Mirror(folder)
    yield mirror, manifest, batches
    mirror.close()


def leftovers(root) -> list[str]:
    """Partial files and folders anywhere under root."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        out += [os.path.join(dirpath, n) for n in dirnames + filenames if n.endswith(".part") or n.startswith(".")]
    return out


def replace_entry(manifest, name, **changes):
    return {"cifar10": tuple(dataclasses.replace(e, **changes) if e.name == name else e for e in manifest["cifar10"])}


# ---------------------------------------------------------------------------------------------------- tests
def test_fetch_lays_out_checkpoints_and_image_folders(tmp_path, served):
    mirror, manifest, batches = served
    root = tmp_path / "assets"
    report = fetch.fetch(["cifar10"], str(root), mirror=mirror.url, manifest=manifest, progress=False)
    assert sorted(mirror.requests) == sorted([*CHECKPOINTS, ARCHIVE]) and report.downloads == 5
    for e in manifest["cifar10"][:4]:
        assert digest(root / "cifar10" / e.name) == e.digest
    assert not (root / "cifar10" / ARCHIVE).exists()       # deleted after extraction
    assert not leftovers(root)
    assert {o.path: o.status for o in report.outcomes} == {
        **{f"cifar10/{n}": "fetched" for n in [*CHECKPOINTS, ARCHIVE]},
        "cifar10/test": "written", "cifar10/train": "written"}

    for split, names in (("test", ["test_batch"]), ("train", [f"data_batch_{i}" for i in range(1, 6)])):
        data = np.concatenate([batches[n][b"data"] for n in names])
        labels = [label for n in names for label in batches[n][b"labels"]]
        assert sorted(os.listdir(root / "cifar10" / split)) == CLASSES
        for i, label in enumerate(labels):          # lossless: the PNG is the source array, HWC
            png = np.asarray(Image.open(root / "cifar10" / split / CLASSES[label] / f"{i:05d}.png"))
            assert png.dtype == np.uint8 and np.array_equal(png, data[i].reshape(3, 32, 32).transpose(1, 2, 0))
        folder = ImageFolder(str(root / "cifar10" / split))
        assert folder.classes == CLASSES and sorted(folder.targets) == sorted(labels)
        assert all(target == labels[int(os.path.basename(p)[:5])] for p, target in folder.samples)

    # everything there: not one request, every file reported as already there
    mirror.requests.clear()
    again = fetch.fetch(["cifar10"], str(root), mirror=mirror.url, manifest=manifest, progress=False)
    assert mirror.requests == [] and again.downloads == 0
    assert {o.path: o.status for o in again.outcomes} == {
        **{f"cifar10/{n}": "already there" for n in CHECKPOINTS},
        "cifar10/test": "already there", "cifar10/train": "already there"}


def test_keep_archive_and_rebuild_a_missing_split_from_it(tmp_path, served):
    mirror, manifest, _ = served
    root = tmp_path / "assets"
    fetch.fetch(["cifar10"], str(root), mirror=mirror.url, manifest=manifest, progress=False, keep_archive=True)
    assert digest(root / "cifar10" / ARCHIVE, "md5") == manifest["cifar10"][4].digest
    shutil.rmtree(root / "cifar10" / "test")
    mirror.requests.clear()
    report = fetch.fetch(["cifar10"], str(root), mirror=mirror.url, manifest=manifest, progress=False)
    assert mirror.requests == []                    # the verified tarball on disk is used
    statuses = {o.path: o.status for o in report.outcomes}
    assert statuses["cifar10/test"] == "written" and statuses["cifar10/train"] == "already there"
    assert len(os.listdir(root / "cifar10" / "test" / "airplane")) >= 1
    assert not (root / "cifar10" / ARCHIVE).exists() and not leftovers(root)


def test_another_copy_of_the_images_is_left_alone(tmp_path, served):
    mirror, manifest, _ = served
    root = tmp_path / "assets"
    for split in ("test", "train"):
        for cls in CLASSES:
            (root / "cifar10" / split / cls).mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(root / "cifar10" / split / cls / "0001.jpg")
    report = fetch.fetch(["cifar10"], str(root), mirror=mirror.url, manifest=manifest, progress=False)
    assert ARCHIVE not in mirror.requests and sorted(mirror.requests) == sorted(CHECKPOINTS)
    assert [o.status for o in report.outcomes if o.path in ("cifar10/test", "cifar10/train")] == ["already there"] * 2
    assert os.listdir(root / "cifar10" / "test" / "cat") == ["0001.jpg"]


def test_an_incomplete_image_folder_stops_before_any_download(tmp_path, served):
    mirror, manifest, _ = served
    root = tmp_path / "assets"
    (root / "cifar10" / "train" / "airplane").mkdir(parents=True)
    with pytest.raises(UserError, match=r"train exists but is not a complete CIFAR-10 image folder") as info:
        fetch.fetch(["cifar10"], str(root), mirror=mirror.url, manifest=manifest, progress=False)
    assert "\n" not in str(info.value) and mirror.requests == []


def test_checksum_mismatch_leaves_nothing(tmp_path, served):
    mirror, manifest, _ = served
    root = tmp_path / "assets"
    name = CHECKPOINTS[0]
    wrong = replace_entry(manifest, name, digest="0" * 64)
    with pytest.raises(UserError) as info:
        fetch.fetch(["cifar10"], str(root), mirror=mirror.url, manifest=wrong, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and f"{mirror.url}/{name}" in msg
    assert f"expected {'0' * 64}" in msg and digest(mirror.folder + "/" + name) in msg
    assert "retry" in msg and "PTQKIT_ASSETS" in msg
    assert not (root / "cifar10" / name).exists() and not leftovers(root)


def test_truncated_transfer_leaves_nothing(tmp_path, served):
    mirror, manifest, _ = served
    root = tmp_path / "assets"
    name = CHECKPOINTS[1]
    mirror.truncate.add(name)
    with pytest.raises(UserError, match=r"the transfer stopped after \d+ of \d+ bytes") as info:
        fetch.fetch(["cifar10"], str(root), mirror=mirror.url, manifest=manifest, progress=False)
    assert "\n" not in str(info.value) and f"{mirror.url}/{name}" in str(info.value)
    assert not (root / "cifar10" / name).exists() and not leftovers(root)
    assert (root / "cifar10" / CHECKPOINTS[0]).exists()     # what came before stays


def test_refused_connection_is_one_line_naming_the_url(tmp_path):
    with socket.socket() as s:                       # a port that was free a moment ago: nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "assets"
    with pytest.raises(UserError, match="the connection was refused") as info:
        fetch.fetch(["cifar10"], str(root), mirror=f"http://127.0.0.1:{port}/", progress=False)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"could not fetch http://127.0.0.1:{port}/{CHECKPOINTS[0]}: ")
    assert str(root / "cifar10" / CHECKPOINTS[0]) in msg and not leftovers(root)


def test_a_server_that_never_answers_times_out(tmp_path):
    with socket.socket() as s:                       # listens, never accepts: the request waits for an answer
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        root = tmp_path / "assets"
        with pytest.raises(UserError, match=r"no answer within 0.3 s; retry") as info:
            fetch.fetch(["cifar10"], str(root), mirror=url, progress=False, timeout=0.3)
    assert "\n" not in str(info.value) and not leftovers(root)


def test_http_404(tmp_path, served):
    mirror, manifest, _ = served
    os.remove(os.path.join(mirror.folder, CHECKPOINTS[2]))
    root = tmp_path / "assets"
    with pytest.raises(UserError, match=r"HTTP 404") as info:
        fetch.fetch(["cifar10"], str(root), mirror=mirror.url, manifest=manifest, progress=False)
    assert "\n" not in str(info.value) and f"{mirror.url}/{CHECKPOINTS[2]}" in str(info.value)
    assert not (root / "cifar10" / CHECKPOINTS[2]).exists() and not leftovers(root)


def test_stale_part_and_wrong_file_are_fetched_again(tmp_path, served):
    mirror, manifest, _ = served
    root = tmp_path / "assets"
    (root / "cifar10").mkdir(parents=True)
    (root / "cifar10" / (CHECKPOINTS[0] + ".part")).write_bytes(b"interrupted")
    (root / "cifar10" / CHECKPOINTS[1]).write_bytes(b"not the checkpoint")
    (root / "cifar10" / ".partial-test").mkdir()           # an interrupted image layout
    report = fetch.fetch(["cifar10"], str(root), mirror=mirror.url, manifest=manifest, progress=False)
    for e in manifest["cifar10"][:4]:
        assert digest(root / "cifar10" / e.name) == e.digest
    assert {CHECKPOINTS[0], CHECKPOINTS[1]} <= set(mirror.requests)
    assert {o.path: o.status for o in report.outcomes}[f"cifar10/{CHECKPOINTS[1]}"] == "fetched"
    assert not leftovers(root)


def test_unknown_group(tmp_path):
    with pytest.raises(UserError, match=r"unknown fetch group 'imagenet'; the groups are cifar10"):
        fetch.fetch(["imagenet"], str(tmp_path))


def test_list_touches_no_network(tmp_path, served, capsys):
    mirror, manifest, _ = served
    root = tmp_path / "assets"
    assert fetch_tool.main(["--list", "--root", str(root), "--mirror", mirror.url]) == 0
    out = capsys.readouterr().out
    assert mirror.requests == [] and not root.exists()
    for e in fetch.default_manifest()["cifar10"]:
        assert f"{e.algorithm} {e.digest}" in out and f"{mirror.url}/{e.name}" in out
    assert fetch_tool.main(["--list"]) == 0
    assert "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/resnet20-12fca82f.th" \
        in capsys.readouterr().out


def _command(args, env_root):
    """`python -m ptqkit.tools.fetch ARGS` from the repository root, $PTQKIT_ASSETS set to env_root."""
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    env.update(OMP_NUM_THREADS="1", PTQKIT_ASSETS=str(env_root))
    return subprocess.run([sys.executable, "-m", "ptqkit.tools.fetch", *args], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=120)


def test_command_line_exit_status_and_messages(tmp_path, served, capsys, monkeypatch):
    monkeypatch.setenv("PTQKIT_ASSETS", str(tmp_path / "elsewhere"))
    mirror, manifest, _ = served
    root = tmp_path / "assets"
    # the real checksums against the mirror's fake files: a checksum mismatch, one line, exit status 2
    proc = _command(["--root", str(root), "--mirror", mirror.url, "--quiet"], tmp_path / "elsewhere")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: could not fetch {mirror.url}/{CHECKPOINTS[0]}: the sha256")
    assert "Traceback" not in proc.stderr and not leftovers(root)

    # the command with the mirror's checksums (in this process: only the manifest differs): one line per file,
    # and how to point the toolkit at a root that is not the default one
    assert fetch_tool.main(["--root", str(root), "--mirror", mirror.url, "--quiet"], manifest=manifest) == 0
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    assert [line.split()[:2] for line in out[:-1]] == [
        *[["fetched", f"cifar10/{n}"] for n in [*CHECKPOINTS, ARCHIVE]],
        ["written", "cifar10/test"], ["written", "cifar10/train"]]
    assert out[-1].endswith(f"export PTQKIT_ASSETS={root}") and captured.err == ""
    assert sorted(os.listdir(root / "cifar10" / "train")) == CLASSES
    assert fetch_tool.main(["--root", str(root), "--mirror", mirror.url], manifest=manifest) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[:-1]] == ["already"] * 6


def test_command_line_finds_the_real_checkpoints_without_a_request(tmp_path, served):
    """With the real checkpoints at hand ($PTQKIT_ASSETS), the plain command finds them by their real checksums."""
    mirror, _, _ = served
    source = os.environ.get("PTQKIT_ASSETS")
    if not source or not all(os.path.isfile(os.path.join(source, "cifar10", n)) for n in CHECKPOINTS):
        pytest.skip("the real CIFAR-10 checkpoints are not under $PTQKIT_ASSETS")
    root = tmp_path / "assets"
    for split in ("test", "train"):
        for cls in CLASSES:
            (root / "cifar10" / split / cls).mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(root / "cifar10" / split / cls / "0.png")
    for name in CHECKPOINTS:
        shutil.copy(os.path.join(source, "cifar10", name), root / "cifar10" / name)
    proc = _command(["--root", str(root), "--mirror", mirror.url], root)
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ["already"] * 6
    assert mirror.requests == [] and "export" not in proc.stdout
