"""BSS: the k smallest squared singular values of hand-made matrices, gradients, the gathered
variant over 2 gloo processes, and a 2-step run stacked with L2-SP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist_helpers import run_gloo
from tllab.errors import ConfigError
from tllab.plugin import SetupContext, StepOutput, build_plugins
from tllab.regularizer.bss import BSS, batch_spectral_shrinkage

# The gloo workers import this module in fresh processes: the heavy imports (models, Hydra, the
# trainer) stay inside the tests that need them.


def with_singular_values(s: list[float], rows: int, seed: int = 0) -> torch.Tensor:
    """U diag(s) V^T (float64, rows x len(s)) from random orthogonal U and V."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(len(s), len(s), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T


def step_output(f_s: torch.Tensor) -> StepOutput:
    z = torch.zeros(1)
    return StepOutput(0, 1, None, z, z, z, z, f_s)


def test_k_smallest_squared_singular_values():
    f = with_singular_values([4.0, 3.0, 1.0, 0.5], rows=6)
    torch.testing.assert_close(batch_spectral_shrinkage(f, k=1), torch.tensor(0.25, dtype=torch.float64))
    torch.testing.assert_close(batch_spectral_shrinkage(f, k=2), torch.tensor(1.25, dtype=torch.float64))
    torch.testing.assert_close(batch_spectral_shrinkage(f.T, k=2), torch.tensor(1.25, dtype=torch.float64))
    loss = BSS(weight=0.1, k=2).loss(step_output(f))["spectral"]
    torch.testing.assert_close(loss, torch.tensor(0.125, dtype=torch.float64))


def test_half_precision_features_are_upcast():
    f = with_singular_values([4.0, 3.0, 1.0], rows=5).bfloat16().requires_grad_()
    loss = batch_spectral_shrinkage(f, k=1)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(1.0, rel=2e-2)
    loss.backward()
    assert f.grad.dtype == torch.bfloat16 and torch.isfinite(f.grad.float()).all()
    assert batch_spectral_shrinkage(f.detach().float()).dtype == torch.float32


@pytest.mark.parametrize("k", [1, 2])
def test_gradcheck(k):
    f = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(k)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: batch_spectral_shrinkage(x, k), (f,))


def test_gradient_of_the_smallest_is_two_sigma_u_v():
    f = with_singular_values([4.0, 3.0, 1.5], rows=5).requires_grad_()
    batch_spectral_shrinkage(f, k=1).backward()
    u, s, vh = torch.linalg.svd(f.detach(), full_matrices=False)
    torch.testing.assert_close(f.grad, 2 * s[-1] * torch.outer(u[:, -1], vh[-1]))


def test_gather_in_one_process_is_the_local_loss():
    f = torch.randn(5, 3, dtype=torch.float64).requires_grad_()
    local, gathered = BSS(k=2).loss(step_output(f))["spectral"], BSS(k=2, gather=True).loss(step_output(f))["spectral"]
    assert torch.equal(local, gathered)
    (g_local,), (g_gathered,) = torch.autograd.grad(local, f), torch.autograd.grad(gathered, f)
    assert torch.equal(g_local, g_gathered)


def gathered_worker(rank: int, world: int, out_dir: str) -> None:
    """Each rank: its rows of x (3 and 5 rows: uneven), the same Linear, BSS gathered over ranks."""
    torch.manual_seed(0)
    x, layer = torch.randn(8, 4, dtype=torch.float64), torch.nn.Linear(4, 3).double()
    rows = x[:3] if rank == 0 else x[3:]
    loss = BSS(weight=1.0, k=2, gather=True).loss(step_output(layer(rows)))["spectral"]
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": layer.weight.grad}, f"{out_dir}/r{rank}.pt")


def test_gathered_loss_over_two_processes_equals_one_process_on_the_whole_batch(tmp_path):
    run_gloo(gathered_worker, 2, tmp_path, str(tmp_path))
    ranks = [torch.load(tmp_path / f"r{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    x, layer = torch.randn(8, 4, dtype=torch.float64), torch.nn.Linear(4, 3).double()
    loss = batch_spectral_shrinkage(layer(x), k=2)
    loss.backward()
    for r in ranks:
        torch.testing.assert_close(r["loss"], loss.detach())
    # The trainer averages gradients over ranks: the average is the whole batch's gradient.
    torch.testing.assert_close((ranks[0]["grad"] + ranks[1]["grad"]) / 2, layer.weight.grad)


def test_bad_k_is_refused():
    with pytest.raises(ConfigError, match="k=0 must be at least 1"):
        build_plugins("regularizer", {"bss": {"_target_": "tllab.regularizer.bss.BSS", "k": 0}})
    with pytest.raises(ValueError, match="k=4 is out of range: a \\(5, 3\\) feature matrix has 3"):
        batch_spectral_shrinkage(torch.randn(5, 3), k=4)
    from tllab.models import Classifier, create_backbone

    model = Classifier(create_backbone("tllab", "digits_cnn"), 10)  # 2048 features
    ctx = SetupContext(model, None, torch.device("cpu"), Path("."), {"trainer": {"batch_size": 8}})
    BSS(k=8).setup(ctx)
    with pytest.raises(ConfigError, match="regularizer.bss.k=9 exceeds the 8 singular values of a batch's 8 x 2048"):
        BSS(k=9).setup(ctx)


def test_yaml_composes_with_the_defaults():
    from tests.conftest import compose_config
    from tllab.train import resolve_config

    cfg, resolved = resolve_config(compose_config(["experiment=digits_finetune", "regularizer=bss"]))
    assert resolved["regularizer"]["bss"] == {"_target_": "tllab.regularizer.bss.BSS", "weight": 0.001, "k": 1,
                                              "gather": False}
    assert isinstance(build_plugins("regularizer", cfg.regularizer)["bss"], BSS)


def test_stacked_with_l2sp_trains_two_steps_and_logs_every_term(train_run, tmp_path):
    """Also the 2-step run of bss.yaml (alone it would only repeat this run)."""
    from tllab.models import Classifier, create_backbone

    source = tmp_path / "source.pt"  # a tllab-style checkpoint of a digits classifier
    torch.save({"model": Classifier(create_backbone("tllab", "digits_cnn"), 10).state_dict()}, source)
    summary = train_run("experiment=digits_finetune", "regularizer=[l2sp,bss]", "trainer.max_steps=2",
                        f"backbone.pretrained={source}")
    assert summary["steps"] == 2 and summary["regularizer"] == "l2sp+bss"
    record = json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[-1])
    terms = ["train/ce", "train/regularizer.l2sp/backbone", "train/regularizer.l2sp/head",
             "train/regularizer.bss/spectral"]
    assert record["train/loss"] == pytest.approx(sum(record[k] for k in terms), rel=1e-5)
    assert all(summary["final"][k] == record[k] for k in terms)
