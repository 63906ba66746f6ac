"""Tests of the DICOM node (networking half: config, db, SCP, completion, worker, export)."""
