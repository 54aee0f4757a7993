"""Progress of a reconstruction run, saved after every unit so that a killed or interrupted run can continue.

`RUN_DIR/progress.pt` holds the position (phase and unit last finished), the quantized model's state at that
point (hard-rounded weights, learned activation steps), the loss history so far and the random-number state.
`python ptq_main.py --resume RUN_DIR` rebuilds the model from `RUN_DIR/config.yaml` exactly as the first start did
(same calibration), loads that state and continues with the next unit; with the random state restored, the
result is the one an uninterrupted run of the same seed gives. The file is replaced atomically, so a kill while
it is written leaves the previous one.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn

from ptqkit.errors import CheckpointError
from ptqkit.files import read_blob, save_atomic
from ptqkit.quant.quantizers import fake_quantizers
from ptqkit.quant.state import match_quantizer_shapes

FORMAT = "ptqkit-progress-v1"
FILENAME = "progress.pt"


def progress_path(run_dir: str) -> str:
    return os.path.join(run_dir, FILENAME)


def save_progress(path: str, qmodel: nn.Module, phase: int, unit: int, phase_names: list[str],
                  unit_names: list[str], history: list[dict]) -> None:
    blob = {"format": FORMAT, "phase": phase, "unit": unit, "phase_names": phase_names, "unit_names": unit_names,
            "history": history, "state_dict": qmodel.state_dict(), "rng": torch.get_rng_state(),
            "np_rng": _numpy_state()}
    if torch.cuda.is_available():
        blob["cuda_rng"] = torch.cuda.get_rng_state_all()
    save_atomic(blob, path)


def _numpy_state() -> dict:
    # As tensors and numbers: the file is read weights-only, which refuses numpy arrays.
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "gauss": float(gauss)}


def _set_numpy_state(state: dict) -> None:
    np.random.set_state(("MT19937", state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                         state["gauss"]))


def read_progress(path: str) -> dict:
    blob = read_blob(path, "resume state", FORMAT, "ptqkit", " (a run saves it after its first reconstruction unit; "
                     "naive and fdda runs have none)")
    blob["path"] = path
    return blob


def restore_progress(blob: dict, qmodel: nn.Module, phase_names: list[str], unit_names: list[str]) -> tuple[int, int]:
    """Load the saved state into a freshly calibrated model; return the (phase, unit) last finished."""
    path = blob["path"]
    if blob["phase_names"] != phase_names or blob["unit_names"] != unit_names:
        raise CheckpointError(f"resume state '{path}': written for phases {blob['phase_names']} over "
                              f"{len(blob['unit_names'])} units, this config builds {phase_names} over "
                              f"{len(unit_names)} units")
    match_quantizer_shapes(qmodel, [n for n, _ in fake_quantizers(qmodel)], blob["state_dict"])
    try:
        qmodel.load_state_dict(blob["state_dict"], strict=True)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1].strip()
        raise CheckpointError(f"resume state '{path}': does not match the model its config builds ({detail})") \
            from None
    torch.set_rng_state(blob["rng"])
    if "np_rng" in blob:   # algorithm.batch_draw fixed draws from numpy's generator
        _set_numpy_state(blob["np_rng"])
    if "cuda_rng" in blob and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    return blob["phase"], blob["unit"]
