"""The pipeline steps: data, training, evaluation, registry (plain functions, thin Prefect task wrappers)."""

import v2m  # noqa: F401  first: gives this process its numba cache slot before librosa compiles anything
