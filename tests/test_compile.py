"""torch.compile (inductor, CPU) over the torch reference path gives eager's results.

Three compiled functions, tiny model (32 x 32, L = 3, S = 1, C = 8): the inference
forward (latents, anomaly map and score against a template), and one training step in
each memory mode (compiled forward + loss, the backward that AOTAutograd derives, then the
eager optimizer step). Compared with the same step run eagerly on an identical copy:
loss, every gradient, the VN running means and the parameters after the Adam step.

``memory="store"`` compiles to one graph (``fullgraph=True``): forward and backward are
inductor code. ``memory="recompute"`` runs the flow in a custom ``autograd.Function``
whose backward calls ``torch.autograd.grad`` to rebuild each block's graph; Dynamo does
not trace that (``trace_autograd_ops`` is off), so it graph-breaks there: the pyramid and
the loss are compiled, the Function's forward body is compiled as its own frame, and its
backward runs eagerly, which keeps the constant-memory behaviour. Results are the same.

Inductor on CPU compiles C++ with the system compiler: cold (empty inductor cache) this
file takes about a minute and a half on 2 cores; a warm cache brings it to seconds.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from pyramidflow_kernels.testing import relative_error

from pyramidflow import Config, PyramidFlow
from pyramidflow.training.loop import make_optimizer

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="inductor on CPU needs a C++ compiler",
)

SIZE = 32


def tiny_model(memory: str, seed: int = 0) -> PyramidFlow:
    """A tiny model whose blocks really scale, shift and mix (the last convolution of each
    parameter network is zero-initialised: give it random values) and whose running means
    are not zero."""
    torch.manual_seed(seed)
    config = Config(image_size=SIZE, levels=3, stacks=1, channels=8, backend="torch", memory=memory)
    model = PyramidFlow(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "param_net" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
        for block in model.blocks:
            block.running_mean.copy_(0.1 * torch.randn(block.running_mean.shape, generator=gen))
    return model


def images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_compiled_inference_matches_eager() -> None:
    model = tiny_model("recompute").eval()
    with torch.no_grad():
        template = [z.mean(0) for z in model(images(4, seed=1))]

    def infer(batch: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        latents = model(batch)
        amap, score = model.anomaly_map(latents, template)
        return latents, amap, score

    compiled = torch.compile(infer, backend="inductor", fullgraph=True)
    batch = images(3, seed=2)
    with torch.no_grad():
        latents, amap, score = infer(batch)
        latents_c, amap_c, score_c = compiled(batch)
    assert amap_c.shape == (3, SIZE, SIZE) and score_c.shape == (3,)
    for z, z_c in zip(latents, latents_c, strict=True):
        assert relative_error(z_c, z) < 1e-5
    assert relative_error(amap_c, amap) < 1e-5
    torch.testing.assert_close(score_c, score, rtol=1e-5, atol=1e-6)
    # the images' ranking by score, what a user acts on, is the same
    assert torch.equal(score_c.argsort(), score.argsort())


@pytest.mark.parametrize("memory", ["store", "recompute"])
def test_compiled_training_step_matches_eager(memory: str) -> None:
    eager = tiny_model(memory).train()
    compiled_model = copy.deepcopy(eager)
    batch = images(2, seed=3)

    def loss_of(model: PyramidFlow, x: torch.Tensor) -> torch.Tensor:
        return model.loss(model(x))

    compiled_loss = torch.compile(loss_of, backend="inductor", fullgraph=memory == "store")
    results = []
    for model, fn in ((eager, loss_of), (compiled_model, compiled_loss)):
        optimizer = make_optimizer(model, model.config)
        loss = fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], model.config.grad_clip
        )
        optimizer.step()
        results.append((loss.detach(), grads))
    (loss_e, grads_e), (loss_c, grads_c) = results

    assert relative_error(loss_c, loss_e) < 1e-5
    assert len(grads_c) == len(grads_e) > 0
    for g_c, g_e in zip(grads_c, grads_e, strict=True):
        assert relative_error(g_c, g_e) < 1e-4
    # VN running means were updated once, as in eager, and the Adam step lands in the
    # same place
    for (name, b_e), (_, b_c) in zip(
        eager.named_buffers(), compiled_model.named_buffers(), strict=True
    ):
        assert relative_error(b_c, b_e) < 1e-5, name
    for (name, p_e), (_, p_c) in zip(
        eager.named_parameters(), compiled_model.named_parameters(), strict=True
    ):
        assert relative_error(p_c, p_e) < 1e-5, name
