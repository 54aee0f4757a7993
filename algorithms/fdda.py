"""FDDA (Zhong et al., ECCV 2022): fine-tuning of the quantized network by distillation from the full-precision
one, on one real image per class plus images from a conditional generator steered by per-class BN statistics.

Per-class BN statistics ("BNS centers", `ptqkit.algorithms.bns`) are measured once on the real images. Every
iteration the generator G(z, y) is trained, through the frozen teacher, with

    L_G = w_ce · CE(T(G(z, y)), y) + w_bns · BNS(G(z, y))                       random labels y
        + w_dbns · D-BNS(G(z', c)) + w_cbns · C-BNS(G(z', c)) + w_sce · CE(T(G(z', c)), c)   one class c

where BNS is the mean over all BN layers of MSE(batch mean, running mean) + MSE(batch variance, running
variance) of the BN inputs, C-BNS the same against the class centers of c and D-BNS against those centers
perturbed with Gaussian noise (σ 0.5 on means, 1.0 on variances); D-/C-BNS use the deeper half of the BN layers.
After `warmup_epochs` epochs of generator training alone, each iteration also takes one SGD step of the student
(the quantized model, eval mode, BN unfolded) on real + generated images with

    L_S = KL(softmax(T(x)/τ) || softmax(S(x)/τ)) · α · τ² + CE(S(x), y).

Quantizers follow the paper: per-channel min/max weight ranges recomputed before every student forward, EMA
min/max activation ranges observed during the first `act_freeze_epoch` epochs (on generated images while only the
generator trains) and frozen after.

Host and device: an epoch's iterations read nothing back from the device. The loss terms and accuracies are summed
there and read once at the epoch's end (the log line, the progress bar), where a non-finite generator or student
loss is also reported, naming its epoch; the real images are augmented on the host and copied through pinned
memory.

Precision (runtime.compute_dtype): the generator's step (generator and teacher forward, backward) and the
student's (teacher and student forward, backward) run under `ptqkit.precision.autocast`; the losses and the BN
statistics are computed in float32, the weights, the generator and both optimisers' state stay float32, and the
warm-up's observation, the report and the final ranges run in float32.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import RandomResizedCrop
from torchvision.utils import save_image
from tqdm import tqdm

from ptqkit import precision
from ptqkit.algorithms.base import Algorithm, AlgorithmConfig, RunContext
from ptqkit.algorithms.bns import (batchnorm_layers, bn_input_stats, check_centers, compute_bns_centers, load_centers,
                                   record_bn_inputs)
from ptqkit.algorithms.engine import frozen_parameters
from ptqkit.algorithms.registry import register
from ptqkit.errors import ConfigError, NumericalError
from ptqkit.quant import hostsync, kernels
from ptqkit.quant import prepare as pq
from ptqkit.quant.quantizers import act_quantizers, fake_quantizers, quant_state, weight_quantizers
from ptqkit.schema import spec

log = logging.getLogger(__name__)

AUGMENTATIONS = ("resized_crop", "pad_crop", "none")


# -------------------------------------------------------------------------------------------- generator
class ConditionalGenerator(nn.Module):
    """DCGAN-style conditional generator: the label embedding multiplies the noise, a linear layer makes a
    (width, H/4, W/4) map, two nearest-neighbour 2x upsamplings with conv-BN-LeakyReLU bring it to (H, W), a last
    conv and tanh give `channels` planes, mapped affinely onto [low, high] per channel (the range of the
    normalised real images, so generated and real inputs share the teacher's input range)."""

    def __init__(self, num_classes: int, latent_dim: int, image_shape: tuple[int, int, int], low: torch.Tensor,
                 high: torch.Tensor, width: int = 128):
        super().__init__()
        channels, height, width_px = image_shape
        self.latent_dim, self.width, self.image_shape = latent_dim, width, image_shape
        self.init_hw = (math.ceil(height / 4), math.ceil(width_px / 4))
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.project = nn.Linear(latent_dim, width * self.init_hw[0] * self.init_hw[1])
        self.body = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width, 3, 1, 1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width // 2, 3, 1, 1), nn.BatchNorm2d(width // 2), nn.LeakyReLU(0.2),
            nn.Conv2d(width // 2, channels, 3, 1, 1), nn.Tanh())
        self.register_buffer("low", low.reshape(1, channels, 1, 1).clone())
        self.register_buffer("high", high.reshape(1, channels, 1, 1).clone())

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.project(self.embed(labels) * z).view(len(z), self.width, *self.init_hw)
        x = self.body(h)[..., :self.image_shape[1], :self.image_shape[2]]
        return self.low + (x + 1) * 0.5 * (self.high - self.low)


# -------------------------------------------------------------------------------------------- helpers
def kd_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float) -> torch.Tensor:
    """KL(teacher || student) at temperature τ, scaled by α·τ² (batch mean), plus CE on the labels; in float32."""
    student_logits, teacher_logits = precision.float32(student_logits), precision.float32(teacher_logits)
    kl = F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.softmax(teacher_logits / temperature, dim=1),
                  reduction="batchmean")
    return kl * alpha * temperature ** 2 + F.cross_entropy(student_logits, labels)


