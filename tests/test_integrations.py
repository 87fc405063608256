"""docs/integrations.md's recipes run as written, against oracles: BoTorch's
default L-BFGS-B fit, and a plain rprop.Rprop loop on the same data and model.
Each recipe's test is skipped when its extra (botorch, lightning, hf) is
missing. RecordedLossRprop's own contract is checked without any of them."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import rprop
from rprop.integrations import RecordedLossRprop, botorch_optimizer_kwargs

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
# The recipe tests are grouped by framework (xdist_group), so that under
# `pytest -n 2 --dist loadgroup` each framework is imported by one worker only
# (lightning takes ~4-13 s to import here, most of it torchmetrics and dynamo).

# Lightning 2.6's own pytree code calls a deprecated check of torch's.
LIGHTNING_PYTREE = r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"


def recipe(name: str) -> str:
    found = re.findall(rf"<!-- recipe: {re.escape(name)} -->\n```python\n(.*?)```",
                       DOC.read_text(), re.S)
    assert len(found) == 1, f"docs/integrations.md has {len(found)} recipes named {name!r}"
    return found[0]


def import_or_skip(name: str) -> ModuleType:
    # Importing linear_operator (under botorch) warns that torch.jit.script is
    # deprecated; that is theirs, not ours, and warnings are errors here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pytest.importorskip(name)


def run(*names: str) -> dict[str, Any]:
    scope: dict[str, Any] = {}
    for name in names:
        exec(recipe(name), scope)
    return scope


# -- RecordedLossRprop, without any framework --------------------------------


@pytest.mark.slow
def test_no_framework_is_imported() -> None:
    code = ("import sys, rprop; assert 'rprop.integrations' not in sys.modules; "
            "import rprop.integrations; "
            "print(sorted(m for m in ('botorch', 'gpytorch', 'lightning', 'transformers', "
            "'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "[]"


def _quadratic_step(opt: torch.optim.Optimizer, w: torch.Tensor, record: bool) -> torch.Tensor:
    opt.zero_grad()
    loss = ((w - 0.1) ** 2).sum()
    loss.backward()
    if record:
        opt.record_loss(loss.detach())  # type: ignore[attr-defined]
    return loss.detach()


def test_recorded_loss_steps_as_step_loss() -> None:
    """record_loss(E) then step() is step(loss=E), bitwise, on iRprop+."""
    torch.manual_seed(0)
    w0 = torch.randn(7, dtype=torch.float64)
    a, b = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    oa = rprop.Rprop([a], lr=0.3, variant="irprop+")
    ob = RecordedLossRprop([b], lr=0.3, variant="irprop+")
    for _ in range(40):
        oa.zero_grad()
        la = ((a - 0.1) ** 2).sum()
        la.backward()
        oa.step(loss=la.detach())
        _quadratic_step(ob, b, record=True)
        ob.step()
    assert torch.equal(a, b)


def test_recorded_loss_serves_one_step() -> None:
    w = torch.zeros(3, requires_grad=True)
    opt = RecordedLossRprop([w], lr=0.1, variant="irprop+")
    with pytest.raises(ValueError, match="no loss was recorded since the last step"):
        _quadratic_step(opt, w, record=False)
        opt.step()
    assert torch.equal(w, torch.zeros(3)) and not opt.state  # refused before anything moved
    _quadratic_step(opt, w, record=True)
    opt.step()
    _quadratic_step(opt, w, record=False)
    moved = w.detach().clone()
    with pytest.raises(ValueError, match="no loss was recorded"):
        opt.step()  # the first step's loss is not reused
    assert torch.equal(w, moved)
    with pytest.raises(TypeError, match="record_loss"):
        opt.record_loss(None)
    with pytest.raises(TypeError, match="clamped must be a bool"):
        RecordedLossRprop([w], clamped=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="real parameters only"):
        RecordedLossRprop([torch.zeros(2, dtype=torch.complex64, requires_grad=True)],
                          clamped=True)


def test_recorded_loss_not_needed_by_irprop_minus() -> None:
    w = torch.zeros(3, requires_grad=True)
    opt = RecordedLossRprop([w], lr=0.1)
    _quadratic_step(opt, w, record=False)
    opt.step()
    assert torch.equal(w.detach(), torch.full((3,), 0.1))


def test_load_state_dict_forgets_the_recorded_loss_and_the_last_move() -> None:
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = RecordedLossRprop([w], lr=1.0, variant="irprop+", clamped=True)
    saved = None
    for _ in range(2):
        _quadratic_step(opt, w, record=True)
        if saved is None:
            opt.step()
            saved = opt.state_dict()
            w.data = w.clamp(max=0.5)
    opt.load_state_dict(saved)  # the state after the first step, before the clamp
    with pytest.raises(ValueError, match="no loss was recorded"):
        opt.step()
    _quadratic_step(opt, w, record=True)
    # Where the loaded state's last step left the parameters is not in the
    # state_dict: the undo is the full step, as a plain rprop.Rprop's.
    opt.step()
    assert w.item() == -0.5


@pytest.mark.parametrize("variant", ["irprop+", "rprop+"])
def test_undo_after_a_clamp_returns_to_where_the_step_started(variant: str) -> None:
    """The loop of BoTorch's torch_minimize: loss, step(), clamp into bounds.
    f(w) = (w - 0.1)^2 from w = 0 with a step size of 1 and w <= 0.5: the step
    goes to 1, the clamp to 0.5, where the loss is higher and the gradient
    has flipped, so the next step undoes the move. Undoing the distance moved
    returns to 0; undoing the full step (a plain Rprop, which did not see the
    clamp) lands at -0.5."""
    for clamped, expected in ((True, 0.0), (False, -0.5)):
        w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = RecordedLossRprop([w], lr=1.0, variant=variant, clamped=clamped)
        for _ in range(2):
            _quadratic_step(opt, w, record=True)
            opt.step()
            w.data = w.clamp(max=0.5)  # as torch_minimize does
        assert w.item() == expected, (clamped, w.item())


# -- BoTorch ------------------------------------------------------------------


def _lbfgsb_fit(X: torch.Tensor, Y: torch.Tensor) -> Any:
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from gpytorch.mlls import ExactMarginalLogLikelihood

    model = SingleTaskGP(X, Y)
    mll = ExactMarginalLogLikelihood(model.likelihood, model)
    fit_gpytorch_mll(mll)  # BoTorch's default: L-BFGS-B through SciPy
    return mll


def _neg_mll(mll: Any) -> float:
    mll.train()
    model = mll.model
    with torch.no_grad():
        return float(-mll(model(*model.train_inputs), model.train_targets))


def _hyperparameters(mll: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in mll.named_parameters()}


@pytest.mark.xdist_group("botorch")
@pytest.mark.slow
def test_botorch_recipe_matches_lbfgsb() -> None:
    import_or_skip("botorch")
    scope = run("botorch")
    ours, ref = scope["mll"], _lbfgsb_fit(scope["X"], scope["Y"])
    got, want = _hyperparameters(ours), _hyperparameters(ref)
    assert got.keys() == want.keys() and len(got) == 3  # noise, mean, lengthscales
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=0, msg=k)
    assert abs(_neg_mll(ours) - _neg_mll(ref)) < 1e-8


@pytest.mark.xdist_group("botorch")
@pytest.mark.slow
def test_botorch_noise_at_its_bound() -> None:
    """Noiseless data drive the noise to its lower bound, where BoTorch's clamp
    cuts Rprop's steps: the fit is still no worse than L-BFGS-B's."""
    import_or_skip("botorch")
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.optim.fit import fit_gpytorch_mll_torch
    from botorch.optim.stopping import ExpMAStoppingCriterion
    from gpytorch.mlls import ExactMarginalLogLikelihood

    torch.manual_seed(0)
    X = torch.rand(20, 2, dtype=torch.float64)
    Y = torch.sin(6 * X[:, :1])
    ref = _lbfgsb_fit(X, Y)
    model = SingleTaskGP(X, Y)
    mll = ExactMarginalLogLikelihood(model.likelihood, model)
    fvals: list[float] = []
    kwargs = botorch_optimizer_kwargs(lr=0.01, callback=lambda _, r: fvals.append(r.fval))
    kwargs["stopping_criterion"] = ExpMAStoppingCriterion(rel_tol=1e-8)
    fit_gpytorch_mll(mll, optimizer=fit_gpytorch_mll_torch, optimizer_kwargs=kwargs)
    noise = mll.likelihood.noise_covar.raw_noise.detach()
    lower = mll.likelihood.noise_covar.raw_noise_constraint.lower_bound
    assert torch.equal(noise, lower.expand_as(noise))  # at the bound, as L-BFGS-B's
    assert torch.equal(ref.likelihood.noise_covar.raw_noise.detach(), noise)
    assert _neg_mll(mll) <= _neg_mll(ref) + 1e-8
    assert len(fvals) > 10  # the user's callback saw every iteration


def test_botorch_optimizer_kwargs_bad_input() -> None:
    with pytest.raises(TypeError, match="sets clamped=True itself"):
        botorch_optimizer_kwargs(clamped=False)
    with pytest.raises(TypeError, match="callback must be callable"):
        botorch_optimizer_kwargs(callback=3)  # type: ignore[arg-type]


# -- Lightning ----------------------------------------------------------------


def _plain_loop(net: torch.nn.Module, closure_of: Any, steps: int, **opt_kwargs: Any) -> None:
    opt = rprop.Rprop(net.parameters(), **opt_kwargs)
    closure = closure_of(opt)
    for _ in range(steps):
        opt.step(closure)


def _mse_closure(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
    def closure_of(opt: torch.optim.Optimizer) -> Any:
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x), y)
            loss.backward()
            return loss
        return closure
    return closure_of


def _assert_same(a: torch.nn.Module, b: torch.nn.Module, atol: float = 0.0) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=atol, msg=name)


@pytest.mark.xdist_group("lightning")
@pytest.mark.slow
@pytest.mark.filterwarnings(LIGHTNING_PYTREE)
def test_lightning_recipes_match_a_plain_loop() -> None:
    import_or_skip("lightning")
    scope = run("lightning")
    torch.manual_seed(1)
    ref = scope["Regression"]().net
    _plain_loop(ref, _mse_closure(ref, scope["x"], scope["y"]), 50, lr=0.01, variant="irprop+")
    _assert_same(scope["model"].net, ref)  # bitwise

    run_manual = run("lightning", "lightning-manual")
    ref_m = run_manual["Regression"]().net

    def closure_of(opt: torch.optim.Optimizer) -> Any:
        def per_sample(net: torch.nn.Module, chunk: Any) -> torch.Tensor:
            return torch.nn.functional.mse_loss(net(chunk[0]), chunk[1], reduction="none").mean(1)
        return lambda: rprop.torch.full_batch_backward(ref_m, per_sample, run_manual["chunks"])

    _plain_loop(ref_m, closure_of, 50, lr=0.01, variant="irprop+")
    _assert_same(run_manual["manual"].net, ref_m)  # bitwise
    _assert_same(run_manual["manual"].net, ref, atol=1e-5)  # one batch vs four


@pytest.mark.xdist_group("lightning")
@pytest.mark.slow
@pytest.mark.filterwarnings(LIGHTNING_PYTREE)
def test_lightning_fp16_amp_steps_without_a_closure() -> None:
    """Lightning's fp16 AMP plugin (its scaler, here on CPU) calls
    scaler.step(optimizer) with no closure: iRprop+ then has no loss, and
    RecordedLossRprop fed from training_step trains."""
    L = import_or_skip("lightning")
    from lightning.pytorch.plugins.precision import MixedPrecision

    scope = run("lightning")

    class Recording(scope["Regression"]):  # type: ignore[misc,name-defined]
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            self.optimizers().optimizer.record_loss(loss.detach())
            return loss

        def configure_optimizers(self) -> Any:
            return RecordedLossRprop(self.parameters(), lr=0.01, variant="irprop+")

    def trainer() -> Any:
        return L.Trainer(accelerator="cpu", max_epochs=20, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         plugins=[MixedPrecision("16-mixed", "cpu",
                                                 scaler=torch.amp.GradScaler("cpu"))])

    x, y = scope["x"], scope["y"]
    with pytest.raises(ValueError, match="needs the loss at the current parameters"):
        trainer().fit(scope["Regression"](), train_dataloaders=scope["Once"]((x, y)))
    model = Recording()
    before = torch.nn.functional.mse_loss(model.net(x), y).item()
    trainer().fit(model, train_dataloaders=scope["Once"]((x, y)))
    after = torch.nn.functional.mse_loss(model.net(x), y).item()
    assert after < 0.5 * before, (before, after)


@pytest.mark.xdist_group("lightning")
@pytest.mark.slow
@pytest.mark.filterwarnings(LIGHTNING_PYTREE)
def test_lightning_accumulation_hands_the_last_batch_loss() -> None:
    """With accumulate_grad_batches=2 the step gets the gradient of both
    batches but, from its closure, the second batch's loss halved: not E(t)."""
    L = import_or_skip("lightning")
    scope = run("lightning")
    seen: list[torch.Tensor] = []

    class Seeing(rprop.Rprop):
        def step(self, closure: Any = None, *, loss: Any = None) -> Any:
            out = super().step(closure, loss=loss)
            seen.append(out.detach().clone())
            return out

    class Model(scope["Regression"]):  # type: ignore[misc,name-defined]
        def configure_optimizers(self) -> Any:
            return Seeing(self.parameters(), lr=0.01, variant="irprop+")

    class Each:
        def __init__(self, items: list[Any]) -> None:
            self.items = items

        def __iter__(self) -> Any:
            return iter(self.items)

        def __len__(self) -> int:
            return len(self.items)

    x, y = scope["x"], scope["y"]
    model = Model()
    with torch.no_grad():
        whole = torch.nn.functional.mse_loss(model.net(x), y)
        last_half = torch.nn.functional.mse_loss(model.net(x[32:]), y[32:])
    L.Trainer(accelerator="cpu", max_epochs=1, accumulate_grad_batches=2, logger=False,
              enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(
        model, train_dataloaders=Each(list(zip(x.split(32), y.split(32)))))
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], last_half / 2)
    assert abs(float(seen[0]) - float(whole)) > 0.1 * float(whole)


