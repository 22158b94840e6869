"""Receive -> persist: DIMSE and DICOMweb ingest share one storage path."""
