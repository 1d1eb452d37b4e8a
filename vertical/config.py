"""The ``vertical`` config group: a vertical federation of an active party and passive parties.

``vertical=none`` (the default) leaves runs horizontal. ``vertical=hetero_lr`` or
``vertical=split_nn`` makes the run vertical: the parties below match their customers by private
set intersection, then train the model together; ``task``, ``strategy``, ``aggregation`` and
``privacy`` are the horizontal axes and must stay at their defaults (the vertical protocols carry
their own protection).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.config import check

MODELS = ("none", "hetero_lr", "split_nn", "secureboost")
MODES = ("train", "score")
PROTECTIONS = ("none", "embeddings", "gradients", "both")
ROLES = ("active", "passive")


@dataclass
class PartyConfig:
    """One party of the simulation (a deployed party names its files in its node config instead)."""

    name: str = ""
    role: str = "passive"          # active (holds the labels) | passive (features only)
    data: str = ""                 # its training file: CSV or Parquet, relative to data_dir or absolute
    test: str | None = None        # its held-out customers (scored after every epoch), optional
    schema: str = ""               # the tabular schema of its file (the id column is required)


@dataclass
class BoostConfig:
    """``vertical=secureboost``: the trees (each key as in ``learner=gbdt``, docs/gbdt.md; ``vertical.epochs`` is the
    number of trees) and what each party lets the other learn (docs/vertical.md, "SecureBoost")."""

    max_depth: int = 3
    eta: float = 0.3
    reg_lambda: float = 1.0
    gamma: float = 0.0
    min_child_weight: float = 1.0
    max_bin: int = 32
    grid_cells: int = 1024
    active_trees: int = 0        # the first trees use only the active party's columns (nothing sent to the others)
    min_bin_rows: int = 20       # a passive party merges bins holding fewer of a node's rows (0: every bin alone)
    keep_hessians: bool = False  # store each node's hessian sum in the model (TimberStrike reads them)
    obfuscators: str = "full"    # full | djn: the active party's Paillier obfuscators (docs/paillier.md)


@dataclass
class VerticalConfig:
    """Schema of ``conf/vertical/*.yaml``."""

    name: str = "none"             # none | hetero_lr | split_nn
    mode: str = "train"            # train | score (score vertical.score files with a trained model)
    parties: list[PartyConfig] = field(default_factory=list)
    epochs: int = 10
    batch_size: int = 0            # rows per step; 0 = the whole intersection (full batch)
    lr: float = 0.5
    l2: float = 0.0                # L2 penalty on every party's weights
    min_intersection: int = 100    # refuse to train on fewer common customers
    seed_batches: bool = True      # shuffle the rows every epoch (from the run's seed)
    # hetero_lr: Paillier keys made by each party for the run
    key_bits: int = 2048
    workers: int = 0               # processes per party for Paillier work (0 = all cores)
    # split_nn
    hidden: list[int] = field(default_factory=lambda: [32])   # each party's bottom model
    embedding: int = 8             # width of each party's embedding
    top_hidden: list[int] = field(default_factory=lambda: [16])
    optimizer: str = "adam"        # adam | sgd
    protection: str = "none"       # none | embeddings | gradients | both (what crosses, noised)
    clip: float = 1.0              # L2 bound per row of each protected tensor
    noise_multiplier: float = 0.0  # Gaussian noise std / clip on protected tensors
    delta: float = 1e-5
    # secureboost
    boost: BoostConfig = field(default_factory=BoostConfig)
    # score mode
    model_dir: str | None = None   # simulation: the training run's directory (its parties' model parts)
    score: list[str] = field(default_factory=list)   # simulation: one file to score per party, in party order


def validate(v: VerticalConfig) -> None:
    """Range checks of the ``vertical`` keys."""
    check(v.name in MODELS, "vertical.name", v.name, f"one of {list(MODELS)}")
    if v.name == "none":
        return
    check(v.mode in MODES, "vertical.mode", v.mode, f"one of {list(MODES)}")
    check(v.epochs >= 1, "vertical.epochs", v.epochs, "an integer >= 1")
    check(v.batch_size >= 0, "vertical.batch_size", v.batch_size, "0 (full batch) or an integer >= 1")
    check(v.lr > 0, "vertical.lr", v.lr, "a number > 0")
    check(v.l2 >= 0, "vertical.l2", v.l2, "a number >= 0")
    check(v.min_intersection >= 1, "vertical.min_intersection", v.min_intersection, "an integer >= 1")
    check(v.key_bits >= 2048, "vertical.key_bits", v.key_bits, "an integer >= 2048")
    check(v.workers >= 0, "vertical.workers", v.workers, "0 (all cores) or an integer >= 1")
    check(all(h >= 1 for h in v.hidden), "vertical.hidden", v.hidden, "a list of layer widths >= 1")
    check(all(h >= 1 for h in v.top_hidden), "vertical.top_hidden", v.top_hidden, "a list of layer widths >= 1")
    check(v.embedding >= 1, "vertical.embedding", v.embedding, "an integer >= 1")
    check(v.optimizer in ("adam", "sgd"), "vertical.optimizer", v.optimizer, "adam or sgd")
    check(v.protection in PROTECTIONS, "vertical.protection", v.protection, f"one of {list(PROTECTIONS)}")
    check(v.clip > 0, "vertical.clip", v.clip, "a number > 0")
    check(v.noise_multiplier >= 0, "vertical.noise_multiplier", v.noise_multiplier, "a number >= 0")
    check(0 < v.delta < 1, "vertical.delta", v.delta, "0 < delta < 1")
    b = v.boost
    check(1 <= b.max_depth <= 16, "vertical.boost.max_depth", b.max_depth, "an integer in [1, 16]")
    check(0 < b.eta <= 1, "vertical.boost.eta", b.eta, "a number in (0, 1]")
    check(b.reg_lambda >= 0, "vertical.boost.reg_lambda", b.reg_lambda, "a number >= 0")
    check(b.gamma >= 0, "vertical.boost.gamma", b.gamma, "a number >= 0")
    check(b.min_child_weight >= 0, "vertical.boost.min_child_weight", b.min_child_weight, "a number >= 0")
    check(2 <= b.max_bin <= 256, "vertical.boost.max_bin", b.max_bin, "an integer in [2, 256]")
    check(b.grid_cells >= 16, "vertical.boost.grid_cells", b.grid_cells, "an integer >= 16")
    check(b.active_trees >= 0, "vertical.boost.active_trees", b.active_trees, "an integer >= 0")
    check(b.min_bin_rows >= 0, "vertical.boost.min_bin_rows", b.min_bin_rows, "an integer >= 0")
    check(b.obfuscators in ("full", "djn"), "vertical.boost.obfuscators", b.obfuscators,
          "full or djn (short-exponent obfuscators under an extra assumption, docs/paillier.md)")
    if v.protection != "none":
        check(v.name == "split_nn", "vertical.protection", v.protection,
              "none with vertical=hetero_lr (its traffic is encrypted or masked already)")
        check(v.noise_multiplier > 0, "vertical.noise_multiplier", v.noise_multiplier,
              f"a number > 0 with vertical.protection={v.protection}")
    if v.parties:
        roles = [p.role for p in v.parties]
        for k, p in enumerate(v.parties):
            check(p.role in ROLES, f"vertical.parties[{k}].role", p.role, f"one of {list(ROLES)}")
            check(bool(p.name), f"vertical.parties[{k}].name", p.name, "a non-empty party name")
            check(bool(p.data), f"vertical.parties[{k}].data", p.data, "the party's data file")
            check(bool(p.schema), f"vertical.parties[{k}].schema", p.schema, "the party's schema file")
        check(roles.count("active") == 1, "vertical.parties", roles, "exactly one party with role active")
        check(len(roles) >= 2, "vertical.parties", roles, "an active party and at least one passive party")
        names = [p.name for p in v.parties]
        check(len(set(names)) == len(names), "vertical.parties", names, "parties with distinct names")
        if v.mode == "score":
            check(len(v.score) == len(v.parties), "vertical.score", v.score,
                  f"one file per party ({len(v.parties)}), in party order")
