"""Fixtures for the reliability tests: bad inputs made from the real shared series with
pydicom and DCMTK, sent to real node processes and in-process nodes (issue 13)."""

from __future__ import annotations
