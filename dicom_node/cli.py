"""`ctmtl-node`: run the DICOM node, process a series offline, and look after the node."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.runtime import no_numpy_huge_pages

if TYPE_CHECKING:
    from dicom_node.config import NodeConfig
    from dicom_node.db import Database
    from dicom_node.service import NodeService
    from dicom_node.tls import TLSSettings

logger = logging.getLogger(__name__)

DESCRIPTION = """\
ctmtl DICOM node: receives chest CT series from a PACS (C-STORE), segments COVID-19
lesions and classifies the series with the multi-task network, and sends a DICOM SEG and
a TID 1500 structured report back. Research software, not a medical device.

Typical use:
  ctmtl-node serve --config config/node.toml      run SCP + worker (Ctrl-C stops)
  ctmtl-node echo pacs --config config/node.toml  C-ECHO a configured destination
  ctmtl-node status --config config/node.toml     recent series and jobs
  ctmtl-node process SERIES_DIR --out OUT         one series folder, no network
  ctmtl-node evaluate --series LABELS.csv --json OUT   score the verdict on labelled series
  ctmtl-node config check config/node.toml        validate a config file
  ctmtl-node worker --config config/node.toml     a worker alone (scale-out, one per GPU)
  ctmtl-node destinations --echo --config ...     configured peers, C-ECHO each
  ctmtl-node retry JOB | resend SERIES_UID | purge --older-than 30d | db upgrade

