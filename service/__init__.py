"""FastAPI control plane; arrives with the service issue. Imports no torch, rcm_core or workers."""
