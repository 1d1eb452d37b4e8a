"""privacy=dpsgd: per-sample clipping, noise, the cumulative ledger and budget enforcement.

Epsilons are recomputed independently with Opacus' own accountants stepped one step at a
time from what results.json logs (noise multiplier, sample rate, steps per round).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.validators import ModuleValidator
from torch import nn

from app import config
from app.runtime.local_grid import run_inprocess
from privacy.accountant import STATE_KEY, PrivacyLedger
from privacy.clipping import LayerClipper, LinearClipper, OpacusClipper, layers_supported, linear_supported, make_clipper
from privacy.dpsgd import BudgetExhausted, DPSGDParams, check_budget, private_round, train_private
from tasks.medical import MedicalTask
from tasks.models import MLP, LogisticRegression, SmallCNN
from tasks.training import LocalTrainConfig
from tests.conftest import make_task


def _batch(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 3, (torch.rand(n, generator=g) < 0.3).float()


def _naive_clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, c: float) -> list[torch.Tensor]:
    """One backward pass per example: the definition of per-sample clipping."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        loss = nn.functional.binary_cross_entropy_with_logits(model(x[i : i + 1]), y[i : i + 1], reduction="sum")
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, c / (float(norm) + 1e-6))
        for t, g in zip(total, grads, strict=True):
            t += factor * g
    return total


@pytest.mark.parametrize("model", [MLP(23, [16, 8]), MLP(23, [16], dropout=0.0), LogisticRegression(13)],
                         ids=["mlp2", "mlp1", "logreg"])
@pytest.mark.parametrize("clip", [0.05, 1.0, 1e6])
def test_fast_clipping_equals_per_example_definition_and_opacus(model: nn.Module, clip: float) -> None:
    d = model.net[0].in_features if isinstance(model, MLP) else 13
    x, y = _batch(40, d)
    expected = _naive_clipped_sum(model, x, y, clip)
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    for clipper in (LinearClipper(model, loss_fn), OpacusClipper(model, loss_fn)):
        grads, loss, clipped = clipper.clipped_sum(x, y, clip)
        clipper.close()
        for g, e in zip(grads, expected, strict=True):
            assert torch.allclose(g, e, atol=1e-5, rtol=1e-4), type(clipper).__name__
        assert (clipped == 0) == (clip == 1e6)
    assert all(p.grad is None or not hasattr(p, "grad_sample") for p in model.parameters())


class _ConvVariants(nn.Module):
    """Convolutions LayerClipper must get right: stride, dilation, asymmetric padding, no bias,
    GroupNorm with and without affine parameters, pooling, a linear head."""

    def __init__(self, outputs: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=(1, 2)), nn.GroupNorm(2, 8), nn.ReLU(),
            nn.Conv2d(8, 6, (3, 2), dilation=2, bias=False), nn.GroupNorm(3, 6, affine=False), nn.Tanh(),
            nn.AvgPool2d(2), nn.Conv2d(6, 4, 1, padding="valid"), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.ReLU(), nn.Linear(5, outputs, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.features(x))
        return out.squeeze(-1) if out.shape[-1] == 1 else out


@pytest.mark.parametrize("build, shape, classes", [
    (lambda: SmallCNN(in_channels=3, dropout=0.0), (3, 28, 28), 0),
    (lambda: SmallCNN(outputs=3, dropout=0.0), (1, 28, 28), 3),
    (lambda: _ConvVariants(), (3, 21, 19), 0),
], ids=["smallcnn", "smallcnn-multiclass", "conv-variants"])
@pytest.mark.parametrize("clip", [0.05, 1.0, 1e6])
def test_layer_clipping_of_cnns_equals_per_example_definition_and_opacus(build, shape, classes, clip) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = build()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, *shape, generator=g) * 2
    if classes:
        y, loss_fn = torch.randint(0, classes, (12,), generator=g), nn.CrossEntropyLoss(reduction="sum")
    else:
        y, loss_fn = (torch.rand(12, generator=g) < 0.3).float(), nn.BCEWithLogitsLoss(reduction="sum")
    params = list(model.parameters())
    expected = [torch.zeros_like(p) for p in params]
    for i in range(12):  # the definition: one backward pass per example
        grads = torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), params)
        factor = min(1.0, clip / (float(torch.sqrt(sum(t.pow(2).sum() for t in grads))) + 1e-6))
        for e, t in zip(expected, grads, strict=True):
            e += factor * t
    assert layers_supported(model) and not linear_supported(model)
    for make in (LayerClipper, OpacusClipper):  # one at a time: each hooks into the model
        clipper = make(model, loss_fn)
        got, loss, clipped = clipper.clipped_sum(x, y, clip)
        clipper.close()
        for a, e in zip(got, expected, strict=True):
            assert torch.allclose(a, e, atol=1e-5, rtol=1e-4), type(clipper).__name__
        assert clipped == (12 if clip == 0.05 else 0) or clip == 1.0
        assert loss == pytest.approx(float(loss_fn(model(x), y)), rel=1e-5)
    assert all("forward" not in m.__dict__ for m in model.modules())  # close() restored every layer


