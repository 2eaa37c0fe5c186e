"""PyramidFlow as an anomalib 2.x model: :class:`Pyramidflow`, which anomalib's ``Engine``
fits, tests and predicts with its own datamodules (``Folder``, ``MVTecAD``, ...).

The pieces are the library's own: :class:`~pyramidflow.model.flow.PyramidFlow` (kernels,
memory-constant training), its Siamese Fourier loss, Adam with the paper's settings
(:func:`~pyramidflow.training.loop.make_optimizer`), the gradient-norm clip and the finiteness
check of :mod:`pyramidflow.training.loop`, the float64 template and spread
(:class:`~pyramidflow.training.template.LatentMoments`) and the scoring recipes
(:func:`~pyramidflow.model.scoring.score_latents`). anomalib brings the data, the
pre-processing (resize to ``image_size``, ImageNet normalization: the library's own
``x = (pixel - mean) / std``), the post-processing (thresholds, normalization), the metrics
and the visualizer.

The template (and, for ``scoring="znorm"``, the spread) is computed from the training images
in eval mode whenever the weights changed since the last one and it is needed: before each
validation, and at the end of fitting. It is kept in buffers, so Lightning checkpoints carry
it; a checkpoint written while it was out of date says so and is refused at scoring time.
Training length (epochs, steps) is the ``Engine``'s (``max_epochs``, ``max_steps``); batch
size is the datamodule's (``train_batch_size``: at least 2, pairs are compared).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..config import IMAGENET_MEAN, IMAGENET_STD, Config
from ..errors import PyramidFlowError
from ..model.flow import PyramidFlow, level_sizes
from ..model.scoring import (
    level_scale_size,
    recipe_latents,
    score_latents,
    uses_level_scale,
    uses_spread,
)
from ..training.loop import augment, check_finite, make_optimizer
from ..training.template import LatentMoments, sum_level_maxima

try:
    from anomalib import LearningType
    from anomalib.data import Batch, InferenceBatch
    from anomalib.models.components import AnomalibModule
    from anomalib.pre_processing import PreProcessor
    from torch.utils.data import DataLoader
    from torchvision.transforms.v2 import Compose, Normalize, Resize
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'pyramidflow.integrations.anomalib needs anomalib 2.x: pip install "pyramidflow[anomalib]"'
    ) from exc

__all__ = ["NoTemplateError", "Pyramidflow", "PyramidflowModel"]


class NoTemplateError(PyramidFlowError, RuntimeError):
    """Scoring was asked of a model whose template is missing or older than its weights."""


class PyramidflowModel(nn.Module):
    """anomalib's "torch model" of :class:`Pyramidflow`: the flow and its template.

    In training mode ``model(images)`` returns the latents; in eval mode an
    :class:`~anomalib.data.InferenceBatch` with ``anomaly_map`` (B, H, W) and ``pred_score``
    (B,) of normalized images (B, 3, H, W)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.flow = PyramidFlow(config)
        self.levels = config.levels
        self.recipe = config.scoring
        self.needs_spread = uses_spread(config.scoring)
        self.needs_level_scale = uses_level_scale(config.scoring)
        if self.needs_level_scale:
            size = level_scale_size(config.scoring, config.levels)
            self.register_buffer("level_scale", torch.ones(size))
        for level, (h, w) in enumerate(level_sizes(config.image_size, config.levels)):
            self.register_buffer(f"template_{level}", torch.zeros(config.channels, h, w))
            if self.needs_spread:
                self.register_buffer(f"spread_{level}", torch.ones(config.channels, h, w))
        # whether the template belongs to the current weights (saved with them)
        self.register_buffer("template_ready", torch.tensor(False))

    def template(self) -> list[torch.Tensor]:
        """The latent template, L tensors (C, h_l, w_l), finest first."""
        return [getattr(self, f"template_{level}") for level in range(self.levels)]

    def spread(self) -> list[torch.Tensor] | None:
        """The per-element spread (``znorm``/``relative`` scoring) or None (``paper``)."""
        if not self.needs_spread:
            return None
        return [getattr(self, f"spread_{level}") for level in range(self.levels)]

    @torch.no_grad()
    def set_template(self, moments: LatentMoments) -> None:
        """Finish ``moments`` into the template (and spread) buffers and mark them current."""
        dtype = self.template_0.dtype
        if self.needs_spread:
            template, spread = moments.template_and_spread(dtype)
            for buffer, value in zip(self.spread() or [], spread, strict=True):
                buffer.copy_(value)
        else:
            template = moments.template(dtype)
        for buffer, value in zip(self.template(), template, strict=True):
            buffer.copy_(value)
        self.template_ready.fill_(True)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor] | InferenceBatch:
        """Latents (training mode) or maps and scores (eval mode) of normalized images."""
        if self.training:
            return self.flow(images)
        if not bool(self.template_ready):
            raise NoTemplateError(
                "this PyramidFlow model has no template for its current weights: fit it with "
                "anomalib's Engine.fit (the template is computed at the end of fitting) or "
                "load a checkpoint written after fitting"
            )
        latents = self.flow(images)
        level_scale = self.level_scale if self.needs_level_scale else None
        maps, scores = score_latents(
            self.flow, latents, self.template(), self.spread(), self.recipe, level_scale
        )
        return InferenceBatch(pred_score=scores, anomaly_map=maps)


