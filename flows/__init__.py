"""Prefect flows and deployments."""

import v2m  # noqa: F401  first: gives this process its numba cache slot before librosa compiles anything