def test_output_gradients_are_the_same_with_or_without_autograds_engine_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """The clippers call autograd's C++ engine directly (what torch.autograd.grad does after its argument
    handling); a torch without that entry point falls back to torch.autograd.grad, with the same numbers."""
    import privacy.clipping as clipping

    assert clipping._ENGINE is not None  # the pinned torch has it: the fast path is the one tested elsewhere
    x, y = _batch(40, 23)
    got = {}
    for label, engine in (("direct", clipping._ENGINE), ("fallback", None)):
        monkeypatch.setattr(clipping, "_ENGINE", engine)
        torch.manual_seed(0)
        clipper = LinearClipper(MLP(23, [16, 8]), nn.BCEWithLogitsLoss(reduction="sum"))
        got[label] = clipper.clipped_sum(x, y, 0.5)[0]
        clipper.close()
    assert all(torch.equal(a, b) for a, b in zip(got["direct"], got["fallback"], strict=True))


def test_engine_choice() -> None:
    assert linear_supported(MLP(5, [4])) and linear_supported(LogisticRegression(3))
    assert not linear_supported(SmallCNN()) and layers_supported(SmallCNN())
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    assert isinstance(make_clipper(MLP(5, [4]), loss_fn, "auto"), LinearClipper)
    assert isinstance(make_clipper(SmallCNN(), loss_fn, "auto"), LayerClipper)
    assert isinstance(make_clipper(SmallCNN(), loss_fn, "opacus"), OpacusClipper)
    layer_norm = nn.Sequential(nn.Conv2d(1, 4, 3), nn.LayerNorm([4, 26, 26]), nn.Flatten(), nn.Linear(4 * 26 * 26, 1))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 26 * 26, 1))
    for model in (layer_norm, grouped):  # no LayerClipper rule for these: Opacus' hooks
        assert not layers_supported(model)
        assert isinstance(make_clipper(model, loss_fn, "auto"), OpacusClipper)
        with pytest.raises(ValueError, match="nn.Conv2d"):
            make_clipper(model, loss_fn, "fast")
    with pytest.raises(ValueError, match="privacy.engine"):
        make_clipper(MLP(5, [4]), loss_fn, "jax")


def test_without_noise_or_clipping_a_full_batch_step_is_plain_sgd() -> None:
    """q=1, sigma=0, no clipping: DP-SGD's step is exactly the non-private mean-loss step."""
    x, y = _batch(32, 23)
    a, b = MLP(23, [8]), MLP(23, [8])
    b.load_state_dict(a.state_dict())
    cfg = LocalTrainConfig(epochs=1, batch_size=32, lr=0.5, momentum=0.0)
    train_private(a, x, y, cfg, DPSGDParams(1.0, 0.0, 1e9, 1e-5, 10.0, "rdp"), torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(b.parameters(), lr=0.5)
    nn.functional.binary_cross_entropy_with_logits(b(x), y).backward()
    opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_noise_has_the_promised_scale() -> None:
    """With a zero gradient the update is pure noise: std = lr * sigma * C / (q n)."""
    model = LogisticRegression(200)
    nn.init.zeros_(model.linear.weight)
    x, y = torch.zeros(100, 200), torch.zeros(100)
    before = model.linear.weight.detach().clone()
    params = DPSGDParams(0.5, 2.0, 0.7, 1e-5, 100.0, "rdp")
    train_private(model, x, y, LocalTrainConfig(epochs=1, batch_size=50, lr=1.0, momentum=0.0), params,
                  torch.Generator().manual_seed(1), max_steps=1)
    step = (model.linear.weight.detach() - before).flatten()
    # the zero-input gradient of the weight is exactly 0, so only noise moved it
    expected = 2.0 * 0.7 / (0.5 * 100)
    assert abs(float(step.std()) / expected - 1) < 0.15


def test_ledger_persists_in_context_state_and_budget_stops_the_site() -> None:
    """Two rounds through private_round share one ledger; a third that would exceed the target is refused."""
    task = make_task("medical")
    site = task.sites(config.compose(["task=medical"]).partition, 4, 0)[0]
    params = DPSGDParams(0.2, 1.0, 1.0, 1e-5, 0.0, "rdp")
    acc = RDPAccountant()
    for _ in range(2 * 5):
        acc.step(noise_multiplier=1.0, sample_rate=0.2)
    eps2 = acc.get_epsilon(1e-5)
    for _ in range(5):
        acc.step(noise_multiplier=1.0, sample_rate=0.2)
    eps3 = acc.get_epsilon(1e-5)
    params = DPSGDParams(0.2, 1.0, 1.0, 1e-5, (eps2 + eps3) / 2, "rdp")
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    model = task.build_model()
    cfg = task.local_train_config(1)
    for expected_steps in (5, 10):
        _, record = private_round(context, params, model, site.train.x, site.train.y, cfg, torch.Generator())
        assert record["total_steps"] == expected_steps
    assert record["epsilon"] == pytest.approx(eps2, rel=1e-9)
    stored = PrivacyLedger.from_record(context.state.config_records[STATE_KEY], "rdp")
    assert stored.history == [(1.0, 0.2, 10)]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BudgetExhausted, match="privacy budget exhausted"):
        private_round(context, params, model, site.train.x, site.train.y, cfg, torch.Generator())
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # untouched
    assert PrivacyLedger.from_record(context.state.config_records[STATE_KEY], "rdp").steps == 10
    with pytest.raises(BudgetExhausted):
        check_budget(stored, params, 5)