Exit status: 0 success, 1 action failed or refused, 2 invalid configuration or usage,
3 series rejected (process) / config file unreadable (config check), 4 config syntax error;
evaluate: 1 no series could be scored, 2 malformed labels CSV or checkpoint;
serve / worker refused at start: 2 fix the config or a file it names (checkpoint, TLS
key, database URL, password, corrupt or emptied SQLite file), 1 may pass by itself
(database server not reachable, too many connections, port in use).
"""

_PEER_RE = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")


def _setup_logging(level: str) -> None:
    from dicom_node.redact import MaskingFormatter

    handler = logging.StreamHandler(sys.stderr)  # every line through mask_secrets
    handler.setFormatter(
        MaskingFormatter("%(asctime)s %(levelname)-7s %(threadName)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    if level.upper() != "DEBUG":
        for noisy in ("pynetdicom", "alembic", "highdicom", "dicomweb_client"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # two ERROR lines per failed connect; the exporter and `echo` name the cause in one
        logging.getLogger("pynetdicom.transport").setLevel(logging.CRITICAL)
        # dicomweb-client's retry wrapper: a traceback per failed STOW-RS request (its
        # retries are off); the exporter logs the cause in one line
        logging.getLogger("retrying").setLevel(logging.CRITICAL)


def _load(path: str | None):  # type: ignore[no-untyped-def]
    from dicom_node.config import ConfigError, load_config
    from dicom_node.redact import mask_secrets

    try:
        return load_config(path)
    except ConfigError as exc:
        print(mask_secrets(str(exc)), file=sys.stderr)
        raise SystemExit(2) from None


# --------------------------------------------------------------------------- commands


def cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.service import NodeService

    cfg = _load(args.config)
    if args.port is not None:
        cfg.node.port = args.port
    return _serve(
        lambda: NodeService(cfg, worker=False if args.no_worker else None, config_path=args.config)
    )


def _serve(make: Callable[[], NodeService]) -> int:
    """Build the service and run it until stopped.

    A start-up failure (port in use, missing checkpoint, database refused, ...) is one
    `error:` line per problem on stderr, secrets masked, and exit 2 (fix the config) or 1
    (may pass: port in use, database server not reachable yet).
    """
    from dicom_node.config import StartupError
    from dicom_node.redact import mask_secrets

    try:
        service = make()
        service.serve_forever()
    except StartupError as exc:
        for line in str(exc).splitlines():
            print(mask_secrets(f"error: {line}"), file=sys.stderr)
        return exc.exit_code
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """A worker process without SCP (scale-out): claims jobs from the shared database."""
    from dicom_node.service import NodeService

    cfg = _load(args.config)
    return _serve(
        lambda: NodeService(
            cfg,
            scp=False,
            worker=True,
            exporter=False if args.no_export else None,
            config_path=args.config,
        )
    )


def cmd_destinations(args: argparse.Namespace) -> int:
    from dicom_node.admin import destinations
    from dicom_node.export import target_for

    cfg = _load(args.config)
    rows = destinations(cfg)
    if not rows:
        print("no destinations configured")
        return 0
    failed = 0
    for row in rows:
        line = f"{row.name:<16} {row.peer:<40} {'TLS' if row.tls else 'plain':<5}"
        line += f"  routed: {', '.join(row.routed_from) or '-'}"
        if args.echo:
            ok, message = target_for(cfg.destination(row.name), cfg.node.ae_title).check()
            failed += not ok
            line += f"\n    {'ok' if ok else 'FAILED'}: {message}"
        print(line)
    return 1 if failed else 0


@contextlib.contextmanager
def _node_db(config: str | None) -> Iterator[tuple[NodeConfig, Database]]:
    """The config and the (upgraded) database it names, disposed of afterwards.

    The database is checked first as at start-up (an emptied or corrupt SQLite file, a
    refused connection): one `error:` line per problem and exit 2 (or 1), never a new
    schema in an emptied file.
    """
    from dicom_node.db import Database

    cfg = _load(config)
    refused = _check_database(cfg, thorough=False)
    if refused:
        raise SystemExit(refused)
    db = Database(cfg.database_url)
    try:
        db.upgrade()
        yield cfg, db
    finally:
        db.dispose()


def _run_admin(config: str | None, action: Callable[[NodeConfig, Database], list[str]]) -> int:
    """Run an admin action on the node's database; print its lines, or why it was refused."""
    from dicom_node.admin import AdminError

    try:
        with _node_db(config) as (cfg, db):
            lines = action(cfg, db)
    except AdminError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from dicom_node.admin import AdminError, failed_jobs, retry_job

    if (args.job is None) == (not args.failed) or (args.error_contains and not args.failed):
        print("error: give a JOB, or --failed [--error-contains TEXT]", file=sys.stderr)
        return 2

    def action(_cfg: NodeConfig, db: Database) -> list[str]:
        if not args.failed:
            return [f"job {retry_job(db, args.job)} queued (retry of job {args.job})"]
        lines = []
        for job_id in failed_jobs(db, args.error_contains):
            try:
                lines.append(f"job {retry_job(db, job_id)} queued (retry of job {job_id})")
            except AdminError as exc:  # e.g. its files were purged: the others still go
                lines.append(f"job {job_id} not retried: {exc}")
        return lines or ["no failed job to retry"]

    return _run_admin(args.config, action)


def cmd_resend(args: argparse.Namespace) -> int:
    from dicom_node.admin import resend_series

    def action(cfg: NodeConfig, db: Database) -> list[str]:
        outcome = resend_series(db, cfg, args.series, args.to or ())
        return [f"{name}: {what}" for name, what in outcome]

    return _run_admin(args.config, action)


def cmd_purge(args: argparse.Namespace) -> int:
    from dicom_node.admin import parse_duration, purge

    try:
        age = parse_duration(args.older_than)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def action(cfg: NodeConfig, db: Database) -> list[str]:
        n = purge(db, cfg.spool.path, age)
        return [f"purged the spooled files of {n} finished series older than {args.older_than}"]

    return _run_admin(args.config, action)


