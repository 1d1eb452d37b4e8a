"""``learner=glm``: logistic, multinomial and linear regression fitted exactly by federated Newton steps.

The pooled model a statistician would fit (scikit-learn's ``LogisticRegression`` with its default L2
penalty ``C=1`` on standardised inputs; ``LinearRegression`` for a numeric label), reached by a
protected-sum program:

1. ``vocab`` (discovered categories, ``task=tabular``), then ``moments``: each site's count, sum and
   sum of squares of every input: the pooled means and standard deviations (the inputs are
   standardised with them; a missing value takes the pooled mean);
2. ``newton``, until the largest coefficient change is below ``tol`` (at most ``max_iter``): each site's
   gradient and Hessian of the log-likelihood (or of the squared error) at the coefficients the
   request carries; from the totals the next coefficients ``b - (H + P/C)^-1 (g + P b / C)`` (P: no
   penalty on the intercept). A linear model is one step (its Hessian is the pooled ``X'X``);
3. ``evaluate`` on the validation rows (the pooled loss) and on the sites' own test rows.

``moments`` and ``newton`` are decisions (:attr:`core.programs.Ask.decide`): under Paillier a key holder
verifies each total and returns only the means and deviations, or the next coefficients; the
coordinator never holds a gradient or a Hessian. Sums are float sums: the fit equals the pooled one
to about 1e-9 (not bit for bit as the trees are).
"""

from __future__ import annotations

import json
from collections.abc import Generator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from typing_extensions import override

from core.config import ConfigError
from core.programs import Ask, Gather, PolicyRefusal, Program, ProgramError, SiteCall, Total
from core.programs import register as register_program
from learners import rows as tables
from tasks.base import PooledTask, Task
from tasks.federated import FederatedTask
from tasks.learners import LearnerConfig, SumLearner, register
from tasks.metrics import binary_metrics
from tasks.programs import check_evaluation
from tasks.tabular.task import TabularTask

FORMAT = "fedsilo-glm-v1"


@dataclass(frozen=True)
class GlmOptions:
    """``learner.options`` of ``learner=glm``."""

    C: float = 1.0          # inverse L2 strength on standardised inputs (scikit-learn's C; regression: none)
    max_iter: int = 30      # Newton steps at most
    tol: float = 1e-8       # stop when no coefficient moves more than this
    objective: str = "auto"

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> GlmOptions:
        """The options, checked; :class:`~core.config.ConfigError` naming the key otherwise."""
        known = {"C", "max_iter", "tol", "objective"}
        for key in options:
            if key not in known:
                raise ConfigError(f"learner.options.{key}", options[key], f"one of {sorted(known)} (learner=glm)")
        try:
            out = cls(float(options.get("C", 1.0)), int(options.get("max_iter", 30)), float(options.get("tol", 1e-8)),
                      str(options.get("objective", "auto")))
        except (TypeError, ValueError):
            raise ConfigError("learner.options", dict(options), "C and tol numbers, max_iter an integer") from None
        for key, ok, want in (("C", out.C > 0, "> 0"), ("max_iter", 1 <= out.max_iter <= 1000, "in [1, 1000]"),
                              ("tol", out.tol > 0, "> 0"),
                              ("objective", out.objective in ("auto", "binary", "multiclass", "regression"),
                               "auto, binary, multiclass or regression")):
            if not ok:
                raise ConfigError(f"learner.options.{key}", getattr(out, key), want)
        return out


