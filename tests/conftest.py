"""Fixtures on real assets: pretrained checkpoints and real images, never random weights. They are read from the
assets root (`ptqkit.assets`: $PTQKIT_ASSETS, else the fetcher's per-user cache). A test module that needs them
says which with a marker (`pytestmark = pytest.mark.cifar10`, `imagenet_sample`); where they are missing its
tests are skipped with one reason naming the fetch command, and the rest of the suite runs.

Decoded image tensors are cached per test session so that several tests can evaluate on them cheaply."""
from __future__ import annotations

import logging
import os
import sys
import tempfile

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from ptqkit import assets  # noqa: E402  (after the checkout is on the path)

ASSETS = assets.root()
CIFAR = os.path.join(ASSETS, "cifar10")
IMAGENET = os.path.join(ASSETS, "imagenet")
# Under pytest-xdist (`-n 2`: one worker per core) each worker computes on one thread, so that the workers do not
# oversubscribe the cores; run alone, a test gets two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))
# A cache of this test session's own (kernels, FP32 results), inherited by the runs it starts: no test sees a
# figure an earlier test session left behind.
os.environ["PTQKIT_CACHE"] = tempfile.mkdtemp(prefix="ptqkit-test-cache-")

# marker -> (what must be there, under the assets root; how to get it)
NEEDED = {
    "cifar10": (["cifar10/resnet20-12fca82f.th", "cifar10/resnet56-4bfd9763.th", "cifar10/train", "cifar10/test"],
                f"{assets.FETCH_COMMAND} cifar10"),
    "imagenet_sample": (["imagenet/mobilenet_v2_coral.pth", "imagenet/sample"], "docs/ASSETS.md, 'ImageNet sample'"),
}


def missing_assets(marker: str) -> list[str]:
    return [p for p in NEEDED[marker][0] if not os.path.exists(os.path.join(ASSETS, p))]


def pytest_configure(config):
    for name in NEEDED:
        config.addinivalue_line("markers", f"{name}: needs the {name} assets under the assets root")


def pytest_runtest_setup(item):
    # Raised here, before the test's fixtures load anything, and from one place, so that the summary folds every
    # such skip into one line.
    for name, (_, how) in NEEDED.items():
        if item.get_closest_marker(name) is not None and missing_assets(name):
            pytest.skip(f"{name} assets not under the assets root {ASSETS} (first missing: "
                        f"{missing_assets(name)[0]}); get them with {how}, or set PTQKIT_ASSETS")


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now, for a torchrun rendezvous: tests run side by side (xdist
    workers) must not share one."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_main(capsys, *argv) -> tuple[int, str, str]:
    """ptq_main.py's main in this process: (exit status, stdout, stderr). What a subprocess would check, without a
    new interpreter and torch import per test; tests/test_config.py runs the script itself once."""
    import ptq_main
    status = ptq_main.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def cifar_checkpoint(depth: int) -> str:
    names = {20: "resnet20-12fca82f.th", 32: "resnet32-d509ac18.th", 44: "resnet44-014dd654.th",
             56: "resnet56-4bfd9763.th"}
    return os.path.join(CIFAR, names[depth])


def base_tree(**sections) -> dict:
    """A config tree for ResNet-20 on the shared CIFAR-10 assets; keyword sections are deep-merged over it."""
    from ptqkit.config import deep_merge
    tree = {
        "model": {"name": "cifar_resnet20", "checkpoint": cifar_checkpoint(20)},
        "data": {"root": CIFAR, "preset": "cifar10",
                 "calibration": {"split": "train", "num_images": 256, "batch_size": 32, "seed": 1005},
                 "evaluation": {"split": "test", "batch_size": 500, "workers": 0}},
        # hist_mse: the toolkit's MSE range search. MQBench's own MSEObserver takes minutes per calibration on 2
        # cores; test_observers compares the two.
        "quant": {"w": {"bits": 4, "per_channel": True, "observer": "hist_mse"},
                  "a": {"bits": 4, "observer": "hist_mse"}},
        "algorithm": {"name": "naive"},
        "runtime": {"device": "cpu", "output_dir": "runs/test"},
    }
    return deep_merge(tree, sections)


def small_run_config(tmp_path, name: str, algorithm: dict, observer: str, images: int, seed: int) -> str:
    """A YAML file for a quick ptq_main.py run of ResNet-20 into tmp_path/name: `images` calibration images, the
    first 1,000 test images, one thread."""
    import yaml
    tree = base_tree(algorithm=algorithm, quant={"w": {"observer": observer}, "a": {"observer": observer}},
                     runtime={"output_dir": str(tmp_path / name), "threads": 1, "seed": seed})
    tree["data"]["calibration"]["num_images"] = images
    tree["data"]["evaluation"].update(limit=1000, workers=0)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


@pytest.fixture(autouse=True)
def torch_threads_are_left_as_found():
    """Code run in-process (pipeline, export) must restore torch's thread count: a leaked 1 once ran every later
    test on one thread."""
    before = torch.get_num_threads()
    yield
    assert torch.get_num_threads() == before, f"torch's thread count left at {torch.get_num_threads()}, was {before}"


@pytest.fixture(autouse=True)
def root_logging_is_left_as_found():
    """Commands run in-process (ptq_main's main, the tools) configure the root logger as a command does, with a
    handler on the sys.stderr of that moment, which pytest closes after the test; a later test in the same process
    would log into the closed stream. Each test starts from the root logger as it was."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def cifar_test_set():
    """All 10,000 shared CIFAR-10 test images, decoded once: (images, labels)."""
    from ptqkit import data
    from ptqkit.config import validate
    cfg = validate(base_tree())
    xs, ys = zip(*data.evaluation_loader(data.make_splits(cfg.data), cfg.data.evaluation))
    return torch.cat(xs), torch.cat(ys)


@pytest.fixture(scope="session")
def cifar_calib():
    """256 calibration images drawn with seed 1005 from the shared train folder."""
    from ptqkit import data
    from ptqkit.config import validate
    cfg = validate(base_tree())
    splits = data.make_splits(cfg.data)
    images, _ = data.draw_calibration(splits, cfg.data.calibration)
    return images


@pytest.fixture(scope="session")
def resnet20():
    from ptqkit.models import build_model, load_checkpoint
    model = build_model("cifar_resnet20")
    load_checkpoint(model, cifar_checkpoint(20))
    return model.eval()


@torch.no_grad()
def top1(model, images, labels, batch_size=250) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += (model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
    return 100.0 * correct / len(images)