def bns_distance(means, variances, target_means, target_vars, layers) -> torch.Tensor:
    """Mean over `layers` of MSE(mean, target) + MSE(variance, target)."""
    total = sum(F.mse_loss(means[i], target_means[i]) + F.mse_loss(variances[i], target_vars[i]) for i in layers)
    return total / len(layers)


def reset_weight_ranges(quantizers) -> None:
    # MQBench's MinMaxObserver keeps a running min/max over everything it saw; FDDA's weight ranges are those of
    # the current weights only.
    for q in quantizers:
        obs = q.activation_post_process
        obs.min_val.fill_(float("inf"))
        obs.max_val.fill_(float("-inf"))


class RealBatches:
    """Endless shuffled batches of the real calibration images, augmented per image (the reference draws without
    replacement and drops the last incomplete batch)."""

    def __init__(self, images, labels, batch_size: int, augment: str):
        self.images, self.labels = images, labels
        self.batch_size = min(batch_size, len(images))
        self.augment = augment
        self.order: list[int] = []
        height, width = images.shape[-2:]
        if augment == "resized_crop":
            self.crop = RandomResizedCrop((height, width), antialias=True)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        if self.augment == "resized_crop":
            x = self.crop(x)
        elif self.augment == "pad_crop":
            height, width = x.shape[-2:]
            padded = F.pad(x, (4, 4, 4, 4))
            top, left = torch.randint(0, 9, (2,)).tolist()
            x = padded[:, top:top + height, left:left + width]
        if self.augment != "none" and hostsync.host_float(torch.rand(())) < 0.5:
            x = x.flip(-1)
        return x

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.order) < self.batch_size:
            self.order = torch.randperm(len(self.images)).tolist()
        idx, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        batch = torch.stack([self._augment(self.images[i]) for i in idx])
        return batch, self.labels[idx]


@dataclass
class EpochStats:
    """An epoch's loss terms and accuracies, summed on the device (float64, in order: the sums Python floats would
    make) and read once, by `means()` at the epoch's end; also whether a generator or student loss was not
    finite."""
    sums: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    bad: dict = field(default_factory=dict)     # "generator" / "student" -> first non-finite loss (0-dim), or None

    def add(self, **values) -> None:
        for k, v in values.items():
            v = v.detach().double() if isinstance(v, torch.Tensor) else float(v)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1

    def watch(self, what: str, loss: torch.Tensor) -> None:
        """Remember the first non-finite `loss` of `what`, on the device."""
        loss = loss.detach().double()
        seen = self.bad.get(what)
        self.bad[what] = loss if seen is None else torch.where(torch.isfinite(seen), loss, seen)

    def means(self) -> dict:
        keys = list(self.sums)
        values = [self.sums[k] for k in keys]
        if any(isinstance(v, torch.Tensor) for v in values):
            values = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values]).cpu().tolist()
        return {k: round(v / self.counts[k], 5) for k, v in zip(keys, values)}

    def check(self, epoch: int) -> None:
        """A non-finite loss of this epoch stops the run (at the epoch's end: the iterations do not wait for it)."""
        for what, hint in (("generator", "lower algorithm.g_lr or the BNS weights"), ("student", "lower algorithm.lr")):
            loss = self.bad.get(what)
            if loss is not None and not bool(torch.isfinite(loss)):
                raise NumericalError(f"fdda: {what} loss became {float(loss)} in epoch {epoch} ({hint})")


