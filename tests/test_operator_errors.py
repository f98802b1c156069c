"""Every refusal names the problem and the fix; memory does not grow over many products."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from torch import nn

import hesse
from tests.helpers import SmallCNN, TanhMLP, uneven_batches


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = TanhMLP()
    X, y = torch.randn(20, 6), torch.randint(0, 4, (20,))
    return model, nn.CrossEntropyLoss(), uneven_batches(X, y, [8, 8, 4])


def test_batchnorm_in_train_mode_is_refused(setup):
    _, crit, _ = setup
    model = SmallCNN(batchnorm=True)
    data = (torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,)))
    with pytest.raises(hesse.HesseError, match=r"BatchNorm.*train mode.*model\.eval\(\)"):
        hesse.Hessian(model, crit, data)
    model.eval()
    hesse.Hessian(model, crit, data) @ torch.randn(sum(p.numel() for p in model.parameters()))


def test_dropout_is_refused_unless_stochastic(setup):
    _, crit, batches = setup
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 4))
    with pytest.raises(hesse.HesseError, match=r"dropout.*stochastic=True"):
        hesse.Hessian(model, crit, batches)
    op = hesse.Hessian(model, crit, batches, stochastic=True, check_data=True)
    op @ torch.randn(op.shape[0])
    model.eval()
    hesse.Hessian(model, crit, batches)


def test_mode_changed_after_construction_is_caught(setup):
    _, crit, batches = setup
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 4)).eval()
    op = hesse.Hessian(model, crit, batches)
    model.train()
    with pytest.raises(hesse.HesseError, match="dropout"):
        op @ torch.randn(op.shape[0])


def test_empty_and_one_shot_data_are_refused(setup):
    model, crit, batches = setup
    with pytest.raises(hesse.HesseError, match="empty"):
        hesse.Hessian(model, crit, []) @ torch.randn(sum(p.numel() for p in model.parameters()))
    empty_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(0, 6), torch.zeros(0)))
    with pytest.raises(hesse.HesseError, match="empty"):
        hesse.Hessian(model, crit, empty_loader).loss()
    with pytest.raises(hesse.HesseError, match="one-shot iterator"):
        hesse.Hessian(model, crit, iter(batches))
    with pytest.raises(hesse.HesseError, match="no data"):
        hesse.Hessian(model, crit, None)
    with pytest.raises(hesse.HesseError, match="cannot iterate"):
        hesse.Hessian(model, crit, 3)


def test_non_scalar_loss_is_refused(setup):
    model, _, batches = setup
    for criterion in (nn.CrossEntropyLoss(reduction="none"),):
        with pytest.raises(hesse.HesseError, match="reduction"):
            hesse.Hessian(model, criterion, batches)
    op = hesse.Hessian(model, lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"), batches)
    with pytest.raises(hesse.HesseError, match="not a scalar"):
        op @ torch.randn(op.shape[0])
    op = hesse.GGN(model, lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"), batches)
    with pytest.raises(hesse.HesseError, match="not a scalar"):
        op @ torch.randn(op.shape[0])


def test_no_trainable_parameters_is_refused(setup):
    model, crit, batches = setup
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(hesse.HesseError, match="no trainable parameters"):
        hesse.Hessian(model, crit, batches)
    with pytest.raises(hesse.HesseError, match="no parameter matches"):
        hesse.Hessian(model, crit, batches, params="nothing.*")


def test_wrong_vectors_are_refused(setup):
    model, crit, batches = setup
    op = hesse.Hessian(model, crit, batches)
    with pytest.raises(hesse.HesseError, match=r"does not fit.*expected \[%d\]" % op.shape[0]):
        op @ torch.randn(op.shape[0] + 1)
    with pytest.raises(hesse.HesseError, match=r"dtype torch.float64.*v.to\(torch.float32\)"):
        op @ torch.randn(op.shape[0], dtype=torch.float64)
    with pytest.raises(hesse.HesseError, match="torch tensors"):
        op @ [1.0, 2.0]
    with pytest.raises(hesse.HesseError, match="expected"):
        op @ torch.randn(op.shape[0], 2, 2)


def test_nan_and_inf_are_reported(setup):
    model, crit, batches = setup
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    op = hesse.Hessian(model, crit, batches)
    with pytest.raises(hesse.HesseError, match="NaN or inf"):
        op @ torch.randn(op.shape[0])


def test_data_that_changes_between_passes_is_refused(setup):
    model, crit, batches = setup

    class Augmented:
        def __iter__(self):
            for X, y in batches:
                yield X + 0.1 * torch.randn_like(X), y

    op = hesse.Hessian(model, crit, Augmented())
    v = torch.randn(op.shape[0])
    op @ v
    with pytest.raises(hesse.HesseError, match="data changed between passes.*augmentation"):
        op @ v
    # shuffling alone changes nothing: the full-data curvature is order independent
    X = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=6, shuffle=True)
    op = hesse.Hessian(model, crit, loader)
    assert torch.allclose(op @ v, op @ v, rtol=1e-5, atol=1e-7)


def test_bad_options_are_refused(setup):
    model, crit, batches = setup
    H = hesse.Hessian(model, nn.MSELoss(), (torch.randn(5, 6), torch.randn(5, 4)), method="forward-over-reverse")
    with pytest.raises(hesse.HesseError, match="forward-over-reverse.*double-backward"):
        H @ torch.randn(H.shape[0])
    with pytest.raises(hesse.HesseError, match="unknown Hessian method"):
        hesse.Hessian(model, crit, batches, method="finite-differences")
    with pytest.raises(hesse.HesseError, match="unknown Fisher kind"):
        hesse.Fisher(model, crit, batches, kind="exact")
    with pytest.raises(hesse.HesseError, match="does not know the likelihood"):
        hesse.Fisher(model, nn.L1Loss(), batches)
    with pytest.raises(hesse.HesseError, match="label smoothing"):
        hesse.Fisher(model, nn.CrossEntropyLoss(label_smoothing=0.1), batches)
    with pytest.raises(hesse.HesseError, match="nn.Module"):
        hesse.Hessian(lambda x: x, crit, batches)
    with pytest.raises(hesse.HesseError, match="labels"):
        hesse.Hessian(model, crit, {"x": torch.randn(3, 6)}) @ torch.randn(sum(p.numel() for p in model.parameters()))


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on deprecated torch module attributes warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["forward-over-reverse", "double-backward", "ggn"])
def test_no_memory_growth_over_thousands_of_products(kind):
    """Graphs built for second derivatives are freed after every batch (no create_graph leak)."""
    torch.manual_seed(0)
    model, crit = TanhMLP(), nn.CrossEntropyLoss()
    data = (torch.randn(16, 6), torch.randint(0, 4, (16,)))
    op = hesse.GGN(model, crit, data) if kind == "ggn" else hesse.Hessian(model, crit, data, method=kind)
    V = torch.randn(op.shape[0], 4)
    for _ in range(20):
        V = op @ V
        V = V / V.norm(dim=0)
    baseline = _live_tensors()
    for _ in range(500):  # 2000 products, 4 per pass
        V = op @ V
        V = V / V.norm(dim=0)
    assert _live_tensors() <= baseline + 5
    assert all(p.grad is None for p in model.parameters())
