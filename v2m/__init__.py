"""voice2music's ground floor. Importing it gives this process its own numba cache slot (see numba_cache.py)
before any librosa code is compiled: every entry point (CLI, DVC stages, pool workers, flows) imports v2m."""

from v2m import numba_cache

numba_cache.claim()
