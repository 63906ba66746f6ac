"""A node process under systemd-like control: SIGHUP reloads the config without dropping
associations; SIGTERM lets the running association finish and refuses new ones."""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from helpers import free_port, port_open, wait_for
from ops.conftest import base_sections, send_files, write_toml
from ops.synth import write_series

pytestmark = pytest.mark.slow


def open_association(port: int, calling_ae: str) -> Any:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="CTMTL")
    assert assoc.is_established
    return assoc


def node_config(tmp_path: Path, port: int, callers: list[str], stop_s: float = 10) -> Path:
    node = {"ae_title": "CTMTL", "port": port, "stop_timeout_s": stop_s}
    data = base_sections(tmp_path, node=node)
    data["allowed_callers"] = [{"ae_title": ae} for ae in callers]
    return write_toml(tmp_path / "node.toml", data)


def test_sighup_reloads_without_dropping_associations(node_process: Any, tmp_path: Path) -> None:
    port = free_port()
    cfg = node_config(tmp_path, port, ["FIRST"])
    node = node_process("serve", "--no-worker", "--config", str(cfg))
    wait_for(lambda: port_open(port), 60, "node listening")
    # a long-lived process: its start-up is kept out of the collector's full passes
    wait_for(lambda: "start-up objects kept out of garbage collection" in node.log(), 30, "gc")
    _, files = write_series(tmp_path / "s", n_slices=4, size=32)

    assert send_files(port, files[:1], "SECOND") == []  # not allowed yet
    assoc = open_association(port, "FIRST")  # stays open across the reload
    assert assoc.send_c_store(pydicom.dcmread(files[0])).Status == 0

    node_config(tmp_path, port, ["FIRST", "SECOND"])
    node.signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in node.log(), 30, "the reload")
    assert send_files(port, files[1:2], "SECOND") == [0]
    assert assoc.send_c_store(pydicom.dcmread(files[2])).Status == 0  # the old association
    assoc.release()

    # a broken file is refused and the running config stays
    cfg.write_text("[node\n")
    node.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in node.log(), 30, "the refused reload")
    assert send_files(port, files[3:4], "SECOND") == [0]

    # a setting that needs a restart is reported, the node keeps its port
    node_config(tmp_path, free_port(), ["FIRST", "SECOND"])
    node.signal(signal.SIGHUP)
    wait_for(lambda: node.log().count("configuration reloaded") == 2, 30, "the second reload")
    assert "node.port changed; takes effect after a restart" in node.log()
    assert port_open(port)
    assert node.alive()
    assert node.stop(30) == 0


def test_sigterm_lets_the_running_association_finish(node_process: Any, tmp_path: Path) -> None:
    port = free_port()
    cfg = node_config(tmp_path, port, ["MODALITY"], stop_s=60)
    node = node_process("serve", "--no-worker", "--config", str(cfg))
    wait_for(lambda: port_open(port), 60, "node listening")
    _, files = write_series(tmp_path / "s", n_slices=6, size=32)
    assoc = open_association(port, "MODALITY")
    assert assoc.send_c_store(pydicom.dcmread(files[0])).Status == 0
    node.signal(signal.SIGTERM)
    wait_for(lambda: not port_open(port), 30, "the listener to close")
    assert node.alive()
    for f in files[1:]:  # the transfer goes on to its end
        time.sleep(0.2)
        assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0
    assoc.release()
    node.proc.wait(30)
    assert node.proc.returncode == 0
    assert "waiting up to" in node.log()
    assert len(list((tmp_path / "spool" / "incoming").rglob("*.dcm"))) == 6


def test_a_killed_node_keeps_every_instance_it_acknowledged(
    node_process: Any, tmp_path: Path
) -> None:
    """SIGKILL while three associations deliver (rows committed together by the index
    writer): after a restart, every instance answered with 0x0000 has its row and its
    file, byte for byte; what was cut off was never acknowledged."""
    port = free_port()
    cfg = node_config(tmp_path, port, ["KILLTEST"])
    node = node_process("serve", "--no-worker", "--config", str(cfg))
    wait_for(lambda: port_open(port), 60, "node listening")
    series = [write_series(tmp_path / f"s{k}", n_slices=60, size=128, seed=k) for k in range(3)]
    acked: list[str] = []
    lock = threading.Lock()

    def deliver(files: list[Path]) -> None:
        assoc = open_association(port, "KILLTEST")
        try:
            for path in files:
                ds = pydicom.dcmread(path)
                status = assoc.send_c_store(ds)
                if getattr(status, "Status", None) != 0:
                    return  # the node is gone: this one was not acknowledged
                with lock:
                    acked.append(str(ds.SOPInstanceUID))
        finally:
            assoc.abort()

    senders = [threading.Thread(target=deliver, args=(files,)) for _, files in series]
    for t in senders:
        t.start()
    wait_for(lambda: len(acked) >= 45, 60, "45 acknowledged instances")
    node.signal(signal.SIGKILL)
    for t in senders:
        t.join(60)
    with lock:
        kept = list(acked)
    assert 45 <= len(kept) < 180, len(kept)  # killed mid-delivery

    from dicom_node.db import Database, Instance

    db = Database(f"sqlite:///{tmp_path / 'spool' / 'ctmtl-node.db'}")
    try:
        with db.session() as s:
            rows = {r.sop_instance_uid: r for r in s.query(Instance).all()}
    finally:
        db.dispose()
    missing = [uid for uid in kept if uid not in rows]
    assert missing == []
    for uid in kept:
        data = Path(rows[uid].path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == rows[uid].sha256
        assert pydicom.dcmread(rows[uid].path).SOPInstanceUID == uid

    restarted = node_process("serve", "--no-worker", "--config", str(cfg), name="restarted")
    wait_for(lambda: port_open(port), 60, "node listening again")
    assert restarted.alive()
    assert restarted.stop(30) == 0