def _drawn(t: torch.Tensor, device) -> torch.Tensor:
    """A draw from torch's CPU generator, moved to `device` without waiting: a seed gives the same latents, labels
    and noise on every device, as it gives the same masks (a CUDA run then differs from a CPU one by rounding)."""
    return t.to(device, non_blocking=True)


# -------------------------------------------------------------------------------------------- the method
@register("fdda")
class FDDA(Algorithm):
    @dataclass
    class Config(AlgorithmConfig):
        epochs: int = spec(400, lo=1, doc="epochs (generator warm-up included)")
        iters_per_epoch: int = spec(200, lo=1, doc="iterations per epoch")
        warmup_epochs: int = spec(50, lo=0, doc="first epochs that train the generator only")
        act_freeze_epoch: int = spec(4, lo=1, doc="activation ranges are EMA-observed in epochs [0, this) and "
                                                  "frozen after")
        use_generated: bool = spec(True, doc="false = ablation: the same fine-tuning on the real images only "
                                             "(no generator)")
        batch_size: int = spec(16, lo=1, doc="generated images per step (random labels; also the size of the "
                                             "single-class batch)")
        real_batch_size: int = spec(16, lo=1, doc="real images per student step (at most the calibration images)")
        augment: str = spec("resized_crop", choices=AUGMENTATIONS,
                            doc="augmentation of the real images: resized_crop (+flip, ImageNet reference), "
                                "pad_crop (4-pixel pad and crop +flip, CIFAR), none")
        # generator
        latent_dim: int = spec(100, lo=1)
        g_width: int = spec(128, lo=8, doc="channels of the generator's first feature map")
        g_lr: float = spec(1e-3, lo=0.0, doc="generator Adam learning rate")
        g_betas: list[float] = spec(factory=lambda: [0.5, 0.999], lo=0.0, hi=1.0)
        g_lr_milestones: list[int] = spec(factory=lambda: [100, 200, 300], lo=1,
                                          doc="epochs at which the generator learning rate is multiplied by "
                                              "g_lr_decay")
        g_lr_decay: float = spec(0.1, lo=0.0, hi=1.0)
        ce_weight: float = spec(0.5, lo=0.0, doc="CE of the teacher on random-label generated images")
        bns_weight: float = spec(0.2, lo=0.0, doc="global BNS loss (to the teacher's running statistics)")
        dbns_weight: float = spec(0.9, lo=0.0, doc="D-BNS: distance to Gaussian-perturbed class centers")
        cbns_weight: float = spec(0.01, lo=0.0, doc="C-BNS: distance to the exact class centers")
        single_ce_weight: float = spec(0.5, lo=0.0, doc="CE of the teacher on the single-class batch")
        dbns_mean_sigma: float = spec(0.5, lo=0.0, doc="std of the noise added to center means (D-BNS)")
        dbns_var_sigma: float = spec(1.0, lo=0.0, doc="std of the noise added to center variances (D-BNS)")
        bns_start_layer: Optional[int] = spec(None, lo=0, doc="first BN layer (forward order) of D-/C-BNS; "
                                                              "null = the reference rule (n + 1) // 2 - 2")
        trust_epoch: int = spec(4, lo=0, doc="after this epoch, single-class batches only use classes whose "
                                             "real image the teacher classifies correctly; until then such a "
                                             "class's D-BNS target is N(0, 1) noise on all BN layers (reference)")
        centers: Optional[str] = spec(None, exists="file", doc="BNS centers file of ptqkit.tools.bns_centers; "
                                                               "null = compute them from the calibration images")
        # student
        temperature: float = spec(20.0, lo=1e-3, doc="KD temperature τ")
        alpha: float = spec(20.0, lo=0.0, doc="KD weight α (the KL term is scaled by α·τ²)")
        lr: float = spec(1e-6, lo=0.0, doc="student SGD learning rate")
        momentum: float = spec(0.9, lo=0.0, hi=1.0)
        nesterov: bool = spec(True)
        weight_decay: float = spec(1e-4, lo=0.0)
        cosine_epochs: Optional[int] = spec(None, lo=1, doc="half-period of the student's cosine schedule in "
                                                            "epochs; null = the fine-tuning length (one decay to "
                                                            "0); the reference uses 100 (restarts)")
        eval_before_finetuning: bool = spec(False, doc="also evaluate the quantized model as it is just before "
                                                       "the first student step (results.json: fdda.before_finetuning)")

        def finalize(self, cfg) -> None:
            if self.warmup_epochs >= self.epochs:
                raise ConfigError("algorithm.warmup_epochs", f"fewer than algorithm.epochs ({self.epochs}), "
                                  "or no student step is taken", self.warmup_epochs)
            if self.use_generated and self.batch_size < 2:
                raise ConfigError("algorithm.batch_size", "at least 2 (the generator has BatchNorm layers)",
                                  self.batch_size)
            if len(self.g_betas) != 2:
                raise ConfigError("algorithm.g_betas", "two numbers (Adam beta1, beta2)", self.g_betas)
            if self.use_generated and not self.ce_weight + self.bns_weight + self.dbns_weight + self.cbns_weight \
                    + self.single_ce_weight > 0:
                raise ConfigError("algorithm.ce_weight", "a positive weight on at least one generator loss", 0.0)
            if cfg.quant.w.observer != "minmax":
                raise ConfigError("quant.w.observer", "minmax (fdda recomputes weight ranges at every step)",
                                  cfg.quant.w.observer)
            if cfg.quant.a.observer not in ("ema_minmax", "ema_mse"):
                raise ConfigError("quant.a.observer", "ema_minmax or ema_mse (fdda observes activation ranges "
                                  "as moving averages)", cfg.quant.a.observer)
            if self.centers is not None:
                # Caught here, before any model or data is built; the layer-by-layer check follows at run time.
                made_for = load_centers(self.centers).get("model")
                if made_for is not None and made_for != cfg.model.name:
                    raise ConfigError("algorithm.centers", f"BNS centers of model '{cfg.model.name}'",
                                      f"{self.centers} (made for '{made_for}')")

    # ------------------------------------------------------------------------------------------------ setup
    def _centers(self, ctx: RunContext) -> dict:
        if self.params.centers:
            centers = load_centers(self.params.centers)
            check_centers(centers, ctx.fp_model, self.params.centers)
            return centers
        return compute_bns_centers(ctx.fp_model, ctx.calib_images, ctx.calib_labels,
                                   ctx.cfg.data.calibration.batch_size, ctx.device)

    def _start_layer(self, n_layers: int) -> int:
        start = self.params.bns_start_layer
        if start is None:
            return max((n_layers + 1) // 2 - 2, 0)
        if start >= n_layers:
            raise ConfigError("algorithm.bns_start_layer", f"an index below the model's {n_layers} BN layers", start)
        return start

    def describe(self, ctx: RunContext) -> str:
        p = self.params
        n_bn = len(batchnorm_layers(ctx.fp_model))
        steps = (p.epochs - p.warmup_epochs) * p.iters_per_epoch
        gen = (f"generator {p.epochs * p.iters_per_epoch} steps, D-/C-BNS on BN layers "
               f"{self._start_layer(n_bn)}..{n_bn - 1} of {n_bn}" if p.use_generated else "no generator (ablation)")
        return (f"fdda: {len(ctx.calib_images)} real images of {len(set(ctx.calib_labels.tolist()))} classes; "
                f"{gen}; {steps} student steps of {min(p.real_batch_size, len(ctx.calib_images))} real"
                + (f" + {p.batch_size} generated" if p.use_generated else "") + " images")

    # -------------------------------------------------------------------------------------------------- run
    def run(self, ctx: RunContext) -> nn.Module:
        p = self.params
        device = ctx.device
        teacher = ctx.fp_model.eval()
        qmodel, _ = self.prepare(ctx)
        qmodel.eval()  # BN keeps its running statistics; its affine parameters are fine-tuned
        w_quant, a_quant = weight_quantizers(qmodel), act_quantizers(qmodel)
        quantizer_params = {id(t) for _, q in fake_quantizers(qmodel) for t in q.parameters()}
        for _, q in fake_quantizers(qmodel):
            q.requires_grad_(False)  # activation ranges come from the observers, not from gradients
        student_params = [t for t in qmodel.parameters() if id(t) not in quantizer_params]

        images, labels = ctx.calib_images, ctx.calib_labels
        # the generator's and the student's steps (runtime.compute_dtype; ptqkit.precision)
        compute_dtype = precision.dtype_of(ctx.cfg.runtime.compute_dtype)
        with torch.no_grad():
            num_classes = teacher(images[:1].to(device)).shape[1]
        real = RealBatches(images, labels, p.real_batch_size, p.augment)

        generator = g_opt = None
        if p.use_generated:
            gen_state = self._generator_state(ctx, teacher, num_classes)
            gen_state["compute_dtype"] = compute_dtype
            generator, g_opt = gen_state["generator"], gen_state["optimizer"]

        s_opt = torch.optim.SGD(student_params, lr=p.lr, momentum=p.momentum, nesterov=p.nesterov,
                                weight_decay=p.weight_decay)
        cosine_steps = (p.cosine_epochs or p.epochs - p.warmup_epochs) * p.iters_per_epoch
        s_sched = torch.optim.lr_scheduler.LambdaLR(
            s_opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / cosine_steps)))

        history, seconds = [], {"generator": 0.0, "student": 0.0}
        snapshot = None   # the model just before its first student step (eval_before_finetuning)
        total = p.epochs * p.iters_per_epoch
        with frozen_parameters(teacher), tqdm(total=total, desc="fdda", unit="it", disable=not ctx.show_progress) as bar:
            for epoch in range(p.epochs):
                observe_acts = epoch < p.act_freeze_epoch
                train_student = epoch >= p.warmup_epochs
                if g_opt is not None:
                    factor = p.g_lr_decay ** sum(epoch >= m for m in p.g_lr_milestones)
                    for group in g_opt.param_groups:
                        group["lr"] = p.g_lr * factor
                stats = EpochStats()
                with hostsync.loop():
                    for _ in range(p.iters_per_epoch):
                        fake = None
                        if generator is not None:
                            start = time.perf_counter()
                            fake = self._generator_step(gen_state, teacher, epoch, stats)
                            seconds["generator"] += time.perf_counter() - start
                        start = time.perf_counter()
                        if train_student and p.eval_before_finetuning and snapshot is None:
                            with hostsync.log_point():   # once per run
                                snapshot = self._frozen_copy(qmodel, images[:1].to(device))
                        if train_student:
                            self._student_step(qmodel, teacher, real, fake, s_opt, w_quant, a_quant, observe_acts,
                                               stats, device, compute_dtype)
                            s_sched.step()
                        elif observe_acts:
                            # Generator warm-up: the student only sees the inputs, so that its activation ranges
                            # settle on them (generated images, or the real ones in the ablation).
                            x = fake[0] if fake is not None else kernels.to_device(real.next()[0], device)
                            with torch.no_grad():
                                self._student_forward(qmodel, x, w_quant, a_quant, observe_acts)
                        seconds["student"] += time.perf_counter() - start
                        bar.update(1)
                stats.check(epoch)
                epoch_means = stats.means()
                bar.set_postfix({k: f"{v:.3g}" for k, v in list(epoch_means.items())[:4]}, refresh=False)
                history.append({"epoch": epoch, **epoch_means})
                ctx.log.info("fdda epoch %d/%d%s%s: %s", epoch + 1, p.epochs,
                             " [generator only]" if not train_student else "",
                             " [observing activation ranges]" if observe_acts else "",
                             ", ".join(f"{k} {v:.4g}" for k, v in epoch_means.items()))

        self._finalize_quantizers(qmodel, w_quant, images[:1].to(device))
        ctx.results["fdda"] = {"student_steps": (p.epochs - p.warmup_epochs) * p.iters_per_epoch,
                               "generator_steps": total if p.use_generated else 0,
                               "seconds": {k: round(v, 2) for k, v in seconds.items()}, "epochs": history}
        if generator is not None:
            report = self._generator_report(gen_state, teacher, images, labels, ctx.run_dir)
            ctx.results["fdda"]["generated"] = report
            ctx.log.info("fdda generator: teacher top-1 on its class-conditional images %.1f %% (chance %.1f); "
                         "C-BNS distance to the own class center %.3g, to the other centers %.3g",
                         report["teacher_top1"], 100.0 / num_classes, report["cbns_own"], report["cbns_other"])
        if snapshot is not None and ctx.evaluate is not None:
            # the model before fine-tuning (ranges observed, weights untouched): what fine-tuning adds
            result = ctx.evaluate(snapshot, "eval before fine-tuning")
            ctx.results["fdda"]["before_finetuning"] = result
            ctx.log.info("fdda: top-1 %.2f %% before fine-tuning (ranges observed, weights untouched)",
                         result["top1"])
        return qmodel

    # ---------------------------------------------------------------------------------------- generator
    def _generator_state(self, ctx: RunContext, teacher: nn.Module, num_classes: int) -> dict:
        p = self.params
        images = ctx.calib_images
        low = images.amin(dim=(0, 2, 3))
        high = images.amax(dim=(0, 2, 3))
        generator = ConditionalGenerator(num_classes, p.latent_dim, tuple(images.shape[1:]), low, high,
                                         p.g_width).to(ctx.device).train()
        # fused: its step count lives on the device (the default Adam reads it back on the host every step)
        optimizer = torch.optim.Adam(generator.parameters(), lr=p.g_lr, betas=tuple(p.g_betas), fused=True)
        centers = self._centers(ctx)
        layers = batchnorm_layers(teacher)
        classes = centers["classes"].tolist()
        # A class is trusted when the teacher gets most of its real images right (with one image: that image).
        trusted = [c for c, hits, n in zip(classes, centers["correct"].tolist(), centers["counts"].tolist())
                   if 2 * hits >= n]
        if not trusted:
            ctx.log.warning("fdda: the teacher misclassifies every calibration image; single-class batches use "
                            "all classes")
        start = self._start_layer(len(layers))
        ctx.log.info("fdda: BNS centers of %d classes (%d classified correctly by the teacher), %d BN layers, "
                     "D-/C-BNS on layers %d..%d", len(classes), len(trusted), len(layers), start, len(layers) - 1)
        to_dev = lambda ts: [t.to(ctx.device) for t in ts]  # noqa: E731
        return {"generator": generator, "optimizer": optimizer, "layers": layers, "start": start,
                "classes": classes, "trusted": set(trusted or classes), "num_classes": num_classes,
                "center_index": {c: i for i, c in enumerate(classes)},
                "center_mean": to_dev(centers["mean"]), "center_var": to_dev(centers["var"]),
                "running_mean": [m.running_mean for _, m in layers],
                "running_var": [m.running_var for _, m in layers]}

    def _teacher_with_stats(self, teacher, layers, x):
        means, variances = [None] * len(layers), [None] * len(layers)

        def keep(i, inp):
            means[i], variances[i] = bn_input_stats(inp)

        with record_bn_inputs(layers, keep):
            logits = teacher(x)
        return logits, means, variances

    def _generator_step(self, state: dict, teacher, epoch: int, stats: EpochStats):
        p = self.params
        device = state["running_mean"][0].device
        z = _drawn(torch.randn(p.batch_size, p.latent_dim), device)
        y = _drawn(torch.randint(0, state["num_classes"], (p.batch_size,)), device)
        with precision.autocast(device, state.get("compute_dtype", torch.float32)):
            loss, terms, fake, logits = self._generator_losses(state, teacher, epoch, z, y)
        stats.watch("generator", loss)
        state["optimizer"].zero_grad(set_to_none=True)
        loss.backward()
        state["optimizer"].step()
        stats.add(g_loss=loss, g_acc=(logits.argmax(1) == y).float().mean().double() * 100, **terms)
        return precision.float32(fake.detach()), y, precision.float32(logits.detach())

    def _generator_losses(self, state: dict, teacher, epoch: int, z, y):
        """The generator's loss, its terms (float32, whatever the networks computed in), the images and the
        teacher's logits on them."""
        p = self.params
        generator, layers, device = state["generator"], state["layers"], state["running_mean"][0].device
        fake = generator(z, y)
        logits, means, variances = self._teacher_with_stats(teacher, layers, fake)
        all_layers = range(len(layers))
        ce = F.cross_entropy(precision.float32(logits), y)
        bns = bns_distance(means, variances, state["running_mean"], state["running_var"], all_layers)
        loss = p.ce_weight * ce + p.bns_weight * bns
        terms = {"g_ce": ce, "g_bns": bns}

        if p.dbns_weight or p.cbns_weight or p.single_ce_weight:
            pool = sorted(state["trusted"]) if epoch > p.trust_epoch else state["classes"]
            cls = pool[hostsync.host_int(torch.randint(len(pool), ()))]
            ys = torch.full((p.batch_size,), cls, device=device, dtype=torch.long)
            logits_c, means_c, vars_c = self._teacher_with_stats(
                teacher, layers, generator(_drawn(torch.randn(p.batch_size, p.latent_dim), device), ys))
            k = state["center_index"][cls]
            deep = range(state["start"], len(layers))
            c_mean = [m[k] for m in state["center_mean"]]
            c_var = [v[k] for v in state["center_var"]]
            if cls in state["trusted"]:
                d_mean = [m + p.dbns_mean_sigma * _drawn(torch.randn(m.shape), m.device) for m in c_mean]
                d_var = [v + p.dbns_var_sigma * _drawn(torch.randn(v.shape), v.device) for v in c_var]
                dbns = bns_distance(means_c, vars_c, d_mean, d_var, deep)
                cbns = bns_distance(means_c, vars_c, c_mean, c_var, deep)
            else:
                # Reference: the centers of a class the teacher gets wrong are not trusted; early on such a
                # class is pulled towards unit-normal noise statistics on every layer instead.
                noise_mean = [_drawn(torch.randn(m.shape), m.device) for m in c_mean]
                noise_var = [_drawn(torch.randn(v.shape), v.device) for v in c_var]
                dbns = 2.0 * bns_distance(means_c, vars_c, noise_mean, noise_var, all_layers)
                cbns = torch.zeros((), device=device)
            sce = F.cross_entropy(precision.float32(logits_c), ys)
            loss = loss + p.dbns_weight * dbns + p.cbns_weight * cbns + p.single_ce_weight * sce
            terms.update(g_dbns=dbns, g_cbns=cbns, g_sce=sce)
        return loss, terms, fake, logits

    @torch.no_grad()
    def _generator_report(self, state: dict, teacher, images, labels, run_dir, per_class: int = 16) -> dict:
        """What the generator has learnt, measured as it trained it (BN in training mode, one class per batch):
        does the teacher recognise each class, and are a class's BN statistics (the D-/C-BNS layers) nearer its
        own center than the other classes' centers? With a `run_dir`, samples.png: one row per class, the real
        image first, then 8 generated ones (each channel shown over the real images' range)."""
        generator, layers = state["generator"], state["layers"]
        device = state["running_mean"][0].device
        rng = torch.Generator(device="cpu").manual_seed(0)   # leaves the run's random stream alone
        deep = range(state["start"], len(layers))
        hits, own, other, rows = 0, [], [], []
        for cls in state["classes"]:
            z = torch.randn(per_class, generator.latent_dim, generator=rng).to(device)
            fake = generator(z, torch.full((per_class,), cls, device=device, dtype=torch.long))
            logits, means, variances = self._teacher_with_stats(teacher, layers, fake)
            hits += int((logits.argmax(1) == cls).sum())
            for k, _ in enumerate(state["classes"]):
                d = float(bns_distance(means, variances, [m[k] for m in state["center_mean"]],
                                       [v[k] for v in state["center_var"]], deep))
                (own if k == state["center_index"][cls] else other).append(d)
            real = images[labels == cls][:1].to(device)
            rows.append(torch.cat([real, fake[:8]]))
        report = {"teacher_top1": 100.0 * hits / (per_class * len(state["classes"])),
                  "cbns_own": sum(own) / len(own), "cbns_other": sum(other) / max(len(other), 1),
                  "images_per_class": per_class}
        if run_dir:
            grid = (torch.cat(rows) - generator.low) / (generator.high - generator.low)
            save_image(grid.clamp(0, 1).cpu(), f"{run_dir}/samples.png", nrow=9, padding=1)
            report["samples"] = "samples.png"
        return report

    # ------------------------------------------------------------------------------------------ student
    @staticmethod
    def _student_forward(qmodel, x, w_quant, a_quant, observe_acts: bool):
        reset_weight_ranges(w_quant)
        with quant_state(qmodel, observe=True, quantize=True, only=w_quant), \
                quant_state(qmodel, observe=observe_acts, quantize=True, only=a_quant):
            return qmodel(x)

    def _student_step(self, qmodel, teacher, real: RealBatches, fake, optimizer, w_quant, a_quant,
                      observe_acts: bool, stats: EpochStats, device, compute_dtype=torch.float32) -> None:
        p = self.params
        x, y = real.next()
        x, y = kernels.to_device(x, device), kernels.to_device(y, device)
        with precision.autocast(device, compute_dtype):
            with torch.no_grad():
                t_logits = precision.float32(teacher(x))
            if fake is not None:
                fake_x, fake_y, fake_logits = fake
                x, y, t_logits = torch.cat([x, fake_x]), torch.cat([y, fake_y]), torch.cat([t_logits, fake_logits])
            logits = self._student_forward(qmodel, x, w_quant, a_quant, observe_acts)
        loss = kd_loss(logits, t_logits, y, p.temperature, p.alpha)
        stats.watch("student", loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stats.add(s_loss=loss, s_acc=(logits.argmax(1) == y).float().mean().double() * 100)

    def _frozen_copy(self, qmodel, sample) -> nn.Module:
        snapshot = copy.deepcopy(qmodel)
        self._finalize_quantizers(snapshot, weight_quantizers(snapshot), sample)
        return snapshot

    @staticmethod
    @torch.no_grad()
    def _finalize_quantizers(qmodel, w_quant, sample) -> None:
        """Weight ranges of the final weights; then every observer off and every quantizer on."""
        reset_weight_ranges(w_quant)
        with quant_state(qmodel, observe=False, quantize=True), \
                quant_state(qmodel, observe=True, quantize=True, only=w_quant):
            qmodel(sample)
        pq.freeze(qmodel)
