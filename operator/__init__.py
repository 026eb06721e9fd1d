"""Kubernetes operator for AugmentSearch and Pretrain custom resources (kopf)."""