@pytest.mark.slow
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_reported_epsilon_matches_opacus_recomputation(accountant: str, tmp_path: Path) -> None:
    """results.json's per-round epsilon equals Opacus' accountant stepped through the logged
    noise multiplier, sample rate and steps, round by round (cumulative, not per round)."""
    res = run_inprocess(["task=medical", "num_rounds=3", "privacy=dpsgd", "privacy.target_epsilon=3",
                         f"privacy.accountant={accountant}", "strategy.stragglers=0.25",
                         "strategy.straggler_policy=partial"], tmp_path)
    per_site: dict[str, object] = {}
    for h in res["history"]:
        for site, rec in h["participation"]["privacy"].items():
            acc = per_site.setdefault(site, RDPAccountant() if accountant == "rdp" else PRVAccountant())
            for _ in range(rec["steps"]):
                acc.step(noise_multiplier=rec["noise_multiplier"], sample_rate=rec["sample_rate"])
            assert rec["epsilon"] == pytest.approx(acc.get_epsilon(delta=rec["delta"]), rel=1e-6)
            assert rec["epsilon"] <= 3.0
    assert len(per_site) == 4
    summary = res["privacy"]
    assert summary["mechanism"] == "dpsgd" and summary["budget_exhausted"] == {}
    assert 2.0 < summary["max_epsilon"] <= 3.0  # the budget is spread over the run, not spent per round
    assert set(summary["epsilon_per_site"]) == set(MedicalTask.natural_sites or ())  # keyed by name, not label
    assert {rec["label"] for rec in summary["sites"].values()} == set(per_site)
    assert all(rec["label"] == f"{name} (node {rec['label'].split('node ')[1]}" for name, rec in summary["sites"].items())


def test_budget_enforcement_in_a_run(tmp_path: Path) -> None:
    """Every site stops once its next round would pass the target; the run still ends cleanly
    and the model stays the last one trained within budget."""
    sigma, rate = 1.5, 32 / 179  # medical site 0: 179 training rows at the task's batch 32
    acc = RDPAccountant()
    with pytest.raises(RuntimeError, match="privacy budget exhausted"):  # no site can afford one round
        run_inprocess(["task=medical", "num_rounds=4", "privacy=dpsgd", f"privacy.noise_multiplier={sigma}",
                       "privacy.target_epsilon=0.0001"], tmp_path / "zero")
    res = json.loads((tmp_path / "zero" / "results.json").read_text())
    assert res["status"] == "failed" and len(res["privacy"]["budget_exhausted"]) == 4
    assert all("privacy budget exhausted" in r["reason"] for r in res["history"][0]["participation"]["train"]["rejected"])
    # a target between 2 and 3 rounds of site 0
    for _ in range(2 * int(1 / rate)):
        acc.step(noise_multiplier=sigma, sample_rate=rate)
    eps2 = acc.get_epsilon(1e-5)
    res = run_inprocess(["task=medical", "num_rounds=4", "privacy=dpsgd", f"privacy.noise_multiplier={sigma}",
                         f"privacy.target_epsilon={eps2 * 1.05}"], tmp_path / "run")
    assert res["status"] == "completed"
    cleveland = res["privacy"]["sites"]["cleveland"]
    assert (cleveland["last_round"], cleveland["total_steps"]) == (2, 2 * int(1 / rate))
    assert cleveland["epsilon"] == pytest.approx(eps2, rel=1e-9)
    rejected = {r["site"]: r["reason"] for r in res["history"][2]["participation"]["train"]["rejected"]}
    assert "privacy budget exhausted" in rejected["cleveland (node 1000)"] and "1000" in res["privacy"]["budget_exhausted"]
    assert res["history"][3]["participation"]["budget_exhausted"] >= 1  # no longer sampled
    for site, eps in res["privacy"]["epsilon_per_site"].items():
        assert eps <= eps2 * 1.05, site  # nobody ever passes the target


