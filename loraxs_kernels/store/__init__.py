"""Many adapters behind one model: AdapterStore (store.py) and its parts."""

from .store import AdapterStore

__all__ = ["AdapterStore"]
