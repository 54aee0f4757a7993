"""Naive PTQ: calibrate the observers, round to nearest."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tqdm import tqdm

from ptqkit.algorithms.base import Algorithm, AlgorithmConfig, RunContext
from ptqkit.algorithms.registry import register
from ptqkit.quant import prepare as pq
from ptqkit.schema import spec


@register("naive")
class NaivePTQ(Algorithm):
    multi_process = True
    @dataclass
    class Config(AlgorithmConfig):
        calib_images: Optional[int] = spec(None, lo=1,
                                           doc="observe ranges on the first N calibration images (null = all)")

    def run(self, ctx: RunContext):
        qmodel, _ = self.prepare(ctx)
        images = ctx.calib_images[: self.params.calib_images]
        with tqdm(total=len(images), desc="calibrate", unit="img", disable=not ctx.show_progress) as bar:
            pq.calibrate(qmodel, images, ctx.cfg.data.calibration.batch_size, ctx.device, bar)
        self.after_calibration(qmodel, ctx, images)
        return qmodel