@pytest.mark.slow  # among the heaviest; the full suite runs it (fast tier: README)
def test_dpsgd_composes_with_secure_aggregation(tmp_path: Path) -> None:
    """Noise is added at the site before masking: the securely aggregated model equals the plain
    one within secagg's documented bound (one quantisation step, plus float32 rounding), and every
    site's privacy report still reaches the coordinator beside its masked vector."""
    common = ["task=finance", "num_sites=3", "num_rounds=1", "privacy=dpsgd", "privacy.target_epsilon=2"]
    plain = run_inprocess(common, tmp_path / "plain")
    sec = run_inprocess([*common, "aggregation=secagg"], tmp_path / "sec")
    a = config.compose([*common, "aggregation=secagg"]).aggregation
    step = 2 * a.clip / ((1 << a.value_bits) - 1)
    p_model, s_model = torch.load(tmp_path / "plain" / "model.pt"), torch.load(tmp_path / "sec" / "model.pt")
    worst = max(float((p_model[k] - s_model[k]).abs().max()) for k in p_model)
    assert 0 < worst <= step + 1e-6  # masked and quantised, yet FedAvg's model within one step
    part = sec["history"][0]["participation"]
    assert part["secagg"]["survivors"] == 3 and len(part["privacy"]) == 3
    plain_steps = {r["steps"] for r in plain["history"][0]["participation"]["privacy"].values()}
    assert {r["steps"] for r in part["privacy"].values()} == plain_steps


@pytest.mark.parametrize("task", ["finance", "medical", "medical_imaging"])
def test_every_task_model_is_opacus_valid(task: str) -> None:
    t = make_task(task)
    for model in t.models:
        m = make_task(task, model=model).build_model()
        assert ModuleValidator.validate(m, strict=False) == [], (task, model)


@pytest.mark.parametrize("override, key", [
    ("privacy.target_epsilon=0", "privacy.target_epsilon"),
    ("privacy.delta=0", "privacy.delta"),
    ("privacy.delta=1.5", "privacy.delta"),
    ("privacy.max_grad_norm=-1", "privacy.max_grad_norm"),
    ("privacy.noise_multiplier=0", "privacy.noise_multiplier"),
    ("privacy.accountant=gdp2", "privacy.accountant"),
    ("privacy.engine=jax", "privacy.engine"),
    ("privacy.batch_size=-3", "privacy.batch_size"),
])
def test_bad_dpsgd_config_names_the_key(override: str, key: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.compose(["privacy=dpsgd", override])
    assert err.value.key == key


def test_cnn_task_trains_under_dpsgd_with_either_engine_to_the_same_model(tmp_path: Path) -> None:
    """medical_imaging's GroupNorm CNN under fedsilo's LayerClipper (engine=auto) and Opacus' GradSampleModule:
    same sampling and noise, clipped sums equal up to float rounding, so the same model to rounding."""
    runs = {}
    for engine in ("auto", "opacus"):
        res = run_inprocess(["task=medical_imaging", "num_sites=2", "num_rounds=1", "privacy=dpsgd",
                             "privacy.target_epsilon=5", "strategy.fraction_evaluate=0", f"privacy.engine={engine}"],
                            tmp_path / engine)
        assert res["status"] == "completed" and 0 < res["privacy"]["max_epsilon"] <= 5
        runs[engine] = res["final"]
    assert runs["auto"]["auc"] == pytest.approx(runs["opacus"]["auc"], abs=1e-4)
    assert runs["auto"]["loss"] == pytest.approx(runs["opacus"]["loss"], rel=1e-4)
