"""`serve`: the SCP, completion monitor, worker and exporter of one node process.

Each part runs in its own thread and talks to the others only through the database,
so the same parts can later run as separate processes (an SCP-only node and GPU
workers sharing PostgreSQL and the spool). `stop()` closes the SCP first (no new
instances), then lets the worker finish or hand back its job (an unfinished job keeps
its lease and is taken up again after restart) and the exporter finish its sends.
SIGHUP re-reads the config file (`dicom_node.admin.reload_service`); the metrics and
health endpoint is attached by `dicom_node.admin.attach_observability`.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from dicom_node.completion import CompletionMonitor
from dicom_node.config import NodeConfig, StartupError
from dicom_node.db import Database
from dicom_node.export import Exporter
from dicom_node.metrics import MetricsServer, NodeMetrics
from dicom_node.redact import mask_secrets
from dicom_node.results import preload_result_tables
from dicom_node.runtime import freeze_startup_objects
from dicom_node.scp import StorageSCP
from dicom_node.spool import Spool
from dicom_node.worker import PredictorFactory, Worker

logger = logging.getLogger(__name__)


class NodeService:
    """One node process. `start()` returns once everything listens; `stop()` is idempotent."""

    def __init__(
        self,
        config: NodeConfig,
        predictor_factory: PredictorFactory | None = None,
        scp: bool = True,
        worker: bool | None = None,
        exporter: bool | None = None,
        config_path: str | Path | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path  # re-read on SIGHUP
        self.db = _open_database(config)
        self._default_model = predictor_factory is None  # checked and loaded by start()
        self.spool = Spool(config.spool.path, config.spool.min_free_mb)
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.metrics = NodeMetrics()
        self.metrics_server: MetricsServer | None = None
        m = self.metrics
        self.scp = StorageSCP(config, self.db, self.spool, metrics=m) if scp else None
        self.completion = CompletionMonitor(config, self.db, self.spool, metrics=m) if scp else None
        run_worker = config.worker.enabled if worker is None else worker
        run_export = config.export.enabled if exporter is None else exporter
        self.worker = (
            Worker(config, self.db, self.spool, predictor_factory, metrics=m)
            if run_worker
            else None
        )
        self.exporter = Exporter(config, self.db, metrics=m) if run_export else None
        self._threads: list[threading.Thread] = []
        self._stopped = False
        self._started = False

    def start(self) -> None:
        """Check what this process needs, then start its parts; `StartupError` if it can't.

        Nothing runs before the checks pass (`dicom_node.preflight`): TLS files, the model
        checkpoint (and, for a worker, the model itself, loaded here), the database
        (integrity, connection, schema) and the spool. Only then the SCP binds its ports (a
        port in use ends the start here, with no thread running) and the threads start, so a
        node that cannot process never accepts an instance.
        """
        from dicom_node.preflight import describe_db_error, raise_for, startup_problems

        cfg = self.config
        raise_for(
            startup_problems(
                cfg,
                inbound_tls=self.scp is not None,
                outbound_tls=self.exporter is not None,
                model=self.worker is not None and self._default_model,
            )
        )
        try:
            self.spool.ensure()
        except OSError as exc:
            raise StartupError(
                f"spool.path: cannot create the spool folders in {self.spool.root}: "
                f"{exc.strerror or exc}",
                exit_code=2,
            ) from exc
        try:
            self.db.upgrade()
            revision = self.db.current_revision()
        except SQLAlchemyError as exc:
            line, transient = describe_db_error(exc)
            raise StartupError(
                f"database.url: cannot bring the schema of {mask_secrets(cfg.database_url)} "
                f"up to date: {line}",
                exit_code=1 if transient else 2,
            ) from exc
        logger.info(
            "database %s at revision %s; spool %s",
            mask_secrets(cfg.database_url),
            revision,
            self.spool.root,
        )
        if self.worker is not None and self._default_model:
            self._load_model()
        from dicom_node.admin import attach_observability

        self._started = True  # from here on stop() has parts to stop
        if self.scp is not None:  # bind first: a port in use stops the start before any thread
            self.scp.start()
        self.metrics_server = attach_observability(self)
        parts: list[tuple[str, Callable[[threading.Event], None]]] = []
        if self.completion is not None:
            parts.append(("completion", self.completion.run))
        if self.worker is not None:
            parts.append(("worker", self.worker.run))
        if self.exporter is not None:
            parts.append(("exporter", self.exporter.run))
        for name, target in parts:
            thread = threading.Thread(
                target=target, args=(self.stop_event,), name=name, daemon=True
            )
            thread.start()
            self._threads.append(thread)

    @property
    def port(self) -> int:
        return self.scp.port if self.scp is not None else 0

    def stop(self, timeout: float | None = None) -> None:
        if self._stopped:
            return
        self._stopped = True
        if not self._started:  # refused by the start-up checks: nothing runs
            self.db.dispose()
            return
        logger.info("node stopping")
        if self.scp is not None:
            self.scp.stop()
        self.stop_event.set()
        for thread in self._threads:
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("%s thread did not stop within %s s", thread.name, timeout)
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        self.db.dispose()
        logger.info("node stopped")

    def reload(self) -> bool:
        """Apply the config file again without stopping anything (SIGHUP)."""
        from dicom_node.admin import reload_service

        return reload_service(self, self.config_path)

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then stop cleanly."""

        def _handler(signum: int, _frame: FrameType | None) -> None:
            logger.info("signal %s received", signal.Signals(signum).name)
            self.stop_event.set()

        def _hup(_signum: int, _frame: FrameType | None) -> None:
            self.reload_event.set()

        previous: dict[signal.Signals, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _handler)
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, _hup)
        try:
            self.start()
            freeze_startup_objects()  # this process lives on: keep its start-up out of gc
            while not self.stop_event.wait(0.5):
                if self.reload_event.is_set():
                    self.reload_event.clear()
                    logger.info("SIGHUP received: reloading %s", self.config_path)
                    self.reload()
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def __enter__(self) -> NodeService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _load_model(self) -> None:
        """Load the worker's model now, in this thread: a model that does not load stops
        the start instead of failing every job."""
        from dicom_node.preflight import checkpoint_path, one_line
        from mtl_model.checkpoint import CheckpointError
        from mtl_model.openvino_engine import EngineError

        assert self.worker is not None
        try:
            predictor = self.worker.predictor
            warm = self.config.model.warm_up
            device = getattr(getattr(predictor, "device", None), "type", "cpu")
            if warm == "yes" or (warm == "auto" and device != "cpu"):
                predictor.warm_up()
            preload_result_tables()
        except CheckpointError as exc:
            raise StartupError(f"model.checkpoint: {one_line(str(exc))}", exit_code=2) from exc
        except EngineError as exc:  # e.g. engine "openvino" without the package
            raise StartupError(f"model.engine: {one_line(str(exc))}", exit_code=2) from exc
        except Exception as exc:
            path = checkpoint_path(self.config)
            raise StartupError(
                f"model: cannot load checkpoint {path} on device {self.config.model.device}: "
                f"{type(exc).__name__}: {one_line(str(exc))}",
                exit_code=2,
            ) from exc


def _open_database(config: NodeConfig) -> Database:
    """The `Database` of the config; a bad URL or a missing driver is a `StartupError`."""
    from dicom_node.preflight import database_url_problems, raise_for

    raise_for(database_url_problems(config.database_url))
    try:
        return Database(config.database_url, echo=config.database.echo)
    except OSError as exc:  # the SQLite file's folder cannot be made
        raise StartupError(
            f"database.url: cannot create the folder of {mask_secrets(config.database_url)}: "
            f"{exc.strerror or exc}",
            exit_code=2,
        ) from exc
