"""HTTP: REST API, DICOMweb and dashboard (one router per resource)."""