def _check_database(cfg: NodeConfig, thorough: bool, prefix: str = "") -> int:
    """The start-up checks of the database: 0, or print the problems and return the exit
    status (2: fix the config or the file, 1: the server may come back)."""
    from dicom_node.config import StartupError
    from dicom_node.preflight import database_problems, raise_for

    try:
        raise_for(database_problems(cfg, connect=True, thorough=thorough))
    except StartupError as exc:
        for line in str(exc).splitlines():
            print(f"error: {prefix}{line}", file=sys.stderr)
        return exc.exit_code
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from dicom_node.admin import db_upgrade
    from dicom_node.preflight import describe_db_error
    from dicom_node.redact import mask_secrets

    cfg = _load(args.config)
    refused = _check_database(cfg, thorough=True, prefix="database upgrade failed: ")
    if refused:
        return refused
    try:
        before, after = db_upgrade(cfg.database_url)
    except Exception as exc:  # connection refused, permissions, failed migration
        line, _ = describe_db_error(exc)
        print(f"error: database upgrade failed: {type(exc).__name__}: {line}", file=sys.stderr)
        return 1
    url = mask_secrets(cfg.database_url)
    if before == after:
        print(f"{url}: already at revision {after}")
    else:
        print(f"{url}: upgraded from {before or 'empty'} to {after}")
    return 0