class Pyramidflow(AnomalibModule):
    """PyramidFlow (Lei et al., CVPR 2023) on this package's engine, as an anomalib model.

    The arguments are :class:`~pyramidflow.config.Config`'s of the same names (the paper's
    defaults): pyramid ``levels``, coupling ``stacks``, latent ``channels``, coupling
    ``kernel_size``, ``volume_norm`` ("CVN" or "SVN"), ``image_size`` (the pre-processor
    resizes to it; multiples of 2^(levels-1)), ``clamp``, ``memory`` ("recompute": training
    memory constant in depth; "store": plain autograd), ``backend`` ("auto", "torch",
    "triton"), ``scoring`` ("paper", "znorm", "relative", "fused" or "fused_peak"), the
    optimizer's ``lr``, ``betas``, ``eps``, ``weight_decay``, the gradient-norm clip
    ``grad_clip``, the texture ``augment``ation (flips, rot90) and the ``seed`` of its
    draws. ``pre_processor`` ... ``visualizer`` are anomalib's (True: the defaults,
    False: none, or an instance).
    """

    def __init__(
        self,
        levels: int = 4,
        stacks: int = 4,
        channels: int = 16,
        kernel_size: int = 7,
        volume_norm: str = "CVN",
        image_size: tuple[int, int] | int = (256, 256),
        clamp: float = 2.0,
        memory: str = "recompute",
        backend: str = "auto",
        scoring: str = "fused_peak",
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.5, 0.9),
        eps: float = 1e-4,
        weight_decay: float = 1e-5,
        grad_clip: float = 1.0,
        augment: bool = False,
        seed: int = 0,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Any = True,
        visualizer: Any = True,
    ) -> None:
        if augment == "auto":
            raise ValueError(
                "augment='auto' decides from the whole good set before training, which an "
                "anomalib datamodule does not give the model: pass augment=True for textures"
            )
        config = Config(
            levels=levels, stacks=stacks, channels=channels, kernel_size=kernel_size,
            volume_norm=volume_norm, image_size=image_size, clamp=clamp, memory=memory,
            backend=backend, scoring=scoring, lr=lr, betas=betas, eps=eps,
            weight_decay=weight_decay, grad_clip=grad_clip, augment=augment, seed=seed,
            in_channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, normalization="imagenet",
        )  # fmt: skip
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(config.image_size)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.config = config
        self.model = PyramidflowModel(config)
        self._augment_draws = torch.Generator().manual_seed(config.seed)
        self._last_loss: torch.Tensor | None = None
        self._trained_since_template = False

    @staticmethod
    def configure_pre_processor(image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to ``image_size`` (default 256 x 256) and normalize with the ImageNet
        statistics, as the library does for 8-bit RGB images."""
        return PreProcessor(
            transform=Compose([
                Resize(tuple(image_size or (256, 256)), antialias=True),
                Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
            ])
        )  # fmt: skip

    @property
    def learning_type(self) -> LearningType:
        """Trained on good images only."""
        return LearningType.ONE_CLASS

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """One device (VN statistics are not synchronized across Lightning ranks), no
        sanity validation before the template exists; clipping is the model's own."""
        return {"devices": 1, "num_sanity_val_steps": 0, "gradient_clip_val": None}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam with the configured (paper's) settings over the flow's parameters."""
        return make_optimizer(self.model.flow, self.config)

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        """The Siamese Fourier loss of the batch's latents; a batch of one image (the last
        of an epoch) has no pair and is skipped."""
        del args, kwargs
        images = batch.image
        if images.shape[0] < 2:
            return None
        if self.config.augment:
            images = augment(images, self._augment_draws)
        flow = self.model.flow
        # no name for the latents: memory="recompute" frees each one during the backward
        loss = flow.loss(flow(images))
        self._last_loss = loss.detach()
        self.log("train_loss", self._last_loss, on_step=True, prog_bar=True)
        return loss

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip the gradient norm at ``grad_clip`` and stop on a non-finite loss or norm
        before the optimizer step, as the library's training loop does."""
        del gradient_clip_val, gradient_clip_algorithm
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        loss = self._last_loss if self._last_loss is not None else torch.zeros(())
        value, norm_value = torch.stack([loss.float(), norm.float().to(loss.device)]).tolist()
        check_finite(value, norm_value, self.current_epoch, self.global_step + 1)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """The weights moved: the template no longer belongs to them."""
        del outputs, batch, batch_idx
        if not self._trained_since_template:
            self._trained_since_template = True
            self.model.template_ready.fill_(False)

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        """Maps and scores of a validation batch, for anomaly's thresholds and metrics."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    def on_validation_start(self) -> None:
        """Bring the template up to date with the weights before scoring."""
        self._refresh_template()

    def on_train_epoch_end(self) -> None:
        """At the end of fitting (last epoch, step limit or a stop), compute the template,
        before the epoch's checkpoint is written."""
        trainer = self.trainer
        last_epoch = trainer.max_epochs not in (None, -1) and (
            trainer.current_epoch + 1 >= trainer.max_epochs
        )
        step_limit = trainer.max_steps not in (None, -1) and (
            trainer.global_step >= trainer.max_steps
        )
        if last_epoch or step_limit or trainer.should_stop:
            self._refresh_template()

    def on_train_end(self) -> None:
        """Fitting ended elsewhere than at an epoch's end: the template still follows."""
        self._refresh_template()

    def _refresh_template(self) -> None:
        """Recompute the template from the training images when the weights changed since
        it was last computed."""
        if not self._trained_since_template:
            return
        was_training = self.model.training
        self.model.eval()
        moments = LatentMoments(
            self.config, squares=self.model.needs_spread, device=self.model.template_0.device
        )
        with torch.no_grad():
            for images in self._training_images():
                moments.add(recipe_latents(self.model.flow(images), self.model.recipe))
            self.model.set_template(moments)
            if self.model.needs_level_scale:
                self._refresh_level_scale()
        self._trained_since_template = False
        self.model.train(was_training)

    def _refresh_level_scale(self) -> None:
        """The ``fused`` recipe's level scale: every level's map maximum averaged over the
        training images (a second pass, with the new template and spread)."""
        total, count = sum_level_maxima(
            self.model.flow, self._training_images(), self.model.template(),
            self.model.spread() or [], self.model.recipe,
        )  # fmt: skip
        self.model.level_scale.copy_(total / count.clamp_min(1))

    def _training_images(self) -> Iterator[torch.Tensor]:
        """The training images in order, pre-processed, on the model's device: the
        datamodule's training set (with its own augmentations, if any), else the trainer's
        training loader."""
        datamodule = getattr(self.trainer, "datamodule", None)
        dataset = getattr(datamodule, "train_data", None)
        if dataset is not None:
            loader: Any = DataLoader(
                dataset,
                batch_size=getattr(datamodule, "eval_batch_size", 32),
                shuffle=False,
                num_workers=getattr(datamodule, "num_workers", 0),
                collate_fn=dataset.collate_fn,
            )
        else:
            loader = self.trainer.train_dataloader
        transform = getattr(self.pre_processor, "transform", None)
        for batch in loader:
            images = batch.image.to(self.model.template_0.device)
            yield transform(images) if transform is not None else images
