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

from dicom_node.completion import CompletionMonitor
from dicom_node.config import NodeConfig
from dicom_node.db import Database
from dicom_node.export import Exporter
from dicom_node.metrics import MetricsServer, NodeMetrics
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
        self.db = Database(config.database_url, echo=config.database.echo)
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

    def start(self) -> None:
        self.spool.ensure()
        self.db.upgrade()
        logger.info(
            "database %s at revision %s; spool %s",
            _safe_url(self.config.database_url),
            self.db.current_revision(),
            self.spool.root,
        )
        from dicom_node.admin import attach_observability

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
        if self.scp is not None:
            self.scp.start()

    @property
    def port(self) -> int:
        return self.scp.port if self.scp is not None else 0

    def stop(self, timeout: float | None = None) -> None:
        if self._stopped:
            return
        self._stopped = True
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


def _safe_url(url: str) -> str:
    """The URL without its password, for logs."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]
