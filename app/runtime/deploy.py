"""``fedsilo deploy local --sites N [overrides]``: a real multi-site deployment on one machine.

For demos and tests of the deployment path, not a simulation: one ``flower-superlink``
and N ``flower-supernode`` processes on loopback, each SuperNode with **its own data
file** (``fedsilo data split``), connecting over **TLS** (a CA and certificate made for
this deployment) and **authenticated** (its key registered at the SuperLink, which runs
with ``--enable-supernode-auth``). Runtime dependency installation is off, ``FLWR_HOME``
is private, ports are free ones. The run is submitted with ``flwr run``, followed to its
final status from ``flwr ls``, and writes the same ``results.json`` as a simulation.
Every process started is stopped, also on Ctrl-C or ``kill``.

The output folder keeps what a real deployment would hand out: ``sites/`` (one data file
per site), ``pki/`` (CA, SuperLink certificate, one key pair per SuperNode), and the logs
(``superlink.log``, ``supernode-<i>.log``). ``--insecure`` drops TLS and authentication
(demos on a closed machine only). Exit codes: 0 completed, 1 the run failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.runtime import appdir


@dataclass
class Deployment:
    """What :func:`prepare` made: the config, the site files, the TLS files and node keys."""

    overrides: list[str]
    sites: list[dict[str, Any]]
    certs: Any  # app.runtime.pki.Certificates | None
    keys: list[tuple[Path, Path]]
    option_node_config: dict[str, str] = field(default_factory=dict)  # the aggregation option's node-config entries


def site_overrides(overrides: list[str], sites: int) -> tuple[list[str], str]:
    """The overrides for ``sites`` SuperNodes, and a note of what was adjusted.

    ``num_sites`` becomes ``sites``; under a natural split with more sites than asked for
    (the medical task's 4 hospitals, ``--sites 3``), the first ``sites`` natural sites take
    part (``partition.natural_sites``), as the simulation of the same overrides does.
    """
    from app import config

    out = [o for o in overrides if not o.startswith(("num_sites=", "partition.natural_sites="))] + [f"num_sites={sites}"]
    cfg = config.compose(out)
    note = ""
    if cfg.partition.name == "natural":
        import tasks

        natural = tasks.get(cfg.task.name).natural_sites or ()
        if _own_data(cfg):  # one site per file of task.data
            from app.support.paths import resolve_data_dir

            own = tasks.get(cfg.task.name)(cfg.task, resolve_data_dir(cfg.data_dir))
            natural = tuple(f.stem for f in own.site_files())  # type: ignore[attr-defined]
        if sites > len(natural):
            raise ValueError(f"--sites {sites}: task {cfg.task.name}'s natural split has only {len(natural)} sites "
                             f"{list(natural)}; use --sites {len(natural)} or partition=iid")
        if sites < len(natural):
            out.append(f"partition.natural_sites={sites}")
            note = (f"natural split: the first {sites} of {len(natural)} sites take part "
                    f"({', '.join(natural[:sites])}); partition.natural_sites={sites}")
    config.compose(out)  # validate the final set
    return out, note


def prepare(out: Path, overrides: list[str], sites: int, secure: bool = True) -> Deployment:
    """Site data files, and (``secure``) a CA, SuperLink certificate and one key pair per site."""
    from app.runtime import pki, site_files

    entries = vertical_sites(overrides, out / "sites") if _vertical(overrides) else site_files.split(overrides, out / "sites")
    if len(entries) != sites:
        raise ValueError(f"the config yields {len(entries)} sites, not --sites {sites}")
    certs = pki.make_certificates(out / "pki", hosts=["localhost"], ips=["127.0.0.1"]) if secure else None
    keys = pki.make_supernode_keys(out / "pki" / "supernodes", sites) if secure else []
    import aggregation
    from app import config

    a = config.compose(overrides).aggregation
    option = aggregation.get(a.name)
    names = [str(e.get("node", {}).get("site-name", e["name"])) for e in entries]
    per_site = option.site_setup(a, out / "identities", names)  # e.g. secagg's identities and their roster
    for entry, name in zip(entries, names, strict=True):
        if per_site.get(name):
            entry.setdefault("node", {}).update(per_site[name])
    return Deployment(overrides, entries, certs, keys, option.node_config(a))


def _vertical(overrides: list[str]) -> bool:
    from app import config

    return config.compose(overrides).vertical.name != "none"


def vertical_sites(overrides: list[str], out: Path) -> list[dict[str, Any]]:
    """A vertical federation: each party's files copied into a folder of its own (as each party
    would hold them), its node config naming its role, schema, held-out file and model folder."""
    import shutil

    from app import config
    from app.vertical import resolved

    v = resolved(config.compose(overrides))
    entries: list[dict[str, Any]] = []
    for p in v.parties:
        home = out / p.name
        home.mkdir(parents=True, exist_ok=True)
        data = Path(shutil.copy(p.data, home / Path(p.data).name)).resolve()
        node: dict[str, Any] = {"role": p.role, "party-name": p.name,
                                "schema-path": str(Path(shutil.copy(p.schema, home / Path(p.schema).name)).resolve()),
                                "model-dir": str((home / "models").resolve())}
        if p.test:
            node["test-path"] = str(Path(shutil.copy(p.test, home / Path(p.test).name)).resolve())
        entries.append({"name": p.name, "file": str(data), "node": node})
    # each party's identity and the others' public keys, pinned (vertical/channel.py): the coordinator
    # cannot put its own run key between two parties
    from vertical.channel import provision

    for entry, (key, peers) in zip(entries, provision(out, [p.name for p in v.parties]).values(), strict=True):
        entry["node"].update({"party-key": key, "peer-keys": peers})
    return entries


def node_config(entry: dict[str, Any], option_config: dict[str, str] | None = None) -> str:
    """A SuperNode's ``--node-config``: the path of its own data file, its own state folder (SCAFFOLD's
    control variate, personal models: ``core/state.py``), and what the aggregation option needs at
    the site (``aggregation=paillier``: the sites' key pair, which the server never gets)."""
    state = Path(entry["file"]).with_suffix(".state")
    extra = f' state-dir="{state}"' + "".join(f' {k}="{v}"' for k, v in (option_config or {}).items())
    extra += "".join(f' {k}={v}' if isinstance(v, int) else f' {k}="{v}"' for k, v in entry.get("node", {}).items())
    return f'data-path="{entry["file"]}"{extra}'


def start(dep: Deployment, out: Path, worker: bool = True, database: Path | None = None) -> Any:
    """Start the SuperLink (TLS, node authentication) and one SuperNode per site; return the link.

    ``worker``: each SuperNode with its site's long-lived ClientApp worker
    (:mod:`app.runtime.site_worker`); ``False``: Flower's stock SuperNode (benchmarks).
    ``database``: the SuperLink keeps its state in this file, so it can be restarted."""
    from app.runtime.superlink import LocalSuperLink

    link = LocalSuperLink(out / "superlink.log", simulation=False, certs=dep.certs, supernode_auth=dep.certs is not None,
                          database=database)
    link.start()
    try:
        for _, public in dep.keys:
            link.register(public)
        link.add_supernodes([node_config(e, dep.option_node_config) for e in dep.sites], [k for k, _ in dep.keys] or None,
                            worker=worker)
    except BaseException:
        link.stop()
        raise
    return link


def run(overrides: list[str], sites: int, out: Path, secure: bool = True, timeout: float = 4 * 3600,
        stream: bool = True, worker: bool = True, policies: list[Path] | None = None,
        then: list[list[str]] | None = None) -> tuple[Any, dict[str, Any] | None]:
    """Prepare, start, submit, follow and stop a local deployment; return (outcome, results).

    ``policies``: the sites' own policy files (app/site_policy.py), one for every site or one per site.
    ``then``: more jobs, each a list of overrides on the same task and data, run one after another on the same
    SuperLink and SuperNodes (as a consortium runs several analyses on one federation); job ``k`` (from 2) writes
    into ``out/job-k``, and its (outcome, results) are in ``results["then"]`` of the first job's results, in order."""
    from app import config
    from app.runtime.preflight import preflight

    overrides, note = site_overrides(overrides, sites)
    if note:
        print(f"fedsilo deploy: {note}", flush=True)
    cfg = config.compose(overrides)
    data_dir = preflight(cfg)
    out.mkdir(parents=True, exist_ok=True)
    dep = prepare(out, overrides, sites, secure)
    if policies:
        if len(policies) not in (1, len(dep.sites)):
            raise ValueError(f"--policy: give one policy for every site or one per site ({len(dep.sites)}), not "
                             f"{len(policies)}")
        for k, entry in enumerate(dep.sites):
            entry.setdefault("node", {})["policy-path"] = str(Path(policies[k % len(policies)]).resolve())
    jobs = [(overrides, out)]
    for k, more in enumerate(then or [], start=2):
        more, _ = site_overrides(more, sites)
        preflight(config.compose(more))
        jobs.append((more, out / f"job-{k}"))
    print(f"fedsilo deploy: {sites} SuperNodes, {'TLS + SuperNode authentication' if secure else 'INSECURE'}, "
          f"output {out}", flush=True)
    t0 = time.monotonic()
    done: list[tuple[Any, dict[str, Any] | None]] = []
    link = start(dep, out, worker)
    try:
        for job, folder in jobs:
            folder.mkdir(parents=True, exist_ok=True)
            run_id = link.submit(appdir.app_dir(), job_config(job, data_dir, folder), {})
            outcome = link.follow(run_id, timeout=timeout, stream=stream)
            results_path = folder / "results.json"
            results = json.loads(results_path.read_text()) if results_path.is_file() else None
            if results is not None:
                results["deployment"] = {"sites": sites, "tls": secure, "supernode_auth": secure,
                                         "site_worker": worker, "seconds": time.monotonic() - t0,
                                         "run_id": outcome.run_id, "status": outcome.status}
                from app.reporting.results import write_json_atomic

                write_json_atomic(results_path, results)
            done.append((outcome, results))
    finally:
        link.stop()
    outcome, results = done[0] if done else (None, None)
    if results is not None and len(done) > 1:
        results["then"] = [{"outcome": o, "results": r} for o, r in done[1:]]
    return outcome, results


def job_config(overrides: list[str], data_dir: Path, folder: Path) -> dict[str, str]:
    """The run config of one job of a deployment: the coordinator holds no site data (an empty folder, the
    schemas as absolute paths) where the sites hold their own; its results go to ``folder``."""
    from app import config

    cfg = config.compose(overrides)
    coordinator_data = data_dir
    if cfg.vertical.name != "none":  # the coordinator holds no data: an empty folder, the schemas as absolute paths
        from app.vertical import resolved

        v = resolved(cfg)
        overrides = [*overrides, *(f"vertical.parties.{k}.schema={p.schema}" for k, p in enumerate(v.parties))]
        coordinator_data = (folder / "coordinator").resolve()
        coordinator_data.mkdir(exist_ok=True)
    elif _own_data(cfg):  # the coordinator gets an empty folder: it holds no data, only the schema
        import tasks

        if cfg.task.schema:
            schema = tasks.get(cfg.task.name)(cfg.task, data_dir).path(cfg.task.schema, "schema").resolve()  # type: ignore[attr-defined]
            overrides = [o for o in overrides if not o.startswith("task.schema=")] + [f"task.schema={schema}"]
        coordinator_data = (folder / "coordinator").resolve()
        coordinator_data.mkdir(exist_ok=True)
    return {"overrides": config.run_overrides(overrides, coordinator_data), "output-dir": str(folder.resolve())}


def _own_data(cfg: Any) -> bool:
    import tasks

    return tasks.get(cfg.task.name).federated_data


def output_folder(out: Path | None, overrides: list[str]) -> tuple[Path, list[str]]:
    """The deployment's output folder and the overrides without ``hydra.run.dir``.

    ``hydra.run.dir=DIR`` names the folder as it does for the ``fedsilo`` command (the same as
    ``--out DIR``); other ``hydra.*`` settings do not apply to a deployment and are refused, as
    are ``--out`` and ``hydra.run.dir`` naming different folders."""
    keys = ("hydra.run.dir=", "+hydra.run.dir=")
    run_dirs = [Path(o.split("=", 1)[1]) for o in overrides if o.startswith(keys)]
    rest = [o for o in overrides if not o.startswith(keys)]
    if run_dirs and out is not None and run_dirs[-1] != out:
        raise ValueError(f"--out {out} and hydra.run.dir={run_dirs[-1]} name different output folders; give one of them")
    other = [o for o in rest if o.lstrip("+~").startswith("hydra.")]
    if other:
        raise ValueError(f"{other[0]}: of Hydra's settings only hydra.run.dir (the output folder, as --out) "
                         "applies to a deployment")
    default = Path("outputs") / "deploy" / time.strftime("%Y-%m-%d_%H-%M-%S")
    return out or (run_dirs[-1] if run_dirs else default), rest


def main(argv: list[str]) -> int:
    """``fedsilo deploy local``: a SuperLink and SuperNodes on this machine, a job run on them; the exit code."""
    parser = argparse.ArgumentParser(prog="fedsilo deploy local", description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, required=True, help="number of SuperNodes (sites)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: hydra.run.dir= if given, else outputs/deploy/<time>)")
    parser.add_argument("--insecure", action="store_true", help="no TLS, no SuperNode authentication (demos only)")
    parser.add_argument("--policy", type=Path, action="append", default=None,
                        help="a site policy (YAML, docs/deployment.md): once for every site, or once per site in order")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for a job: task=medical aggregation=secagg")
    args = parser.parse_args(argv)
    if args.sites < 2:
        print("fedsilo deploy: --sites must be >= 2", file=sys.stderr)
        return 2
    try:
        out, args.overrides = output_folder(args.out, args.overrides)
    except ValueError as err:
        print(f"fedsilo deploy: {err}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through LocalSuperLink.stop()
    from app import config
    from app.runtime.preflight import PreflightError
    from app.runtime.superlink import SimulationError

    try:
        outcome, results = run(args.overrides, args.sites, out, secure=not args.insecure, policies=args.policy)
    except (config.ConfigError, PreflightError, ValueError) as err:
        print(f"fedsilo deploy: {err}", file=sys.stderr)
        return 2
    except SimulationError as err:
        print(f"fedsilo deploy: {err}", file=sys.stderr)
        return 1
    if not outcome.ok or results is None:
        print(f"fedsilo deploy: run {outcome.run_id} ended with status {outcome.status}: {outcome.details} "
              f"(logs in {out})", file=sys.stderr)
        return 1
    final = results["final"]
    print(f"fedsilo deploy: run {outcome.run_id} completed in {results['deployment']['seconds']:.1f}s; final "
          + " ".join(f"{k}={final[k]:.4f}" for k in ("auc", "accuracy", "loss") if final.get(k) is not None), flush=True)
    if config.compose(list(args.overrides)).report:
        from app.reporting import report

        page, why = report.ensure(out)  # the ServerApp wrote it
        if page is not None:
            print(f"fedsilo deploy: report in {page}", flush=True)
        else:
            print(f"fedsilo deploy: warning: {why}", file=sys.stderr, flush=True)
    print(f"fedsilo deploy: results in {out / 'results.json'}", flush=True)
    return 0