# ---- the model ------------------------------------------------------------------------------------
@dataclass
class LinearModel:
    """Coefficients on standardised inputs (outputs x (1 + inputs): intercept first) and the standardisation."""

    coef: list[list[float]]
    means: list[float]
    sds: list[float]
    names: list[str]
    objective: str
    classes: int
    schema: str | None = None
    vocab: dict[str, list[str]] | None = None

    def design(self, x: np.ndarray) -> np.ndarray:
        """Standardised inputs with a leading 1 (a missing value: the pooled mean, i.e. 0)."""
        z = (x - np.asarray(self.means)) / np.asarray(self.sds)
        return np.column_stack([np.ones(len(x)), np.where(np.isnan(z), 0.0, z)])

    def margins(self, x: np.ndarray) -> np.ndarray:
        """Raw scores (rows x outputs): logits, or the prediction of a linear model."""
        return self.design(x) @ np.asarray(self.coef).T

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Probabilities of the positive class (binary), of each class, or values (regression)."""
        m = self.margins(x)
        if self.objective == "binary":
            return 1.0 / (1.0 + np.exp(-m[:, 0]))
        if self.objective == "multiclass":
            e = np.exp(m - m.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)
        return m[:, 0]

    def coefficients(self) -> dict[str, Any]:
        """Per output, each input's coefficient on its own scale (per unit) and the intercept."""
        out = {}
        coef, means, sds = np.asarray(self.coef), np.asarray(self.means), np.asarray(self.sds)
        for k, row in enumerate(coef):
            per_unit = row[1:] / sds
            out[f"output {k}" if self.classes > 1 else "coefficients"] = {
                "intercept": float(row[0] - np.dot(per_unit, means)), **dict(zip(self.names, map(float, per_unit)))}
        return out

    def to_dict(self) -> dict[str, Any]:
        """The model as JSON."""
        return {"format": FORMAT, **asdict(self), "vocab": self.vocab or {}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LinearModel:
        """A model from :meth:`to_dict`'s JSON (ValueError if it is not one)."""
        if d.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} model (format {d.get('format')!r})")
        return cls(d["coef"], d["means"], d["sds"], list(d["names"]), str(d["objective"]), int(d["classes"]),
                   d.get("schema"), d.get("vocab") or {})

    def save(self, folder: Path) -> dict[str, str]:
        """Write ``model.json`` into ``folder``; its path."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "model.json"
        path.write_text(json.dumps(self.to_dict()))
        return {"model": str(path)}


@dataclass
class GlmOutcome:
    """The fitted model and how it was reached."""

    model: LinearModel
    iterations: int = 0
    converged: bool = False
    val_loss: float = float("nan")
    test: dict[str, float] = field(default_factory=dict)
    sites: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    path: list[float] = field(default_factory=list)  # the largest coefficient change of each step


# ---- the site's arithmetic -----------------------------------------------------------------------
def _design(x: np.ndarray, means: np.ndarray, sds: np.ndarray) -> np.ndarray:
    z = (x - means) / sds
    return np.column_stack([np.ones(len(x)), np.where(np.isnan(z), 0.0, z)])


def moments_vector(x: np.ndarray) -> np.ndarray:
    """A site's ``moments`` vector: per input its count of present values, their sum and sum of squares."""
    present = ~np.isnan(x)
    x0 = np.where(present, x, 0.0)
    return np.concatenate([present.sum(axis=0), x0.sum(axis=0), (x0 * x0).sum(axis=0)]).astype(np.float64)


