"""Devices: `cutegrad.device("cuda:0")`, with a backend index for dispatch."""

CPU, CUDA = 0, 1  # backend indices into every kernel table
_TYPES = {"cpu": CPU, "cuda": CUDA}


class device:
    __slots__ = ("type", "index", "backend")

    def __new__(cls, spec="cpu", index=None):
        if isinstance(spec, device):
            return spec
        if isinstance(spec, int):
            spec, index = "cuda", spec
        if not isinstance(spec, str):
            raise TypeError(f"device must be a string, int or cutegrad.device, got {type(spec).__name__}")
        kind, _, idx = spec.partition(":")
        if kind not in _TYPES:
            raise ValueError(f"unknown device type {kind!r} in {spec!r}; expected 'cpu' or 'cuda[:N]'")
        if idx:
            if not idx.isdigit():
                raise ValueError(f"bad device index in {spec!r}")
            index = int(idx)
        if kind == "cpu":
            index = None
        elif index is None:
            index = 0
        key = (kind, index)
        cached = _CACHE.get(key)
        if cached is not None:
            return cached
        self = object.__new__(cls)
        self.type, self.index, self.backend = kind, index, _TYPES[kind]
        _CACHE[key] = self
        return self

    def __repr__(self):
        return f"device(type='{self.type}')" if self.index is None else f"device(type='{self.type}', index={self.index})"

    def __str__(self):
        return self.type if self.index is None else f"{self.type}:{self.index}"

    def __eq__(self, other):
        if isinstance(other, str):
            other = device(other)
        return isinstance(other, device) and self.type == other.type and self.index == other.index

    def __hash__(self):
        return hash((self.type, self.index))

    def __reduce__(self):
        return (device, (str(self),))


_CACHE = {}
cpu = device("cpu")
