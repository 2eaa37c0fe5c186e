"""Two gloo processes on the CPU equal the documented single-process run.

A run on R ranks with per-rank batch b equals ``loop.train(..., pair_groups=R)`` with
batch R*b on one process: same global batches and augmentation, VN mean over the global
batch, Siamese pairs only inside each rank's b images (see pyramidflow/distributed.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import pyramidflow.api
from pyramidflow import Config, Detector, PyramidFlow
from pyramidflow.io.checkpoint import load_checkpoint
from pyramidflow.synthetic import generate_category
from pyramidflow.training import loop
from pyramidflow.training.template import compute_template

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(image_size=32, levels=3, stacks=1, channels=8, kernel_size=3, epochs=1, lr=1e-3)
CONFIGS = {  # per-rank batch 2, 8 images: 2 steps of a global batch of 4
    "cvn": dict(TINY, volume_norm="CVN", augment=True, seed=1),
    "svn": dict(TINY, volume_norm="SVN", memory="store", seed=2),
}
WORKER = textwrap.dedent(
    """
    import sys
    import torch
    from safetensors.torch import save_file
    from pyramidflow import Config, PyramidFlow
    from pyramidflow.training import distributed
    from pyramidflow.training import loop, state
    from pyramidflow.training.template import compute_template

    out, configs = sys.argv[1], eval(sys.argv[2])
    device = distributed.init_from_env()  # what a torchrun script does
    rank = distributed.rank()
    if rank != 0:  # only rank 0 may write checkpoints
        def forbidden(*args, **kwargs):
            raise AssertionError("rank 1 wrote a checkpoint")
        state.save_checkpoint = forbidden
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    results = {}
    for name, values in configs.items():
        config = Config(**values)
        torch.manual_seed(config.seed)
        model = PyramidFlow(config)
        report = loop.train(model, images, config, device=device,
                              checkpoint_path=f"{out}/{name}.safetensors")
        assert report.steps == 2, report
        template = compute_template(model, images, batch_size=3)
        results.update({f"{name}.{k}": v.contiguous() for k, v in model.state_dict().items()})
        results.update({f"{name}.template.{i}": t for i, t in enumerate(template)})
        results[f"{name}.losses"] = torch.tensor(report.epoch_losses, dtype=torch.float64)
    save_file(results, f"{out}/rank{rank}.safetensors")
    distributed.shutdown()
    """
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(command: list[str], timeout: float = 180) -> None:
    """Run ``command`` as ranks 0 and 1 of a gloo group, as torchrun would start them."""
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        if sys.platform.startswith("linux"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        procs.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, output.decode()[-3000:]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ranks")
    script = out / "worker.py"
    script.write_text(WORKER)
    _run_ranks([sys.executable, str(script), str(out), repr(CONFIGS)])
    return out


def _single_process(name: str, **changes) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    config = Config(**{**CONFIGS[name], "batch_size": 4})
    torch.manual_seed(config.seed)
    model = PyramidFlow(config)
    report = loop.train(model, _images(), config, **changes)
    assert report.steps == 2
    template = compute_template(model, _images(), batch_size=3)
    return dict(model.state_dict()), template


def _images() -> torch.Tensor:
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_two_ranks_equal_one_process_with_pairs_inside_each_ranks_batch(
    two_ranks: Path, name: str
) -> None:
    ranks = [load_file(two_ranks / f"rank{r}.safetensors") for r in range(2)]
    for key in ranks[0]:  # every rank ends with the same model
        if key.startswith(name):
            torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0, msg=key)

    state, template = _single_process(name, pair_groups=2)
    for key, value in state.items():
        torch.testing.assert_close(
            ranks[0][f"{name}.{key}"], value, rtol=1e-5, atol=1e-6, msg=key
        )  # weights, and the VN running means (updated with the global batch mean)
    for level, t in enumerate(template):
        torch.testing.assert_close(ranks[0][f"{name}.template.{level}"], t, rtol=1e-5, atol=1e-6)

    # the documented equivalence is the discriminating one: all pairs across the global
    # batch (a plain batch of 4) is a different run
    plain, _ = _single_process(name)
    gap = max((ranks[0][f"{name}.{k}"] - v).abs().max().item() for k, v in plain.items())
    assert gap > 1e-4


def test_rank_zero_wrote_a_resumable_checkpoint(two_ranks: Path) -> None:
    saved = load_checkpoint(two_ranks / "cvn.safetensors")
    assert saved.info["world_size"] == 2 and saved.info["step"] == 2
    ranks = load_file(two_ranks / "rank0.safetensors")
    for key, value in saved.model.state_dict().items():
        assert torch.equal(value, ranks[f"cvn.{key}"]), key
    assert saved.info["epoch_losses"] == ranks["cvn.losses"].tolist()


@pytest.mark.slow
def test_train_command_under_torchrun_equals_one_process_with_pairs_per_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`torchrun --nproc_per_node 2 -m pyramidflow train ...` writes one model (rank 0)
    equal to `Detector.fit` with twice the batch and pairs inside each half."""
    data = generate_category(tmp_path, "disc", size=32, n_train=9, n_test_good=1,
                             n_test_defect_per_type=1)  # fmt: skip
    flags = ["--image-size", "32", "--levels", "3", "--stacks", "1", "--channels", "8",
             "--kernel-size", "3", "--epochs", "2", "--lr", "1e-3", "--seed", "3"]  # fmt: skip
    out = tmp_path / "ddp.safetensors"
    _run_ranks(
        [
            sys.executable,
            "-m",
            "pyramidflow",
            "train",
            str(data),
            "--out",
            str(out),
            "--batch-size",
            "2",
            "--no-progress",
            *flags,
        ]  # fmt: skip
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.safetensors", "disc"]  # no state
    trained = Detector.load(out)

    real_train = loop.train
    monkeypatch.setattr(
        pyramidflow.api, "train", lambda *a, **k: real_train(*a, **{**k, "pair_groups": 2})
    )
    single = Detector(
        Config(
            image_size=32,
            levels=3,
            stacks=1,
            channels=8,
            kernel_size=3,
            epochs=2,
            lr=1e-3,
            seed=3,
            batch_size=4,
        )  # fmt: skip
    ).fit(data)
    assert trained.info["steps"] == single.info["steps"] == 4  # 8 of 9 images: 2 x 2 steps
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(
            trained.model.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key
        )
    for a, b in zip(trained.template, single.template, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert trained.threshold == pytest.approx(single.threshold, rel=1e-4)
