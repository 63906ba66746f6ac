"""`NodePart`: what each part of a node process holds (SCP, completion, worker, exporter)."""

from __future__ import annotations

from dicom_node.backoff import LoopGuard, NodeFaults, faults_for
from dicom_node.config import NodeConfig
from dicom_node.db import Database
from dicom_node.metrics import NodeMetrics
from dicom_node.spool import Spool


class NodePart:
    """The process's config, database, spool (where the part uses one) and metrics.

    `config` is replaced as a whole when the config file is reloaded
    (`dicom_node.admin.reload_service`); a part reads it anew for each association,
    series, job or delivery. Without `metrics` the part counts into a registry of its own.
    `faults` are the latches (database unavailable, disk full) that all parts sharing the
    same `Database` object share (`dicom_node.backoff`).
    """

    def __init__(
        self,
        config: NodeConfig,
        db: Database,
        spool: Spool | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.config = config
        self.db = db
        self.spool = spool
        self.metrics = metrics or NodeMetrics()
        #: database outage / disk full, shared by the parts of this process using `db`
        self.faults: NodeFaults = faults_for(db)
        self.metrics.watch_faults(self.faults)

    def loop_guard(self, name: str) -> LoopGuard:
        """Backoff and once-per-state-change logging for this part's polling loop."""
        b = self.config.backoff
        return LoopGuard(name, self.faults, b.initial_s, b.max_s)
