"""The data module on the CIFAR-10 images of the assets: evaluation images decoded once with the values of torchvision's
per-image transforms; an unreadable image stops a run before any calibration, in one line naming it; the FP32
result is reused only for the same model and the same image bytes."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ptqkit import data
from conftest import CIFAR, REPO, base_tree, cifar_checkpoint
from ptqkit.config import validate
from ptqkit.errors import DataError

pytestmark = pytest.mark.cifar10


def small_folder(tmp_path, per_class=3):
    """A copy of the first images of each CIFAR-10 test class (train/ and test/ alike), to damage at will."""
    root = tmp_path / "cifar"
    for split in ("train", "test"):
        for cls in sorted(os.listdir(os.path.join(CIFAR, "test"))):
            os.makedirs(root / split / cls)
            for name in sorted(os.listdir(os.path.join(CIFAR, "test", cls)))[:per_class]:
                shutil.copy(os.path.join(CIFAR, "test", cls, name), root / split / cls / name)
    return root


def test_decoded_evaluation_set_equals_the_per_image_transforms():
    cfg = validate(base_tree(data={"evaluation": {"limit": 200}}))
    splits = data.make_splits(cfg.data)
    eval_set = data.evaluation_loader(splits, cfg.data.evaluation)
    images, labels = (torch.cat(t) for t in zip(*eval_set))
    reference = torch.stack([splits.evaluation[i][0] for i in splits.evaluation_indices])
    assert torch.equal(images, reference)                # ToTensor + Normalize per image: the very same values
    assert labels.tolist() == [splits.evaluation.targets[i] for i in splits.evaluation_indices]
    assert eval_set.images.dtype == torch.uint8 and len(eval_set) == 1 and eval_set.num_images == 200


def test_streamed_set_gives_the_same_batches_and_digest(tmp_path):
    root = small_folder(tmp_path)
    tree = base_tree(data={"root": str(root), "evaluation": {"batch_size": 7}})
    held = validate(tree)
    streamed = validate(base_tree(data={"root": str(root), "evaluation": {"batch_size": 7, "cache_mb": 0}}))
    a = data.evaluation_loader(data.make_splits(held.data), held.data.evaluation)
    b = data.evaluation_loader(data.make_splits(streamed.data), streamed.data.evaluation)
    assert a.images is not None and b.images is None and a.digest == b.digest
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("cache_mb", [4096, 0])
def test_unreadable_image_is_one_line_naming_it(tmp_path, cache_mb):
    root = small_folder(tmp_path)
    bad = root / "test" / "cat" / sorted(os.listdir(root / "test" / "cat"))[1]
    bad.write_bytes(b"this is not a JPEG")
    cfg = validate(base_tree(data={"root": str(root), "evaluation": {"cache_mb": cache_mb}}))
    with pytest.raises(DataError, match=rf"^image '{bad}': cannot be decoded \(.*\)$"):
        data.evaluation_loader(data.make_splits(cfg.data), cfg.data.evaluation)


def test_cli_unreadable_image_stops_before_calibration(tmp_path):
    root = small_folder(tmp_path)
    bad = root / "test" / "dog" / sorted(os.listdir(root / "test" / "dog"))[0]
    bad.write_bytes(bad.read_bytes()[:40])                # a truncated JPEG
    tree = base_tree(data={"root": str(root), "calibration": {"num_images": 16}},
                     algorithm={"name": "qdrop", "iters": 100000},          # would take hours if it started
                     runtime={"output_dir": str(tmp_path / "run")})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tree))
    proc = subprocess.run([sys.executable, "ptq_main.py", "--config", str(config), "--quiet"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: image '{bad}': cannot be decoded (")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()    # nothing was done, so no run folder is left behind


def test_fp32_result_is_reused_only_for_the_same_model_and_images(tmp_path):
    from ptqkit import pipeline
    root = small_folder(tmp_path, per_class=2)

    def run(folder, **model):
        cfg = validate(base_tree(data={"root": str(root), "calibration": {"num_images": 8}},
                                 model=model, runtime={"save_model": False}))
        out = tmp_path / folder
        out.mkdir()
        return pipeline.run(cfg, str(out), show_progress=False)
    first, second = run("a"), run("b")
    assert not first["fp32_reused"] and second["fp32_reused"] and second["fp32"] == first["fp32"]
    other = run("c", name="cifar_resnet32", checkpoint=cifar_checkpoint(32))
    assert not other["fp32_reused"]
    image = root / "test" / "ship" / sorted(os.listdir(root / "test" / "ship"))[0]
    Image.fromarray(np.array(Image.open(image))[:, ::-1]).save(image, format="JPEG")   # one image mirrored
    assert not run("d")["fp32_reused"]