# -- Hugging Face Trainer -----------------------------------------------------


def _hf_reference(scope: dict[str, Any], **opt_kwargs: Any) -> torch.nn.Module:
    ref = scope["Regression"]().double().net
    _plain_loop(ref, _mse_closure(ref, scope["x"], scope["y"]), 50, lr=0.01, **opt_kwargs)
    return ref


@pytest.mark.xdist_group("hf")
@pytest.mark.slow
def test_hf_trainer_recipes_match_a_plain_loop(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import_or_skip("transformers")
    import_or_skip("accelerate")
    monkeypatch.chdir(tmp_path)
    scope = run("hf")
    _assert_same(scope["model"].net, _hf_reference(scope), atol=1e-12)
    assert not any((tmp_path / "hf-rprop").iterdir())  # the recipe's comment
    exec(recipe("hf-irprop+"), scope)
    _assert_same(scope["model"].net, _hf_reference(scope, variant="irprop+"), atol=1e-12)


@pytest.mark.xdist_group("hf")
@pytest.mark.slow
def test_hf_trainer_warmup_warns_that_lr_seeds_the_step_sizes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import_or_skip("transformers")
    import_or_skip("accelerate")
    from transformers import Trainer, TrainingArguments

    monkeypatch.chdir(tmp_path)
    scope = run("hf")
    model = scope["Regression"]().double()
    args = TrainingArguments(
        output_dir="warmup", per_device_train_batch_size=64, num_train_epochs=3,
        warmup_steps=2, save_strategy="no", logging_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=scope["data"],
                      optimizer_cls_and_kwargs=(rprop.Rprop, {"lr": 0.01}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    kinds = {w.category for w in caught}
    assert rprop.LrSeedWarning in kinds, [str(w.message) for w in caught]
    # The warmup then raises lr, which Rprop no longer reads.
    assert rprop.LrChangeWarning in kinds
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    step_sizes = [opt.state[p]["step_size"] for p in model.parameters()]
    assert max(float(s.max()) for s in step_sizes) < 1e-5  # 1e-6 * 1.2**2 at most
