"""moto_server whose ranged GETs read only the range.

moto answers `GET /bucket/key` with `Range: bytes=A-B` by reading the whole object into memory
and slicing it, so every 8 MiB range of a 2 GiB blob costs a 2 GiB copy: the model-weight tests
would measure moto, not the agent. This launcher runs moto's own server with one change: for a
GET with a Range header, the object's bytes are handed to moto's range handling as a view that
reads (under the object's lock, as moto's own reads do) only the slice asked for. Everything
else, including the answer's status, headers and error cases, is moto's.

Usage: python3 moto_server.py [moto_server arguments], with moto installed.
"""

import sys

from moto.s3 import responses
from moto.server import main


class _RangedValue:
    """An object's bytes that are read only where sliced."""

    def __init__(self, key):
        self._key = key

    def __len__(self):
        return self._key.size

    def __bool__(self):
        return self._key.size > 0

    def __getitem__(self, index):
        if not isinstance(index, slice):
            raise TypeError("object bytes are only sliced")
        start, stop, _ = index.indices(self._key.size)
        with self._key.lock:
            buffer = self._key._value_buffer
            buffer.seek(start)
            return buffer.read(max(0, stop - start))


class _RangedKey:
    """A key whose `value` is a `_RangedValue`; every other attribute is the key's."""

    def __init__(self, key):
        self._key = key

    def __getattr__(self, name):
        if name == "value":
            return _RangedValue(self._key)
        return getattr(self._key, name)


_get_object = responses.S3Response.get_object


def _get_object_reading_only_the_range(self):
    if self.headers.get("range"):
        get_key = self._get_key

        def ranged_key(*args, **kwargs):
            key, not_modified = get_key(*args, **kwargs)
            return _RangedKey(key), not_modified

        self._get_key = ranged_key
    return _get_object(self)


responses.S3Response.get_object = _get_object_reading_only_the_range

if __name__ == "__main__":
    sys.exit(main())
