"""Protected-sum programs: coordinator logic that learns only totals of the sites' vectors.

Federated preprocessing, pooled test metrics, histogram trees and survival statistics have
one shape: the coordinator asks every site for a vector of a declared length and encoding,
receives the *total* under the run's aggregation option (plain: every vector; secure
aggregation: only the total; Paillier: a total only the sites can open), and decides what to
ask next. A :class:`Program` writes that logic once:

* its **coordinator half**, :meth:`Program.run`, is a generator: it yields an :class:`Ask` (a sum)
  or a :class:`Gather` (names in the clear, e.g. the categories of a column) and is sent back a
  :class:`Total` (or the gathered values); what it returns is the program's outcome. It writes
  public values the sites need later (a vocabulary, a fingerprint) into :attr:`Program.state`;
  a total asked with ``keep=KEY`` is kept under ``KEY`` by the runner (sealed where the
  coordinator may not read it) and every later request, and every later message of the run,
  carries it;
* its **site half**, :meth:`Program.site`, is a pure function of the site's data, the program's
  state and the step's parameters (:class:`SiteCall`): the same inputs give the same vector.

Programs are registered by name (:func:`register`); the runner that drives them under an
aggregation option is :mod:`aggregation.programs`, and the same program gives the same totals,
bit for bit, under every option. A program knows no option, no grid and no message.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

from core.fixedpoint import STATS, Encoding

T = TypeVar("T")

#: Public values a request may carry: what Flower's ConfigRecord holds.
Scalar = int | float | str | bool | bytes


@dataclass(frozen=True)
class Ask:
    """One protected sum: every site's vector of ``length`` values, in ``encoding``, totalled.

    ``params`` are the step's public parameters (the site half reads them); ``keep`` names the
    state key the total is kept under for later steps and messages; ``reveal`` asks for the total
    in the clear at the coordinator (Paillier: one key-holding site reveals it, for metrics only);
    ``arrays`` is a model the sites need for this step (e.g. to score it), sent in the form the
    aggregation option gives the sites. ``decide`` asks not for the total but for the program's
    :meth:`Program.decision` of it (a split, a bin edge): where the coordinator may read the total
    it computes the decision itself; under Paillier one key-holding site computes it from the total
    it recomputes and verifies, and the coordinator learns the decision only.
    """

    step: str
    length: int
    params: Mapping[str, Scalar] = field(default_factory=dict)
    encoding: Encoding = STATS
    keep: str | None = None
    reveal: bool = False
    arrays: Any = None
    decide: bool = False


@dataclass(frozen=True)
class Gather:
    """Every site's public value (JSON), in the clear: for names, never for rows or statistics."""

    step: str
    params: Mapping[str, Scalar] = field(default_factory=dict)


@dataclass
class Total:
    """What the coordinator gets back for an :class:`Ask`."""

    sites: int                                  # how many sites' vectors the total holds
    values: np.ndarray | None                   # the total, where the coordinator may read it
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (node, reason) of the sites left out


@dataclass
class Gathered:
    """What the coordinator gets back for a :class:`Gather`: each answering site's value."""

    values: list[Any]
    rejected: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class SiteCall:
    """What a program's site half may read, and nothing else.

    ``data`` is the site's data as its task keeps them, ``task`` the site's own task object,
    ``params`` the request's public entries (the step's parameters and the program's state),
    ``total(key)`` a total kept under ``key`` (opened by the aggregation option: Paillier decrypts it
    here), ``model(template)`` the model the step sent, and ``policy`` the site's own policy (its
    bounds on what it releases; :mod:`app.site_policy`).
    """

    data: Any
    task: Any
    params: Mapping[str, Any]
    total: Callable[[str], np.ndarray]
    model: Callable[[dict[str, Any]], dict[str, Any]]
    policy: Any


class ProgramError(ValueError):
    """A request a program's site half refuses (a bad step or parameter); the reason names no value."""


class PolicyRefusal(ValueError):
    """A request the site's own policy refuses; the reason names the policy's bound, never data."""


class Program(ABC):
    """A protected-sum program (see the module docstring)."""

    #: the registry name, carried by every request so the site knows which program asks
    name: ClassVar[str]

    def __init__(self) -> None:
        self.state: dict[str, Scalar | list[Any]] = {}
        #: the coordinator half's latest resumable point (JSON values; e.g. after a round of trees), or None.
        #: The runner hands it to the run's checkpoint; :meth:`restore` takes it back in a resumed run.
        self.progress: dict[str, Any] | None = None

    def restore(self, progress: Mapping[str, Any]) -> None:
        """Continue from ``progress`` (a :attr:`progress` of an interrupted run with the same config), before
        :meth:`run`; a program without resumable points refuses."""
        raise ProgramError(f"{self.name} cannot be resumed")

    @abstractmethod
    def run(self) -> Generator[Ask | Gather, Any, Any]:
        """The coordinator half: yield steps, receive their totals, return the outcome."""

    @classmethod
    @abstractmethod
    def site(cls, step: str, call: SiteCall) -> np.ndarray | Any:
        """The site half of ``step``: this site's vector (a :class:`Gather` step: its public value).

        A class method: it may read only ``call`` (the coordinator's instance never reaches a site)."""

    #: the steps whose totals are asked with ``decide=True`` (a key holder computes only these)
    decisions: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def decision(cls, step: str, total: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        """What the coordinator learns of ``step``'s total (a step in :attr:`decisions`): a pure function of the
        total and the request's public ``params`` (the program's state and the step's parameters).

        Under Paillier a key-holding site runs it on a total it has verified to hold at least its policy's
        number of sites, once per sum: the coordinator learns at most this function of one such total."""
        raise ProgramError(f"{cls.name} decides nothing of a {step!r} total")


#: name -> program class (the coordinator instantiates it; a site calls its :meth:`Program.site`)
REGISTRY: dict[str, type[Program]] = {}


def register(program: type[Program]) -> type[Program]:
    """Make ``program`` known to the sites and the coordinator under its name (a class decorator)."""
    if REGISTRY.get(program.name, program) is not program:
        raise ValueError(f"program {program.name!r} is registered already, by {REGISTRY[program.name]!r}")
    REGISTRY[program.name] = program
    return program


#: Installed packages name their programs here (``[project.entry-points."fedsilo.programs"]``, name = module):
#: a site loads only what is installed at the site; a request names a program, never code or a path.
ENTRY_POINTS = "fedsilo.programs"


def get(name: str) -> type[Program]:
    """The program registered under ``name`` (loading an installed package's entry point of that name if
    need be); :class:`ProgramError` naming the known ones otherwise."""
    found = lookup(REGISTRY, ENTRY_POINTS, name)
    if found is None:
        raise ProgramError(f"no protected-sum program {name!r} (known: {sorted(REGISTRY)})")
    return found


def lookup(registry: dict[str, T], group: str, name: str) -> T | None:
    """``registry[name]``, after importing the module an installed package declares for ``name`` in
    entry-point ``group`` if the registry lacks it (importing it registers what it provides); None if absent."""
    if name not in registry:
        from importlib.metadata import entry_points

        for ep in entry_points(group=group, name=name):
            ep.load()
    return registry.get(name)


def drive(program: Program, answer: Callable[[Ask | Gather], Total | Gathered]) -> Any:
    """Run ``program``'s coordinator half, answering each step with ``answer``; return its outcome."""
    steps = program.run()
    try:
        step = next(steps)
        while True:
            step = steps.send(answer(step))
    except StopIteration as done:
        return done.value
