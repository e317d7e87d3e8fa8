"""Offline validation of the deployment files and the KubeRay backend (no Docker engine or cluster here)."""