def newton_terms(objective: str, classes: int, x: np.ndarray, y: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, ...]:
    """The gradient and Hessian of the summed loss at ``beta`` (outputs x design columns, flattened)."""
    d = x.shape[1]
    eta = x @ beta.reshape(-1, d).T
    if objective == "regression":
        r = eta[:, 0] - y
        return x.T @ r, x.T @ x
    if objective == "binary":
        p = 1.0 / (1.0 + np.exp(-eta[:, 0]))
        return x.T @ (p - y), (x * (p * (1 - p))[:, None]).T @ x
    e = np.exp(eta - eta.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    onehot = np.eye(classes)[y.astype(np.int64)]
    g = ((p - onehot).T @ x).ravel()
    h = np.zeros((classes * d, classes * d))
    for k in range(classes):
        for j in range(k, classes):
            w = p[:, k] * ((1.0 if k == j else 0.0) - p[:, j])
            block = (x * w[:, None]).T @ x
            h[k * d:(k + 1) * d, j * d:(j + 1) * d] = block
            h[j * d:(j + 1) * d, k * d:(k + 1) * d] = block
    return g, h


def loss_of(objective: str, classes: int, x: np.ndarray, y: np.ndarray, beta: np.ndarray) -> float:
    """The summed loss (log loss, or squared error) at ``beta``."""
    eta = x @ beta.reshape(-1, x.shape[1]).T
    if objective == "regression":
        return float(np.sum((eta[:, 0] - y) ** 2))
    if objective == "binary":
        return float(np.sum(np.logaddexp(0.0, eta[:, 0]) - y * eta[:, 0]))
    logp = eta - np.logaddexp.reduce(eta, axis=1, keepdims=True)
    return float(-logp[np.arange(len(y)), y.astype(np.int64)].sum())


@register_program
@dataclass
class GlmProgram(Program):
    """``learner=glm``: the program (module docstring)."""

    name: ClassVar[str] = "fedsilo.glm"
    decisions: ClassVar[frozenset[str]] = frozenset({"moments", "newton"})

    task: Task
    options: GlmOptions
    test_bins: int = 1024

    def __post_init__(self) -> None:
        super().__init__()

    def _note(self, total: Total, step: str, out: GlmOutcome) -> None:
        out.rejected += [{"node": n, "step": step, "reason": r} for n, r in total.rejected]

    @override
    def run(self) -> Generator[Ask | Gather, Any, GlmOutcome]:
        """Moments, Newton steps to convergence, the validation loss, the pooled test metrics."""
        o, task = self.options, self.task
        objective = tables.objective_of(task) if o.objective == "auto" else o.objective
        classes = tables.classes_of(task) if objective == "multiclass" else 1
        self.state.update({"glm-options": json.dumps(asdict(o)), "glm-objective": objective, "glm-classes": classes})
        if isinstance(task, FederatedTask):
            self.state["prep-fingerprint"] = task.fingerprint()
        vocab = yield from tables.discover(task)
        self.state["glm-vocab"] = json.dumps(vocab, sort_keys=True)
        names = tables.feature_names(task, vocab)
        F = len(names)
        self.state["glm-features"] = F
        moments: Total = yield Ask("moments", 3 * F, decide=True)
        if moments.values is None:
            raise RuntimeError("no site contributed the inputs' moments")
        means, sds = moments.values[:F], moments.values[F:]
        self.state["glm-scale"] = json.dumps([means.tolist(), sds.tolist()])
        d = F + 1
        beta = np.zeros(classes * d)
        model = LinearModel(beta.reshape(classes, d).tolist(), means.tolist(), sds.tolist(), names, objective, classes,
                            vocab=vocab)
        out = GlmOutcome(model, sites=moments.sites)
        self._note(moments, "moments", out)
        if isinstance(task, TabularTask):
            model.schema = task.path(task.cfg.schema, "schema").read_text(encoding="utf-8")
        for it in range(o.max_iter):
            self.state["glm-beta"] = json.dumps(beta.tolist())
            step: Total = yield Ask("newton", classes * d + (classes * d) ** 2, {"iteration": it}, decide=True)
            self._note(step, "newton", out)
            if step.values is None:
                raise RuntimeError(f"Newton step {it + 1}: no total (every site left out, or no key holder decided it)")
            new = step.values
            change = float(np.max(np.abs(new - beta)))
            beta, out.iterations = new, it + 1
            out.path.append(change)
            if change < o.tol or objective == "regression" and it >= 1:
                out.converged = True
                break
        model.coef = beta.reshape(classes, d).tolist()
        self.state["glm-beta"] = json.dumps(beta.tolist())
        val: Total = yield Ask("evaluate", 2, {"rows": "val"}, reveal=True)
        if val.values is not None and val.values[1] > 0:
            out.val_loss = float(val.values[0] / val.values[1])
        if isinstance(task, FederatedTask):
            spec = task.eval_spec(self.test_bins)
            test: Total = yield Ask("evaluate", spec.size, {"rows": "test", "bins": spec.bins}, spec.encoding,
                                    reveal=True)
            if test.values is not None and test.sites > 0:
                out.test = {**spec.metrics(test.values), "test_sites": float(test.sites)}
        elif isinstance(task, PooledTask):
            split = task.data().test
            y = split.y.numpy().astype(np.float64)
            p = model.predict(split.x.numpy().astype(np.float64))
            out.test = binary_metrics(y, p, float(np.mean(np.logaddexp(0.0, model.margins(split.x.numpy().astype(
                np.float64))[:, 0]) - y * model.margins(split.x.numpy().astype(np.float64))[:, 0])))
        return out

    @classmethod
    @override
    def decision(cls, step: str, total: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        """``moments``: the pooled means and standard deviations; ``newton``: the next coefficients."""
        F = int(params["glm-features"])
        if step == "moments":
            n, s, ss = total[:F], total[F:2 * F], total[2 * F:]
            means = np.where(n > 0, s / np.maximum(n, 1), 0.0)
            var = np.where(n > 0, ss / np.maximum(n, 1) - means * means, 0.0)  # population variance (scikit-learn's)
            sds = np.sqrt(np.maximum(var, 0.0))
            return np.concatenate([means, np.where(sds > 0, sds, 1.0)])
        if step == "newton":
            o = GlmOptions.parse(json.loads(str(params["glm-options"])))
            objective, classes = str(params["glm-objective"]), int(params["glm-classes"])
            d = F + 1
            m = classes * d
            g, h = total[:m], total[m:].reshape(m, m)
            beta = np.asarray(json.loads(str(params["glm-beta"])), dtype=np.float64)
            if objective == "regression":
                return np.asarray(np.linalg.lstsq(h, h @ beta - g, rcond=None)[0])
            penalty = np.tile(np.r_[0.0, np.ones(F)], classes) / o.C
            delta = np.linalg.lstsq(h + np.diag(penalty), g + penalty * beta, rcond=None)[0]
            new = (beta - delta).reshape(classes, d)
            if objective == "multiclass":  # softmax is unchanged by a shift of every intercept: keep them centred
                new[:, 0] -= new[:, 0].mean()
            return np.asarray(new.ravel())
        raise ProgramError(f"{cls.name} decides no {step!r} total")

    @classmethod
    @override
    def site(cls, step: str, call: SiteCall) -> np.ndarray | str:
        """The site's vector for ``step`` (its policy checked first)."""
        task, p = call.task, call.params
        if isinstance(task, FederatedTask):
            task.check_fingerprint(p)
        if step == "vocab":
            return tables.local_vocab(call)
        vocab = json.loads(str(p.get("glm-vocab", "{}")))
        train, val, test = tables.cached_site_rows(task, call.data, vocab)
        F = int(p.get("glm-features", -1))  # type: ignore[call-overload]
        if train.x.shape[1] != F:
            raise ProgramError(f"the request counts {F} inputs, this site's table has {train.x.shape[1]}")
        if len(train) < call.policy.statistics.min_rows:
            raise PolicyRefusal(f"this site has fewer training rows than its policy's statistics.min_rows="
                                f"{call.policy.statistics.min_rows}: it releases no statistic of them")
        if step == "moments":
            return moments_vector(train.x)
        objective, classes = str(p.get("glm-objective")), int(p.get("glm-classes", 1))  # type: ignore[call-overload]
        scale = json.loads(str(p.get("glm-scale", "null")))
        beta = np.asarray(json.loads(str(p.get("glm-beta", "[]"))), dtype=np.float64)
        if not isinstance(scale, list) or len(scale) != 2 or beta.shape != (classes * (F + 1),) or \
                objective not in ("binary", "multiclass", "regression") or not np.all(np.isfinite(beta)):
            raise ProgramError("a glm request whose scale, coefficients or objective do not fit this site's inputs")
        means, sds = np.asarray(scale[0], dtype=np.float64), np.asarray(scale[1], dtype=np.float64)
        if step == "newton":
            g, h = newton_terms(objective, classes, _design(train.x, means, sds), train.y, beta)
            return np.concatenate([g, h.ravel()])
        if step == "evaluate":
            rows = str(p.get("rows"))
            if rows == "val":
                return np.array([loss_of(objective, classes, _design(val.x, means, sds), val.y, beta), len(val)])
            if rows == "test" and test is not None and isinstance(task, FederatedTask):
                bins = check_evaluation(p.get("bins"), len(test), call.policy)
                eta = _design(test.x, means, sds) @ beta.reshape(classes, F + 1).T
                return task.eval_spec(bins).site_vector(eta if classes > 1 else eta[:, 0], test.y)
            raise ProgramError(f"no {rows!r} rows to evaluate at this site")
        raise ProgramError(f"unknown step {step!r} of {cls.name}")


class GlmLearner(SumLearner):
    """``learner.name=glm`` (options: :class:`GlmOptions`)."""

    name: ClassVar[str] = "glm"

    @override
    def validate(self, cfg: LearnerConfig, task: type[Task]) -> None:
        """The options' ranges, and a task with a table."""
        GlmOptions.parse(dict(cfg.options))
        if not issubclass(task, (TabularTask, PooledTask)) or getattr(task, "name", "") == "medical_imaging":
            raise ConfigError("learner.name", "glm", "a learner for tables: task=tabular or a bundled tabular task "
                              "(finance, medical)")

    @override
    def program(self, task: Task, options: Mapping[str, Any]) -> Program:
        """The Newton program over ``task``'s sites."""
        return GlmProgram(task, GlmOptions.parse(dict(options)))

    @override
    def results(self, outcome: Any) -> dict[str, Any]:
        """The ``learner`` section of results.json: convergence, the validation loss, test metrics, coefficients."""
        out: GlmOutcome = outcome
        return {"objective": out.model.objective, "classes": out.model.classes, "iterations": out.iterations,
                "converged": out.converged, "val_loss": out.val_loss, "sites": out.sites, "test": out.test,
                "coefficients_per_unit": out.model.coefficients(), "step_sizes": out.path, "vocab": out.model.vocab,
                "rejected": out.rejected}

    @override
    def save(self, outcome: Any, folder: Path) -> dict[str, str]:
        """``model.json`` in the run's folder."""
        return outcome.model.save(folder)  # type: ignore[no-any-return]


register(GlmLearner())
