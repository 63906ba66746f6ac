"""Storage SCP over loopback with pynetdicom as the peer: statuses, policies, idempotence."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLosslessSV1
from pynetdicom import AE, _config
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from sqlalchemy import select, text

from dicom_node.config import NodeConfig
from dicom_node.db import Instance, Series
from dicom_node.scp import file_meta_bytes
from dicom_node.service import NodeService
from helpers import wait_for

CT = "1.2.840.10008.5.1.4.1.1.2"
SC = "1.2.840.10008.5.1.4.1.1.7"
VERIFICATION = "1.2.840.10008.1.1"


def _ae(calling: str = "TESTSCU") -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    for ts in (JPEGLosslessSV1, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ae.add_requested_context(CT, [ts])
    ae.add_requested_context(SC, [ExplicitVRLittleEndian])
    ae.add_requested_context(VERIFICATION)
    return ae


def _instances(node: NodeService) -> list[Instance]:
    with node.db.session() as s:
        return list(s.scalars(select(Instance).order_by(Instance.id)).all())


@pytest.fixture
def node(
    make_config: Callable[..., NodeConfig], start_node: Callable[..., NodeService]
) -> NodeService:
    cfg = make_config(completion={"idle_seconds": 300})
    return start_node(cfg, worker=False, exporter=False)


def test_echo_and_store_compressed_and_native(node: NodeService, covid_files: list[Path]) -> None:
    assoc = _ae().associate("127.0.0.1", node.port, ae_title="CTMTL")
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        jpeg = pydicom.dcmread(covid_files[0])
        assert jpeg.file_meta.TransferSyntaxUID == JPEGLosslessSV1
        assert assoc.send_c_store(covid_files[0]).Status == 0x0000
        native = pydicom.dcmread(covid_files[1])
        native.decompress()
        assert native.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert assoc.send_c_store(native).Status == 0x0000
    finally:
        assoc.release()
    rows = _instances(node)
    assert [r.transfer_syntax_uid for r in rows] == [JPEGLosslessSV1, ExplicitVRLittleEndian]
    for row, src in zip(rows, covid_files[:2], strict=True):
        stored = pydicom.dcmread(row.path)
        assert stored.file_meta.SourceApplicationEntityTitle == "TESTSCU"
        assert stored.file_meta.MediaStorageSOPInstanceUID == row.sop_instance_uid
        assert stored.file_meta.TransferSyntaxUID == row.transfer_syntax_uid
        expected = pydicom.dcmread(src).pixel_array
        np.testing.assert_array_equal(stored.pixel_array, expected)
        assert hashlib.sha256(Path(row.path).read_bytes()).hexdigest() == row.sha256
    # the JPEG file is kept byte for byte: same compressed pixel data as the source
    assert pydicom.dcmread(rows[0].path).PixelData == jpeg.PixelData


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "transfer_syntax", "caller"),
    [
        (CT, "1.2.3.4.5", ExplicitVRLittleEndian, "TESTSCU"),  # odd-length UIDs: padded
        (CT, "1.2.3.4.56", JPEGLosslessSV1, "ABC"),  # odd AE title: padded with a space
        (SC, "2.25.123456789012345678901234567890123", ImplicitVRLittleEndian, ""),
    ],
)
def test_file_meta_is_byte_for_byte_what_pynetdicom_writes(
    sop_class: str, sop_instance: str, transfer_syntax: str, caller: str
) -> None:
    meta = create_file_meta(
        sop_class_uid=UID(sop_class),
        sop_instance_uid=UID(sop_instance),
        transfer_syntax=UID(transfer_syntax),
    )
    meta.SourceApplicationEntityTitle = caller
    ours = file_meta_bytes(sop_class, sop_instance, transfer_syntax, caller)
    assert ours == encode_file_meta(meta)
    assert file_meta_bytes(sop_class, sop_instance + "1", transfer_syntax, caller) != ours


def test_resent_instance_is_idempotent(node: NodeService, noncovid_files: list[Path]) -> None:
    assoc = _ae().associate("127.0.0.1", node.port, ae_title="CTMTL")
    for _ in range(2):
        assert assoc.send_c_store(noncovid_files[0]).Status == 0x0000
    assoc.release()
    rows = _instances(node)
    assert len(rows) == 1 and rows[0].times_received == 2
    with node.db.session() as s:
        assert s.scalars(select(Series)).one().n_instances == 1


def test_non_ct_storage_is_received(node: NodeService, noncovid_files: list[Path]) -> None:
    ds = pydicom.dcmread(noncovid_files[0])
    ds.SOPClassUID = SC
    ds.file_meta.MediaStorageSOPClassUID = SC
    ds.Modality = "OT"
    assoc = _ae().associate("127.0.0.1", node.port, ae_title="CTMTL")
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    assert [r.sop_class_uid for r in _instances(node)] == [SC]


def test_association_policies(
    make_config: Callable[..., NodeConfig], start_node: Callable[..., NodeService]
) -> None:
    cfg = make_config(
        allowed_callers=[{"ae_title": "GOODPACS"}, {"ae_title": "PINNED", "host": "10.9.9.9"}]
    )
    node = start_node(cfg, worker=False, exporter=False)
    for calling, called in (("EVIL", "CTMTL"), ("PINNED", "CTMTL"), ("GOODPACS", "NOTME")):
        assoc = _ae(calling).associate("127.0.0.1", node.port, ae_title=called)
        assert not assoc.is_established and assoc.is_rejected, (calling, called)
    assoc = _ae("GOODPACS").associate("127.0.0.1", node.port, ae_title="CTMTL")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert node.scp is not None and node.scp.stats.rejected_associations == 3


def _file_with_bytes(
    src: Path, dest: Path, dataset_bytes: bytes | None = None, truncate_to: int | None = None
) -> Path:
    raw = src.read_bytes()
    meta_end = _meta_end(src)
    if dataset_bytes is not None:
        raw = raw[:meta_end] + dataset_bytes
    if truncate_to is not None:
        raw = raw[:truncate_to]
    dest.write_bytes(raw)
    return dest


def _meta_end(path: Path) -> int:
    with path.open("rb") as fh:
        pydicom.filereader.read_preamble(fh, False)
        pydicom.filereader._read_file_meta_info(fh)
        return fh.tell()


def test_corrupt_instances_fail_and_nothing_else_is_lost(
    node: NodeService, noncovid_files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # send files as they are on disk, without pynetdicom decoding them first
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    size = noncovid_files[2].stat().st_size
    truncated = _file_with_bytes(noncovid_files[2], tmp_path / "trunc.dcm", truncate_to=size - 4000)
    garbage = _file_with_bytes(
        noncovid_files[3],
        tmp_path / "garbage.dcm",
        dataset_bytes=b"\x08\x00\x16\x00UI\xff\xff" + b"\x17" * 600,
    )
    assoc = _ae().associate("127.0.0.1", node.port, ae_title="CTMTL")
    try:
        assert assoc.send_c_store(noncovid_files[0]).Status == 0x0000
        status = assoc.send_c_store(truncated)
        assert status.Status == 0xC000
        assert "truncated" in status.ErrorComment
        assert assoc.send_c_store(garbage).Status == 0xC000
        assert assoc.send_c_store(noncovid_files[1]).Status == 0x0000
    finally:
        assoc.release()
    rows = _instances(node)
    good = {pydicom.dcmread(f).SOPInstanceUID for f in noncovid_files[:2]}
    assert {r.sop_instance_uid for r in rows} == good
    assert len(list(node.spool.incoming.rglob("*.dcm"))) == 2
    assert not list(node.spool.incoming.rglob("*.part"))


def test_dataset_mismatch_statuses(
    node: NodeService, noncovid_files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_series = pydicom.dcmread(noncovid_files[0])
    del no_series.SeriesInstanceUID
    bad_uid = pydicom.dcmread(noncovid_files[1])
    bad_uid.StudyInstanceUID = "1.2.3/../../etc"
    other = pydicom.dcmread(noncovid_files[2])
    other.file_meta.MediaStorageSOPInstanceUID = "1.2.3.999"  # command UID != data set UID
    other_path = tmp_path / "other.dcm"
    other.save_as(other_path)
    assoc = _ae().associate("127.0.0.1", node.port, ae_title="CTMTL")
    try:
        status = assoc.send_c_store(no_series)
        assert status.Status == 0xA900 and "Series Instance UID" in status.ErrorComment
        assert assoc.send_c_store(bad_uid).Status == 0xA900
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
        status = assoc.send_c_store(other_path)
        assert status.Status == 0xA900 and "differs" in status.ErrorComment
    finally:
        assoc.release()
    assert _instances(node) == []
    assert not list(node.spool.root.rglob("*.dcm"))


def test_out_of_resources_when_spool_is_full(
    make_config: Callable[..., NodeConfig],
    start_node: Callable[..., NodeService],
    noncovid_files: list[Path],
) -> None:
    node = start_node(make_config(spool={"min_free_mb": 10**12}), worker=False, exporter=False)
    assoc = _ae().associate("127.0.0.1", node.port, ae_title="CTMTL")
    status = assoc.send_c_store(noncovid_files[0])
    assoc.release()
    assert status.Status == 0xA700
    assert _instances(node) == []


def test_out_of_resources_when_database_fails(
    node: NodeService, noncovid_files: list[Path]
) -> None:
    assoc = _ae().associate("127.0.0.1", node.port, ae_title="CTMTL")
    assert assoc.send_c_store(noncovid_files[0]).Status == 0x0000
    with node.db.engine.begin() as conn:  # a broken database: the instances table is gone
        conn.execute(text("ALTER TABLE instances RENAME TO instances_gone"))
    status = assoc.send_c_store(noncovid_files[1])
    assoc.release()
    assert status.Status == 0xA700
    # the file of the failed store is removed again; the earlier one is untouched
    files = list(node.spool.incoming.rglob("*.dcm"))
    assert [f.stem for f in files] == [pydicom.dcmread(noncovid_files[0]).SOPInstanceUID]


class _Relay:
    """A TCP relay between a peer and the node that forwards the peer's bytes in small
    pieces with pauses between them, so that the node's reads see each PDU arrive in many
    segments, and that closes both ends once `cut_after` bytes went through (if given)."""

    def __init__(self, node_port: int, piece: int = 1400, cut_after: int | None = None) -> None:
        self.node_port = node_port
        self.piece = piece
        self.cut_after = cut_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.forwarded = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        peer, _ = self.listener.accept()
        node = socket.create_connection(("127.0.0.1", self.node_port))
        for s in (peer, node):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        back = threading.Thread(target=self._pipe, args=(node, peer, False), daemon=True)
        back.start()
        self._pipe(peer, node, True)
        for s in (peer, node):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        back.join(5)

    def _pipe(self, src: socket.socket, dst: socket.socket, dribble: bool) -> None:
        try:
            while data := src.recv(self.piece if dribble else 65536):
                if dribble and self.cut_after is not None:
                    data = data[: self.cut_after - self.forwarded]
                dst.sendall(data)
                if dribble:
                    self.forwarded += len(data)
                    if self.forwarded == self.cut_after:
                        return
                    time.sleep(0.0005)
        except OSError:
            return

    def close(self) -> None:
        self.listener.close()
        self._thread.join(10)


def test_pdus_arriving_in_small_segments_are_stored_whole(
    node: NodeService, noncovid_files: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """The node reads a PDU with as few calls as it can (`_BulkReadSocket`); a PDU that
    trickles in, 1,400 bytes at a time, must still come out byte for byte; a connection cut
    in the middle of one stores nothing and leaves the node serving."""
    relay = _Relay(node.port)
    assoc = _ae().associate("127.0.0.1", relay.port, ae_title="CTMTL")
    assert assoc.is_established
    assert assoc.send_c_store(noncovid_files[0]).Status == 0x0000
    assoc.release()
    relay.close()
    assert relay.forwarded > 500_000  # a 512 x 512 slice went through in pieces
    [row] = _instances(node)
    stored = pydicom.dcmread(row.path)
    source = pydicom.dcmread(noncovid_files[0])
    assert stored.SOPInstanceUID == source.SOPInstanceUID
    assert stored.PixelData == source.PixelData

    cut = _Relay(node.port, cut_after=300_000)  # inside the second slice's P-DATA
    assoc = _ae().associate("127.0.0.1", cut.port, ae_title="CTMTL")
    assert assoc.is_established
    status = assoc.send_c_store(noncovid_files[1])
    assert not status  # no answer: the connection is gone
    assoc.release()
    cut.close()
    # the short read reaches pynetdicom as such (not as a PDU padded out with zeros)
    short = "The received PDU is shorter than expected"
    wait_for(lambda: short in caplog.text, 10, "the node's DUL to see the short PDU")
    assert [r.sop_instance_uid for r in _instances(node)] == [row.sop_instance_uid]

    assoc = _ae().associate("127.0.0.1", node.port, ae_title="CTMTL")
    assert assoc.send_c_store(noncovid_files[1]).Status == 0x0000
    assoc.release()
    assert len(_instances(node)) == 2
    assert not list(node.spool.incoming.rglob("*.part"))
