"""The examples run and do what they say (pyramidflow_kernels as a backend of other flows)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def custom_flow() -> ModuleType:
    return load_example("custom_flow")


def test_custom_flow_trains_inverts_and_finds_blemishes(custom_flow, capsys) -> None:
    result = custom_flow.main(steps=12, size=16, batch=4, verbose=True)
    losses = result["losses"]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < losses[0]  # training lowers the NLL
    assert result["inversion_error_train"] < 1e-5
    assert result["inversion_error_eval"] < 1e-5
    assert result["map_shape"] == [4, 16, 16]  # maps at the input resolution
    assert result["defect_score_min"] > result["clean_score_max"]
    assert "inversion error" in capsys.readouterr().out


def test_custom_flow_with_the_fourier_loss_runs(custom_flow) -> None:
    result = custom_flow.main(steps=3, size=16, batch=2, loss="fourier", verbose=False)
    assert all(math.isfinite(v) for v in result["losses"])
    assert result["inversion_error_eval"] < 1e-5


def test_custom_flow_is_volume_preserving_over_a_batch(custom_flow) -> None:
    """The example's NLL has no log-det term: the couplings' Jacobian over a whole batch
    (training mode, batch statistics) has log|det| = 0."""
    torch.manual_seed(0)
    flow = custom_flow.TwoLevelFlow(8).double().train()
    with torch.no_grad():  # random conditioners: the zero-initialised ones are identities
        for module in flow.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(0.0, 0.3)
    fine, coarse = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 3, 4, 4).double()

    def flat_couple(flat: torch.Tensor) -> torch.Tensor:
        bands = [flat[: fine.numel()].view_as(fine), flat[fine.numel() :].view_as(coarse)]
        return torch.cat([z.reshape(-1) for z in flow.couple(bands)])

    flat = torch.cat([fine.reshape(-1), coarse.reshape(-1)])
    jacobian = torch.autograd.functional.jacobian(flat_couple, flat)
    sign, logabsdet = torch.linalg.slogdet(jacobian)
    # the orthogonal matrices were made in float32: |det W| = 1 only to float32 rounding,
    # once per pixel; the volume-normalized scales contribute exactly nothing
    mixing = sum(
        torch.linalg.slogdet(coupling.mixing.weight).logabsdet * target.numel() / target.shape[1]
        for coupling, target in ((flow.fine_from_coarse, fine), (flow.coarse_from_fine, coarse))
    )
    assert abs(mixing) < 1e-4
    assert sign != 0 and abs(logabsdet - mixing) < 1e-9
    latents = flow.couple([fine, coarse])
    restored = flow.uncouple(latents)
    assert (restored[0] - fine).abs().max() < 1e-12 and (restored[1] - coarse).abs().max() < 1e-12
