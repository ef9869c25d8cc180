"""Where a run's output lives: protocols in :mod:`batch.storage.base`, one module per storage."""
