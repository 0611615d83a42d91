"""The one cache helper: a small least-recently-used map.

fastguide caches what is expensive to rebuild and cheap to keep: built loop specs, device tables,
compiled stage bodies, CUDA graphs, constant scale vectors. Each is an ``LRUCache`` with its own size.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterator, Optional


class LRUCache:
    """A map of at most ``maxsize`` entries; a hit makes an entry the newest, a put beyond the size evicts
    the oldest (``on_evict(value)`` is called for each evicted value, e.g. to free a CUDA graph).

    >>> cache = LRUCache(2)
    >>> cache.put("a", 1); cache.put("b", 2); cache.get("a"); cache.put("c", 3)
    >>> list(cache.keys())        # "b" was the least recently used
    ['a', 'c']
    """

    def __init__(self, maxsize: int, on_evict: Optional[Callable[[Any], None]] = None):
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self.on_evict = on_evict
        self._data: "OrderedDict[Hashable, Any]" = OrderedDict()

    def get(self, key: Hashable, default: Any = None) -> Any:
        value = self._data.get(key, _MISSING)
        if value is _MISSING:
            return default
        self._data.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Any) -> Any:
        """Store ``value`` as the newest entry and return it."""
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            _, old = self._data.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(old)
        return value

    def get_or_build(self, key: Hashable, build: Callable[[], Any]) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            value = self.put(key, build())
        return value

    def clear(self) -> None:
        while self._data:
            _, old = self._data.popitem()
            if self.on_evict is not None:
                self.on_evict(old)

    def keys(self) -> Iterator[Hashable]:
        return iter(list(self._data))

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data


_MISSING = object()
