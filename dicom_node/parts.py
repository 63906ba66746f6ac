"""`NodePart`: what each part of a node process holds (SCP, completion, worker, exporter)."""

from __future__ import annotations

from dicom_node.config import NodeConfig
from dicom_node.db import Database
from dicom_node.metrics import NodeMetrics
from dicom_node.spool import Spool


class NodePart:
    """The process's config, database, spool (where the part uses one) and metrics.

    `config` is replaced as a whole when the config file is reloaded
    (`dicom_node.admin.reload_service`); a part reads it anew for each association,
    series, job or delivery. Without `metrics` the part counts into a registry of its own.
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
