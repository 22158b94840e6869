"""pacs-node: a PACS-integrated AI node that finds anomalies in medical images."""

__version__ = "0.1.0"