def cmd_process(args: argparse.Namespace) -> int:
    from dicom_node.pipeline import run_process_command
    from dicom_node.volume import SeriesRejected

    series_dir = Path(args.series_dir)
    if not series_dir.is_dir():
        print(f"error: {series_dir} is not a folder", file=sys.stderr)
        return 2
    try:
        out = run_process_command(series_dir, Path(args.out), args.checkpoint, args.device)
    except SeriesRejected as exc:
        print(f"series rejected: {exc.reason}", file=sys.stderr)
        return 3
    print(json.dumps(out, default=str))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score the node's series verdict on a labels CSV; exit 1 when nothing was scored."""
    from dicom_node.evaluate import LabelsError, evaluate_series, read_labels
    from mtl_model import CheckpointError, Predictor

    try:
        read_labels(args.series)  # refuse a bad CSV before loading the model
    except LabelsError as exc:
        print(f"error: labels {exc.path}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    options = _load(args.config).results if args.config else None
    try:
        predictor = Predictor(checkpoint=args.checkpoint, device=args.device)
    except (CheckpointError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = evaluate_series(args.series, predictor, args.json, args.report, options)
    m = result["metrics"]
    for f in result["failures"]:
        print(f"{f['status']}: {f['path']}: {f['reason']}", file=sys.stderr)

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    print(
        f"{m['n_scored']} of {m['n']} series scored ({m['n_rejected']} rejected, "
        f"{m['n_failed']} failed): AUC {fmt(m['auc'])}, accuracy {fmt(m['accuracy'])}, "
        f"sensitivity {fmt(m['sensitivity'])}, specificity {fmt(m['specificity'])} "
        f"at {m['threshold']:g}; JSON in {args.json}"
    )
    if not m["n_scored"]:
        print("error: no series could be scored", file=sys.stderr)
        return 1
    return 0


def parse_peer(text: str) -> tuple[str, str, int]:
    """`AE@host:port` -> (ae, host, port); ValueError with the expected form."""
    m = _PEER_RE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is neither a configured destination nor AE@host:port")
    port = int(m.group("port"))
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return m.group("ae"), m.group("host").strip("[]"), port


def _echo_tls_given(args: argparse.Namespace) -> bool:
    given = (args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    return bool(args.tls or args.tls_no_verify) or any(v is not None for v in given)


def _echo_tls(args: argparse.Namespace) -> TLSSettings | None:
    """TLSSettings from `echo --tls-*` (None when no TLS option is given); ValueError."""
    from dicom_node.tls import TLSSettings

    if not _echo_tls_given(args):
        return None
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_ca is None and not args.tls_no_verify:
        raise ValueError("TLS needs --tls-ca (the CA of the peer's certificate) or --tls-no-verify")
    return TLSSettings(
        enabled=True,
        ca_file=args.tls_ca,
        cert_file=args.tls_cert,
        key_file=args.tls_key,
        verify_peer=not args.tls_no_verify,
        server_hostname=args.tls_server_name,
    )


def cmd_echo(args: argparse.Namespace) -> int:
    import dataclasses

    from dicom_node.config import DicomWebDestination, validate_ae_title
    from dicom_node.export import Peer, echo, peer_for, target_for

    cfg = _load(args.config) if args.config else None
    calling = args.calling_ae or (cfg.node.ae_title if cfg else "CTMTL")
    peer: Peer | None = None
    if cfg is not None:
        try:
            dest = cfg.destination(args.target)
        except KeyError:
            dest = None
        if isinstance(dest, DicomWebDestination):  # QIDO-RS with its own auth and TLS
            if args.calling_ae or _echo_tls_given(args):
                print(
                    f"error: {dest.name} is a DICOMweb destination: --calling-ae and --tls-* "
                    "are for DICOM peers (its url, auth, ca_file come from the config)",
                    file=sys.stderr,
                )
                return 2
            ok, message = target_for(dest, calling).check()
            print(message)
            return 0 if ok else 1
        peer = None if dest is None else peer_for(dest, calling)
    try:
        tls = _echo_tls(args)
        if peer is None:
            ae, host, port = parse_peer(args.target)
            peer = Peer(validate_ae_title(ae), host, port, validate_ae_title(calling), args.timeout)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if tls is not None:  # given on the command line: instead of a destination's own
        peer = dataclasses.replace(peer, tls=tls)
    ok, message = echo(peer)
    print(message)
    return 0 if ok else 1


#: `status --state` value for series whose current result failed to reach a destination
DELIVERY_FAILED = "delivery-failed"


def cmd_status(args: argparse.Namespace) -> int:
    from sqlalchemy import or_, select
    from sqlalchemy.orm import selectinload

    from dicom_node.db import (
        Delivery,
        DeliveryState,
        Job,
        Result,
        Series,
        SeriesState,
        refusal_summary,
    )

    with _node_db(args.config) as (_cfg, db):
        with db.session() as s:
            query = select(Series).order_by(Series.last_received_at.desc()).limit(args.limit)
            undelivered = (
                select(Result.series_id)
                .join(Delivery, Delivery.result_id == Result.id)
                .where(Delivery.state == DeliveryState.FAILED, Result.superseded.is_(False))
            )
            if args.state == DELIVERY_FAILED:
                query = query.where(Series.id.in_(undelivered))
            elif args.state == SeriesState.FAILED:  # processing failed, or a delivery did
                query = query.where(
                    or_(Series.state == SeriesState.FAILED, Series.id.in_(undelivered))
                )
            elif args.state:
                query = query.where(Series.state == args.state)
            series = list(s.scalars(query).all())
            rows = []
            for se in series:
                jobs = list(s.scalars(select(Job).where(Job.series_id == se.id).order_by(Job.id)))
                results = {
                    r.job_id: r
                    for r in s.scalars(
                        select(Result)
                        .where(Result.series_id == se.id)
                        .options(selectinload(Result.deliveries))  # read after the session
                    )
                }
                rows.append((se, jobs, results))

        def failed_to(results: dict[int, Result]) -> list[str]:
            """Destinations the current result of a series failed to reach for good."""
            return sorted(
                {
                    d.destination
                    for r in results.values()
                    if not r.superseded
                    for d in r.deliveries
                    if d.state == DeliveryState.FAILED
                }
            )

        if args.json:
            out = []
            for se, jobs, results in rows:
                out.append(
                    {
                        "series_instance_uid": se.series_instance_uid,
                        "state": se.state,
                        "delivery_failed": failed_to(results),
                        "reason": se.reason,
                        "instances": se.n_instances,
                        "refused_instances": se.refusals or {},
                        "receive_interrupted": se.receive_interrupted,
                        "calling_ae": se.calling_ae,
                        "last_received_at": se.last_received_at.isoformat(),
                        "jobs": [
                            {
                                "id": j.id,
                                "state": j.state,
                                "attempts": j.attempts,
                                "error": j.error,
                                "timings": j.timings,
                                "covid_probability": results[j.id].covid_probability
                                if j.id in results
                                else None,
                                "deliveries": [
                                    {
                                        "destination": d.destination,
                                        "state": d.state,
                                        "attempts": d.attempts,
                                        "error": d.last_error,
                                    }
                                    for d in results[j.id].deliveries
                                ]
                                if j.id in results
                                else [],
                            }
                            for j in jobs
                        ],
                    }
                )
            print(json.dumps(out, indent=1, default=str))
            return 0
        if not rows:
            print("no series received yet")
            return 0
        for se, jobs, results in rows:
            failed = failed_to(results)
            print(
                f"{se.last_received_at:%Y-%m-%d %H:%M:%S}  {se.state:<10} {se.n_instances:>4} inst"
                f"  from {se.calling_ae or '?':<16} series {se.series_instance_uid}"
                + (f"  [delivery failed: {', '.join(failed)}]" if failed else "")
            )
            if se.reason:
                print(f"    reason: {se.reason}")
            refused = refusal_summary(se.refusals)
            if refused and refused not in (se.reason or ""):
                print(f"    {refused}")
            if se.receive_interrupted:
                print(f"    last association {se.receive_interrupted}")
            for j in jobs:
                line = f"    job {j.id:<5} {j.state:<10} attempts {j.attempts}"
                if j.timings:
                    line += "  " + " ".join(
                        f"{k}={v:.1f}s" for k, v in j.timings.items() if isinstance(v, (int, float))
                    )
                print(line)
                if j.error:
                    print(f"        error: {j.error.splitlines()[0][:200]}")
                r = results.get(j.id)
                if r is not None:
                    share = r.lung_involvement_percent
                    print(
                        f"        covid_probability={r.covid_probability:.3f} "
                        f"lesion={r.lesion_volume_ml:.1f} mL "
                        f"involvement={'n/a' if share is None else f'{share:.1f} %'}"
                        + ("  (superseded)" if r.superseded else "")
                    )
                    for d in r.deliveries:
                        err = f"  {d.last_error[:300]}" if d.last_error else ""
                        print(f"        -> {d.destination:<12} {d.state:<9} {d.attempts}x{err}")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from dicom_node.config import ConfigError, effective_toml, load_config
    from dicom_node.preflight import config_problems
    from dicom_node.redact import mask_secrets

    warnings: list[str] = []
    try:
        cfg = load_config(args.path)
        problems = config_problems(cfg, connect=not args.no_connect)
        errors = [(p.key, p.message) for p in problems if p.level == "error"]
        warnings = [p.line for p in problems if p.level != "error"]
        code = 2
    except ConfigError as exc:
        errors = exc.errors
        keys = {key for key, _ in exc.errors}
        code = 3 if keys == {"(file)"} else 4 if keys == {"(syntax)"} else 2
    for line in warnings:  # e.g. the database server not reachable now: not a config error
        print(f"warning: {line}", file=sys.stderr)
    if errors:
        print(f"{args.path}: {len(errors)} error(s)", file=sys.stderr)
        for key, msg in errors:
            print(mask_secrets(f"  {key}: {' '.join(msg.split())}"), file=sys.stderr)
        return code
    if args.quiet:
        print(f"# {args.path}: valid")
        return 0
    print(f"# {args.path}: valid; effective configuration (defaults and environment applied)")
    print(effective_toml(cfg), end="")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctmtl-node",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "serve",
        help="run the node: storage SCP, completion, worker and exporter",
        description="Run the node until SIGTERM/SIGINT. Without --config the embedded "
        "defaults are used (AE CTMTL on 127.0.0.1:11112, SQLite + spool under ./var).",
    )
    p.add_argument("--config", help="node TOML config (see config/node.toml)")
    p.add_argument("--port", type=int, help="override node.port")
    p.add_argument("--no-worker", action="store_true", help="receive and queue only")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "process",
        help="process one series folder offline and print one JSON line",
        description="Read the DICOM files of one CT series from SERIES_DIR, write its SEG "
        "and SR into --out and print a JSON line with series_instance_uid, "
        "covid_probability, lesion_volume_ml, lung_involvement_percent, seg_path, sr_path. "
        "No network, no database. Exit 3 when the series is rejected.",
    )
    p.add_argument("series_dir", metavar="SERIES_DIR")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--checkpoint", help="model checkpoint (default: the shipped one)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.set_defaults(func=cmd_process)

    p = sub.add_parser(
        "evaluate",
        help="score the series COVID-19 verdict on labelled series folders",
        description="Run the node's own path (load, checks, lung mask, network, series "
        "aggregation, threshold) on every series of a labels CSV (header 'path,covid', "
        "covid 0 or 1, paths relative to the CSV or starting with $CTMTL_DATA/). A path is a "
        "DICOM series folder or an ordered stack of 8-bit lung-window PNG slices. Writes "
        "series AUC, accuracy / sensitivity / specificity at the node's threshold and each "
        "series' figures to --json, and with --report a ROC PNG, report.md and series.csv. "
        "Rejected and unreadable series are listed with their reason. Exit 0 when at least "
        "one series was scored, 1 when none was, 2 for a malformed CSV or checkpoint.",
    )
    p.add_argument("--series", required=True, metavar="LABELS.csv", help="labels CSV")
    p.add_argument("--json", required=True, metavar="OUT", help="JSON results file")
    p.add_argument("--report", metavar="DIR", help="folder for roc.png, report.md, series.csv")
    p.add_argument("--checkpoint", help="model checkpoint (default: the shipped one)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--config", help="node TOML config whose [results] thresholds apply")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "echo",
        help="C-ECHO a destination (name from the config, or AE@host:port); QIDO-RS for "
        "a DICOMweb one",
        description="Verify a peer: TARGET is a destination name from --config or "
        "AE@host:port. A DICOMweb destination is checked with QIDO-RS "
        "(GET {url}/studies?limit=1, with its auth and TLS settings). Exit 0 when the peer "
        "answers with success.",
    )
    p.add_argument("target", metavar="DEST|AE@host:port")
    p.add_argument("--config", help="node TOML config (for destination names and our AE)")
    p.add_argument("--calling-ae", help="calling AE title (default: node.ae_title or CTMTL)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    tls = p.add_argument_group(
        "DICOM TLS",
        "Any of these makes the C-ECHO go over TLS, e.g. to try a peer before adding it to "
        "the config; for a destination name they replace its configured TLS settings.",
    )
    tls.add_argument("--tls", action="store_true", help="use TLS (implied by the options below)")
    tls.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA(s) that sign the peer")
    tls.add_argument("--tls-cert", type=Path, metavar="PEM", help="our client certificate")
    tls.add_argument("--tls-key", type=Path, metavar="PEM", help="its private key")
    tls.add_argument(
        "--tls-server-name", metavar="NAME", help="name in the peer's certificate (default: host)"
    )
    tls.add_argument(
        "--tls-no-verify",
        action="store_true",
        help="do not check the peer's certificate (testing only)",
    )
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser(
        "status",
        help="recent series and their jobs: state, reason, timings, deliveries",
        description="Read the node database named by --config and list recent series.",
    )
    p.add_argument("--config", help="node TOML config (default: embedded defaults)")
    p.add_argument("--limit", type=int, default=20, help="series to show (default 20)")
    p.add_argument(
        "--state",
        help="only series in this state (receiving, queued, processing, done, rejected, "
        "failed); 'failed' also lists series whose results failed to reach a destination "
        f"for good, '{DELIVERY_FAILED}' only those",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    c = csub.add_parser(
        "check",
        help="validate a config file and print the effective configuration",
        description="Exit 0 and print the effective config (passwords masked), or exit 2 "
        "and print every error with its key path. Checks the files the config names (TLS "
        "files and key permissions, the model checkpoint's header) and tries the database: "
        "the driver, the SQLite file (opens, not emptied) or a connection to the server. A "
        "server that cannot be reached right now is a warning, not an error.",
    )
    c.add_argument("path", metavar="PATH")
    c.add_argument("--no-connect", action="store_true", help="do not connect to a database server")
    c.add_argument(
        "--quiet", "-q", action="store_true", help="do not print the effective configuration"
    )
    c.set_defaults(func=cmd_config_check)

    p = sub.add_parser(
        "worker",
        help="run a worker alone (no SCP): claims jobs from the shared database",
        description="Scale-out: run one worker process (one per GPU) against the database "
        "and spool of --config (PostgreSQL and a shared spool path for several hosts). "
        "Also sends results unless --no-export. Stops cleanly on SIGTERM after its job.",
    )
    p.add_argument("--config", required=True, help="node TOML config")
    p.add_argument("--no-export", action="store_true", help="leave sending to other nodes")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser(
        "destinations",
        help="list configured destinations and their routing; --echo verifies each",
    )
    p.add_argument("--config", help="node TOML config")
    p.add_argument(
        "--echo", action="store_true", help="C-ECHO each destination (exit 1 if any fails)"
    )
    p.set_defaults(func=cmd_destinations)

    p = sub.add_parser(
        "retry",
        help="queue a finished (failed, rejected or done) job again",
        description="Adds a new job for the job's series; the running workers pick it up. "
        "--failed does so for the last job of every series whose processing failed for "
        "good, e.g. after the model was missing: --failed --error-contains CheckpointError.",
    )
    p.add_argument("job", type=int, nargs="?", metavar="JOB", help="job id (see status)")
    p.add_argument(
        "--failed", action="store_true", help="every series whose processing failed for good"
    )
    p.add_argument(
        "--error-contains", metavar="TEXT", help="with --failed: only jobs whose error has TEXT"
    )
    p.add_argument("--config", help="node TOML config")
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser(
        "resend",
        help="send the latest result of a series again",
        description="Queues the SEG and SR of the series' latest result for its routed "
        "destinations (or --to NAME ...) with a fresh retry budget; the running node's "
        "exporter sends them. For deliveries that failed for good (status shows "
        "'[delivery failed: DEST]'; `status --state delivery-failed` lists them), a "
        "destination that was removed from the config and added again, or a PACS that lost "
        "the objects. The exporter also queues failed deliveries again by itself once their "
        "destination answers C-ECHO (export.recheck_failed_s), except objects the PACS "
        "refused by status.",
    )
    p.add_argument("series", metavar="SERIES_UID", help="Series Instance UID of the CT series")
    p.add_argument("--to", action="append", metavar="DEST", help="destination name (repeatable)")
    p.add_argument("--config", help="node TOML config")
    p.set_defaults(func=cmd_resend)

    p = sub.add_parser(
        "purge",
        help="delete spooled files of finished series older than a duration",
        description="Removes received instances and results of done/rejected/failed series "
        "last received before now minus --older-than (e.g. 30d, 12h); rows stay as audit trail.",
    )
    p.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 7d, 12h, 30m")
    p.add_argument("--config", help="node TOML config")
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser("db", help="database tools")
    dsub = p.add_subparsers(dest="db_command", required=True, metavar="SUBCOMMAND")
    d = dsub.add_parser(
        "upgrade",
        help="apply the database migrations (alembic) up to this version's schema",
    )
    d.add_argument("--config", help="node TOML config (database.url)")
    d.set_defaults(func=cmd_db_upgrade)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    no_numpy_huge_pages()  # before any command imports numpy
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        _setup_logging(args.log_level)
        code = int(args.func(args))
        sys.stdout.flush()  # a pipe closed early fails here, not at interpreter exit
    except BrokenPipeError:
        _stdout_gone()
        return 141  # 128 + SIGPIPE, as a shell reports a command that `head` cut short
    return code


def _stdout_gone() -> None:
    """The reader of stdout went away (`status | head`): exit quietly, no traceback.

    Standard output is pointed at /dev/null so that Python's flush at exit does not
    raise the same error again.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (tests)
        pass


if __name__ == "__main__":
    raise SystemExit(main())
